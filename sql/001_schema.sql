-- 001_schema.sql — the agentq schema's tables and the functions the worker
-- fleet calls. Applied by `agentqctl migrate` (src/migrate.c), each file in
-- its own transaction: no BEGIN/COMMIT here, and nothing that cannot run in
-- a transaction block (CREATE INDEX CONCURRENTLY belongs in a later file
-- the migrator would have to special-case).
--
-- What this file does not own: views (002), roles and grants (003), the
-- schema_migrations bookkeeping table (created by the migrator itself).

CREATE SCHEMA IF NOT EXISTS agentq;

-- True for the statuses a task never leaves. The worker acks a redelivery
-- of a task in one of these without running it again.
CREATE FUNCTION agentq.is_final(status text) RETURNS boolean
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
AS $$
    SELECT status IN ('completed', 'failed', 'timeout', 'budget_exceeded',
                      'max_steps', 'cancelled', 'expired', 'rejected')
$$;

CREATE TABLE agentq.tasks (
    task_id           uuid PRIMARY KEY,
    user_id           text NOT NULL,
    goal              text NOT NULL,
    -- AMQP priority is an octet; the broker caps it at x-max-priority (9).
    priority          smallint NOT NULL DEFAULT 0 CHECK (priority BETWEEN 0 AND 255),
    status            text NOT NULL CONSTRAINT tasks_status_check CHECK (status IN (
                          'queued', 'running', 'retrying',
                          'completed', 'failed', 'timeout', 'budget_exceeded',
                          'max_steps', 'cancelled', 'expired', 'rejected')),
    attempt           integer NOT NULL DEFAULT 1 CHECK (attempt >= 0),
    max_steps         integer,
    budget_usd        numeric(12,6),
    timeout_seconds   double precision,
    model             text,
    steps             integer NOT NULL DEFAULT 0 CHECK (steps >= 0),
    prompt_tokens     bigint NOT NULL DEFAULT 0 CHECK (prompt_tokens >= 0),
    completion_tokens bigint NOT NULL DEFAULT 0 CHECK (completion_tokens >= 0),
    cost_usd          numeric(14,8) NOT NULL DEFAULT 0 CHECK (cost_usd >= 0),
    result            text,
    error             text,
    worker_id         text,
    metadata          jsonb,
    enqueued_at       timestamptz,
    started_at        timestamptz,
    finished_at       timestamptz,
    updated_at        timestamptz NOT NULL DEFAULT now(),
    cancel_requested  boolean NOT NULL DEFAULT false
);

COMMENT ON TABLE agentq.tasks IS
    'One row per task; status is final once agentq.is_final(status).';
COMMENT ON COLUMN agentq.tasks.attempt IS
    'Attempt number, 1 for the first run; a redelivery of a running task runs attempt + 1.';
COMMENT ON COLUMN agentq.tasks.enqueued_at IS
    'The message''s AMQP timestamp (when the producer published it).';

CREATE INDEX tasks_status_idx      ON agentq.tasks (status);
CREATE INDEX tasks_user_id_idx     ON agentq.tasks (user_id);
CREATE INDEX tasks_enqueued_at_idx ON agentq.tasks (enqueued_at);
CREATE INDEX tasks_finished_at_idx ON agentq.tasks (finished_at);

-- updated_at follows every change without each writer having to say so.
CREATE FUNCTION agentq.touch_updated_at() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    NEW.updated_at := now();
    RETURN NEW;
END
$$;

CREATE TRIGGER tasks_touch_updated_at
    BEFORE UPDATE ON agentq.tasks
    FOR EACH ROW EXECUTE FUNCTION agentq.touch_updated_at();

CREATE TABLE agentq.steps (
    id                bigserial PRIMARY KEY,
    task_id           uuid NOT NULL REFERENCES agentq.tasks (task_id) ON DELETE CASCADE,
    attempt           integer NOT NULL DEFAULT 1,
    step              integer NOT NULL,
    kind              text NOT NULL CHECK (kind IN ('llm', 'tool')),
    name              text,
    status            text,
    started_at        timestamptz,
    duration_ms       double precision,
    prompt_tokens     bigint,
    completion_tokens bigint,
    cost_usd          numeric(14,8),
    detail            jsonb
);

COMMENT ON TABLE agentq.steps IS
    'One row per LLM call (kind llm) and per tool call (kind tool) of a task attempt.';

CREATE INDEX steps_task_idx ON agentq.steps (task_id, attempt, step);

CREATE TABLE agentq.dead_letters (
    id          bigserial PRIMARY KEY,
    task_id     uuid,
    reason      text NOT NULL,
    error       text,
    -- The message body as received: it need not be UTF-8 (a rejected
    -- message may be anything), so bytes; agentq.dead_letters_text shows it
    -- as text where it is valid.
    body        bytea,
    headers     jsonb,
    recorded_at timestamptz NOT NULL DEFAULT now(),
    requeued_at timestamptz
);

COMMENT ON COLUMN agentq.dead_letters.reason IS
    'rejected (invalid message), expired (TTL while queued), failed (out of attempts), ...';
COMMENT ON COLUMN agentq.dead_letters.headers IS
    'The AMQP headers as JSON, x-death included.';

CREATE INDEX dead_letters_task_id_idx     ON agentq.dead_letters (task_id);
CREATE INDEX dead_letters_recorded_at_idx ON agentq.dead_letters (recorded_at);
CREATE INDEX dead_letters_parked_idx      ON agentq.dead_letters (id) WHERE requeued_at IS NULL;

-- The fleet's shared token buckets (rate limiter `fleet` mode). A bucket
-- holds `tokens` as of `updated_at` and gains `refill_per_sec` per second up
-- to `capacity`; refills are computed lazily by agentq.take_tokens.
CREATE TABLE agentq.rate_limits (
    name           text PRIMARY KEY,
    capacity       double precision NOT NULL CHECK (capacity >= 0),
    tokens         double precision NOT NULL CHECK (tokens >= 0),
    refill_per_sec double precision NOT NULL CHECK (refill_per_sec >= 0),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    paused_until   timestamptz
);

-- Creates bucket `p_name` full, or changes an existing one's capacity and
-- refill rate keeping its tokens (capped at the new capacity). Idempotent:
-- every worker calls it at start-up with its configuration.
CREATE FUNCTION agentq.define_bucket(p_name text, p_capacity double precision,
                                     p_refill_per_sec double precision)
RETURNS void
LANGUAGE sql
AS $$
    INSERT INTO agentq.rate_limits AS r (name, capacity, tokens, refill_per_sec, updated_at)
    VALUES (p_name, p_capacity, p_capacity, p_refill_per_sec, clock_timestamp())
    ON CONFLICT (name) DO UPDATE
        SET capacity = EXCLUDED.capacity,
            refill_per_sec = EXCLUDED.refill_per_sec,
            tokens = least(r.tokens, EXCLUDED.capacity)
$$;

-- Refills bucket `p_name` for the time since it was last touched, then takes
-- up to `p_want` tokens; returns how many were granted (0 while the bucket
-- is paused or empty, NULL if there is no such bucket). All of it happens
-- under the bucket row's lock, so concurrent callers across the fleet never
-- grant more than the bucket holds and the bucket never goes negative.
--
-- A grant is all of `p_want` when that much is there; a partial grant is a
-- whole number of tokens, so a caller leasing requests never gets 0.4 of
-- one. The clock is the database's, shared by the whole fleet.
CREATE FUNCTION agentq.take_tokens(p_name text, p_want double precision)
RETURNS double precision
LANGUAGE plpgsql
AS $$
DECLARE
    b     agentq.rate_limits%ROWTYPE;
    t     timestamptz := clock_timestamp();
    avail double precision;
    got   double precision;
BEGIN
    SELECT * INTO b FROM agentq.rate_limits WHERE name = p_name FOR UPDATE;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    -- updated_at may lie in the future: a pause pushes it there so that
    -- nothing refills before the pause ends.
    avail := least(b.capacity,
                   b.tokens + b.refill_per_sec *
                       greatest(0, extract(epoch FROM t - b.updated_at)::double precision));
    IF p_want IS NULL OR p_want <= 0 OR (b.paused_until IS NOT NULL AND b.paused_until > t) THEN
        got := 0;
    ELSIF avail >= p_want THEN
        got := p_want;
    ELSE
        got := floor(avail);
    END IF;
    UPDATE agentq.rate_limits
       SET tokens = greatest(0, avail - got),
           updated_at = greatest(b.updated_at, t)
     WHERE name = p_name;
    RETURN got;
END
$$;

-- Gives back tokens a worker leased but did not use (at shutdown), up to
-- the capacity. Returns the bucket's tokens afterwards (NULL: no bucket).
CREATE FUNCTION agentq.return_tokens(p_name text, p_tokens double precision)
RETURNS double precision
LANGUAGE sql
AS $$
    UPDATE agentq.rate_limits
       SET tokens = least(capacity, tokens + greatest(0, coalesce(p_tokens, 0)))
     WHERE name = p_name
    RETURNING tokens
$$;

-- Pauses bucket `p_name` until `p_until` (a provider's 429 Retry-After):
-- the whole fleet gets no tokens until then, and the bucket starts empty
-- afterwards so the fleet does not burst into the same limit again. A
-- shorter pause never cuts a longer one. Returns the effective pause end.
CREATE FUNCTION agentq.pause_bucket(p_name text, p_until timestamptz)
RETURNS timestamptz
LANGUAGE sql
AS $$
    UPDATE agentq.rate_limits
       SET paused_until = greatest(paused_until, p_until),
           updated_at = greatest(updated_at, p_until),
           tokens = 0
     WHERE name = p_name
    RETURNING paused_until
$$;

-- Cancellation: `agentqctl cancel` sets cancel_requested; the worker that
-- runs the task LISTENs on agentq_cancel and gets the task_id at commit.
-- (NOTIFY is not replayed: after a reconnect the worker polls the column.)
CREATE FUNCTION agentq.notify_cancel() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    PERFORM pg_notify('agentq_cancel', NEW.task_id::text);
    RETURN NULL;
END
$$;

CREATE TRIGGER tasks_notify_cancel
    AFTER UPDATE OF cancel_requested ON agentq.tasks
    FOR EACH ROW
    WHEN (NEW.cancel_requested AND NOT OLD.cancel_requested)
    EXECUTE FUNCTION agentq.notify_cancel();
