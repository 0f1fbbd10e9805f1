-- The hubs' sweep, the safety net under the change notes (every second
-- while an instance has streams open), asks which bets and rounds changed
-- in its last seconds: `bets.updated_at >= $1` and
-- `greatest(created_at, closed_at, settled_at) >= $1` on rounds. Neither had
-- an index, so every sweep read the whole table: about 21 ms a second at
-- 100,000 bets in the benchmark, and more with every bet ever placed.
--
-- BRIN, not B-tree. A B-tree on updated_at would add an entry to every row
-- version of a bet (no status change is a HOT update, and a bet has four
-- versions), which 20261207000001_narrow_bet_indexes just took pains to
-- avoid. A BRIN index keeps one summary (the smallest and largest value) a
-- range of 16 pages. A row version in the table's unsummarized tail costs
-- it nothing. One landing in a summarized range (a page with room: the old
-- version's own, or one VACUUM freed) raises that range's largest value,
-- a small update of the summary page and its WAL record, and makes the
-- range one the next sweeps read. Autosummarize asks autovacuum to
-- summarize each range once it fills, and every VACUUM summarizes what is
-- left. So a sweep reads the unsummarized tail and the ranges changed
-- lately, not the table (plans.rs,
-- `the_hub_sweep_reads_the_latest_changes_not_the_whole_table`); how long
-- the tail grows depends on how often autovacuum visits `bets`.
--
-- Rounds' close, settle and void from OPEN were HOT updates (only the
-- primary key indexed them) and are not now: two index entries a round.
--
-- The statements are the previous release's too, so it gains at once, and
-- nothing it runs needs anything this drops (nothing).
CREATE INDEX bets_updated_brin ON bets USING brin (updated_at)
    WITH (pages_per_range = 16, autosummarize = on);
CREATE INDEX rounds_changed_brin ON rounds
    USING brin ((greatest(created_at, closed_at, settled_at)))
    WITH (pages_per_range = 16, autosummarize = on);
