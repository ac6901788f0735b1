-- 016_visibility.sql — what `agentqctl wait` and `agentqctl prune` need
-- from the database: a notification when a task becomes final, and
-- retention of finished tasks and old dead letters in short batches.
--
-- * NOTIFY channel `agentq_final`, payload the task_id as text, sent at
--   the COMMIT of every change that makes a task's status final (an UPDATE
--   from a status that is not final, or a row inserted final, e.g. a
--   rejected message's). Never replayed: a listener that was disconnected
--   reads the rows again after it LISTENs anew (agentqctl wait does). A
--   requeued task that ends again notifies again. PostgreSQL serialises
--   the commits of transactions that notify; the worker's writer commits
--   a batch of rows at a time, so that costs one short lock per batch.
--
-- * agentq.prune(p_cutoff, p_batch, p_statuses, p_dry_run) deletes ONE
--   batch and returns what it deleted: up to p_batch finished tasks
--   (agentq.is_final(status)) whose finished_at is before p_cutoff, oldest
--   first, with their steps; and up to p_batch dead letters recorded
--   before p_cutoff. Called in autocommit, each call is one short
--   transaction holding row locks on that batch only; rows another
--   transaction holds locked are skipped (left for the next run), never
--   waited for. Call it again while a count equals p_batch. p_statuses
--   (final statuses; NULL: all) limits the tasks, and then leaves dead
--   letters alone: their reasons are not statuses. p_dry_run deletes
--   nothing and returns everything a full prune would delete now (not
--   one batch). Tasks that are not final (queued, running, retrying,
--   waiting) are never touched. A pruned task_id is forgotten: a message
--   of it published again later runs as a new task.
--
--   A worker or a cron job with the writer role calls it the same way the
--   CLI does, e.g. keep 30 days:
--     SELECT * FROM agentq.prune(now() - interval '30 days');  -- repeat while
--     -- tasks = 1000 or dead_letters = 1000 (the default batch)
--   agentqctl prune --older-than 30d fixes the cutoff once and loops.
--
-- The indexes it reads exist since 001: tasks_finished_at_idx (finished_at
-- is set exactly when a status becomes final and cleared by a requeue, so
-- a partial index on final rows would hold the same entries),
-- steps_task_idx (steps of a batch of tasks) and
-- dead_letters_recorded_at_idx. None is added, so no write pays for this.
--
-- Owned by agentqctl (src/cmd/agentqctl.c: wait, prune).

-- ------------------------------------------------------------ final --

CREATE FUNCTION agentq.notify_final() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    PERFORM pg_notify('agentq_final', NEW.task_id::text);
    RETURN NULL;
END
$$;

CREATE TRIGGER tasks_notify_final
    AFTER UPDATE OF status ON agentq.tasks
    FOR EACH ROW
    WHEN (agentq.is_final(NEW.status) AND NOT agentq.is_final(OLD.status))
    EXECUTE FUNCTION agentq.notify_final();

CREATE TRIGGER tasks_notify_final_insert
    AFTER INSERT ON agentq.tasks
    FOR EACH ROW
    WHEN (agentq.is_final(NEW.status))
    EXECUTE FUNCTION agentq.notify_final();

-- ------------------------------------------------------------ prune --

CREATE FUNCTION agentq.prune(p_cutoff timestamptz, p_batch integer DEFAULT 1000,
                             p_statuses text[] DEFAULT NULL, p_dry_run boolean DEFAULT false,
                             OUT tasks bigint, OUT steps bigint, OUT dead_letters bigint)
LANGUAGE plpgsql
AS $$
DECLARE
    bad  text;
    ids  uuid[];
BEGIN
    IF p_cutoff IS NULL THEN
        RAISE EXCEPTION 'agentq.prune: p_cutoff must be a time, not NULL'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_batch IS NULL OR p_batch < 1 OR p_batch > 100000 THEN
        RAISE EXCEPTION 'agentq.prune: p_batch must be from 1 to 100000 (got %)', p_batch
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT s INTO bad FROM unnest(p_statuses) AS u(s)
     WHERE s IS NULL OR NOT agentq.is_final(s) LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'agentq.prune: ''%'' is not a final status (only finished tasks are pruned)',
            coalesce(bad, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;

    IF p_dry_run THEN
        SELECT count(*) INTO tasks FROM agentq.tasks t
         WHERE agentq.is_final(t.status) AND t.finished_at < p_cutoff
           AND (p_statuses IS NULL OR t.status = ANY (p_statuses));
        SELECT count(*) INTO steps FROM agentq.steps s JOIN agentq.tasks t ON t.task_id = s.task_id
         WHERE agentq.is_final(t.status) AND t.finished_at < p_cutoff
           AND (p_statuses IS NULL OR t.status = ANY (p_statuses));
        SELECT count(*) INTO dead_letters FROM agentq.dead_letters d
         WHERE p_statuses IS NULL AND d.recorded_at < p_cutoff;
        RETURN;
    END IF;

    SELECT coalesce(array_agg(v.task_id), '{}') INTO ids
      FROM (SELECT t.task_id FROM agentq.tasks t
             WHERE agentq.is_final(t.status) AND t.finished_at < p_cutoff
               AND (p_statuses IS NULL OR t.status = ANY (p_statuses))
             ORDER BY t.finished_at
             LIMIT p_batch
               FOR UPDATE SKIP LOCKED) v;
    -- The steps first, to count them (the foreign key's cascade would
    -- delete them too, uncounted).
    WITH d AS (DELETE FROM agentq.steps s WHERE s.task_id = ANY (ids) RETURNING 1)
    SELECT count(*) INTO steps FROM d;
    WITH d AS (DELETE FROM agentq.tasks t WHERE t.task_id = ANY (ids) RETURNING 1)
    SELECT count(*) INTO tasks FROM d;

    dead_letters := 0;
    IF p_statuses IS NULL THEN
        WITH v AS (SELECT x.id FROM agentq.dead_letters x
                    WHERE x.recorded_at < p_cutoff
                    ORDER BY x.recorded_at
                    LIMIT p_batch
                      FOR UPDATE SKIP LOCKED),
             d AS (DELETE FROM agentq.dead_letters x USING v WHERE x.id = v.id RETURNING 1)
        SELECT count(*) INTO dead_letters FROM d;
    END IF;
END
$$;

COMMENT ON FUNCTION agentq.prune(timestamptz, integer, text[], boolean) IS
    'Deletes one batch of finished tasks (with their steps) finished before p_cutoff and of dead letters recorded before it; returns the counts. Call again while a count equals p_batch.';

-- ------------------------------------------------------------ grants --

-- It deletes: the writer's, not the reader's (functions are PUBLIC unless
-- revoked). Explicit, though 003's default privileges give the worker the
-- same when the role that ran 003 runs this file.
REVOKE EXECUTE ON FUNCTION agentq.prune(timestamptz, integer, text[], boolean) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION agentq.prune(timestamptz, integer, text[], boolean) TO agentq_worker;
