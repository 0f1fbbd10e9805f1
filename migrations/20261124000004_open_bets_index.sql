-- PlaceBet's open-bets limit counts a user's unmatched bets (PLACING or
-- PENDING) before each new bet. This partial index holds only those rows, so
-- the count reads at most the limit's worth of index entries however long
-- the user's history is.
CREATE INDEX bets_open_by_user_idx ON bets (user_id) WHERE status IN ('PLACING', 'PENDING');
