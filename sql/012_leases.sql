-- 012_leases.sql — a task_id names one task for good, and a running task
-- belongs to one live worker.
--
-- * The first message with a task_id defines the task: its body is kept
--   (body, body_sha256) and a later message with the same id never changes
--   the row; one whose body differs is reported as a conflict and recorded
--   as a `duplicate` dead letter by the worker.
-- * A running row holds a lease (lease_owner, lease_until) that its worker
--   renews in one statement a few times a lease. Another delivery takes a
--   running row over only when the lease has expired or its owner is gone;
--   otherwise it is a duplicate and is acked unrun (the owner still holds
--   its own unacked copy). An owner is alive while its store connection
--   holds the session advisory lock (AQ_OWNER_NS, lease_owner): a killed
--   worker's connection closes and the lock goes with it at once.
-- * A sweeper finds running rows whose lease expired (a copy acked by
--   mistake, a consumer_timeout, a purge: no message is left to redeliver
--   them) and the worker republishes the stored body.
-- * failures counts failed attempts (amqp.max_attempts); interruptions
--   counts executions cut short by a lost worker or a drain
--   (amqp.max_interruptions), so crashes do not use up retries.
-- * The row, not the message, says what attempt and deadline a task is at:
--   deadline is set from the first message's TTL.
--
-- The advisory lock namespace is 1634169969 ('agtq'); lease_owner is the
-- second key, a random positive int4 each store picks.
--
-- Owned by the store module (src/store/store.c) and the worker; 001's tables.

ALTER TABLE agentq.tasks
    ADD COLUMN body          bytea,
    ADD COLUMN body_sha256   bytea,
    ADD COLUMN deadline      timestamptz,
    ADD COLUMN failures      integer NOT NULL DEFAULT 0 CHECK (failures >= 0),
    ADD COLUMN interruptions integer NOT NULL DEFAULT 0 CHECK (interruptions >= 0),
    ADD COLUMN lease_owner   integer,
    ADD COLUMN lease_until   timestamptz,
    ADD COLUMN leased_at     timestamptz,
    ADD COLUMN swept_at      timestamptz;

COMMENT ON COLUMN agentq.tasks.body IS
    'The message body that defined the task (the first one with its task_id); the sweeper republishes it.';
COMMENT ON COLUMN agentq.tasks.failures IS
    'Attempts that failed (retryable errors); amqp.max_attempts bounds them.';
COMMENT ON COLUMN agentq.tasks.interruptions IS
    'Executions cut short by a lost worker or a drain; amqp.max_interruptions bounds them.';
COMMENT ON COLUMN agentq.tasks.lease_until IS
    'While running: the lease its worker renews; past it (or with the owner gone) another delivery may take over.';
COMMENT ON COLUMN agentq.tasks.deadline IS
    'The first message''s per-message TTL as an absolute time; an attempt that would start after it ends the task as expired.';

-- The sweeper's scan.
CREATE INDEX tasks_running_lease_idx ON agentq.tasks (lease_until) WHERE status = 'running';

-- True while the worker holding lease key p_owner is connected (its store
-- connection holds the advisory lock). A lease last taken or renewed
-- before the server started (p_leased_at) says nothing yet: its worker
-- may simply not have reconnected since the restart, so it counts as
-- alive until the lease expires. (A worker takes its lock as it connects,
-- before it claims or renews anything, so a lease written since the start
-- with no lock held means the worker is gone.)
CREATE FUNCTION agentq.owner_alive(p_owner integer, p_leased_at timestamptz) RETURNS boolean
LANGUAGE sql STABLE
AS $$
    SELECT p_owner IS NOT NULL AND (
        p_leased_at IS NULL OR p_leased_at < pg_postmaster_start_time()
        OR EXISTS (SELECT 1 FROM pg_catalog.pg_locks l
                    WHERE l.locktype = 'advisory' AND l.granted
                      AND l.database = (SELECT d.oid FROM pg_catalog.pg_database d
                                         WHERE d.datname = current_database())
                      AND l.classid = 1634169969::oid AND l.objid = p_owner::oid
                      AND l.objsubid = 2))
$$;

-- Takes the liveness lock of lease key p_owner for this session unless it
-- holds it already (a session lock taken twice must be released twice).
-- False when another session holds it: a stale connection of this very
-- worker the server has not noticed yet, or (rarely) another worker that
-- drew the same key; either way the next renewal tries again.
CREATE FUNCTION agentq.hold_owner_lock(p_owner integer) RETURNS boolean
LANGUAGE sql VOLATILE
AS $$
    SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_locks l
                    WHERE l.locktype = 'advisory' AND l.granted AND l.pid = pg_backend_pid()
                      AND l.classid = 1634169969::oid AND l.objid = p_owner::oid
                      AND l.objsubid = 2)
        OR pg_try_advisory_lock(1634169969, p_owner)
$$;

-- Renews the leases of the tasks a worker runs (one statement for all of
-- them) and keeps its liveness lock. Returns the tasks of p_tasks this
-- worker no longer holds (another attempt took them over), so it can stop
-- paying for them.
CREATE FUNCTION agentq.renew_leases(p_owner integer, p_seconds double precision, p_tasks uuid[])
RETURNS SETOF uuid
LANGUAGE plpgsql
AS $$
BEGIN
    PERFORM agentq.hold_owner_lock(p_owner);
    UPDATE agentq.tasks
       SET lease_until = now() + p_seconds * interval '1 second', leased_at = now()
     WHERE task_id = ANY (p_tasks) AND status = 'running' AND lease_owner = p_owner;
    RETURN QUERY
        SELECT u.id FROM unnest(p_tasks) AS u(id)
         WHERE NOT EXISTS (SELECT 1 FROM agentq.tasks t
                            WHERE t.task_id = u.id AND t.status = 'running' AND t.lease_owner = p_owner);
END
$$;

-- Marks up to p_limit running rows whose lease expired as swept and
-- returns what the worker republishes. A row is swept again only after
-- p_resweep_seconds (its copy may wait behind a long queue); a claim
-- clears swept_at. Concurrent sweepers skip each other's rows.
CREATE FUNCTION agentq.sweep_leases(p_limit integer, p_resweep_seconds double precision)
RETURNS TABLE (swept_task_id uuid, swept_body bytea, swept_priority smallint)
LANGUAGE sql
AS $$
    UPDATE agentq.tasks t
       SET swept_at = now()
      FROM (SELECT c.task_id FROM agentq.tasks c
             WHERE c.status = 'running' AND c.body IS NOT NULL
               AND (c.lease_until IS NULL OR c.lease_until < now())
               AND (c.swept_at IS NULL OR c.swept_at < now() - p_resweep_seconds * interval '1 second')
             ORDER BY c.lease_until NULLS FIRST
             LIMIT p_limit
             FOR UPDATE SKIP LOCKED) s
     WHERE t.task_id = s.task_id
    RETURNING t.task_id, t.body, t.priority
$$;

-- The claim of one delivery: decides, under the row's lock, whether this
-- message runs the task, and takes the row for this worker if so.
--
-- o_outcome:
--   run       the row is running for this worker as attempt o_attempt
--             (a new task, a retry, a requeued task, a takeover of a lost
--             worker's run, or this very claim replayed)
--   final     the task is final already: ack
--   duplicate a live worker runs it under a live lease: ack (that worker
--             holds its own copy)
--   conflict  the task_id names a task defined by another body: record
--             the message as a `duplicate` dead letter and ack
--   ended     this claim ended the task (o_status says how: cancelled,
--             expired, or failed after too many interruptions) and
--             recorded its dead letter (reason: the status, or
--             `interrupted`): ack
--   busy      the user runs p_user_cap tasks already; nothing written
CREATE FUNCTION agentq.claim(
    p_task uuid, p_user text, p_goal text, p_priority integer, p_max_steps integer,
    p_budget double precision, p_timeout double precision, p_model text,
    p_body bytea, p_has_metadata boolean, p_enqueued_us bigint, p_deadline_us bigint,
    p_worker text, p_token text, p_owner integer, p_lease_seconds double precision,
    p_user_cap integer, p_max_interruptions integer,
    OUT o_outcome text, OUT o_attempt integer, OUT o_failures integer, OUT o_status text)
LANGUAGE plpgsql
AS $$
DECLARE
    t     agentq.tasks%ROWTYPE;
    h     bytea := sha256(p_body);
    lease timestamptz := now() + p_lease_seconds * interval '1 second';
    ints  integer;
    err   text;
BEGIN
    LOOP
        SELECT * INTO t FROM agentq.tasks WHERE task_id = p_task FOR UPDATE;
        EXIT WHEN FOUND;
        IF NOT agentq.user_slot_free(p_user, p_task, p_user_cap) THEN
            o_outcome := 'busy'; o_attempt := 1; o_failures := 0; o_status := 'queued';
            RETURN;
        END IF;
        INSERT INTO agentq.tasks
            (task_id, user_id, goal, priority, status, attempt, max_steps, budget_usd,
             timeout_seconds, model, metadata, enqueued_at, started_at, worker_id,
             claim_token, body, body_sha256, deadline, lease_owner, lease_until, leased_at)
        VALUES
            (p_task, p_user, p_goal, p_priority, 'running', 1, p_max_steps, p_budget,
             p_timeout, p_model,
             -- jsonb from the original text: numbers keep their digits
             CASE WHEN p_has_metadata THEN convert_from(p_body, 'UTF8')::jsonb -> 'metadata' END,
             coalesce(timestamptz 'epoch' + p_enqueued_us * interval '1 microsecond', now()),
             now(), p_worker, p_token, p_body, h,
             CASE WHEN p_deadline_us > 0
                  THEN timestamptz 'epoch' + p_deadline_us * interval '1 microsecond' END,
             p_owner, lease, now())
        ON CONFLICT (task_id) DO NOTHING;
        IF FOUND THEN
            o_outcome := 'run'; o_attempt := 1; o_failures := 0; o_status := 'running';
            RETURN;
        END IF;
        -- Another claim inserted the row since our look: read it locked.
    END LOOP;

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

    -- From here this message either ends the task or runs it. A running
    -- row that got this far lost its worker: one more interruption.
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

    IF NOT agentq.user_slot_free(t.user_id, p_task, p_user_cap) THEN
        o_outcome := 'busy';
        RETURN;
    END IF;

    -- A row made before any message defined it (producer --record, a dead
    -- letter) takes this message's task; a defined row keeps its own.
    UPDATE agentq.tasks SET
        status = 'running',
        -- a queued row nothing ever started (producer --record) starts at 1
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
END
$$;

GRANT EXECUTE ON FUNCTION agentq.owner_alive(integer, timestamptz) TO agentq_worker;
GRANT EXECUTE ON FUNCTION agentq.hold_owner_lock(integer) TO agentq_worker;
GRANT EXECUTE ON FUNCTION agentq.renew_leases(integer, double precision, uuid[]) TO agentq_worker;
GRANT EXECUTE ON FUNCTION agentq.sweep_leases(integer, double precision) TO agentq_worker;
GRANT EXECUTE ON FUNCTION agentq.claim(uuid, text, text, integer, integer, double precision,
    double precision, text, bytea, boolean, bigint, bigint, text, text, integer,
    double precision, integer, integer) TO agentq_worker;
