-- 003_roles.sql — the two group roles deployments grant to their login
-- users: agentq_worker (what the worker fleet writes) and agentq_reader
-- (read-only: tables and views, for users querying results with SQL).
--
-- Roles are cluster-wide while the schema is per database, so the roles
-- are created only if missing (several databases on one cluster each run
-- this file) and the grants, which are per database, always run. Both are
-- NOLOGIN: deployments make their own login users members, e.g.
--   CREATE ROLE agentq_app LOGIN PASSWORD '...' IN ROLE agentq_worker;

DO $$
DECLARE
    r text;
BEGIN
    FOREACH r IN ARRAY ARRAY['agentq_worker', 'agentq_reader'] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r) THEN
            BEGIN
                EXECUTE format('CREATE ROLE %I NOLOGIN', r);
            EXCEPTION WHEN duplicate_object OR unique_violation THEN
                -- Another database's migration created it just now.
                NULL;
            END;
        END IF;
    END LOOP;
END
$$;

GRANT USAGE ON SCHEMA agentq TO agentq_worker, agentq_reader;

-- The worker: rows in, rows changed, rows deleted (retention), the id
-- sequences, and every function (take_tokens and friends).
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA agentq TO agentq_worker;
GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA agentq TO agentq_worker;
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA agentq TO agentq_worker;
-- Which migrations ran is the migrator's business, not the worker's.
REVOKE INSERT, UPDATE, DELETE ON agentq.schema_migrations FROM agentq_worker;

-- The reader: SELECT on tables and views (ALL TABLES includes views), and
-- only the functions that read. Functions are executable by PUBLIC unless
-- revoked; those that write would fail for a reader anyway (no UPDATE on
-- agentq.rate_limits), but a reader should not even be offered them.
GRANT SELECT ON ALL TABLES IN SCHEMA agentq TO agentq_reader;
REVOKE EXECUTE ON FUNCTION
    agentq.define_bucket(text, double precision, double precision),
    agentq.take_tokens(text, double precision),
    agentq.return_tokens(text, double precision),
    agentq.pause_bucket(text, timestamptz)
    FROM PUBLIC;
GRANT EXECUTE ON FUNCTION
    agentq.is_final(text),
    agentq.utf8_or_null(bytea)
    TO agentq_reader;

-- Objects later migrations create (run by the same migrating role) get the
-- same grants without each file having to repeat them.
ALTER DEFAULT PRIVILEGES IN SCHEMA agentq
    GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO agentq_worker;
ALTER DEFAULT PRIVILEGES IN SCHEMA agentq
    GRANT USAGE, SELECT ON SEQUENCES TO agentq_worker;
ALTER DEFAULT PRIVILEGES IN SCHEMA agentq
    GRANT EXECUTE ON FUNCTIONS TO agentq_worker;
ALTER DEFAULT PRIVILEGES IN SCHEMA agentq
    GRANT SELECT ON TABLES TO agentq_reader;
