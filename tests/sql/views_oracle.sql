-- tests/sql/views_oracle.sql — the views of sql/002_views.sql and
-- sql/014_sessions.sql as they were before sql/018_rollups.sql: every one
-- a query of the whole history. The roll-ups must answer the same, which
-- agentq_oracle.diff counts (a row per view, n = rows that differ): exact
-- for usage_by_user, throughput_per_minute and status_counts; for
-- latency_percentiles, the same counts and percentiles within 1 % (plus
-- 2 ms: values under 1 ms count as 0) for period 'all', and exact for
-- 'last_hour' (1e-9 relative, for the float sums' order).
--
-- Used by tests/it_schema.c and bench/history. Needs a superuser or the
-- schema's owner (it creates schema agentq_oracle).

CREATE SCHEMA IF NOT EXISTS agentq_oracle;
CREATE OR REPLACE VIEW agentq_oracle.usage_by_user AS
SELECT user_id, count(*) AS tasks, count(*) FILTER (WHERE status = 'completed') AS completed,
       count(*) FILTER (WHERE agentq.is_final(status) AND status <> 'completed') AS failed,
       count(*) FILTER (WHERE NOT agentq.is_final(status)) AS in_flight,
       sum(steps) AS steps, sum(prompt_tokens) AS prompt_tokens, sum(completion_tokens) AS completion_tokens,
       sum(prompt_tokens + completion_tokens) AS tokens, sum(cost_usd) AS cost_usd,
       min(enqueued_at) AS first_enqueued_at, max(finished_at) AS last_finished_at
  FROM agentq.tasks GROUP BY user_id;
CREATE OR REPLACE VIEW agentq_oracle.throughput_per_minute AS
SELECT date_trunc('minute', finished_at) AS minute, status, count(*) AS tasks,
       sum(prompt_tokens + completion_tokens) AS tokens, sum(cost_usd) AS cost_usd
  FROM agentq.tasks WHERE finished_at IS NOT NULL GROUP BY 1, 2;
CREATE OR REPLACE VIEW agentq_oracle.status_counts AS
SELECT status, count(*) AS tasks FROM agentq.tasks GROUP BY status;
CREATE OR REPLACE VIEW agentq_oracle.latency_percentiles AS
WITH periods(period, since, ord) AS (VALUES ('last_hour', now() - interval '1 hour', 1), ('all', '-infinity'::timestamptz, 2))
SELECT p.period, w.n AS started, w.pct[1] AS queue_wait_p50_s, w.pct[2] AS queue_wait_p95_s, w.pct[3] AS queue_wait_p99_s,
       r.n AS finished, r.pct[1] AS run_time_p50_s, r.pct[2] AS run_time_p95_s, r.pct[3] AS run_time_p99_s
  FROM periods p
 CROSS JOIN LATERAL (SELECT count(*) AS n, percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP (ORDER BY extract(epoch FROM started_at - enqueued_at)::double precision) AS pct
          FROM agentq.tasks WHERE started_at >= p.since AND enqueued_at IS NOT NULL) w
 CROSS JOIN LATERAL (SELECT count(*) AS n, percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP (ORDER BY extract(epoch FROM finished_at - started_at)::double precision) AS pct
          FROM agentq.tasks WHERE finished_at >= p.since AND started_at IS NOT NULL) r ORDER BY p.ord;
-- How far off a percentile may be: 1 % + 2 ms over all time, float
-- rounding in the last hour.
CREATE OR REPLACE FUNCTION agentq_oracle.off(period text, got double precision, want double precision)
RETURNS boolean LANGUAGE sql IMMUTABLE
AS $$
    SELECT CASE WHEN got IS NULL OR want IS NULL THEN (got IS NULL) <> (want IS NULL)
                WHEN period = 'all' THEN abs(got - want) > 0.01 * abs(want) + 0.002
                ELSE abs(got - want) > 1e-9 * abs(want) + 1e-9 END
$$;

CREATE OR REPLACE VIEW agentq_oracle.diff AS
SELECT 'usage_by_user' AS view, count(*) AS n
  FROM ((SELECT * FROM agentq.usage_by_user EXCEPT ALL SELECT * FROM agentq_oracle.usage_by_user)
        UNION ALL
        (SELECT * FROM agentq_oracle.usage_by_user EXCEPT ALL SELECT * FROM agentq.usage_by_user)) d
UNION ALL
SELECT 'throughput_per_minute', count(*)
  FROM ((SELECT * FROM agentq.throughput_per_minute EXCEPT ALL SELECT * FROM agentq_oracle.throughput_per_minute)
        UNION ALL
        (SELECT * FROM agentq_oracle.throughput_per_minute EXCEPT ALL SELECT * FROM agentq.throughput_per_minute)) d
UNION ALL
SELECT 'status_counts', count(*)
  FROM ((SELECT status, tasks FROM agentq.status_counts WHERE tasks <> 0
         EXCEPT ALL SELECT * FROM agentq_oracle.status_counts)
        UNION ALL
        (SELECT * FROM agentq_oracle.status_counts
         EXCEPT ALL SELECT status, tasks FROM agentq.status_counts)) d
UNION ALL
SELECT 'latency_percentiles', count(*)
  FROM agentq_oracle.latency_percentiles o
  FULL JOIN agentq.latency_percentiles v USING (period)
 WHERE v.started IS DISTINCT FROM o.started OR v.finished IS DISTINCT FROM o.finished
    OR agentq_oracle.off(period, v.queue_wait_p50_s, o.queue_wait_p50_s)
    OR agentq_oracle.off(period, v.queue_wait_p95_s, o.queue_wait_p95_s)
    OR agentq_oracle.off(period, v.queue_wait_p99_s, o.queue_wait_p99_s)
    OR agentq_oracle.off(period, v.run_time_p50_s, o.run_time_p50_s)
    OR agentq_oracle.off(period, v.run_time_p95_s, o.run_time_p95_s)
    OR agentq_oracle.off(period, v.run_time_p99_s, o.run_time_p99_s);
