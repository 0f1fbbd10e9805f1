-- Money safety: a refusal is the answer for its key, and the balance limit
-- applies to deposits only.

-- The wallet's refusals (INSUFFICIENT_FUNDS for a debit, BALANCE_LIMIT for a
-- deposit, and the guards' NO_MATCHING_STAKE, ALREADY_PAID, ALREADY_REFUNDED
-- for refunds and payouts), kept under their idempotency key exactly as
-- movements are, so
-- that the same key and payload always get the same answer: a retry of a
-- refused HoldStake can never take the stake later, and a rejected bet stays
-- rejected. A key is in at most one of ledger_entries and wallet_refusals;
-- the wallet decides which under a per-key lock.
CREATE TABLE wallet_refusals (
    idempotency_key TEXT PRIMARY KEY,
    kind            TEXT NOT NULL CHECK (kind IN ('DEPOSIT', 'WITHDRAWAL', 'STAKE', 'REFUND', 'PAYOUT')),
    user_id         BIGINT NOT NULL CHECK (user_id > 0),
    -- The amount asked for (positive), to tell a retry from a reused key.
    amount          NUMERIC(30, 8) NOT NULL CHECK (amount > 0),
    reference       TEXT NOT NULL DEFAULT '',
    reason          TEXT NOT NULL CHECK (reason IN ('INSUFFICIENT_FUNDS', 'BALANCE_LIMIT',
                        'NO_MATCHING_STAKE', 'ALREADY_PAID', 'ALREADY_REFUNDED')),
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TRIGGER wallet_refusals_no_update_delete
    BEFORE UPDATE OR DELETE ON wallet_refusals
    FOR EACH ROW EXECUTE FUNCTION ledger_entries_append_only();

CREATE TRIGGER wallet_refusals_no_truncate
    BEFORE TRUNCATE ON wallet_refusals
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_entries_append_only();

-- Deposits may fill a wallet up to 10^15 (the wallet checks it); money owed
-- back (refunds, payouts) is always credited, even past that. The column's
-- backstop is 10^18: far beyond what deposits allow, and still well inside
-- rust_decimal's range at 8 fractional digits (about 7.9 x 10^20) for sums.
ALTER TABLE wallets DROP CONSTRAINT wallets_balance_limit;
ALTER TABLE wallets ADD CONSTRAINT wallets_balance_range CHECK (balance <= 1000000000000000000);
