-- Rounds, bets, matches, and the betting side's outbox of wallet commands.

CREATE TABLE rounds (
    round_id     TEXT PRIMARY KEY CHECK (round_id ~ '^[A-Za-z0-9._:-]{1,64}$'),
    status       TEXT NOT NULL DEFAULT 'OPEN' CHECK (status IN ('OPEN', 'CLOSED', 'SETTLED', 'VOIDED')),
    winning_side TEXT CHECK (winning_side IN ('A', 'B')),
    void_reason  TEXT,
    version      BIGINT NOT NULL DEFAULT 1,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    closed_at    TIMESTAMPTZ,
    settled_at   TIMESTAMPTZ,
    CONSTRAINT rounds_winner_iff_settled CHECK ((status = 'SETTLED') = (winning_side IS NOT NULL))
);

CREATE TABLE bets (
    bet_id          UUID PRIMARY KEY,
    user_id         BIGINT NOT NULL CHECK (user_id > 0),
    -- The client's key, scoped to the user: a retry finds this row.
    idempotency_key TEXT NOT NULL,
    -- No foreign key to rounds on purpose: every insert would take a KEY SHARE
    -- lock on the round's row, one hot row for every bet of the round. The
    -- round is checked in the inserting statement instead.
    round_id        TEXT NOT NULL,
    side            TEXT NOT NULL CHECK (side IN ('A', 'B')),
    amount          NUMERIC(30, 8) NOT NULL CHECK (amount > 0),
    -- PLACING: written, stake not yet held. REJECTED: the stake could not be
    -- taken. Neither is ever shown to clients.
    status          TEXT NOT NULL CHECK (status IN ('PLACING', 'REJECTED', 'PENDING', 'MATCHED', 'SETTLED', 'REFUNDED')),
    reject_reason   TEXT,
    match_id        UUID,
    result          TEXT CHECK (result IN ('WON', 'LOST')),
    payout          NUMERIC(30, 8) CHECK (payout >= 0),
    refund_reason   TEXT CHECK (refund_reason IN ('CANCELLED', 'MATCH_TIMEOUT', 'ROUND_CLOSED', 'ROUND_VOIDED')),
    -- The owner's balance right after the stake: what a PlaceBet replay returns.
    balance_after   NUMERIC(30, 8),
    version         BIGINT NOT NULL DEFAULT 0,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT bets_user_key_unique UNIQUE (user_id, idempotency_key),
    CONSTRAINT bets_matched_has_match CHECK (status NOT IN ('MATCHED', 'SETTLED') OR match_id IS NOT NULL),
    CONSTRAINT bets_settled_has_result CHECK ((status = 'SETTLED') = (result IS NOT NULL AND payout IS NOT NULL)),
    CONSTRAINT bets_refunded_has_reason CHECK ((status = 'REFUNDED') = (refund_reason IS NOT NULL)),
    CONSTRAINT bets_rejected_has_reason CHECK ((status = 'REJECTED') = (reject_reason IS NOT NULL))
);

-- ListBets: a user's bets, newest first (bet ids are UUIDv7, time-ordered).
CREATE INDEX bets_user_idx ON bets (user_id, bet_id DESC);
-- Matching and round statistics.
CREATE INDEX bets_round_idx ON bets (round_id, status, amount, side, created_at);
-- The recovery pass and the match sweeper.
CREATE INDEX bets_placing_idx ON bets (created_at) WHERE status = 'PLACING';
CREATE INDEX bets_pending_idx ON bets (created_at) WHERE status = 'PENDING';

CREATE TABLE matches (
    match_id     UUID PRIMARY KEY,
    round_id     TEXT NOT NULL,
    -- A bet is matched at most once.
    bet_a_id     UUID NOT NULL UNIQUE REFERENCES bets (bet_id),
    bet_b_id     UUID NOT NULL UNIQUE REFERENCES bets (bet_id),
    -- Both stakes are equal: this is each one.
    amount       NUMERIC(30, 8) NOT NULL CHECK (amount > 0),
    status       TEXT NOT NULL DEFAULT 'OPEN' CHECK (status IN ('OPEN', 'SETTLED', 'VOIDED')),
    winning_side TEXT CHECK (winning_side IN ('A', 'B')),
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    settled_at   TIMESTAMPTZ,
    CONSTRAINT matches_distinct_bets CHECK (bet_a_id <> bet_b_id)
);

CREATE INDEX matches_round_idx ON matches (round_id, status);

ALTER TABLE bets ADD CONSTRAINT bets_match_fk FOREIGN KEY (match_id) REFERENCES matches (match_id);

-- Money the betting side owes back (refunds now, payouts next): written in the
-- same transaction as the bet's change of state, carried out through
-- WalletService right after commit, and again by the relay until done. The
-- wallet's idempotency key makes every retry safe.
CREATE TABLE wallet_commands (
    idempotency_key TEXT PRIMARY KEY,
    kind            TEXT NOT NULL CHECK (kind IN ('REFUND', 'PAYOUT')),
    user_id         BIGINT NOT NULL CHECK (user_id > 0),
    amount          NUMERIC(30, 8) NOT NULL CHECK (amount > 0),
    bet_id          UUID REFERENCES bets (bet_id),
    match_id        UUID REFERENCES matches (match_id),
    attempts        INTEGER NOT NULL DEFAULT 0,
    last_error      TEXT,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    done_at         TIMESTAMPTZ
);

CREATE INDEX wallet_commands_due_idx ON wallet_commands (created_at) WHERE done_at IS NULL;
