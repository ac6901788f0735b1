-- 002_views.sql — views for the questions users ask of agentq with SQL:
-- what each user used and spent, how many tasks finish per minute, how long
-- tasks wait and run, how many are in each status, and the dead letters
-- with their bodies readable. Read-only; agentq_reader may select them.

-- The body's bytes as text when they are valid UTF-8 (and hold no NUL),
-- NULL otherwise. A function because PostgreSQL 15 has no test for valid
-- encoding that does not raise.
CREATE FUNCTION agentq.utf8_or_null(b bytea) RETURNS text
LANGUAGE plpgsql IMMUTABLE STRICT
AS $$
BEGIN
    RETURN convert_from(b, 'UTF8');
EXCEPTION WHEN character_not_in_repertoire OR untranslatable_character THEN
    RETURN NULL;
END
$$;

CREATE VIEW agentq.dead_letters_text AS
SELECT id, task_id, reason, error,
       agentq.utf8_or_null(body) AS body_text,
       body,
       headers, recorded_at, requeued_at
  FROM agentq.dead_letters;

COMMENT ON VIEW agentq.dead_letters_text IS
    'agentq.dead_letters with body_text = the body as text where it is valid UTF-8 (else NULL).';

-- Per user: tasks, how they ended, tokens and cost. `failed` counts every
-- task that ended without a result (every final status but completed);
-- `in_flight` those still queued, running or retrying.
CREATE VIEW agentq.usage_by_user AS
SELECT user_id,
       count(*)                                                  AS tasks,
       count(*) FILTER (WHERE status = 'completed')              AS completed,
       count(*) FILTER (WHERE agentq.is_final(status)
                          AND status <> 'completed')             AS failed,
       count(*) FILTER (WHERE NOT agentq.is_final(status))       AS in_flight,
       sum(steps)                                                AS steps,
       sum(prompt_tokens)                                        AS prompt_tokens,
       sum(completion_tokens)                                    AS completion_tokens,
       sum(prompt_tokens + completion_tokens)                    AS tokens,
       sum(cost_usd)                                             AS cost_usd,
       min(enqueued_at)                                          AS first_enqueued_at,
       max(finished_at)                                          AS last_finished_at
  FROM agentq.tasks
 GROUP BY user_id;

COMMENT ON VIEW agentq.usage_by_user IS
    'Per user: tasks, completed, failed (ended without a result), in_flight, tokens and cost.';

-- Tasks that reached a final status, per minute of finished_at and status.
CREATE VIEW agentq.throughput_per_minute AS
SELECT date_trunc('minute', finished_at)       AS minute,
       status,
       count(*)                                AS tasks,
       sum(prompt_tokens + completion_tokens)  AS tokens,
       sum(cost_usd)                           AS cost_usd
  FROM agentq.tasks
 WHERE finished_at IS NOT NULL
 GROUP BY 1, 2;

COMMENT ON VIEW agentq.throughput_per_minute IS
    'Finished tasks per minute (of finished_at) and final status.';

-- Queue wait (started_at - enqueued_at) and run time (finished_at -
-- started_at) percentiles in seconds, over the last hour and over all
-- time. A task counts for the wait once it started (by started_at) and for
-- the run time once it finished (by finished_at).
CREATE VIEW agentq.latency_percentiles AS
WITH periods(period, since, ord) AS (
    VALUES ('last_hour', now() - interval '1 hour', 1),
           ('all',       '-infinity'::timestamptz, 2)
)
SELECT p.period,
       w.n            AS started,
       w.pct[1]       AS queue_wait_p50_s,
       w.pct[2]       AS queue_wait_p95_s,
       w.pct[3]       AS queue_wait_p99_s,
       r.n            AS finished,
       r.pct[1]       AS run_time_p50_s,
       r.pct[2]       AS run_time_p95_s,
       r.pct[3]       AS run_time_p99_s
  FROM periods p
 CROSS JOIN LATERAL (
        SELECT count(*) AS n,
               percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP (
                   ORDER BY extract(epoch FROM started_at - enqueued_at)::double precision) AS pct
          FROM agentq.tasks
         WHERE started_at >= p.since AND enqueued_at IS NOT NULL) w
 CROSS JOIN LATERAL (
        SELECT count(*) AS n,
               percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP (
                   ORDER BY extract(epoch FROM finished_at - started_at)::double precision) AS pct
          FROM agentq.tasks
         WHERE finished_at >= p.since AND started_at IS NOT NULL) r
 ORDER BY p.ord;

COMMENT ON VIEW agentq.latency_percentiles IS
    'p50/p95/p99 of queue wait and run time in seconds, for period last_hour and all.';

-- Every status with its count, zeros included, so a dashboard or
-- `agentqctl status` shows the whole picture.
CREATE VIEW agentq.status_counts AS
SELECT s.status,
       agentq.is_final(s.status)  AS final,
       coalesce(c.n, 0)           AS tasks
  FROM (VALUES (1, 'queued'), (2, 'running'), (3, 'retrying'), (4, 'completed'),
               (5, 'failed'), (6, 'timeout'), (7, 'budget_exceeded'), (8, 'max_steps'),
               (9, 'cancelled'), (10, 'expired'), (11, 'rejected')) AS s(ord, status)
  LEFT JOIN (SELECT status, count(*) AS n FROM agentq.tasks GROUP BY status) c
         ON c.status = s.status
 ORDER BY s.ord;

COMMENT ON VIEW agentq.status_counts IS 'Tasks per status, every status listed.';
