-- Fewer and narrower index entries a bet row version. A status change is
-- never a HOT update here (the status is in index predicates and keys), so
-- every version of a bet (PLACING, PENDING, MATCHED, SETTLED) writes an entry
-- into every index whose predicate it meets: on a model of a bet's life
-- (BENCHMARKS.md, 2026-12-07) the indexes wrote two thirds of the table's WAL.
--
-- bets_round_idx carried (round_id, status, amount, side, created_at): one
-- distinct key a row, so none of PostgreSQL's deduplication, for statements
-- that only ever ask for a round's bets in some statuses (the round's
-- totals, its refunds). Now (round_id, status): few distinct keys, stored as
-- posting lists, half the index size.
--
-- The matcher's reads of a group (a round's PENDING bets of one stake and
-- side, oldest first, and the probe of whether any is left) went through
-- bets_round_idx's (round_id, status, amount, side) prefix or through
-- bets_matching_idx filtering the side; bets_matching_idx now has the side
-- in its key, so they read exactly the side's entries, in order.
--
-- bets_match_idx (a bet by its match) served the settler's MATCHED ->
-- SETTLED update, which now names the bets by primary key (the match rows'
-- bet_a_id and bet_b_id, returned by the same transaction's update of the
-- matches); the audit's joins by match read whole tables. It stays in this
-- release: the migration job runs while the previous release's settlers
-- still serve (docs/runbook.md), and their statement without the index
-- would read the whole table a page of matches. A later release, once no
-- settler runs that statement, drops it (an entry for the MATCHED and the
-- SETTLED version of every matched bet).
CREATE INDEX bets_matching_side_idx ON bets (round_id, amount, side, created_at)
    WHERE status = 'PENDING';
DROP INDEX bets_matching_idx;
ALTER INDEX bets_matching_side_idx RENAME TO bets_matching_idx;

CREATE INDEX bets_round_status_idx ON bets (round_id, status);
DROP INDEX bets_round_idx;
ALTER INDEX bets_round_status_idx RENAME TO bets_round_idx;

-- What is left, and what needs it:
--   bets_pkey              every move of a bet by id
--   bets_user_key_unique   a PlaceBet retry finds its bet by the client's key
--   bets_user_idx          ListBets: a player's bets, newest first
--   bets_round_idx         a round's totals; its refunds on close and void
--   bets_placing_idx       the recovery pass (PLACING bets left behind)
--   bets_pending_idx       the match-timeout sweep, oldest first
--   bets_matching_idx      the matcher's group reads
--   bets_open_by_user_idx  the per-user bound on open bets
--   bets_match_idx         the previous release's settlers (see above)
