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
-- range of pages: a new row version landing in a summarized range widens
-- that range's summary at most, one in the table's unsummarized tail costs
-- nothing, and autosummarize has autovacuum summarize each range once it
-- fills. New row versions go to pages with free space, mostly the table's
-- end, so the sweep reads the unsummarized tail and the few ranges whose
-- summaries reach into its window, not the table (plans.rs,
-- `the_hub_sweep_reads_the_latest_changes_not_the_whole_table`).
--
-- The statements are the previous release's too, so it gains at once, and
-- nothing it runs needs anything this drops (nothing).
CREATE INDEX bets_updated_brin ON bets USING brin (updated_at)
    WITH (pages_per_range = 16, autosummarize = on);
CREATE INDEX rounds_changed_brin ON rounds
    USING brin ((greatest(created_at, closed_at, settled_at)))
    WITH (pages_per_range = 16, autosummarize = on);
