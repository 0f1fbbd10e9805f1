-- The money: wallets and the append-only, double-entry ledger.
--
-- Every movement is one row of ledger_entries: a transfer between one user
-- wallet and one system account (EXTERNAL, ESCROW, HOUSE). `amount` is the
-- signed change of the user's wallet; the system account gets the opposite, so
-- all accounts sum to zero by construction. System account balances are never
-- stored (no row that every bet would lock): they are derived from the ledger.

CREATE TABLE wallets (
    user_id    BIGINT PRIMARY KEY CHECK (user_id > 0),
    balance    NUMERIC(30, 8) NOT NULL DEFAULT 0,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- No overdraft, whatever the code does.
    CONSTRAINT wallets_balance_non_negative CHECK (balance >= 0),
    -- Keeps every balance and sum inside rust_decimal's range.
    CONSTRAINT wallets_balance_limit CHECK (balance <= 1000000000000000)
);

CREATE TABLE ledger_entries (
    entry_id        BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    transfer_id     UUID NOT NULL UNIQUE,
    -- Every movement has a unique key: a retry finds the original instead of moving money twice.
    idempotency_key TEXT NOT NULL CONSTRAINT ledger_entries_idempotency_key_unique UNIQUE,
    kind            TEXT NOT NULL CHECK (kind IN ('DEPOSIT', 'WITHDRAWAL', 'STAKE', 'REFUND', 'PAYOUT')),
    -- No cascade from anywhere: money history is never deleted with what it paid for.
    user_id         BIGINT NOT NULL REFERENCES wallets (user_id) ON DELETE RESTRICT,
    counterparty    TEXT NOT NULL CHECK (counterparty IN ('EXTERNAL', 'ESCROW', 'HOUSE')),
    amount          NUMERIC(30, 8) NOT NULL CHECK (amount <> 0),
    balance_after   NUMERIC(30, 8) NOT NULL CHECK (balance_after >= 0),
    -- What the movement is for: a bet id (STAKE, REFUND), a match id (PAYOUT), or the caller's text.
    reference       TEXT NOT NULL DEFAULT '',
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- Credits are positive, debits negative, each kind against its own account.
    CONSTRAINT ledger_entries_direction CHECK (
        (kind IN ('DEPOSIT', 'REFUND', 'PAYOUT')) = (amount > 0)
    ),
    CONSTRAINT ledger_entries_counterparty CHECK (
        CASE kind
            WHEN 'DEPOSIT' THEN counterparty = 'EXTERNAL'
            WHEN 'WITHDRAWAL' THEN counterparty = 'EXTERNAL'
            ELSE counterparty = 'ESCROW'
        END
    )
);

-- ListLedgerEntries: a user's entries, newest first.
CREATE INDEX ledger_entries_user_idx ON ledger_entries (user_id, entry_id DESC);
-- Refunds and payouts look up the stakes they return.
CREATE INDEX ledger_entries_reference_idx ON ledger_entries (reference)
    WHERE kind IN ('STAKE', 'REFUND', 'PAYOUT');

-- Append-only, enforced by the database rather than by convention.
CREATE FUNCTION ledger_entries_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'ledger_entries is append-only: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END;
$$;

CREATE TRIGGER ledger_entries_no_update_delete
    BEFORE UPDATE OR DELETE ON ledger_entries
    FOR EACH ROW EXECUTE FUNCTION ledger_entries_append_only();

CREATE TRIGGER ledger_entries_no_truncate
    BEFORE TRUNCATE ON ledger_entries
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_entries_append_only();

-- Every account's balance, the system accounts derived. Sums to zero.
CREATE VIEW account_balances AS
    SELECT 'USER:' || user_id AS account, sum(amount) AS balance
      FROM ledger_entries GROUP BY user_id
    UNION ALL
    SELECT counterparty AS account, -sum(amount) AS balance
      FROM ledger_entries GROUP BY counterparty;
