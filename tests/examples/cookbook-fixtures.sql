-- tests/examples/cookbook-fixtures.sql — rows tests/examples/run adds to
-- the tasks the examples ran, so that every query of docs/sql-cookbook.md
-- has something to find: what a short run on the mock LLM does not make
-- (stuck tasks, 429s, cache hits, a retried task, a second provider, a
-- user with a budget). All of user 'cookbook-fixture' (and alice's budget
-- row), metadata {"fixture": true}.

INSERT INTO agentq.users (user_id, weight, daily_budget_usd, daily_budget_tokens)
VALUES ('alice', 2, 5.00, 1000000), ('cookbook-fixture', 1, 1.00, NULL)
ON CONFLICT (user_id) DO NOTHING;

-- Three tasks stuck in three ways, one timed out on its second attempt,
-- one completed through another provider.
INSERT INTO agentq.tasks (task_id, user_id, goal, status, attempt, failures, interruptions, metadata,
                          enqueued_at, started_at, finished_at, updated_at,
                          lease_owner, lease_until, leased_at, question, wait_until, error, result,
                          steps, prompt_tokens, completion_tokens, cost_usd)
VALUES
    ('00000000-0000-4000-8000-00000000c001', 'cookbook-fixture', 'waits for an answer', 'waiting', 1, 0, 0,
     '{"fixture": true}', now() - interval '3 days', now() - interval '3 days', NULL, now() - interval '2 days',
     NULL, NULL, NULL, 'Which account should I close?', now() + interval '1 day', NULL, NULL, 1, 100, 10, 0.00002),
    ('00000000-0000-4000-8000-00000000c002', 'cookbook-fixture', 'queued behind nothing', 'queued', 1, 0, 0,
     '{"fixture": true}', now() - interval '30 minutes', NULL, NULL, now() - interval '30 minutes',
     NULL, NULL, NULL, NULL, NULL, NULL, NULL, 0, 0, 0, 0),
    ('00000000-0000-4000-8000-00000000c003', 'cookbook-fixture', 'its worker was killed', 'running', 2, 0, 1,
     '{"fixture": true}', now() - interval '20 minutes', now() - interval '6 minutes', NULL, now() - interval '6 minutes',
     424242, now() - interval '5 minutes', now() - interval '6 minutes', NULL, NULL, NULL, NULL, 1, 50, 5, 0.00001),
    ('00000000-0000-4000-8000-00000000c004', 'cookbook-fixture', 'slow tool', 'timeout', 2, 1, 0,
     '{"fixture": true}', now() - interval '12 minutes', now() - interval '11 minutes', now() - interval '5 minutes',
     now() - interval '5 minutes', NULL, NULL, NULL, NULL, NULL,
     'timeout: 60 s of running time over 2 attempts (timeout_seconds 60)', NULL, 3, 900, 60, 0.00017),
    ('00000000-0000-4000-8000-00000000c005', 'cookbook-fixture', 'through openai, cached once', 'completed', 1, 0, 0,
     '{"fixture": true}', now() - interval '8 minutes', now() - interval '8 minutes', now() - interval '7 minutes',
     now() - interval '7 minutes', NULL, NULL, NULL, NULL, NULL, NULL, 'done: 42', 2, 400, 40, 0.000084);

-- Their steps: 429s and a 5xx from openai before answers, a cache hit, and
-- http_get calls slower than the calculator.
INSERT INTO agentq.steps (task_id, attempt, step, seq, kind, name, status, started_at, duration_ms,
                          prompt_tokens, completion_tokens, cost_usd, provider, detail)
VALUES
    ('00000000-0000-4000-8000-00000000c004', 1, 1, 1, 'llm', 'gpt-4o-mini', 'rate_limited', now() - interval '11 minutes', 40,
     0, 0, 0, 'openai', '{"http_status": 429, "error": "Rate limit reached for requests"}'),
    ('00000000-0000-4000-8000-00000000c004', 1, 1, 2, 'llm', 'gpt-4o-mini', 'error', now() - interval '11 minutes', 900,
     0, 0, 0, 'openai', '{"http_status": 503, "error": "The server is overloaded"}'),
    ('00000000-0000-4000-8000-00000000c004', 1, 1, 0, 'llm', 'gpt-4o-mini', 'ok', now() - interval '11 minutes', 1200,
     300, 20, 0.000057, 'openai', '{"finish_reason": "tool_calls", "tool_calls": 1}'),
    ('00000000-0000-4000-8000-00000000c004', 1, 1, 1, 'tool', 'http_get', 'ok', now() - interval '10 minutes', 2500,
     NULL, NULL, NULL, NULL, '{"output": "<html>..."}'),
    ('00000000-0000-4000-8000-00000000c004', 2, 2, 0, 'llm', 'gpt-4o-mini', 'ok', now() - interval '8 minutes', 1100,
     300, 20, 0.000057, 'openai', '{"finish_reason": "tool_calls", "tool_calls": 1}'),
    ('00000000-0000-4000-8000-00000000c004', 2, 2, 1, 'tool', 'http_get', 'error', now() - interval '8 minutes', 10000,
     NULL, NULL, NULL, NULL, '{"output": "http_get: timed out after 10 s"}'),
    ('00000000-0000-4000-8000-00000000c005', 1, 1, 1, 'llm', 'gpt-4o-mini', 'rate_limited', now() - interval '8 minutes', 35,
     0, 0, 0, 'openai', '{"http_status": 429, "error": "Rate limit reached for tokens"}'),
    ('00000000-0000-4000-8000-00000000c005', 1, 1, 0, 'llm', 'gpt-4o-mini', 'ok', now() - interval '8 minutes', 950,
     200, 20, 0.000042, 'openai', '{"finish_reason": "tool_calls", "tool_calls": 1}'),
    ('00000000-0000-4000-8000-00000000c005', 1, 1, 1, 'tool', 'http_get', 'ok', now() - interval '8 minutes', 800,
     NULL, NULL, NULL, NULL, '{"output": "{\"answer\": 42}"}'),
    ('00000000-0000-4000-8000-00000000c005', 1, 2, 0, 'llm', 'gpt-4o-mini', 'cached', now() - interval '7 minutes', 3,
     200, 20, 0, 'cache', '{"finish_reason": "stop", "tool_calls": 0}');

-- A message refused this hour.
INSERT INTO agentq.dead_letters (task_id, reason, error, body, headers)
VALUES (NULL, 'rejected', 'max_steps: must be an integer from 1 to 100 (got 0)',
        convert_to('{"user_id": "cookbook-fixture", "goal": "x", "max_steps": 0}', 'UTF8'), '{}');
