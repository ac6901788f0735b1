-- 011_user_cap.sql — limits.max_inflight_per_user: how many of one user's
-- tasks may run at once across the fleet. The worker's claim asks
-- agentq.user_slot_free() in the same statement that would set the row
-- running; a claim refused for it leaves the row as it was, and the worker
-- sends the task back to wait.
--
-- Claims under a cap take one fleet-wide advisory lock, held to the end of
-- the claiming transaction, so two workers cannot both see the last free
-- slot. One lock for every user (not one per user) keeps batched claims
-- free of deadlocks; it is taken only when a cap is set.

-- Finds running tasks by user quickly.
CREATE INDEX tasks_running_user_idx ON agentq.tasks (user_id) WHERE status = 'running';

-- True if `p_user` runs fewer than `p_cap` tasks other than `p_task`
-- (p_cap <= 0: no cap). VOLATILE: the count runs with a snapshot taken
-- after the lock, so it sees what the last holder committed.
CREATE FUNCTION agentq.user_slot_free(p_user text, p_task uuid, p_cap integer)
RETURNS boolean
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    n bigint;
BEGIN
    IF p_cap IS NULL OR p_cap <= 0 THEN
        RETURN true;
    END IF;
    PERFORM pg_advisory_xact_lock(hashtext('agentq.user_cap'));
    SELECT count(*) INTO n FROM agentq.tasks
     WHERE user_id = p_user AND status = 'running' AND task_id <> p_task;
    RETURN n < p_cap;
END
$$;

GRANT EXECUTE ON FUNCTION agentq.user_slot_free(text, uuid, integer) TO agentq_worker;
