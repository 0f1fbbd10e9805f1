-- The links between a match and its two bets (matches.bet_a_id and bet_b_id,
-- bets.match_id) are written only by the matcher, in one transaction under
-- the round's lock: the match rows and the MATCHED update together. Their
-- three foreign keys checked each link once more, a query per row (two per
-- match inserted, one per bet marked MATCHED), and PostgreSQL plans each of
-- those queries once per connection and keeps the plan: planned against the
-- statistics of an empty table (a fresh deployment, or the benchmark's
-- quiesced cluster), the checks cost the matcher two and a half times as
-- much a pair until autovacuum analyzed the tables again, and placement
-- outran it (BENCHMARKS.md, 2026-12-05). The audit's MATCH_LINK_BROKEN
-- check now verifies more than the keys did: that every bet naming a match
-- is one of its two bets, in its round and of its stake, and that both bets
-- of every match name it. (bets has had no foreign key to rounds from the
-- start, for the same reason: the round's row would be a hot row.)
ALTER TABLE bets DROP CONSTRAINT bets_match_fk;
ALTER TABLE matches DROP CONSTRAINT matches_bet_a_id_fkey,
                    DROP CONSTRAINT matches_bet_b_id_fkey;
