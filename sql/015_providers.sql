-- 015_providers.sql — several LLM providers behind one fleet: which
-- provider answered each call, a response cache the whole fleet shares,
-- and fleet rate limits that learn from what providers say.
--
-- * steps.provider names the provider that answered an llm row ('cache'
--   when the fleet's cache did), so cost and latency can be split by
--   provider in SQL.
-- * agentq.llm_cache maps the sha256 of a request's text (the chat
--   completion request exactly as it would be sent) to the provider's
--   reply body, byte for byte: text, not jsonb (jsonb refuses \u0000 and
--   reorders keys). agentq.cache_get() reads it, agentq.cache_put() fills
--   it; TTL and size bound are the workers' configuration, so they are
--   arguments, not settings stored here.
--   Eviction rule: a put keeps the sum of response bytes at or under its
--   p_max_bytes, removing expired rows first (soonest expired first), then
--   the oldest (by created_at). The sum is kept, not computed: the one row
--   of agentq.llm_cache_size holds it, maintained by triggers on
--   agentq.llm_cache (so a DELETE or TRUNCATE by hand keeps it right too),
--   and every put takes that row's lock before it touches the cache. Puts
--   across the fleet therefore run one at a time, each seeing the total
--   every earlier put left, which is what makes the bound hold exactly
--   (and keeps two puts from deadlocking over each other's rows). A put is
--   one short transaction of its own (the store sends it outside its write
--   batches), a few index probes, so that queue is short; one that waits
--   more than its lock_timeout (200 ms) for the lock gives up instead, as
--   befits an optimisation.
-- * agentq.clamp_bucket() lowers a bucket to what a provider's
--   x-ratelimit-remaining-* headers say is left (never raises it).
-- * agentq.pause_bucket() (001's, same signature and semantics) now also
--   tells every worker at once, instead of at its next lease:
--     NOTIFY channel `agentq_limits`, payload
--       '<bucket name> <paused_until as epoch seconds>'
--     e.g. 'llm.requests 1718000000.250000'. The time is the end of the
--     bucket's pause (a shorter pause never cuts a longer one): seconds
--     since 1970-01-01 UTC, six decimal places; split at the last space
--     (a bucket name is free text). Sent at COMMIT and never replayed; a
--     pause a worker missed while disconnected still holds for it, since
--     take_tokens grants nothing from a paused bucket.
--
-- Owned by the store module (src/store/store.c: steps.provider, the cache
-- verbs) and the fleet limiter (src/limits/fleetlimit.c: the buckets and
-- the channel).

-- ------------------------------------------------------------- steps --

ALTER TABLE agentq.steps ADD COLUMN provider text;
COMMENT ON COLUMN agentq.steps.provider IS
    'For an llm row: the provider that answered (its configured name), or ''cache'' when agentq.llm_cache did; NULL for tool rows and for rows written before 015.';

-- ------------------------------------------------------------- cache --

CREATE TABLE agentq.llm_cache (
    key        bytea PRIMARY KEY,          -- sha256(convert_to(request, 'UTF8'))
    model      text,
    response   text NOT NULL,
    bytes      integer GENERATED ALWAYS AS (octet_length(response)) STORED,
    hits       bigint NOT NULL DEFAULT 0,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL
);
COMMENT ON TABLE agentq.llm_cache IS
    'Fleet-wide LLM response cache: written by agentq.cache_put(), read by agentq.cache_get(); kept within the putting worker''s byte bound (expired rows go first, then the oldest).';
COMMENT ON COLUMN agentq.llm_cache.key IS 'sha256 of the request text (UTF-8).';
COMMENT ON COLUMN agentq.llm_cache.response IS
    'The provider''s chat.completion body, byte for byte (cast to jsonb to query it).';
COMMENT ON COLUMN agentq.llm_cache.bytes IS 'octet_length(response): what the byte bound counts.';
COMMENT ON COLUMN agentq.llm_cache.hits IS
    'Lookups that found this row unexpired. A statistic: a lookup that finds the row locked (being bumped, replaced or evicted) answers without counting.';

-- Eviction's two orders: expired rows first, then the oldest.
CREATE INDEX llm_cache_expires_idx ON agentq.llm_cache (expires_at);
CREATE INDEX llm_cache_created_idx ON agentq.llm_cache (created_at);

-- The running total of llm_cache.bytes: one row, always there.
CREATE TABLE agentq.llm_cache_size (
    one   boolean PRIMARY KEY DEFAULT true CHECK (one),
    bytes bigint NOT NULL DEFAULT 0
);
COMMENT ON TABLE agentq.llm_cache_size IS
    'sum(agentq.llm_cache.bytes), kept by triggers; its row lock serialises agentq.cache_put().';
INSERT INTO agentq.llm_cache_size DEFAULT VALUES;

-- Row triggers for what inserts and replacements add (a lookup's hits
-- bump touches no response and fires nothing); a statement trigger with
-- the deleted rows for evictions and deletes by hand, so removing many
-- rows updates the total once.
CREATE FUNCTION agentq.llm_cache_count_row() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    UPDATE agentq.llm_cache_size
       SET bytes = bytes + NEW.bytes - CASE WHEN TG_OP = 'UPDATE' THEN OLD.bytes ELSE 0 END;
    RETURN NULL;
END
$$;

CREATE FUNCTION agentq.llm_cache_count_gone() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        UPDATE agentq.llm_cache_size SET bytes = 0;
    ELSE
        UPDATE agentq.llm_cache_size
           SET bytes = bytes - (SELECT coalesce(sum(g.bytes), 0) FROM gone g);
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER llm_cache_count_insert AFTER INSERT ON agentq.llm_cache
    FOR EACH ROW EXECUTE FUNCTION agentq.llm_cache_count_row();
CREATE TRIGGER llm_cache_count_update AFTER UPDATE OF response ON agentq.llm_cache
    FOR EACH ROW EXECUTE FUNCTION agentq.llm_cache_count_row();
CREATE TRIGGER llm_cache_count_delete AFTER DELETE ON agentq.llm_cache
    REFERENCING OLD TABLE AS gone
    FOR EACH STATEMENT EXECUTE FUNCTION agentq.llm_cache_count_gone();
CREATE TRIGGER llm_cache_count_truncate AFTER TRUNCATE ON agentq.llm_cache
    FOR EACH STATEMENT EXECUTE FUNCTION agentq.llm_cache_count_gone();

-- The cached response to `p_request`, or NULL when there is none or it
-- has expired. A miss is one primary-key probe. It never waits for a
-- lock: the response is read from the snapshot, and the hits bump skips
-- a row another transaction holds (a lookup that waited would stall the
-- store connection it shares with the worker's writes).
CREATE FUNCTION agentq.cache_get(p_request text) RETURNS text
LANGUAGE plpgsql
AS $$
DECLARE
    k    bytea := sha256(convert_to(p_request, 'UTF8'));
    resp text;
BEGIN
    SELECT c.response INTO resp FROM agentq.llm_cache c
     WHERE c.key = k AND c.expires_at > now();
    IF FOUND THEN
        UPDATE agentq.llm_cache c SET hits = c.hits + 1
         WHERE c.key = (SELECT l.key FROM agentq.llm_cache l WHERE l.key = k
                         FOR UPDATE SKIP LOCKED);
    END IF;
    RETURN resp;
END
$$;

-- Caches `p_response` (the provider's reply to `p_request`, made with
-- `p_model`) for `p_ttl_seconds`, then evicts until the cache's response
-- bytes are at most `p_max_bytes` (the eviction rule at the top). A live
-- row for the same request is kept as it is (two workers that missed at
-- once both put: the first answer stays, with its hits, and the second
-- put is no error); an expired one is replaced. Nothing is stored when
-- the TTL is not positive, when the response alone is larger than
-- p_max_bytes, or when an argument other than the model is NULL.
-- lock_timeout: a put that cannot have the fleet's put lock soon fails
-- (the store drops it: a put is an optimisation) rather than holding up
-- the connection it shares with the worker's writes.
CREATE FUNCTION agentq.cache_put(p_request text, p_model text, p_response text,
                                 p_ttl_seconds integer, p_max_bytes bigint)
RETURNS void
LANGUAGE plpgsql
SET lock_timeout = '200ms'
AS $$
DECLARE
    k      bytea := sha256(convert_to(p_request, 'UTF8'));
    total  bigint;
    doomed bytea[];
    r      record;
BEGIN
    IF p_request IS NULL OR p_response IS NULL OR p_ttl_seconds IS NULL OR p_max_bytes IS NULL
       OR p_ttl_seconds <= 0 OR octet_length(p_response) > p_max_bytes THEN
        RETURN;
    END IF;
    -- The fleet's put lock first, before any cache row: every put locks
    -- in the same order, so puts queue instead of deadlocking.
    SELECT s.bytes INTO total FROM agentq.llm_cache_size s FOR UPDATE;
    INSERT INTO agentq.llm_cache AS c (key, model, response, expires_at)
    VALUES (k, p_model, p_response, now() + p_ttl_seconds * interval '1 second')
    ON CONFLICT (key) DO UPDATE
        SET model = EXCLUDED.model, response = EXCLUDED.response, hits = 0,
            created_at = now(), expires_at = EXCLUDED.expires_at
        WHERE c.expires_at <= now();
    SELECT s.bytes INTO total FROM agentq.llm_cache_size s;
    -- Over the bound: evict only what it takes, expired rows first, then
    -- the oldest. Each round reads at most 256 rows down an index in
    -- order (the LIMIT is what makes the planner walk the index rather
    -- than sort the table). The row just put is never its own victim; it
    -- fits alone, so the loops end with the bound met.
    WHILE total > p_max_bytes LOOP
        doomed := '{}';
        FOR r IN SELECT c.key, c.bytes FROM agentq.llm_cache c
                  WHERE c.expires_at <= now() AND c.key <> k
                  ORDER BY c.expires_at LIMIT 256 LOOP
            EXIT WHEN total <= p_max_bytes;
            doomed := doomed || r.key;
            total := total - r.bytes;
        END LOOP;
        EXIT WHEN cardinality(doomed) = 0;
        DELETE FROM agentq.llm_cache WHERE key = ANY (doomed);
    END LOOP;
    WHILE total > p_max_bytes LOOP
        doomed := '{}';
        FOR r IN SELECT c.key, c.bytes FROM agentq.llm_cache c
                  WHERE c.key <> k
                  ORDER BY c.created_at LIMIT 256 LOOP
            EXIT WHEN total <= p_max_bytes;
            doomed := doomed || r.key;
            total := total - r.bytes;
        END LOOP;
        EXIT WHEN cardinality(doomed) = 0;
        DELETE FROM agentq.llm_cache WHERE key = ANY (doomed);
    END LOOP;
END
$$;

-- ------------------------------------------------------------ limits --

-- Refills bucket `p_name` as agentq.take_tokens does, then lowers it to
-- at most `p_max` tokens (a provider's x-ratelimit-remaining-*: the fleet
-- must not believe it has more than the provider says is left). Never
-- raises the level: what the provider says it has beyond our bucket is
-- not ours to spend. Returns the new level; NULL if there is no such
-- bucket. A NULL p_max only refills.
CREATE FUNCTION agentq.clamp_bucket(p_name text, p_max double precision)
RETURNS double precision
LANGUAGE plpgsql
AS $$
DECLARE
    b     agentq.rate_limits%ROWTYPE;
    t     timestamptz := clock_timestamp();
    level double precision;
BEGIN
    SELECT * INTO b FROM agentq.rate_limits WHERE name = p_name FOR UPDATE;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    -- As in take_tokens: updated_at may lie in the future (a pause).
    level := least(b.capacity,
                   b.tokens + b.refill_per_sec *
                       greatest(0, extract(epoch FROM t - b.updated_at)::double precision));
    IF p_max IS NOT NULL THEN
        level := least(level, greatest(p_max, 0));
    END IF;
    UPDATE agentq.rate_limits
       SET tokens = level,
           updated_at = greatest(b.updated_at, t)
     WHERE name = p_name;
    RETURN level;
END
$$;

-- 001's pause (a shorter pause never cuts a longer one; the bucket starts
-- empty afterwards; returns the effective end, NULL if there is no such
-- bucket), and the NOTIFY on agentq_limits described at the top, so every
-- worker stops granting now rather than at its next lease.
CREATE OR REPLACE FUNCTION agentq.pause_bucket(p_name text, p_until timestamptz)
RETURNS timestamptz
LANGUAGE plpgsql
AS $$
DECLARE
    until timestamptz;
BEGIN
    UPDATE agentq.rate_limits
       SET paused_until = greatest(paused_until, p_until),
           updated_at = greatest(updated_at, p_until),
           tokens = 0
     WHERE name = p_name
    RETURNING paused_until INTO until;
    IF until IS NOT NULL THEN
        PERFORM pg_notify('agentq_limits', p_name || ' ' || extract(epoch FROM until)::text);
    END IF;
    RETURN until;
END
$$;

-- ------------------------------------------------------------ grants --

-- Explicit, though 003's default privileges give the worker the same when
-- the role that ran 003 runs this file: another migrating role would not
-- get them. The reader may read the cache but call none of these (they
-- write: even a lookup counts its hit); functions are PUBLIC unless
-- revoked. CREATE OR REPLACE keeps pause_bucket's grants from 003.
GRANT SELECT, INSERT, UPDATE, DELETE ON agentq.llm_cache, agentq.llm_cache_size TO agentq_worker;
GRANT SELECT ON agentq.llm_cache, agentq.llm_cache_size TO agentq_reader;
REVOKE EXECUTE ON FUNCTION
    agentq.cache_get(text),
    agentq.cache_put(text, text, text, integer, bigint),
    agentq.clamp_bucket(text, double precision)
    FROM PUBLIC;
GRANT EXECUTE ON FUNCTION
    agentq.cache_get(text),
    agentq.cache_put(text, text, text, integer, bigint),
    agentq.clamp_bucket(text, double precision)
    TO agentq_worker;
