-- 018_rollups.sql — the views of 002 (and 014's status_counts) on a long
-- history. They aggregated every task row on each read: 0.1 to 2.5 s at a
-- million tasks. Now each reads a roll-up of the finished tasks plus the
-- few rows that are not final: 0.5 to 56 ms there (docs/benchmarks.md,
-- "Views on a long history: roll-ups").
--
-- * A finished task no longer changes, so what it adds to a view is
--   known once it is final. Three row triggers on agentq.tasks (which
--   also send 016's NOTIFY agentq_final, in place of its two) append
--   that contribution to agentq.rollup_pending: +1 row when a row becomes
--   (or is inserted) final, -1 row with the old values when a final row
--   changes or is deleted (prune, a requeue, an UPDATE by hand), and so
--   both for a final row that changes again. The triggers' WHEN clauses
--   keep them off the updates of running tasks (every step's progress),
--   so a task's run appends one row in all.
-- * Appending never waits on another writer: no row is shared. Every
--   1024th append folds the pending rows into the roll-up tables
--   (agentq.rollups_flush()) under a lock that is only tried: when
--   another transaction is folding, this one goes on and a later append
--   folds. The fold is one statement (delete the committed pending rows,
--   add them to the roll-ups), so a reader sees each delta exactly once,
--   in the pending rows or in the roll-ups.
-- * Each view adds the roll-up, the pending rows and the tasks that are
--   not final (queued, running, retrying, waiting; tasks_status_idx finds
--   them), so it says exactly what the old whole-history query said, with
--   one exception: `latency_percentiles` for period 'all' reads 1 %-wide
--   logarithmic buckets of the wait and run times, and its percentiles are
--   within 1 % of percentile_cont's (values under 1 ms count as 0).
--   Period 'last_hour' stays exact, read through tasks_finished_at_idx (a
--   final task that started in the last hour finished after it).
-- * first_enqueued_at and last_finished_at of usage_by_user are one index
--   probe each per user: tasks_user_listed_idx (017) gives the first
--   enqueued_at, tasks_user_finished_idx (new, in place of 001's
--   tasks_user_id_idx, which it serves as well) the last finished_at. A
--   minimum or maximum cannot be taken back when a row goes, so they are
--   not rolled up.
-- * agentq.rollups_rebuild() recomputes every roll-up from the tasks (this
--   migration calls it once; about 7 s per million tasks). A TRUNCATE of
--   agentq.tasks empties them. Rows loaded with triggers off
--   (session_replication_role = replica, as a restore does) need a
--   rebuild afterwards.
--
-- The index swap and the rebuild run in this migration's transaction and
-- hold agentq.tasks' writers meanwhile: on a large live database, build
-- tasks_user_finished_idx beforehand with CREATE INDEX CONCURRENTLY (then
-- the CREATE here is a no-op) and migrate when the fleet is quiet.
--
-- What it costs a task: one pending row (about 100 bytes) when it ends,
-- and a fold's share (a thousandth of a fold of 1024 rows, about 6 ms):
-- 2.2 % more PostgreSQL instructions for a task's writes (bench/write-cost).
-- agentq.is_final
-- loses STRICT here: with it PostgreSQL did not inline the function and
-- called it for each row of each WHEN, claim and view; the answer is the
-- same for every input, NULL included.
--
-- Owned by the schema (the views are the contract's, docs/contract.md).

CREATE OR REPLACE FUNCTION agentq.is_final(status text) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT status IN ('completed', 'failed', 'timeout', 'budget_exceeded',
                      'max_steps', 'cancelled', 'expired', 'rejected')
$$;

-- ----------------------------------------------------------- indexes --

DROP INDEX IF EXISTS agentq.tasks_user_id_idx;
CREATE INDEX IF NOT EXISTS tasks_user_finished_idx ON agentq.tasks (user_id, finished_at);

-- ------------------------------------------------------------ tables --

-- A latency in seconds as a bucket: 0 for |s| < 1 ms; otherwise
-- sign(s) * (1 + floor(log base 1.01 of |s| / 1 ms)), so bucket b > 0
-- holds [1 ms * 1.01^(b-1), 1 ms * 1.01^b). Buckets sort as their values.
CREATE FUNCTION agentq.latency_bucket(seconds double precision) RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT CASE WHEN abs(seconds) < 0.001 THEN 0
                ELSE (sign(seconds) * (1 + floor(ln(abs(seconds) / 0.001) / ln(1.01))))::integer END
$$;

-- The value `frac` (0 to 1) of the way through a bucket, in seconds.
CREATE FUNCTION agentq.latency_bucket_value(bucket integer, frac double precision)
RETURNS double precision
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT CASE WHEN bucket = 0 THEN 0
                WHEN bucket > 0 THEN 0.001 * 1.01 ^ (bucket - 1 + frac)
                ELSE -(0.001 * 1.01 ^ (-bucket - frac)) END
$$;

-- Percentiles of a histogram as percentile_cont takes them: rank
-- p * (n - 1) between the two values around it, each value the middle of
-- its share of its bucket. p_buckets ascending, p_counts > 0.
CREATE FUNCTION agentq.histogram_percentiles(p_buckets integer[], p_counts bigint[],
                                             p_fractions double precision[])
RETURNS double precision[]
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE
AS $$
DECLARE
    total  bigint := 0;
    result double precision[] := '{}';
    f      double precision;
    r      double precision;
    lo     bigint;
    v      double precision[];
    k      bigint;
    want   bigint[];
    before bigint;
    i      integer;
    j      integer;
BEGIN
    FOR i IN 1 .. coalesce(array_length(p_counts, 1), 0) LOOP
        total := total + p_counts[i];
    END LOOP;
    IF total <= 0 THEN
        RETURN array_fill(NULL::double precision, ARRAY[array_length(p_fractions, 1)]);
    END IF;
    FOREACH f IN ARRAY p_fractions LOOP
        r := f * (total - 1);
        lo := floor(r)::bigint;
        want := ARRAY[lo, least(lo + 1, total - 1)];
        v := '{}';
        FOREACH k IN ARRAY want LOOP
            before := 0;
            FOR j IN 1 .. array_length(p_counts, 1) LOOP
                IF k < before + p_counts[j] THEN
                    v := v || agentq.latency_bucket_value(p_buckets[j], (k - before + 0.5) / p_counts[j]);
                    EXIT;
                END IF;
                before := before + p_counts[j];
            END LOOP;
        END LOOP;
        result := result || (v[1] + (r - lo) * (v[2] - v[1]));
    END LOOP;
    RETURN result;
END
$$;

-- A final task's contribution, +1 (added) or -1 (taken back).
CREATE TABLE agentq.rollup_pending (
    sign              smallint NOT NULL CHECK (sign IN (-1, 1)),
    user_id           text NOT NULL,
    status            text NOT NULL,
    finished_minute   timestamptz,
    steps             integer NOT NULL,
    prompt_tokens     bigint NOT NULL,
    completion_tokens bigint NOT NULL,
    cost_usd          numeric(14,8) NOT NULL,
    wait_bucket       integer,
    run_bucket        integer
);
CREATE SEQUENCE agentq.rollup_pending_seq;

-- A task row's contribution as a pending row, for the triggers and the
-- rebuild alike. SETOF (one row), so that PostgreSQL inlines it in FROM.
CREATE FUNCTION agentq.rollup_delta(p_sign smallint, t agentq.tasks)
RETURNS SETOF agentq.rollup_pending
LANGUAGE sql STABLE PARALLEL SAFE ROWS 1
AS $$
    SELECT p_sign, t.user_id, t.status, date_trunc('minute', t.finished_at), t.steps,
           t.prompt_tokens, t.completion_tokens, t.cost_usd,
           agentq.latency_bucket(extract(epoch FROM t.started_at - t.enqueued_at)::double precision),
           agentq.latency_bucket(extract(epoch FROM t.finished_at - t.started_at)::double precision)
$$;

-- The final tasks, per user.
CREATE TABLE agentq.rollup_usage (
    user_id           text PRIMARY KEY,
    tasks             bigint NOT NULL,
    completed         bigint NOT NULL,
    failed            bigint NOT NULL,
    steps             bigint NOT NULL,
    prompt_tokens     bigint NOT NULL,
    completion_tokens bigint NOT NULL,
    cost_usd          numeric NOT NULL
);

-- The final tasks, per minute of finished_at and status.
CREATE TABLE agentq.rollup_throughput (
    minute   timestamptz NOT NULL,
    status   text NOT NULL,
    tasks    bigint NOT NULL,
    tokens   bigint NOT NULL,
    cost_usd numeric NOT NULL,
    PRIMARY KEY (minute, status)
);

-- The final tasks, per status.
CREATE TABLE agentq.rollup_status (
    status text PRIMARY KEY,
    tasks  bigint NOT NULL
);

-- The final tasks' queue waits (kind 'wait') and run times ('run'), per
-- agentq.latency_bucket.
CREATE TABLE agentq.rollup_latency (
    kind   text NOT NULL CHECK (kind IN ('wait', 'run')),
    bucket integer NOT NULL,
    tasks  bigint NOT NULL,
    PRIMARY KEY (kind, bucket)
);

COMMENT ON TABLE agentq.rollup_pending IS
    'Final tasks'' contributions to the roll-ups, not yet folded in (agentq.rollups_flush()).';
COMMENT ON TABLE agentq.rollup_usage IS 'Roll-up of the final tasks per user (agentq.usage_by_user).';
COMMENT ON TABLE agentq.rollup_throughput IS
    'Roll-up of the final tasks per minute and status (agentq.throughput_per_minute).';
COMMENT ON TABLE agentq.rollup_status IS 'Roll-up of the final tasks per status (agentq.status_counts).';
COMMENT ON TABLE agentq.rollup_latency IS
    'Roll-up of the final tasks'' wait and run times in 1 % buckets (agentq.latency_percentiles).';

-- ------------------------------------------------------------- folds --

-- Folds the committed pending rows into the roll-ups; returns how many.
-- Returns 0 at once when another transaction is folding (or rebuilding).
CREATE FUNCTION agentq.rollups_flush() RETURNS bigint
LANGUAGE plpgsql
AS $$
DECLARE
    n bigint;
BEGIN
    IF NOT pg_try_advisory_xact_lock(hashtext('agentq.rollups')) THEN
        RETURN 0;
    END IF;
    WITH d AS (DELETE FROM agentq.rollup_pending RETURNING *),
    u AS (
        INSERT INTO agentq.rollup_usage AS r
        SELECT user_id, sum(sign), sum(CASE WHEN status = 'completed' THEN sign ELSE 0 END),
               sum(CASE WHEN status <> 'completed' THEN sign ELSE 0 END), sum(sign * steps),
               sum(sign * prompt_tokens), sum(sign * completion_tokens), sum(sign * cost_usd)
          FROM d GROUP BY user_id
        ON CONFLICT (user_id) DO UPDATE SET
            tasks = r.tasks + EXCLUDED.tasks, completed = r.completed + EXCLUDED.completed,
            failed = r.failed + EXCLUDED.failed, steps = r.steps + EXCLUDED.steps,
            prompt_tokens = r.prompt_tokens + EXCLUDED.prompt_tokens,
            completion_tokens = r.completion_tokens + EXCLUDED.completion_tokens,
            cost_usd = r.cost_usd + EXCLUDED.cost_usd),
    t AS (
        INSERT INTO agentq.rollup_throughput AS r
        SELECT finished_minute, status, sum(sign), sum(sign * (prompt_tokens + completion_tokens)),
               sum(sign * cost_usd)
          FROM d WHERE finished_minute IS NOT NULL GROUP BY finished_minute, status
        ON CONFLICT (minute, status) DO UPDATE SET
            tasks = r.tasks + EXCLUDED.tasks, tokens = r.tokens + EXCLUDED.tokens,
            cost_usd = r.cost_usd + EXCLUDED.cost_usd),
    s AS (
        INSERT INTO agentq.rollup_status AS r
        SELECT status, sum(sign) FROM d GROUP BY status
        ON CONFLICT (status) DO UPDATE SET tasks = r.tasks + EXCLUDED.tasks),
    l AS (
        INSERT INTO agentq.rollup_latency AS r
        SELECT kind, bucket, sum(sign) FROM (
            SELECT 'wait' AS kind, wait_bucket AS bucket, sign FROM d WHERE wait_bucket IS NOT NULL
            UNION ALL
            SELECT 'run', run_bucket, sign FROM d WHERE run_bucket IS NOT NULL) b
         GROUP BY kind, bucket
        ON CONFLICT (kind, bucket) DO UPDATE SET tasks = r.tasks + EXCLUDED.tasks)
    SELECT count(*) INTO n FROM d;
    RETURN n;
END
$$;

-- Recomputes every roll-up from agentq.tasks; returns the final tasks
-- counted. The pending rows are replaced by one +1 row per final task and
-- folded as any others are. Waits for a fold in progress, and a fold
-- waits for it.
CREATE FUNCTION agentq.rollups_rebuild() RETURNS bigint
LANGUAGE plpgsql
AS $$
DECLARE
    n bigint;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('agentq.rollups'));
    DELETE FROM agentq.rollup_usage;
    DELETE FROM agentq.rollup_throughput;
    DELETE FROM agentq.rollup_status;
    DELETE FROM agentq.rollup_latency;
    -- One statement, so the pending rows it drops and the tasks it reads
    -- are of the same snapshot: a delta committed after it stays pending,
    -- and its change is not in what was read.
    WITH p AS (DELETE FROM agentq.rollup_pending)
    INSERT INTO agentq.rollup_pending
    SELECT d.* FROM agentq.tasks t, agentq.rollup_delta(1::smallint, t) d WHERE agentq.is_final(t.status);
    GET DIAGNOSTICS n = ROW_COUNT;
    PERFORM agentq.rollups_flush(); -- takes the lock this transaction holds
    RETURN n;
END
$$;

COMMENT ON FUNCTION agentq.rollups_flush() IS
    'Folds the pending roll-up deltas into the roll-ups (the task triggers do it every 1024 appends); returns how many.';
COMMENT ON FUNCTION agentq.rollups_rebuild() IS
    'Recomputes the roll-ups behind the views from agentq.tasks; returns the final tasks counted.';

-- ---------------------------------------------------------- triggers --

-- What a task's row does when it ends, changes once final, or goes: the
-- NOTIFY of 016 (when it becomes final: agentqctl wait) and the roll-up
-- deltas, in one trigger function per event, since a row trigger's call
-- costs more than what this one does.
CREATE FUNCTION agentq.task_final() RETURNS trigger
LANGUAGE plpgsql
AS $$
DECLARE
    appended boolean := false;
BEGIN
    IF TG_OP = 'UPDATE'
       AND (OLD.status, OLD.user_id, OLD.steps, OLD.prompt_tokens, OLD.completion_tokens,
            OLD.cost_usd, OLD.enqueued_at, OLD.started_at, OLD.finished_at)
           IS NOT DISTINCT FROM
           (NEW.status, NEW.user_id, NEW.steps, NEW.prompt_tokens, NEW.completion_tokens,
            NEW.cost_usd, NEW.enqueued_at, NEW.started_at, NEW.finished_at) THEN
        RETURN NULL; -- nothing a view reads changed
    END IF;
    IF TG_OP <> 'INSERT' AND agentq.is_final(OLD.status) THEN
        INSERT INTO agentq.rollup_pending SELECT * FROM agentq.rollup_delta(-1::smallint, OLD);
        appended := true;
    END IF;
    IF TG_OP <> 'DELETE' AND agentq.is_final(NEW.status) THEN
        INSERT INTO agentq.rollup_pending SELECT * FROM agentq.rollup_delta(1::smallint, NEW);
        appended := true;
        IF TG_OP = 'INSERT' OR NOT agentq.is_final(OLD.status) THEN
            PERFORM pg_notify('agentq_final', NEW.task_id::text);
        END IF;
    END IF;
    IF appended AND nextval('agentq.rollup_pending_seq') % 1024 = 0 THEN
        PERFORM agentq.rollups_flush();
    END IF;
    RETURN NULL;
END
$$;

-- After a TRUNCATE, the rebuild of an empty table empties the roll-ups.
CREATE FUNCTION agentq.rollup_clear() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    PERFORM agentq.rollups_rebuild();
    RETURN NULL;
END
$$;

DROP TRIGGER tasks_notify_final ON agentq.tasks;
DROP TRIGGER tasks_notify_final_insert ON agentq.tasks;
DROP FUNCTION agentq.notify_final();

CREATE TRIGGER tasks_final_insert
    AFTER INSERT ON agentq.tasks
    FOR EACH ROW
    WHEN (agentq.is_final(NEW.status))
    EXECUTE FUNCTION agentq.task_final();

-- PostgreSQL reads a trigger's WHEN anew for every UPDATE statement, so
-- it is kept to what skips the hot path, a running task's progress
-- (every step); the function decides the rest.
CREATE TRIGGER tasks_final_update
    AFTER UPDATE ON agentq.tasks
    FOR EACH ROW
    WHEN (OLD.status <> 'running' OR NEW.status <> 'running')
    EXECUTE FUNCTION agentq.task_final();

CREATE TRIGGER tasks_final_delete
    AFTER DELETE ON agentq.tasks
    FOR EACH ROW
    WHEN (agentq.is_final(OLD.status))
    EXECUTE FUNCTION agentq.task_final();

CREATE TRIGGER tasks_rollup_truncate
    AFTER TRUNCATE ON agentq.tasks
    FOR EACH STATEMENT
    EXECUTE FUNCTION agentq.rollup_clear();

-- ------------------------------------------------------------- views --
-- Same names, columns and types as before (CREATE OR REPLACE keeps the
-- grants). The statuses that are not final are spelled out so that
-- tasks_status_idx finds them; a new status goes into both lists.

CREATE OR REPLACE VIEW agentq.usage_by_user AS
SELECT g.user_id, g.tasks, g.completed, g.failed, g.in_flight, g.steps,
       g.prompt_tokens, g.completion_tokens,
       g.prompt_tokens + g.completion_tokens AS tokens,
       g.cost_usd,
       (SELECT t.enqueued_at FROM agentq.tasks t
         WHERE t.user_id = g.user_id AND t.enqueued_at IS NOT NULL
         ORDER BY coalesce(t.enqueued_at, t.finished_at, '-infinity'::timestamptz)
         LIMIT 1) AS first_enqueued_at,
       (SELECT max(t.finished_at) FROM agentq.tasks t WHERE t.user_id = g.user_id) AS last_finished_at
  FROM (SELECT x.user_id,
               sum(x.tasks)::bigint     AS tasks,
               sum(x.completed)::bigint AS completed,
               sum(x.failed)::bigint    AS failed,
               sum(x.in_flight)::bigint AS in_flight,
               sum(x.steps)::bigint     AS steps,
               sum(x.prompt_tokens)     AS prompt_tokens,
               sum(x.completion_tokens) AS completion_tokens,
               sum(x.cost_usd)          AS cost_usd
          FROM (SELECT user_id, tasks, completed, failed, 0 AS in_flight, steps,
                       prompt_tokens, completion_tokens, cost_usd
                  FROM agentq.rollup_usage
                UNION ALL
                SELECT user_id, sign, CASE WHEN status = 'completed' THEN sign ELSE 0 END,
                       CASE WHEN status <> 'completed' THEN sign ELSE 0 END, 0, sign * steps,
                       sign * prompt_tokens, sign * completion_tokens, sign * cost_usd
                  FROM agentq.rollup_pending
                UNION ALL
                SELECT user_id, 1, 0, 0, 1, steps, prompt_tokens, completion_tokens, cost_usd
                  FROM agentq.tasks
                 WHERE status IN ('queued', 'running', 'retrying', 'waiting')) x
         GROUP BY x.user_id
        HAVING sum(x.tasks) > 0) g;

-- A roll-up row per minute and status, over 100,000 of them a month: the
-- pending and live rows are summed apart (a few thousand) and merged
-- into the roll-up rows they touch, so the others are read as they are,
-- not summed again; a filter on minute reaches both halves.
CREATE OR REPLACE VIEW agentq.throughput_per_minute AS
WITH recent AS (
    SELECT x.minute, x.status, sum(x.tasks) AS tasks, sum(x.tokens) AS tokens, sum(x.cost_usd) AS cost_usd
      FROM (SELECT finished_minute AS minute, status, sign AS tasks,
                   sign * (prompt_tokens + completion_tokens) AS tokens, sign * cost_usd AS cost_usd
              FROM agentq.rollup_pending WHERE finished_minute IS NOT NULL
            UNION ALL
            SELECT date_trunc('minute', finished_at), status, 1, prompt_tokens + completion_tokens, cost_usd
              FROM agentq.tasks
             WHERE status IN ('queued', 'running', 'retrying', 'waiting') AND finished_at IS NOT NULL) x
     GROUP BY x.minute, x.status)
SELECT r.minute, r.status, r.tasks, r.tokens::numeric AS tokens, r.cost_usd
  FROM agentq.rollup_throughput r
 WHERE r.tasks > 0
   AND NOT EXISTS (SELECT 1 FROM recent c WHERE c.minute = r.minute AND c.status = r.status)
UNION ALL
SELECT c.minute, c.status, (c.tasks + coalesce(r.tasks, 0))::bigint, c.tokens + coalesce(r.tokens, 0),
       c.cost_usd + coalesce(r.cost_usd, 0)
  FROM recent c
  LEFT JOIN agentq.rollup_throughput r ON r.minute = c.minute AND r.status = c.status
 WHERE c.tasks + coalesce(r.tasks, 0) > 0;

CREATE OR REPLACE VIEW agentq.latency_percentiles AS
WITH hist AS (
    SELECT h.kind, h.bucket, sum(h.n)::bigint AS n
      FROM (SELECT kind, bucket, tasks AS n FROM agentq.rollup_latency
            UNION ALL
            SELECT 'wait', wait_bucket, sign FROM agentq.rollup_pending WHERE wait_bucket IS NOT NULL
            UNION ALL
            SELECT 'run', run_bucket, sign FROM agentq.rollup_pending WHERE run_bucket IS NOT NULL
            UNION ALL
            SELECT 'wait', agentq.latency_bucket(extract(epoch FROM started_at - enqueued_at)::double precision), 1
              FROM agentq.tasks
             WHERE status IN ('queued', 'running', 'retrying', 'waiting')
               AND started_at IS NOT NULL AND enqueued_at IS NOT NULL
            UNION ALL
            SELECT 'run', agentq.latency_bucket(extract(epoch FROM finished_at - started_at)::double precision), 1
              FROM agentq.tasks
             WHERE status IN ('queued', 'running', 'retrying', 'waiting')
               AND finished_at IS NOT NULL AND started_at IS NOT NULL) h
     GROUP BY h.kind, h.bucket
    HAVING sum(h.n) > 0),
all_time AS (
    SELECT kind, sum(n)::bigint AS n,
           agentq.histogram_percentiles(array_agg(bucket ORDER BY bucket), array_agg(n ORDER BY bucket),
                                        ARRAY[0.5, 0.95, 0.99]) AS pct
      FROM hist GROUP BY kind),
hour_wait AS (
    SELECT count(*) AS n,
           percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP (ORDER BY w.s) AS pct
      FROM (SELECT extract(epoch FROM started_at - enqueued_at)::double precision AS s
              FROM agentq.tasks
             WHERE finished_at >= now() - interval '1 hour'
               AND started_at >= now() - interval '1 hour' AND enqueued_at IS NOT NULL
            UNION ALL
            SELECT extract(epoch FROM started_at - enqueued_at)::double precision
              FROM agentq.tasks
             WHERE status IN ('queued', 'running', 'retrying', 'waiting')
               AND started_at >= now() - interval '1 hour' AND enqueued_at IS NOT NULL
               AND NOT coalesce(finished_at >= now() - interval '1 hour', false)) w),
hour_run AS (
    SELECT count(*) AS n,
           percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP (
               ORDER BY extract(epoch FROM finished_at - started_at)::double precision) AS pct
      FROM agentq.tasks
     WHERE finished_at >= now() - interval '1 hour' AND started_at IS NOT NULL),
periods AS (
    SELECT 1 AS ord, 'last_hour'::text AS period, w.n AS started, w.pct AS wait, r.n AS finished, r.pct AS run
      FROM hour_wait w, hour_run r
    UNION ALL
    SELECT 2, 'all', coalesce(w.n, 0), w.pct, coalesce(r.n, 0), r.pct
      FROM (SELECT 1) one
      LEFT JOIN all_time w ON w.kind = 'wait'
      LEFT JOIN all_time r ON r.kind = 'run')
SELECT period,
       started,
       wait[1] AS queue_wait_p50_s,
       wait[2] AS queue_wait_p95_s,
       wait[3] AS queue_wait_p99_s,
       finished,
       run[1]  AS run_time_p50_s,
       run[2]  AS run_time_p95_s,
       run[3]  AS run_time_p99_s
  FROM periods
 ORDER BY ord;

COMMENT ON VIEW agentq.latency_percentiles IS
    'p50/p95/p99 of queue wait and run time in seconds, for period last_hour (exact) and all (within 1 %).';

CREATE OR REPLACE VIEW agentq.status_counts AS
SELECT s.status,
       agentq.is_final(s.status)      AS final,
       coalesce(c.n, 0)::bigint       AS tasks
  FROM (VALUES (1, 'queued'), (2, 'running'), (3, 'retrying'), (4, 'waiting'), (5, 'completed'),
               (6, 'failed'), (7, 'timeout'), (8, 'budget_exceeded'), (9, 'max_steps'),
               (10, 'cancelled'), (11, 'expired'), (12, 'rejected')) AS s(ord, status)
  LEFT JOIN (SELECT x.status, sum(x.n) AS n
               FROM (SELECT status, tasks AS n FROM agentq.rollup_status
                     UNION ALL
                     SELECT status, sign FROM agentq.rollup_pending
                     UNION ALL
                     SELECT status, count(*) FROM agentq.tasks
                      WHERE status IN ('queued', 'running', 'retrying', 'waiting')
                      GROUP BY status) x
              GROUP BY x.status) c
         ON c.status = s.status
 ORDER BY s.ord;

-- ------------------------------------------------------------ grants --
-- The worker's triggers write the pending rows and fold them (003's
-- default privileges give it the tables and functions); the reader reads
-- the views, whose functions it calls.

GRANT SELECT, INSERT, UPDATE, DELETE ON agentq.rollup_pending, agentq.rollup_usage,
    agentq.rollup_throughput, agentq.rollup_status, agentq.rollup_latency TO agentq_worker;
GRANT USAGE, SELECT ON SEQUENCE agentq.rollup_pending_seq TO agentq_worker;
GRANT SELECT ON agentq.rollup_pending, agentq.rollup_usage, agentq.rollup_throughput,
    agentq.rollup_status, agentq.rollup_latency TO agentq_reader;
GRANT EXECUTE ON FUNCTION agentq.latency_bucket(double precision),
    agentq.latency_bucket_value(integer, double precision),
    agentq.histogram_percentiles(integer[], bigint[], double precision[]) TO agentq_reader;
REVOKE EXECUTE ON FUNCTION agentq.rollups_flush(), agentq.rollups_rebuild() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION agentq.rollups_flush(), agentq.rollups_rebuild() TO agentq_worker;

SELECT agentq.rollups_rebuild();
