-- A settle-round job pages through a round's unpaid matches in match id
-- order (`RoundStore::open_match_views`: round_id = $1 AND status = 'OPEN'
-- AND match_id > the cursor ORDER BY match_id LIMIT 256). With only
-- matches_round_idx (round_id, status), every page read every open match of
-- the round and sorted them: a round of N matches cost N²/256 rows. This
-- partial index holds the unpaid matches in the order the pages want, so a
-- page reads its 256 entries and stops; a match leaves it when it is paid.
CREATE INDEX matches_open_by_round_idx ON matches (round_id, match_id) WHERE status = 'OPEN';
