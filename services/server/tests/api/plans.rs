//! Statements that move many rows, named by id, out of one status find them
//! by primary key, never through a partial index on that status
//! (`betting_db::from_status`).
//!
//! Each test builds the case that went wrong in the benchmark: rows that
//! passed through a status leave an entry each in its partial index until
//! VACUUM removes it (autovacuum is off for the tables here, as it is
//! between two of its runs), and ANALYZE finds the status rare, which makes
//! the index look cheap to the planner. Then it runs the store's own
//! statement on a pool of one connection, has that backend flush its
//! statistics, and counts the scans of each index.

use std::{collections::HashMap, time::Duration};

use betting_bets::{BetStore, matcher::Matcher};
use betting_domain::{BetId, BetStatus, RefundReason};
use betting_test_kit::{TestDatabase, fresh_database};
use rust_decimal::Decimal;
use sqlx::{PgPool, postgres::PgPoolOptions};
use uuid::Uuid;

/// Bets that passed through the status, and the ones still in it.
const PASSED: i64 = 20_000;
const STILL: i64 = 16;

struct Bloated {
    _db: TestDatabase,
    owner: PgPool,
    /// The store's pool: one connection, whose statistics we flush.
    one: PgPool,
}

/// Runs each statement in turn on `pool`.
async fn execute_all(pool: &PgPool, statements: &[&'static str]) {
    for &statement in statements {
        sqlx::query(statement).execute(pool).await.expect(statement);
    }
}

/// PASSED + STILL bets in `status`, of which the first `stale` (in the
/// table's physical order) last changed an hour ago.
async fn bloated(status: &str, stale: i64) -> Bloated {
    let db = fresh_database().await;
    let owner = PgPoolOptions::new()
        .max_connections(2)
        .connect(&db)
        .await
        .expect("connect");
    let one = PgPoolOptions::new()
        .max_connections(1)
        .connect(&db)
        .await
        .expect("connect");
    execute_all(
        &owner,
        &[
            "ALTER TABLE bets SET (autovacuum_enabled = off)",
            "ALTER TABLE matches SET (autovacuum_enabled = off)",
            "INSERT INTO rounds (round_id) VALUES ('plans')",
        ],
    )
    .await;
    // PASSED + STILL bets in `status`, half on each side, all of one stake,
    // each user's two bets on opposite sides.
    // The first `stale` of them last changed an hour ago, the rest now.
    sqlx::query(
        "INSERT INTO bets (bet_id, user_id, idempotency_key, round_id, side, amount, status, \
           balance_after, version, updated_at) \
         SELECT uuidv7_like, 1 + n / 2, 'k' || n, 'plans', CASE WHEN n % 2 = 0 THEN 'A' ELSE 'B' END, \
           1, $1, CASE WHEN $1 = 'PLACING' THEN NULL ELSE 0 END, 0, \
           CASE WHEN n <= $3 THEN now() - interval '1 hour' ELSE now() END \
         FROM (SELECT n, (lpad(to_hex(n), 12, '0') || '7000800000000000' || lpad(to_hex(n), 4, '0'))::uuid \
                 AS uuidv7_like FROM generate_series(1, $2) AS n) s",
    )
    .bind(status)
    .bind(PASSED + STILL)
    .bind(stale)
    .execute(&owner)
    .await
    .expect("insert bets");
    Bloated {
        _db: db,
        owner,
        one,
    }
}

/// Moves the first PASSED bets on out of their status (to REFUNDED, a
/// status no partial index covers), leaving an index entry each behind,
/// then ANALYZEs.
async fn pass_through(b: &Bloated) {
    sqlx::query(
        "UPDATE bets SET status = 'REFUNDED', refund_reason = 'CANCELLED', \
           balance_after = coalesce(balance_after, 0) \
         WHERE bet_id IN (SELECT bet_id FROM bets ORDER BY bet_id LIMIT $1)",
    )
    .bind(PASSED)
    .execute(&b.owner)
    .await
    .expect("move them on");
    sqlx::query("ANALYZE bets")
        .execute(&b.owner)
        .await
        .expect("analyze");
}

async fn still(b: &Bloated) -> Vec<Uuid> {
    sqlx::query_scalar("SELECT bet_id FROM bets WHERE status <> 'REFUNDED' ORDER BY bet_id")
        .fetch_all(&b.owner)
        .await
        .expect("the bets still in the status")
}

async fn scans(pool: &PgPool) -> HashMap<String, i64> {
    sqlx::query_as::<_, (String, i64)>(
        "SELECT indexrelname::text, idx_scan FROM pg_stat_user_indexes \
         WHERE relname IN ('bets', 'matches')",
    )
    .fetch_all(pool)
    .await
    .expect("index statistics")
    .into_iter()
    .collect()
}

/// Each index's scans since `before`, once the store's backend has flushed
/// its statistics.
async fn scans_since(b: &Bloated, before: &HashMap<String, i64>) -> HashMap<String, i64> {
    let delta = |now: &HashMap<String, i64>| -> HashMap<String, i64> {
        now.iter()
            .map(|(index, n)| (index.clone(), n - before.get(index).copied().unwrap_or(0)))
            .filter(|(_, n)| *n > 0)
            .collect()
    };
    delta(&flushed(b, || scans(&b.owner), |now| !delta(now).is_empty()).await)
}

/// Asks the store's backend to flush its statistics (it does on going idle
/// after `pg_stat_force_next_flush`), then reads them with `read` until
/// `moved` says they show it, for at most 10 s.
async fn flushed<T, F: std::future::Future<Output = T>>(
    b: &Bloated,
    read: impl Fn() -> F,
    moved: impl Fn(&T) -> bool,
) -> T {
    sqlx::query("SELECT pg_stat_force_next_flush()")
        .execute(&b.one)
        .await
        .expect("flush");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let now = read().await;
        if moved(&now) || std::time::Instant::now() > deadline {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn assert_by_primary_key(delta: &HashMap<String, i64>, pkey: &str) {
    assert!(
        delta.contains_key(pkey),
        "the rows were not found by {pkey}: {delta:?}"
    );
    for index in delta.keys() {
        assert!(
            !index.ends_with("_placing_idx")
                && !index.ends_with("_pending_idx")
                && !index.ends_with("_matching_idx")
                && !index.ends_with("_open_by_round_idx")
                && !index.ends_with("_open_by_user_idx")
                && index != "bets_round_idx",
            "a status index was read: {delta:?}"
        );
    }
}

/// A batch reads back the rows the wallet placed by their ids: by primary
/// key, not through a status index full of dead entries.
#[tokio::test]
async fn reading_placed_bets_reads_no_status_index() {
    let b = bloated("PENDING", 0).await;
    pass_through(&b).await;
    let ids = still(&b).await;
    assert_eq!(ids.len() as i64, STILL);
    let before = scans(&b.owner).await;
    let ids: Vec<BetId> = ids.iter().map(|id| BetId::from(*id)).collect();
    let placed = BetStore::new(b.one.clone())
        .get_many(&ids)
        .await
        .expect("read placed bets");
    assert_eq!(placed.len() as i64, STILL, "every bet was read");
    assert_by_primary_key(&scans_since(&b, &before).await, "bets_pkey");
}

#[tokio::test]
async fn matching_reads_its_candidates_and_marks_them_by_primary_key() {
    let b = bloated("PENDING", 0).await;
    pass_through(&b).await;
    let before = scans(&b.owner).await;
    let matched = Matcher::new(b.one.clone())
        .match_group("plans", Decimal::ONE)
        .await
        .expect("match");
    assert_eq!(matched as i64, STILL / 2, "every pair was matched");
    let delta = scans_since(&b, &before).await;
    // The candidates come from an index of the group (round, status, stake),
    // once a side, which matching needs; locking and marking them goes by
    // primary key (and the match rows' keys are checked by theirs).
    let group: i64 = ["bets_round_idx", "bets_matching_idx"]
        .iter()
        .filter_map(|index| delta.get(*index))
        .sum();
    assert_eq!(group, 2, "one read of the group a side: {delta:?}");
    assert!(delta.contains_key("bets_pkey"), "{delta:?}");
    assert!(
        delta.keys().all(|index| [
            "bets_round_idx",
            "bets_matching_idx",
            "bets_pkey",
            "matches_pkey"
        ]
        .contains(&index.as_str())),
        "a status index was read: {delta:?}"
    );
}

#[tokio::test]
async fn refunding_bets_reads_no_status_index() {
    let b = bloated("PENDING", 0).await;
    pass_through(&b).await;
    let ids = still(&b).await;
    let before = scans(&b.owner).await;
    let bets: Vec<(BetId, RefundReason)> = ids
        .iter()
        .map(|id| (BetId::from(*id), RefundReason::Cancelled))
        .collect();
    let mut conn = b.one.acquire().await.expect("a connection");
    let refunded = betting_refunds::refund_bets(&mut conn, &bets, &[BetStatus::Pending], None)
        .await
        .expect("refund");
    drop(conn);
    assert_eq!(refunded.len() as i64, STILL, "every bet was refunded");
    assert_by_primary_key(&scans_since(&b, &before).await, "bets_pkey");
}

/// Index entries read since `before`, summed over the bets' indexes, once the
/// store's backend has flushed its statistics.
async fn entries_read_since(b: &Bloated, before: i64) -> i64 {
    flushed(b, || entries_read(&b.owner), |now| *now > before).await - before
}

async fn entries_read(pool: &PgPool) -> i64 {
    sqlx::query_scalar(
        "SELECT coalesce(sum(idx_tup_read), 0)::BIGINT FROM pg_stat_user_indexes \
         WHERE relname = 'bets'",
    )
    .fetch_one(pool)
    .await
    .expect("index statistics")
}

/// A player's page of one round reads the player's bets, not the round's.
/// The case of the benchmark (and of a hot round in production): the round
/// is newer than the table's statistics, so the planner takes it for a
/// round of a few bets and read the page through `bets_round_idx`, every
/// bet of the round (7,259 entries a page in a run of 11,330 bets).
#[tokio::test]
async fn a_players_page_of_a_round_reads_the_players_bets_not_the_rounds() {
    let b = bloated("PENDING", 0).await;
    // The statistics know the round 'plans' only; then a hot round of as
    // many bets, two a user, comes in after them.
    sqlx::query("ANALYZE bets")
        .execute(&b.owner)
        .await
        .expect("analyze");
    sqlx::query("INSERT INTO rounds (round_id) VALUES ('hot')")
        .execute(&b.owner)
        .await
        .expect("the hot round");
    sqlx::query(
        "INSERT INTO bets (bet_id, user_id, idempotency_key, round_id, side, amount, status, \
           balance_after, version) \
         SELECT gen_random_uuid(), 1 + n / 2, 'hot' || n, 'hot', CASE WHEN n % 2 = 0 THEN 'A' ELSE 'B' END, \
           1, 'PENDING', 0, 1 FROM generate_series(1, $1) AS n",
    )
    .bind(PASSED)
    .execute(&b.owner)
    .await
    .expect("the hot round's bets");
    let store = BetStore::new(b.one.clone());
    let user = betting_domain::UserId::new(4_321).expect("a user id");
    let round = betting_domain::RoundId::parse("hot").expect("a round id");
    // Warm the connection's statement cache, so that the count is the page's.
    store
        .list(user, Some(&round), Some(BetStatus::Pending), None, 500)
        .await
        .expect("list");
    let before = entries_read(&b.owner).await;
    let page = store
        .list(user, Some(&round), Some(BetStatus::Pending), None, 500)
        .await
        .expect("list");
    assert_eq!(page.len(), 2, "the player's two bets of the round");
    assert!(
        page.iter()
            .all(|bet| bet.user_id == user && bet.round_id == "hot"),
        "{page:?}"
    );
    let read = entries_read_since(&b, before).await;
    // The player has four bets in all: the page reads them, not the round's 20,000.
    assert!(read <= 16, "the page read {read} index entries");
}

/// Heap blocks of `table` read so far (from shared buffers or not).
async fn heap_blocks_read(pool: &PgPool, table: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT (coalesce(heap_blks_hit, 0) + coalesce(heap_blks_read, 0))::BIGINT \
         FROM pg_statio_user_tables WHERE relname = $1",
    )
    .bind(table)
    .fetch_one(pool)
    .await
    .expect("table statistics")
}

/// Runs a sweep twice on the store's connection (the first warms its
/// statement cache) and answers the second's result, the heap blocks of
/// `table` it read, and the table's size in pages.
async fn sweep_reads<T, F: std::future::Future<Output = T>>(
    b: &Bloated,
    table: &str,
    sweep: impl Fn() -> F,
) -> (T, i64, i64) {
    let pages: i64 = sqlx::query_scalar("SELECT pg_relation_size($1::TEXT::regclass) / 8192")
        .bind(table)
        .fetch_one(&b.owner)
        .await
        .expect("the table's size");
    sweep().await;
    let before = flushed(b, || heap_blocks_read(&b.owner, table), |_| true).await;
    let answer = sweep().await;
    let read = flushed(b, || heap_blocks_read(&b.owner, table), |now| *now > before).await - before;
    (answer, read, pages)
}

/// The hubs' sweep, every second while streams are open, reads what changed
/// in its last seconds and not the whole table (`bets_updated_brin`). It
/// used to be a sequential scan of every bet ever placed: about 21 ms a
/// second at 100,000 bets in the benchmark, and growing with the table.
#[tokio::test]
async fn the_hub_sweep_reads_the_latest_changes_not_the_whole_table() {
    let b = bloated("PENDING", PASSED).await;
    // What autovacuum does as each range of pages fills (`autosummarize`),
    // and VACUUM: summarize the ranges. Autovacuum is off here, and a range
    // no summary covers yet is read whole by every scan.
    execute_all(
        &b.owner,
        &[
            "ANALYZE bets",
            "SELECT brin_summarize_new_values('bets_updated_brin')",
        ],
    )
    .await;
    let store = BetStore::new(b.one.clone());
    let from = chrono::Utc::now() - chrono::Duration::minutes(1);
    let (changed, read, pages) = sweep_reads(&b, "bets", || async {
        store
            .changed_since(from, None, 10_000)
            .await
            .expect("sweep")
    })
    .await;
    assert!(changed.next.is_none(), "one page holds them");
    let mut ids: Vec<Uuid> = changed.notes.iter().map(|note| note.bet_id).collect();
    ids.sort();
    let mut recent: Vec<Uuid> = sqlx::query_scalar(
        "SELECT bet_id FROM bets WHERE updated_at > now() - interval '1 minute'",
    )
    .fetch_all(&b.owner)
    .await
    .expect("the recent bets");
    recent.sort();
    assert_eq!(
        ids.len() as i64,
        STILL,
        "the sweep finds the latest changes"
    );
    assert_eq!(ids, recent);
    assert!(
        read * 4 < pages,
        "the sweep read {read} of the table's {pages} pages"
    );
}

/// The rounds' half of the sweep: rounds created, closed or settled in its
/// window, read through `rounds_changed_brin`, not the whole table.
#[tokio::test]
async fn the_hub_sweep_reads_the_latest_rounds_not_every_round() {
    let b = bloated("PENDING", 0).await;
    execute_all(
        &b.owner,
        &[
            "INSERT INTO rounds (round_id, status, created_at, closed_at) \
         SELECT 'old-' || n, 'CLOSED', now() - interval '2 hours', now() - interval '1 hour' \
         FROM generate_series(1, 20000) AS n",
            "INSERT INTO rounds (round_id) VALUES ('new')",
            "ANALYZE rounds",
            "SELECT brin_summarize_new_values('rounds_changed_brin')",
        ],
    )
    .await;
    let store = betting_settlement::RoundStore::new(b.one.clone());
    let from = chrono::Utc::now() - chrono::Duration::minutes(1);
    let (mut changed, read, pages) = sweep_reads(&b, "rounds", || async {
        store.changed_since(from, 10_000).await.expect("sweep")
    })
    .await;
    changed.sort();
    // 'plans' is the round of `bloated`'s bets, created just now.
    assert_eq!(changed, ["new", "plans"]);
    assert!(
        read * 4 < pages,
        "the sweep read {read} of the table's {pages} pages"
    );
}

/// One transaction stamps every bet it changes with the same time (a voided
/// round's refunds, say). The sweep used to read the first 10,000 changes of
/// its window and nothing after them, so past 10,000 bets in one
/// transaction it read the same 10,000 every second and never the rest;
/// now it pages by (change time, bet id) and reads every one once.
#[tokio::test]
async fn the_hub_sweep_pages_through_one_transactions_changes() {
    let b = bloated("PENDING", 0).await;
    sqlx::query("UPDATE bets SET version = version + 1, updated_at = now()")
        .execute(&b.owner)
        .await
        .expect("one transaction changes them all");
    let store = BetStore::new(b.one.clone());
    let from = chrono::Utc::now() - chrono::Duration::minutes(1);
    let mut seen: Vec<Uuid> = Vec::new();
    let mut after = None;
    let mut pages = 0;
    loop {
        let page = store
            .changed_since(from, after, 6_000)
            .await
            .expect("a page");
        pages += 1;
        seen.extend(page.notes.iter().map(|note| note.bet_id));
        match page.next {
            Some(next) => after = Some(next),
            None => break,
        }
        assert!(pages < 10, "the pages end");
    }
    let total = (PASSED + STILL) as usize;
    assert_eq!(seen.len(), total, "every change read, none twice");
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), total, "no bet read twice");
    assert_eq!(pages, total.div_ceil(6_000));
}
