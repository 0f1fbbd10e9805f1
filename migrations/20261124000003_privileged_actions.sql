-- The privileged-action trail: who (the token's subject and role) did each
-- deposit, withdrawal, round transition, audit run and queue requeue, with
-- the request's idempotency key when it has one. Each row is written in the
-- same transaction as the change it records (a deposit's ledger entry, a
-- round's new status), so there is no change without its row and no row
-- without its change. Append-only like the ledger.
--
-- Who settled round r-7, and who moved money for user 42 this week:
--   SELECT at, subject, role, action, detail FROM privileged_actions
--    WHERE target = 'round:r-7' ORDER BY id;
--   SELECT at, subject, role, action, idempotency_key, detail FROM privileged_actions
--    WHERE target = 'user:42' AND at > now() - interval '7 days' ORDER BY id;
CREATE TABLE privileged_actions (
    id              BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at              TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- The token's `sub` (a service, game server, cashier or operator name),
    -- or the operator of a CLI command.
    subject         TEXT NOT NULL CHECK (length(subject) BETWEEN 1 AND 128),
    role            TEXT NOT NULL CHECK (role IN ('player', 'service', 'game', 'cashier', 'admin', 'operator-cli')),
    action          TEXT NOT NULL CHECK (action IN ('DEPOSIT', 'WITHDRAWAL', 'ROUND_OPEN', 'ROUND_CLOSE',
                        'ROUND_SETTLE', 'ROUND_VOID', 'AUDIT_RUN', 'QUEUE_RETRY')),
    -- What it acted on, typed by a prefix: user:<id>, round:<id>, job:<queue>:<id>, books.
    target          TEXT NOT NULL,
    idempotency_key TEXT,
    detail          JSONB NOT NULL DEFAULT '{}'::JSONB
);

CREATE INDEX privileged_actions_target_idx ON privileged_actions (target, id);
CREATE INDEX privileged_actions_subject_idx ON privileged_actions (subject, at);
CREATE INDEX privileged_actions_at_idx ON privileged_actions (at);

CREATE TRIGGER privileged_actions_no_update_delete
    BEFORE UPDATE OR DELETE ON privileged_actions
    FOR EACH ROW EXECUTE FUNCTION ledger_entries_append_only();

CREATE TRIGGER privileged_actions_no_truncate
    BEFORE TRUNCATE ON privileged_actions
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_entries_append_only();
