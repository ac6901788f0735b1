-- 013_fair.sql — fair shares of the fleet among users, with settings
-- people change in SQL while the fleet runs.
--
-- * Lanes. Producers publish to one ingress queue (agentq.tasks); every
--   worker routes what arrives there into lane queues (agentq.lane.N) and
--   consumes all lanes under one channel prefetch. The broker hands each
--   freed slot to a random non-empty lane, so every active lane gets an
--   equal share of the fleet's slots, and a user that just arrived is not
--   behind anyone's backlog. agentq.route() records the task as queued
--   (visible to SQL at once, whatever client published it) and picks its
--   lane: a user keeps its lanes while it has work; a newly active user
--   takes, for each of its lanes, the shorter of two lanes its name hashes
--   to (two choices: a burst's lane is avoided). A user of weight w gets
--   w lanes, hence w shares.
-- * agentq.users holds per-user settings: weight, max_inflight (running
--   tasks across the fleet), a daily budget in USD and in tokens, and what
--   happens over budget. A row is optional; changes take effect at the
--   next claim (caps, budgets) or the next time the user becomes active
--   (weight).
-- * Caps and budgets are decided by the claim, under the row's lock: a
--   capped user's task is not started ('busy': it waits, held by a worker
--   or in its lane, with no attempt used); an over-budget one ends as
--   budget_exceeded with a dead letter (over_budget = 'fail'), or waits
--   like a capped one until the next UTC day or a raised budget ('wait').
--
-- Owned by the store module (src/store/store.c) and the worker.

CREATE TABLE agentq.users (
    user_id             text PRIMARY KEY,
    weight              integer NOT NULL DEFAULT 1 CHECK (weight BETWEEN 1 AND 64),
    max_inflight        integer CHECK (max_inflight >= 0),
    daily_budget_usd    numeric(14,6) CHECK (daily_budget_usd >= 0),
    daily_budget_tokens bigint CHECK (daily_budget_tokens >= 0),
    over_budget         text CHECK (over_budget IN ('fail', 'wait')),
    updated_at          timestamptz NOT NULL DEFAULT now()
);

COMMENT ON TABLE agentq.users IS
    'Per-user settings; a user without a row has weight 1 and the fleet''s defaults.';
COMMENT ON COLUMN agentq.users.weight IS
    'Share of the fleet''s slots and of the provider''s tokens relative to other users with work (1..64).';
COMMENT ON COLUMN agentq.users.max_inflight IS
    'Most of this user''s tasks running at once across the fleet (0: none run); NULL: limits.max_inflight_per_user.';
COMMENT ON COLUMN agentq.users.daily_budget_usd IS
    'Most USD this user''s tasks may spend per UTC day (counted from tasks that finished today); NULL: no limit.';
COMMENT ON COLUMN agentq.users.daily_budget_tokens IS
    'Most tokens (prompt + completion) per UTC day; NULL: no limit.';
COMMENT ON COLUMN agentq.users.over_budget IS
    '''fail'': a task that would start over budget ends as budget_exceeded; ''wait'': it waits for the next'
    ' day or a raised budget; NULL: limits.over_budget.';

CREATE TRIGGER users_touch BEFORE UPDATE ON agentq.users
    FOR EACH ROW EXECUTE FUNCTION agentq.touch_updated_at();

ALTER TABLE agentq.tasks ADD COLUMN lane smallint;
COMMENT ON COLUMN agentq.tasks.lane IS
    'The lane queue the task was last routed to (amqp.lane_prefix || lane).';

-- A user's lanes while it has work, and a lane's backlog.
CREATE INDEX tasks_user_lane_active_idx ON agentq.tasks (user_id, lane)
    WHERE status IN ('queued', 'retrying', 'running');
CREATE INDEX tasks_lane_queued_idx ON agentq.tasks (lane) WHERE status = 'queued';
-- (A budget's spend today reads the user's rows through tasks_user_id_idx:
-- an index on (user_id, finished_at) would cost every task's writes for
-- the few users with a budget.)

-- A lane candidate: a hash of (user, lane slot, choice) into [0, p_lanes).
CREATE FUNCTION agentq.lane_candidate(p_user text, p_slot integer, p_choice text, p_lanes integer)
RETURNS integer
LANGUAGE sql IMMUTABLE
AS $$
    SELECT ((hashtext(p_user || '/' || p_slot || '/' || p_choice)::bigint & 2147483647) % p_lanes)::integer
$$;

-- Tasks queued in lane p_lane, counted up to 10,000 (enough to compare).
CREATE FUNCTION agentq.lane_depth(p_lane integer) RETURNS bigint
LANGUAGE sql STABLE
AS $$
    SELECT count(*) FROM (SELECT 1 FROM agentq.tasks
                           WHERE lane = p_lane AND status = 'queued' LIMIT 10000) q
$$;

-- The lane for a task of p_user: one of the user's `weight` lane slots,
-- chosen by the task id's hash; a slot is sticky while the user has a
-- task in it (one of its two candidates holds a waiting or running task
-- of the user), otherwise it takes the shorter candidate. No lock: two
-- routers placing a new user at once see the same depths and choose alike.
CREATE FUNCTION agentq.user_lane(p_user text, p_task uuid, p_lanes integer) RETURNS integer
LANGUAGE plpgsql STABLE
AS $$
DECLARE
    w    integer;
    slot integer;
    a    integer;
    b    integer;
BEGIN
    SELECT least(u.weight, p_lanes) INTO w FROM agentq.users u WHERE u.user_id = p_user;
    w := coalesce(w, 1);
    slot := ((hashtext(p_task::text)::bigint & 2147483647) % w)::integer;
    a := agentq.lane_candidate(p_user, slot, 'a', p_lanes);
    b := agentq.lane_candidate(p_user, slot, 'b', p_lanes);
    IF a = b THEN
        RETURN a;
    END IF;
    IF EXISTS (SELECT 1 FROM agentq.tasks WHERE user_id = p_user AND lane = a
                 AND status IN ('queued', 'retrying', 'running')) THEN
        RETURN a;
    END IF;
    IF EXISTS (SELECT 1 FROM agentq.tasks WHERE user_id = p_user AND lane = b
                 AND status IN ('queued', 'retrying', 'running')) THEN
        RETURN b;
    END IF;
    RETURN CASE WHEN agentq.lane_depth(b) < agentq.lane_depth(a) THEN b ELSE a END;
END
$$;

-- Routes one message of the ingress queue: records the task as queued
-- (the first message with a task_id defines it, as in agentq.claim) and
-- says where it goes.
--
-- o_outcome:
--   lane   publish it to lane o_lane; o_ttl_ms is what is left of the
--          task's TTL (-1: none; 0: it expired, the lane dead-letters it)
--   final  the task is final and this is its own body: ack, nothing to do
-- A message whose body differs from the task's goes to a lane too: its
-- claim records the conflict.
CREATE FUNCTION agentq.route(
    p_task uuid, p_user text, p_goal text, p_priority integer, p_max_steps integer,
    p_budget double precision, p_timeout double precision, p_model text,
    p_body bytea, p_has_metadata boolean, p_enqueued_us bigint, p_deadline_us bigint,
    p_lanes integer,
    OUT o_outcome text, OUT o_lane integer, OUT o_ttl_ms bigint)
LANGUAGE plpgsql
AS $$
DECLARE
    t agentq.tasks%ROWTYPE;
    h bytea := sha256(p_body);
BEGIN
    o_outcome := 'lane';
    o_lane := agentq.user_lane(p_user, p_task, p_lanes);
    -- The common case, a new task, in one statement.
    INSERT INTO agentq.tasks
            (task_id, user_id, goal, priority, status, attempt, max_steps, budget_usd,
             timeout_seconds, model, metadata, enqueued_at, body, body_sha256, deadline, lane)
        VALUES
            (p_task, p_user, p_goal, p_priority, 'queued', 1, p_max_steps, p_budget,
             p_timeout, p_model,
             CASE WHEN p_has_metadata THEN convert_from(p_body, 'UTF8')::jsonb -> 'metadata' END,
             coalesce(timestamptz 'epoch' + p_enqueued_us * interval '1 microsecond', now()),
             p_body, h,
             CASE WHEN p_deadline_us > 0
                  THEN timestamptz 'epoch' + p_deadline_us * interval '1 microsecond' END,
             o_lane)
    ON CONFLICT (task_id) DO NOTHING
    RETURNING * INTO t;
    IF NOT FOUND THEN
        SELECT * INTO t FROM agentq.tasks WHERE task_id = p_task;
        IF agentq.is_final(t.status) AND t.body_sha256 = h THEN
            o_outcome := 'final'; o_lane := -1; o_ttl_ms := -1;
            RETURN;
        END IF;
        -- A task that comes back (retry, requeue, sweep) goes where its
        -- user's work is now, not to a lane its user has left.
        IF t.user_id <> p_user THEN
            o_lane := agentq.user_lane(t.user_id, p_task, p_lanes);
        END IF;
        IF NOT agentq.is_final(t.status) AND t.lane IS DISTINCT FROM o_lane THEN
            UPDATE agentq.tasks SET lane = o_lane WHERE task_id = p_task;
        END IF;
    END IF;
    o_ttl_ms := CASE WHEN t.deadline IS NULL THEN -1
                     ELSE greatest(0, (extract(epoch FROM t.deadline - now()) * 1000)::bigint) END;
END
$$;

-- Why p_user may not start a task now, or NULL if it may: its running
-- tasks other than p_task reached its cap (agentq.users.max_inflight, else
-- p_cap; <= 0 / NULL: none), or its finished tasks spent its daily budget.
-- The text names the setting. Also the user's weight and over_budget
-- (NULL: the fleet's), so a claim reads the user's row once. A cap takes one fleet-wide advisory lock,
-- held to the end of the transaction, so two claims cannot both take the
-- last slot (one lock for all users keeps batched claims free of
-- deadlocks; it is taken only when a cap applies).
CREATE FUNCTION agentq.user_hold(p_user text, p_task uuid, p_cap integer, OUT o_reason text, OUT o_budget boolean,
                                 OUT o_weight integer, OUT o_over_budget text)
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    u     agentq.users%ROWTYPE;
    cap   integer;
    n     bigint;
    usd   numeric;
    toks  bigint;
BEGIN
    o_budget := false;
    SELECT * INTO u FROM agentq.users WHERE user_id = p_user;
    o_weight := coalesce(u.weight, 1);
    o_over_budget := u.over_budget;
    cap := coalesce(u.max_inflight, CASE WHEN p_cap > 0 THEN p_cap END);
    IF cap IS NOT NULL THEN
        PERFORM pg_advisory_xact_lock(hashtext('agentq.user_cap'));
        SELECT count(*) INTO n FROM agentq.tasks
         WHERE user_id = p_user AND status = 'running' AND task_id <> p_task;
        IF n >= cap THEN
            o_reason := format('user %s runs %s tasks, its cap (%s)', p_user, n,
                               CASE WHEN u.max_inflight IS NOT NULL THEN 'agentq.users.max_inflight = ' || cap
                                    ELSE 'limits.max_inflight_per_user = ' || cap END);
            RETURN;
        END IF;
    END IF;
    IF u.daily_budget_usd IS NOT NULL OR u.daily_budget_tokens IS NOT NULL THEN
        SELECT coalesce(sum(cost_usd), 0), coalesce(sum(prompt_tokens + completion_tokens), 0)
          INTO usd, toks
          FROM agentq.tasks
         WHERE user_id = p_user AND finished_at >= date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC';
        IF u.daily_budget_usd IS NOT NULL AND usd >= u.daily_budget_usd THEN
            o_reason := format('user %s spent $%s today, its daily budget (agentq.users.daily_budget_usd = %s)',
                               p_user, round(usd, 6), u.daily_budget_usd);
            o_budget := true;
        ELSIF u.daily_budget_tokens IS NOT NULL AND toks >= u.daily_budget_tokens THEN
            o_reason := format('user %s used %s tokens today, its daily budget (agentq.users.daily_budget_tokens = %s)',
                               p_user, toks, u.daily_budget_tokens);
            o_budget := true;
        END IF;
    END IF;
END
$$;

-- The claim below replaces 012's, and agentq.user_hold 011's cap test:
-- nothing calls the old ones any more.
DROP FUNCTION agentq.claim(uuid, text, text, integer, integer, double precision, double precision, text, bytea,
                           boolean, bigint, bigint, text, text, integer, double precision, integer, integer);
DROP FUNCTION agentq.user_slot_free(text, uuid, integer);

-- The claim of 012, with the user's cap and budget from agentq.users
-- (agentq.user_hold) and what to do over budget (p_over_budget: 'fail' or
-- 'wait', unless the user's row says). A message that finds no row
-- records the task as queued first (as agentq.route does), so every
-- decision below is made on a row. o_reason says why a claim is 'busy'.
CREATE FUNCTION agentq.claim(
    p_task uuid, p_user text, p_goal text, p_priority integer, p_max_steps integer,
    p_budget double precision, p_timeout double precision, p_model text,
    p_body bytea, p_has_metadata boolean, p_enqueued_us bigint, p_deadline_us bigint,
    p_worker text, p_token text, p_owner integer, p_lease_seconds double precision,
    p_user_cap integer, p_max_interruptions integer, p_over_budget text,
    OUT o_outcome text, OUT o_attempt integer, OUT o_failures integer, OUT o_status text,
    OUT o_reason text, OUT o_weight integer)
LANGUAGE plpgsql
AS $$
DECLARE
    t     agentq.tasks%ROWTYPE;
    h     bytea := sha256(p_body);
    lease timestamptz := now() + p_lease_seconds * interval '1 second';
    ints  integer;
    err   text;
    hold  record;
BEGIN
    SELECT * INTO t FROM agentq.tasks WHERE task_id = p_task FOR UPDATE;
    IF NOT FOUND THEN
        INSERT INTO agentq.tasks
            (task_id, user_id, goal, priority, status, attempt, max_steps, budget_usd,
             timeout_seconds, model, metadata, enqueued_at, body, body_sha256, deadline)
        VALUES
            (p_task, p_user, p_goal, p_priority, 'queued', 1, p_max_steps, p_budget,
             p_timeout, p_model,
             -- jsonb from the original text: numbers keep their digits
             CASE WHEN p_has_metadata THEN convert_from(p_body, 'UTF8')::jsonb -> 'metadata' END,
             coalesce(timestamptz 'epoch' + p_enqueued_us * interval '1 microsecond', now()),
             p_body, h,
             CASE WHEN p_deadline_us > 0
                  THEN timestamptz 'epoch' + p_deadline_us * interval '1 microsecond' END)
        ON CONFLICT (task_id) DO NOTHING;
        SELECT * INTO t FROM agentq.tasks WHERE task_id = p_task FOR UPDATE;
    END IF;

    o_attempt := t.attempt; o_failures := t.failures; o_status := t.status;
    IF t.body_sha256 IS NOT NULL AND t.body_sha256 <> h THEN
        o_outcome := 'conflict';
        RETURN;
    END IF;
    IF agentq.is_final(t.status) THEN
        o_outcome := 'final';
        RETURN;
    END IF;
    IF t.claim_token = p_token THEN
        o_outcome := 'run'; -- this claim, replayed after a lost reply
        RETURN;
    END IF;
    IF t.status = 'running' AND t.lease_until > now() AND agentq.owner_alive(t.lease_owner, t.leased_at) THEN
        o_outcome := 'duplicate';
        RETURN;
    END IF;

    -- From here this message either ends the task, waits, or runs it. A
    -- running row that got this far lost its worker: one more interruption.
    ints := t.interruptions + CASE WHEN t.status = 'running' THEN 1 ELSE 0 END;
    IF t.cancel_requested THEN
        err := 'cancelled before it ran';
        o_status := 'cancelled';
    ELSIF t.deadline IS NOT NULL AND t.deadline <= now() THEN
        err := format('its TTL passed (at %s) before attempt %s could start',
                      t.deadline, t.attempt + 1);
        o_status := 'expired';
    ELSIF ints > p_max_interruptions THEN
        err := format('interrupted %s times: the worker running it was lost (killed, drained or cut off)'
                      ' each time; a task that brings workers down ends here (amqp.max_interruptions = %s)',
                      ints, p_max_interruptions);
        o_status := 'failed';
    ELSE
        hold := agentq.user_hold(t.user_id, p_task, p_user_cap);
        IF hold.o_reason IS NOT NULL THEN
            IF hold.o_budget AND coalesce(hold.o_over_budget, p_over_budget) = 'fail' THEN
                err := hold.o_reason || '; the task was not started';
                o_status := 'budget_exceeded';
            ELSE
                o_outcome := 'busy';
                o_reason := hold.o_reason;
                RETURN;
            END IF;
        END IF;
    END IF;
    IF err IS NOT NULL THEN
        -- Every task that ends other than completed is in the parking lot.
        INSERT INTO agentq.dead_letters (task_id, reason, error, body)
        VALUES (p_task, CASE WHEN o_status = 'failed' THEN 'interrupted' ELSE o_status END, err,
                coalesce(t.body, p_body));
        UPDATE agentq.tasks
           SET status = o_status, error = err, interruptions = ints, finished_at = now(),
               lease_owner = NULL, lease_until = NULL
         WHERE task_id = p_task;
        o_outcome := 'ended';
        RETURN;
    END IF;

    -- A row made before any message defined it (producer --record, a dead
    -- letter) takes this message's task; a defined row keeps its own.
    UPDATE agentq.tasks SET
        status = 'running',
        -- a queued row nothing ever started starts at 1
        attempt = CASE WHEN t.status = 'queued' AND t.started_at IS NULL
                       THEN greatest(t.attempt, 1) ELSE t.attempt + 1 END,
        interruptions = ints,
        started_at = now(), finished_at = NULL,
        worker_id = p_worker, claim_token = p_token,
        lease_owner = p_owner, lease_until = lease, leased_at = now(), swept_at = NULL,
        user_id = CASE WHEN t.body_sha256 IS NULL THEN p_user ELSE t.user_id END,
        goal = CASE WHEN t.body_sha256 IS NULL THEN p_goal ELSE t.goal END,
        priority = CASE WHEN t.body_sha256 IS NULL THEN p_priority ELSE t.priority END,
        max_steps = CASE WHEN t.body_sha256 IS NULL THEN p_max_steps ELSE t.max_steps END,
        budget_usd = CASE WHEN t.body_sha256 IS NULL THEN p_budget ELSE t.budget_usd END,
        timeout_seconds = CASE WHEN t.body_sha256 IS NULL THEN p_timeout ELSE t.timeout_seconds END,
        model = CASE WHEN t.body_sha256 IS NULL THEN p_model ELSE t.model END,
        metadata = CASE WHEN t.body_sha256 IS NOT NULL THEN t.metadata
                        WHEN p_has_metadata THEN convert_from(p_body, 'UTF8')::jsonb -> 'metadata' END,
        enqueued_at = coalesce(t.enqueued_at,
                               timestamptz 'epoch' + p_enqueued_us * interval '1 microsecond'),
        deadline = CASE WHEN t.body_sha256 IS NOT NULL OR t.deadline IS NOT NULL THEN t.deadline
                        WHEN p_deadline_us > 0
                        THEN timestamptz 'epoch' + p_deadline_us * interval '1 microsecond' END,
        body = coalesce(t.body, p_body),
        body_sha256 = coalesce(t.body_sha256, h)
     WHERE task_id = p_task
    RETURNING attempt, failures INTO o_attempt, o_failures;
    o_outcome := 'run';
    o_status := 'running';
    o_weight := hold.o_weight; -- set: a claim that runs got past agentq.user_hold
END
$$;
