-- 010_store.sql — what the worker's writer (src/store.c) needs so that
-- replaying a batch after a lost connection writes nothing twice. The
-- writer cannot know whether a COMMIT whose reply was lost took effect, so
-- every statement it sends must be harmless the second time:
--
-- * a claim carries a token; a replayed claim that finds its own token on
--   the row returns the row as it is instead of counting another attempt;
-- * a step row has a key (task, attempt, step, kind, seq) and a second
--   insert of it does nothing; seq tells apart the parallel tool calls of
--   one step (0 for the LLM call);
-- * a dead letter carries a key unique per request.
--
-- Owned by the store module; the tables themselves are 001's.

ALTER TABLE agentq.tasks ADD COLUMN claim_token text;
COMMENT ON COLUMN agentq.tasks.claim_token IS
    'Token of the claim that last set the row running (the writer''s replay guard).';

ALTER TABLE agentq.steps ADD COLUMN seq integer NOT NULL DEFAULT 0 CHECK (seq >= 0);
COMMENT ON COLUMN agentq.steps.seq IS
    '0 for the LLM call; the index of a tool call among its step''s parallel calls.';
CREATE UNIQUE INDEX steps_key_idx ON agentq.steps (task_id, attempt, step, kind, seq);

ALTER TABLE agentq.dead_letters ADD COLUMN store_key text;
COMMENT ON COLUMN agentq.dead_letters.store_key IS
    'Unique per recording request (the writer''s replay guard); NULL for rows written by others.';
CREATE UNIQUE INDEX dead_letters_store_key_idx ON agentq.dead_letters (store_key);
