-- 014_sessions.sql — durable sessions: a new attempt resumes at the last
-- committed step, a task can wait for a person without holding a slot,
-- and the task row shows progress while it runs.
--
-- * Every step row that changed the conversation keeps that change in
--   `message` (JSON text of the OpenAI message: the assistant's reply for
--   an llm row, the tool result as the history held it for a tool row), so
--   a new attempt rebuilds the conversation from the rows, one delta per
--   step. Text, not jsonb: it holds what the provider sent byte for byte
--   (jsonb refuses \u0000 and reorders keys); cast it to query it.
-- * run_seconds is the running time over all attempts as of the last
--   committed step; steps, tokens and cost are updated at each step.
-- * `waiting`: the session asked a person (the built-in ask_human skill);
--   the question is in `question`, the tool row of the call waits with
--   status 'waiting', and `agentq.answer()` turns it into the call's result
--   and sends the task back (resume_reason 'answered': the sweeper
--   publishes its body). A waiting task past wait_until expires; a
--   cancelled one ends at the next sweep.
-- * resume_reason marks a queued row whose next attempt continues a
--   session rather than retries one ('answered', 'handover'): the
--   message's TTL no longer applies to it.
--
-- Owned by the store module (src/store/store.c), the engine
-- (src/agent/agent.c: what a message holds) and agentqctl (answer).

ALTER TABLE agentq.steps ADD COLUMN message text;
COMMENT ON COLUMN agentq.steps.message IS
    'What this call added to the conversation (JSON text of the message), for a later attempt to resume from; NULL for calls that added nothing.';

ALTER TABLE agentq.tasks
    ADD COLUMN run_seconds   double precision NOT NULL DEFAULT 0 CHECK (run_seconds >= 0),
    ADD COLUMN question      text,
    ADD COLUMN wait_until    timestamptz,
    ADD COLUMN resume_reason text CHECK (resume_reason IN ('answered', 'handover'));
COMMENT ON COLUMN agentq.tasks.run_seconds IS
    'Running time over all attempts, as of the last committed step: what timeout_seconds bounds.';
COMMENT ON COLUMN agentq.tasks.question IS
    'While waiting: the question the session asked (ask_human); answer it with agentq.answer().';
COMMENT ON COLUMN agentq.tasks.wait_until IS
    'While waiting: when the task expires unanswered (wait_timeout_seconds after it asked).';

ALTER TABLE agentq.tasks DROP CONSTRAINT tasks_status_check;
ALTER TABLE agentq.tasks ADD CONSTRAINT tasks_status_check CHECK (status IN (
    'queued', 'running', 'retrying', 'waiting',
    'completed', 'failed', 'timeout', 'budget_exceeded',
    'max_steps', 'cancelled', 'expired', 'rejected'));

-- Every status with its count, `waiting` included.
CREATE OR REPLACE VIEW agentq.status_counts AS
SELECT s.status,
       agentq.is_final(s.status)  AS final,
       coalesce(c.n, 0)           AS tasks
  FROM (VALUES (1, 'queued'), (2, 'running'), (3, 'retrying'), (4, 'waiting'), (5, 'completed'),
               (6, 'failed'), (7, 'timeout'), (8, 'budget_exceeded'), (9, 'max_steps'),
               (10, 'cancelled'), (11, 'expired'), (12, 'rejected')) AS s(ord, status)
  LEFT JOIN (SELECT status, count(*) AS n FROM agentq.tasks GROUP BY status) c
         ON c.status = s.status
 ORDER BY s.ord;

-- The sweeper's scans: waiting tasks (to expire or cancel) and answered
-- ones (to publish).
CREATE INDEX tasks_waiting_idx ON agentq.tasks (wait_until) WHERE status = 'waiting';
CREATE INDEX tasks_resume_idx ON agentq.tasks (task_id) WHERE resume_reason IS NOT NULL;

-- The rows a new attempt resumes from, in the order the engine reads them.
-- Every attempt's rows are returned: a step's LLM reply is the one of the
-- earliest attempt that committed it, and its tool results are matched to
-- its calls by tool_call_id (src/agent/agent.c).
CREATE FUNCTION agentq.session_log(p_task uuid)
RETURNS TABLE (attempt integer, step integer, seq integer, kind text, message text,
               prompt_tokens bigint, completion_tokens bigint, cost_usd double precision)
LANGUAGE sql STABLE
AS $$
    SELECT s.attempt, s.step, s.seq, s.kind, s.message, coalesce(s.prompt_tokens, 0),
           coalesce(s.completion_tokens, 0), coalesce(s.cost_usd, 0)::float8
      FROM agentq.steps s
     WHERE s.task_id = p_task AND s.message IS NOT NULL
     ORDER BY s.step, s.kind, s.attempt, s.seq
$$;

-- Answers the question of a waiting task: the waiting tool row becomes
-- the call's result, and the task goes back to the queue (the sweeper,
-- woken by the NOTIFY, publishes it) to resume with the answer. Refused,
-- naming the status, for a task that is not waiting (a second answer
-- finds it queued or running). Callable by the writer role.
CREATE FUNCTION agentq.answer(p_task uuid, p_answer text) RETURNS text
LANGUAGE plpgsql
AS $$
DECLARE
    t agentq.tasks%ROWTYPE;
    n integer;
BEGIN
    IF p_task IS NULL OR p_answer IS NULL THEN
        RAISE EXCEPTION 'agentq.answer: the task id and the answer must not be NULL'
            USING ERRCODE = 'null_value_not_allowed';
    END IF;
    SELECT * INTO t FROM agentq.tasks WHERE task_id = p_task FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no task %', p_task USING ERRCODE = 'no_data_found';
    END IF;
    IF t.status <> 'waiting' THEN
        RAISE EXCEPTION 'task % is %, not waiting for an answer%', p_task, t.status,
            CASE WHEN t.resume_reason = 'answered' THEN ' (it was answered already)' ELSE '' END
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    UPDATE agentq.steps s
       SET status = 'ok',
           message = json_build_object('role', 'tool', 'tool_call_id', s.detail ->> 'tool_call_id',
                                       'name', s.name, 'content', p_answer)::text,
           detail = coalesce(s.detail, '{}'::jsonb) || jsonb_build_object('output', left(p_answer, 2048)),
           duration_ms = extract(epoch FROM now() - s.started_at) * 1000
     WHERE s.task_id = p_task AND s.kind = 'tool' AND s.status = 'waiting';
    GET DIAGNOSTICS n = ROW_COUNT;
    IF n = 0 THEN
        RAISE EXCEPTION 'task % is waiting but has no open question in agentq.steps', p_task
            USING ERRCODE = 'data_corrupted';
    END IF;
    UPDATE agentq.tasks SET status = 'queued', resume_reason = 'answered', swept_at = NULL
     WHERE task_id = p_task;
    PERFORM pg_notify('agentq_cancel', p_task::text); -- wakes a sweeper now
    RETURN 'queued';
END
$$;

-- The sweeper, now also for sessions that wait: ends waiting tasks that
-- were cancelled or waited past wait_until (with their dead letter), and
-- publishes answered ones as well as running rows whose lease expired.
CREATE OR REPLACE FUNCTION agentq.sweep_leases(p_limit integer, p_resweep_seconds double precision)
RETURNS TABLE (swept_task_id uuid, swept_body bytea, swept_priority smallint)
LANGUAGE plpgsql
AS $$
BEGIN
    WITH ended AS (
        UPDATE agentq.tasks t
           SET status = CASE WHEN t.cancel_requested THEN 'cancelled' ELSE 'expired' END,
               error = CASE WHEN t.cancel_requested THEN 'cancelled while waiting for an answer'
                            ELSE format('no answer by %s (wait_timeout_seconds) to its question: %s',
                                        t.wait_until, left(t.question, 200)) END,
               finished_at = now()
          FROM (SELECT c.task_id FROM agentq.tasks c
                 WHERE c.status = 'waiting' AND (c.cancel_requested OR c.wait_until <= now())
                 LIMIT p_limit
                 FOR UPDATE SKIP LOCKED) w
         WHERE t.task_id = w.task_id
        RETURNING t.task_id, t.status, t.error, t.body)
    INSERT INTO agentq.dead_letters (task_id, reason, error, body)
    SELECT e.task_id, e.status, e.error, e.body FROM ended e;

    RETURN QUERY
    UPDATE agentq.tasks t
       SET swept_at = now()
      FROM (SELECT c.task_id FROM agentq.tasks c
             WHERE c.body IS NOT NULL
               AND ((c.status = 'running' AND (c.lease_until IS NULL OR c.lease_until < now()))
                    OR (c.status = 'queued' AND c.resume_reason = 'answered'))
               AND (c.swept_at IS NULL OR c.swept_at < now() - p_resweep_seconds * interval '1 second')
             ORDER BY c.lease_until NULLS FIRST
             LIMIT p_limit
             FOR UPDATE SKIP LOCKED) s
     WHERE t.task_id = s.task_id
    RETURNING t.task_id, t.body, t.priority;
END
$$;

CREATE OR REPLACE FUNCTION agentq.route(
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
    -- A continuation (answered, handed over) has started long ago: the
    -- TTL was about its first wait in the queue.
    o_ttl_ms := CASE WHEN t.deadline IS NULL OR t.resume_reason IS NOT NULL THEN -1
                     ELSE greatest(0, (extract(epoch FROM t.deadline - now()) * 1000)::bigint) END;
END
$$;

-- The claim, as in 013, and: a waiting task is not run (its stray copy is
-- acked), a continuation is not held to its TTL, and o_run_seconds is the
-- running time earlier attempts used (what is left of timeout_seconds is
-- the new attempt's).
DROP FUNCTION agentq.claim(uuid, text, text, integer, integer, double precision,
    double precision, text, bytea, boolean, bigint, bigint, text, text, integer,
    double precision, integer, integer, text);

CREATE FUNCTION agentq.claim(
    p_task uuid, p_user text, p_goal text, p_priority integer, p_max_steps integer,
    p_budget double precision, p_timeout double precision, p_model text,
    p_body bytea, p_has_metadata boolean, p_enqueued_us bigint, p_deadline_us bigint,
    p_worker text, p_token text, p_owner integer, p_lease_seconds double precision,
    p_user_cap integer, p_max_interruptions integer, p_over_budget text,
    OUT o_outcome text, OUT o_attempt integer, OUT o_failures integer, OUT o_status text,
    OUT o_reason text, OUT o_weight integer, OUT o_run_seconds double precision)
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
    -- A waiting task has no message of its own (agentq.answer sends it
    -- back): a stray copy is acked unrun, like one of a final task.
    IF agentq.is_final(t.status) OR t.status = 'waiting' THEN
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
    ELSIF t.deadline IS NOT NULL AND t.deadline <= now() AND t.resume_reason IS NULL THEN
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
        resume_reason = NULL, question = NULL, wait_until = NULL,
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
    RETURNING attempt, failures, run_seconds INTO o_attempt, o_failures, o_run_seconds;
    o_outcome := 'run';
    o_status := 'running';
    o_weight := hold.o_weight; -- set: a claim that runs got past agentq.user_hold
END
$$;

GRANT EXECUTE ON FUNCTION agentq.claim(uuid, text, text, integer, integer, double precision,
    double precision, text, bytea, boolean, bigint, bigint, text, text, integer,
    double precision, integer, integer, text) TO agentq_worker;
GRANT EXECUTE ON FUNCTION agentq.session_log(uuid) TO agentq_worker, agentq_reader;
REVOKE EXECUTE ON FUNCTION agentq.answer(uuid, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION agentq.answer(uuid, text) TO agentq_worker;
