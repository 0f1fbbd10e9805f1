-- bets_match_idx (a bet by its match) was kept by 20261207000001 for the
-- settlers of the release before it, whose MATCHED -> SETTLED update found a
-- match's bets through it. The release since names them by primary key, and
-- a rolling deploy to this one only ever runs beside that release (the
-- migration job runs while the previous release still serves:
-- docs/runbook.md), so no statement left reads this index. Dropping it
-- spares every matched bet two index entries (its MATCHED and its SETTLED
-- version).
DROP INDEX IF EXISTS bets_match_idx;
