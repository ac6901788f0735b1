-- 017_dashboard.sql — the indexes the dashboard's pages need to stay
-- fast on a long history (`agentqctl dashboard`, src/dash/dashboard.sql;
-- measured by bench/history on 1,000,000 tasks and 10 million step rows:
-- docs/benchmarks.md, "Dashboard queries").
--
-- * The task list, newest first, filtered by status or user, paged by a
--   cursor: one index per way in, each ordered by the list's key,
--   listed_at = coalesce(enqueued_at, finished_at, '-infinity') (a
--   message rejected before any claim has a row without enqueued_at), and
--   task_id to break ties. Without them a filter on a rare status or on a
--   user whose tasks are all old walks the whole table backwards.
-- * Today's LLM calls by provider (the overview): a partial index on the
--   llm rows' start, holding the columns the totals read, so the day's
--   rows are counted from the index alone.
--
-- What they cost the writers: a task row's indexes are updated when its
-- status changes (tasks_status_idx already makes that a non-HOT update),
-- not on the progress updates of each step, since none of these columns
-- changes then; a step row's insert updates one more index when it is an
-- llm row.
--
-- Plain CREATE INDEX, as every migration runs in a transaction: on a large
-- live database, build them beforehand with CREATE INDEX CONCURRENTLY and
-- the same names and definitions (then these are no-ops); bench/history
-- prints how long each takes at 10 million rows.
--
-- Owned by the dashboard (src/dash/).

CREATE INDEX IF NOT EXISTS tasks_listed_idx
    ON agentq.tasks ((coalesce(enqueued_at, finished_at, '-infinity'::timestamptz)), task_id);
CREATE INDEX IF NOT EXISTS tasks_status_listed_idx
    ON agentq.tasks (status, (coalesce(enqueued_at, finished_at, '-infinity'::timestamptz)), task_id);
CREATE INDEX IF NOT EXISTS tasks_user_listed_idx
    ON agentq.tasks (user_id, (coalesce(enqueued_at, finished_at, '-infinity'::timestamptz)), task_id);

CREATE INDEX IF NOT EXISTS steps_llm_started_idx
    ON agentq.steps (started_at) INCLUDE (provider, status, prompt_tokens, completion_tokens, cost_usd)
    WHERE kind = 'llm';
