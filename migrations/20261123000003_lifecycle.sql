-- Matching, settlement and refunds.

-- The bets each payout paid for. A bet takes part in at most one payout
-- (the primary key), and the wallet refuses to refund a bet found here or to
-- pay out a bet that was refunded. Append-only like the ledger.
CREATE TABLE payout_bets (
    bet_id   UUID PRIMARY KEY,
    entry_id BIGINT NOT NULL REFERENCES ledger_entries (entry_id) ON DELETE RESTRICT
);

CREATE TRIGGER payout_bets_no_update_delete
    BEFORE UPDATE OR DELETE ON payout_bets
    FOR EACH ROW EXECUTE FUNCTION ledger_entries_append_only();

CREATE TRIGGER payout_bets_no_truncate
    BEFORE TRUNCATE ON payout_bets
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_entries_append_only();

-- The matcher reads a round's PENDING bets of one stake, oldest first.
CREATE INDEX bets_matching_idx ON bets (round_id, amount, created_at) WHERE status = 'PENDING';
-- Settlers read a match's bets.
CREATE INDEX bets_match_idx ON bets (match_id) WHERE match_id IS NOT NULL;
-- The reconciler finds refunds owed per round.
CREATE INDEX wallet_commands_bet_idx ON wallet_commands (bet_id);
