-- dashboard.sql — every statement the dashboard (src/dash/dashboard.c)
-- sends, one per `-- name: NAME` section. The file is compiled into the
-- program (src/dash/embed.cmake) and read by bench/history, which
-- EXPLAIN ANALYZEs each section on a large generated history, so what is
-- measured is what runs. Not a migration: nothing here changes the schema.
--
-- Rules for the reads: each returns one row with one column of JSON text,
-- built here so that PostgreSQL does the escaping; each is bounded (a
-- LIMIT, or an index range over a short time) so that it stays fast on
-- ten million step rows (docs/benchmarks.md, "Dashboard queries"). They
-- run on the reader connection (agentq_reader role, read-only, TimeZone
-- UTC: "today" is the UTC day). Optional filters are `$n IS NULL OR ...`:
-- libpq's unnamed statements are planned with their parameters' values,
-- so a filter that is not given folds away before planning.
--
-- The task list's order is `listed_at` = coalesce(enqueued_at,
-- finished_at, '-infinity'): a message rejected before any claim has a row
-- without enqueued_at (src/store/store.c, aq_dead_task), and it must still
-- show among the newest. sql/017_dashboard.sql indexes that expression;
-- it must be written the same way here for the planner to use it.
--
-- The actions (cancel, requeue_*) run on the writer connection and are
-- agentqctl's statements (src/cmd/agentqctl.c: cmd_cancel, requeue,
-- mark_requeued), so a task cancelled or a dead letter requeued here ends
-- exactly as from the command line.

-- name: overview_counts
-- Tasks not final by status, tasks finished in the last hour and today,
-- parked dead letters, and the database's clock (the chart's "now").
SELECT json_build_object(
    'now', extract(epoch FROM now()),
    'in_flight', (SELECT coalesce(json_object_agg(s.status, s.n), '{}')
                    FROM (SELECT status, count(*) AS n FROM agentq.tasks
                           WHERE status IN ('queued', 'running', 'retrying', 'waiting')
                           GROUP BY status) s),
    'finished_last_hour', (SELECT count(*) FROM agentq.tasks
                            WHERE finished_at >= now() - interval '1 hour'),
    'finished_today', (SELECT count(*) FROM agentq.tasks
                        WHERE finished_at >= date_trunc('day', now())),
    'dead_letters_parked', (SELECT count(*) FROM agentq.dead_letters WHERE requeued_at IS NULL))

-- name: overview_throughput
-- Tasks finished per minute and final status over the last hour (the
-- current minute included): the chart. Minutes are epoch seconds.
SELECT coalesce(json_agg(json_build_object('minute', s.minute, 'status', s.status, 'tasks', s.n)
                         ORDER BY s.minute, s.status), '[]')
  FROM (SELECT extract(epoch FROM date_trunc('minute', finished_at))::bigint AS minute,
               status, count(*) AS n
          FROM agentq.tasks
         WHERE finished_at >= date_trunc('minute', now()) - interval '59 minutes'
         GROUP BY 1, 2) s

-- name: overview_running
-- Running tasks by worker, with the oldest start among them.
SELECT coalesce(json_agg(json_build_object('worker_id', s.worker_id, 'running', s.n,
                                           'oldest_started_at', s.oldest)
                         ORDER BY s.n DESC, s.worker_id), '[]')
  FROM (SELECT coalesce(worker_id, '') AS worker_id, count(*) AS n, min(started_at) AS oldest
          FROM agentq.tasks
         WHERE status = 'running'
         GROUP BY 1) s

-- name: overview_llm
-- Today's LLM calls by provider: answered (ok), from the fleet's cache,
-- refused with a 429, other failures; tokens and cost of them all.
SELECT coalesce(json_agg(row_to_json(s) ORDER BY s.calls DESC, s.provider), '[]')
  FROM (SELECT coalesce(provider, '') AS provider,
               count(*) AS calls,
               count(*) FILTER (WHERE status = 'ok') AS ok,
               count(*) FILTER (WHERE status = 'cached') AS cached,
               count(*) FILTER (WHERE status = 'rate_limited') AS rate_limited,
               count(*) FILTER (WHERE coalesce(status, '') NOT IN ('ok', 'cached', 'rate_limited')) AS errors,
               coalesce(sum(prompt_tokens), 0) AS prompt_tokens,
               coalesce(sum(completion_tokens), 0) AS completion_tokens,
               coalesce(sum(cost_usd), 0) AS cost_usd
          FROM agentq.steps
         WHERE kind = 'llm' AND started_at >= date_trunc('day', now())
         GROUP BY 1) s

-- name: overview_limits
-- The fleet's token buckets as agentq.take_tokens would see them now:
-- what is available after the refill since the last touch (a pause pushes
-- updated_at past now, so a paused bucket shows its 0), and saturation =
-- the share of the capacity in use.
SELECT coalesce(json_agg(json_build_object(
           'name', b.name, 'capacity', b.capacity, 'available', b.available,
           'refill_per_sec', b.refill_per_sec,
           'saturation', CASE WHEN b.capacity > 0 THEN 1 - b.available / b.capacity END,
           'paused_until', CASE WHEN b.paused_until > now() THEN b.paused_until END)
         ORDER BY b.name), '[]')
  FROM (SELECT r.name, r.capacity, r.refill_per_sec, r.paused_until,
               least(r.capacity, r.tokens + r.refill_per_sec *
                     greatest(0, extract(epoch FROM clock_timestamp() - r.updated_at)::double precision))
                   AS available
          FROM agentq.rate_limits r) b

-- name: tasks
-- One page of the task list, newest first. $1 status, $2 user, $3 and $4
-- the listed_at range [from, to), $5/$6 the cursor (the listed_at and
-- task_id of the last row of the previous page), $7 the page size; the
-- caller asks one row more than it shows to know whether there is more.
SELECT coalesce(json_agg(json_build_object(
           'task_id', t.task_id, 'user_id', t.user_id, 'status', t.status,
           'goal', left(t.goal, 240), 'goal_bytes', octet_length(t.goal),
           'steps', t.steps, 'attempt', t.attempt, 'cost_usd', t.cost_usd,
           'tokens', t.prompt_tokens + t.completion_tokens, 'worker_id', t.worker_id,
           'listed_at', t.listed_at, 'enqueued_at', t.enqueued_at,
           'started_at', t.started_at, 'finished_at', t.finished_at)
         ORDER BY t.listed_at DESC, t.task_id DESC), '[]')
  FROM (SELECT task_id, user_id, status, goal, steps, attempt, cost_usd, prompt_tokens,
               completion_tokens, worker_id, enqueued_at, started_at, finished_at,
               coalesce(enqueued_at, finished_at, '-infinity') AS listed_at
          FROM agentq.tasks
         WHERE ($1::text IS NULL OR status = $1::text)
           AND ($2::text IS NULL OR user_id = $2::text)
           AND ($3::timestamptz IS NULL OR coalesce(enqueued_at, finished_at, '-infinity') >= $3::timestamptz)
           AND ($4::timestamptz IS NULL OR coalesce(enqueued_at, finished_at, '-infinity') < $4::timestamptz)
           AND ($5::timestamptz IS NULL
                OR (coalesce(enqueued_at, finished_at, '-infinity'), task_id) < ($5::timestamptz, $6::uuid))
         ORDER BY coalesce(enqueued_at, finished_at, '-infinity') DESC, task_id DESC
         LIMIT $7::integer) t

-- name: task
-- One task's row (not its body: the goal, metadata and limits say what it
-- holds). No row: no such task.
SELECT json_build_object(
           'task_id', t.task_id, 'user_id', t.user_id, 'goal', t.goal, 'priority', t.priority,
           'status', t.status, 'final', agentq.is_final(t.status), 'attempt', t.attempt,
           'failures', t.failures, 'interruptions', t.interruptions,
           'max_steps', t.max_steps, 'budget_usd', t.budget_usd,
           'timeout_seconds', t.timeout_seconds, 'model', t.model, 'steps', t.steps,
           'prompt_tokens', t.prompt_tokens, 'completion_tokens', t.completion_tokens,
           'cost_usd', t.cost_usd, 'run_seconds', t.run_seconds, 'result', t.result,
           'error', t.error, 'question', t.question, 'wait_until', t.wait_until,
           'worker_id', t.worker_id, 'metadata', t.metadata, 'lane', t.lane,
           'cancel_requested', t.cancel_requested, 'resume_reason', t.resume_reason,
           'deadline', t.deadline, 'enqueued_at', t.enqueued_at, 'started_at', t.started_at,
           'finished_at', t.finished_at, 'updated_at', t.updated_at)
  FROM agentq.tasks t
 WHERE t.task_id = $1::uuid

-- name: task_steps
-- Every step row of a task in the order it ran: by attempt and step, and
-- within a step by start (the tries that did not answer, seq 1, 2, ...,
-- came before the call that did, seq 0; the tool calls after it); at most
-- 2,000 rows: a task has at most 100 steps (max_steps) of one call and a
-- few tools each. The detail is cut to its first 600 characters of JSON
-- text.
SELECT coalesce(json_agg(json_build_object(
           'attempt', s.attempt, 'step', s.step, 'seq', s.seq, 'kind', s.kind, 'name', s.name,
           'provider', s.provider, 'status', s.status, 'started_at', s.started_at,
           'duration_ms', s.duration_ms, 'prompt_tokens', s.prompt_tokens,
           'completion_tokens', s.completion_tokens, 'cost_usd', s.cost_usd,
           'detail', left(s.detail::text, 600))
         ORDER BY s.attempt, s.step, s.started_at NULLS LAST, s.kind, s.seq, s.id), '[]')
  FROM (SELECT * FROM agentq.steps
         WHERE task_id = $1::uuid
         ORDER BY attempt, step, started_at NULLS LAST, kind, seq, id
         LIMIT 2000) s

-- name: task_dead_letters
-- The dead letters recorded for a task, newest first.
SELECT coalesce(json_agg(json_build_object(
           'id', d.id, 'reason', d.reason, 'error', left(d.error, 2000),
           'recorded_at', d.recorded_at, 'requeued_at', d.requeued_at)
         ORDER BY d.id DESC), '[]')
  FROM (SELECT id, reason, error, recorded_at, requeued_at
          FROM agentq.dead_letters
         WHERE task_id = $1::uuid
         ORDER BY id DESC
         LIMIT 50) d

-- name: dead_letters
-- One page of dead letters, newest first. $1 reason, $2 only those still
-- parked (not requeued), $3 the cursor (the last id of the previous
-- page), $4 the page size. The body preview is its first 300 characters
-- when its first bytes are UTF-8 (a cut may split a character: up to
-- three bytes fewer are tried), else its first 150 bytes in hex.
SELECT coalesce(json_agg(json_build_object(
           'id', d.id, 'task_id', d.task_id, 'reason', d.reason, 'error', left(d.error, 500),
           'recorded_at', d.recorded_at, 'requeued_at', d.requeued_at,
           'body_bytes', octet_length(d.body),
           'body_preview', CASE WHEN d.body IS NOT NULL THEN
               coalesce(left(coalesce(agentq.utf8_or_null(substring(d.body FROM 1 FOR 1200)),
                                      agentq.utf8_or_null(substring(d.body FROM 1 FOR 1199)),
                                      agentq.utf8_or_null(substring(d.body FROM 1 FOR 1198)),
                                      agentq.utf8_or_null(substring(d.body FROM 1 FOR 1197))), 300),
                        'hex:' || encode(substring(d.body FROM 1 FOR 150), 'hex')) END)
         ORDER BY d.id DESC), '[]')
  FROM (SELECT id, task_id, reason, error, recorded_at, requeued_at, body
          FROM agentq.dead_letters
         WHERE ($1::text IS NULL OR reason = $1::text)
           AND (NOT $2::boolean OR requeued_at IS NULL)
           AND ($3::bigint IS NULL OR id < $3::bigint)
         ORDER BY id DESC
         LIMIT $4::integer) d

-- name: dead_letter_reasons
-- Dead letters by reason: parked and all.
SELECT coalesce(json_agg(json_build_object('reason', r.reason, 'parked', r.parked, 'total', r.total)
                         ORDER BY r.reason), '[]')
  FROM (SELECT reason, count(*) FILTER (WHERE requeued_at IS NULL) AS parked, count(*) AS total
          FROM agentq.dead_letters
         GROUP BY reason) r

-- name: cancel
-- agentqctl cancel: ask for the task to stop; a trigger NOTIFYs
-- agentq_cancel and the worker running it stops it. A final task keeps
-- its status. No row: no such task.
UPDATE agentq.tasks SET cancel_requested = true
 WHERE task_id = $1::uuid
RETURNING json_build_object('task_id', task_id, 'status', status, 'final', agentq.is_final(status))

-- name: requeue_select
-- agentqctl requeue, for one dead letter: what to publish (read in
-- binary: the body is bytea). Duplicates are picked too, for the caller
-- to refuse by name.
SELECT d.id::text, d.body, coalesce(d.task_id::text, ''), d.reason,
       coalesce((SELECT t.priority FROM agentq.tasks t WHERE t.task_id = d.task_id), 0)::text
  FROM agentq.dead_letters d
 WHERE d.id = $1::bigint AND d.requeued_at IS NULL

-- name: requeue_mark
-- agentqctl's mark_requeued(on): the dead letter is requeued and its task
-- queued with fresh failure and interruption counts, before the message
-- is published (a worker that takes it at once must not find the old
-- final status). Only the body that defined the task reopens it.
WITH d AS (UPDATE agentq.dead_letters SET requeued_at = now() WHERE id = $1::bigint
           RETURNING task_id, body)
UPDATE agentq.tasks t SET status = 'queued', failures = 0, interruptions = 0,
       error = NULL, finished_at = NULL, cancel_requested = false, deadline = NULL
  FROM d WHERE t.task_id = d.task_id
   AND (t.body_sha256 IS NULL OR t.body_sha256 = sha256(d.body))

-- name: requeue_unmark
-- agentqctl's mark_requeued(off): the broker did not confirm; the dead
-- letter is parked again and its task gets the status the dead letter
-- gave it.
WITH d AS (UPDATE agentq.dead_letters SET requeued_at = NULL WHERE id = $1::bigint
           RETURNING task_id, reason, error, body)
UPDATE agentq.tasks t SET status = CASE d.reason WHEN 'expired' THEN 'expired'
                                                  WHEN 'rejected' THEN 'rejected' ELSE 'failed' END,
       error = d.error, finished_at = now()
  FROM d WHERE t.task_id = d.task_id AND t.status = 'queued'
   AND (t.body_sha256 IS NULL OR t.body_sha256 = sha256(d.body))
