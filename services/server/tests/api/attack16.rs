//! Attack review 16: the matcher's waiting runs (commit 4ac49eb). A match
//! job whose (round, stake) group has a run of this process registered and
//! not yet reading is done at once (`Waiting`), on the promise that the
//! waiting run "matches [the job's bets] as this job's own run would".
//!
//! That promise needs the waiting run to leave no matchable pair in the
//! group. Its loop stops after a batch that pairs nothing or that looks
//! complete (fewer rows than the batch size on both sides). But the
//! candidates' lock (`FOR UPDATE OF b`, READ COMMITTED) drops, after its
//! wait, a row that a concurrent cancel or timeout refund moved out of
//! PENDING (EvalPlanQual re-checks `b.status = c.status`), and the
//! subquery's LIMIT is not run again: a side cut short by the batch size
//! comes back shorter than the batch, or empty, and the run takes it for
//! the whole side and stops with pairs left. Before 4ac49eb every job that
//! queued behind the run ran itself afterwards and matched what was left;
//! now they are acknowledged and the pairs wait for the next job of the
//! group or the reconciler's sweep (PENDING bets older than 5 s).
//!
//! Each interleaving is pinned as in attack15: a transaction of the test's
//! own holds the round's advisory lock or the rows it changed, and the
//! statement under test is seen waiting (`pg_locks`, `pg_stat_activity`).

use std::time::Duration;

use betting_bets::matcher::Matcher;
use rust_decimal::Decimal;
use uuid::Uuid;

use crate::rows::{self, Db};

const ROUND: &str = "attack16";

/// Batch and per-user bound of the matchers here: small, so that a side is
/// cut short by the batch size with a handful of bets.
const BATCH: i64 = 4;
const PER_USER: i64 = 3;

async fn db() -> Db {
    rows::db(ROUND, 10).await
}

/// A PENDING bet of stake 1, made `nth` milliseconds into the round.
async fn bet(db: &Db, nth: i64, user: i64, side: &str) -> Uuid {
    rows::bet(db, nth, user, side, "PENDING").await
}

async fn status_of(db: &Db, bet: Uuid) -> String {
    sqlx::query_scalar("SELECT status FROM bets WHERE bet_id = $1")
        .bind(bet)
        .fetch_one(&db.pool)
        .await
        .expect("bet")
}

/// PENDING pairs of the group the matcher should have made: PENDING bets on
/// both sides of different users.
async fn matchable_pairs_left(db: &Db) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM bets a JOIN bets b ON a.round_id = b.round_id \
           AND a.amount = b.amount AND a.user_id <> b.user_id \
         WHERE a.round_id = $1 AND a.side = 'A' AND b.side = 'B' \
           AND a.status = 'PENDING' AND b.status = 'PENDING'",
    )
    .bind(ROUND)
    .fetch_one(&db.pool)
    .await
    .expect("pairs left")
}

/// A transaction holding `bets` after cancelling them (PENDING -> REFUNDED,
/// as CancelBet or a MATCH_TIMEOUT refund does), not yet committed.
async fn hold_cancelled(db: &Db, bets: &[Uuid]) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let mut tx = db.pool.begin().await.expect("begin");
    let moved = sqlx::query(
        "UPDATE bets SET status = 'REFUNDED', refund_reason = 'CANCELLED', version = version + 1 \
         WHERE bet_id = ANY($1) AND status = 'PENDING'",
    )
    .bind(bets)
    .execute(&mut *tx)
    .await
    .expect("cancel")
    .rows_affected();
    assert_eq!(moved, bets.len() as u64);
    tx
}

/// A transaction holding the round's advisory lock, as a close, a settle or
/// another matcher's transaction would.
async fn hold_round(db: &Db) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let mut tx = db.pool.begin().await.expect("begin");
    betting_db::lock_round(&mut tx, ROUND)
        .await
        .expect("hold the round's lock");
    tx
}

async fn until(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !check().await {
        assert!(std::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Until `n` backends wait for the round's lock.
async fn advisory_waiters(db: &Db, n: i64) {
    rows::advisory_waiters(&db.pool, n).await;
}

/// Until the matcher's candidates read waits for a row lock held by a
/// cancel: it read the old version of the held row.
async fn candidates_read_waits(db: &Db) {
    until("the candidates read waits for a held bet", async || {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND wait_event_type = 'Lock' \
               AND wait_event IN ('transactionid', 'tuple') \
               AND ltrim(query) LIKE 'SELECT b.created_at%'",
        )
        .fetch_one(&db.pool)
        .await
        .expect("pg_stat_activity");
        waiting > 0
    })
    .await;
}

/// A run of the group of a PENDING bet `a1` (stake 1, side A) waiting for
/// the round's lock, which the test holds.
struct WaitingRun {
    db: Db,
    a1: Uuid,
    matcher: Matcher,
    round_lock: sqlx::Transaction<'static, sqlx::Postgres>,
    run: tokio::task::JoinHandle<Result<usize, betting_db::StoreError>>,
}

async fn a_waiting_run() -> WaitingRun {
    let db = db().await;
    let a1 = bet(&db, 1, 1, "A").await;
    let matcher = matcher(&db);
    let round_lock = hold_round(&db).await;
    let run = spawn_match(&matcher, a1);
    advisory_waiters(&db, 1).await;
    WaitingRun {
        db,
        a1,
        matcher,
        round_lock,
        run,
    }
}

/// A match job run in a task of its own.
fn spawn_match(
    matcher: &Matcher,
    bet: Uuid,
) -> tokio::task::JoinHandle<Result<usize, betting_db::StoreError>> {
    let matcher = matcher.clone();
    tokio::spawn(async move { matcher.match_bet(bet).await })
}

async fn assert_matched(db: &Db, bets: &[Uuid]) {
    for bet in bets {
        assert_eq!(status_of(db, *bet).await, "MATCHED", "bet {bet}");
    }
}

/// What a spawned matcher call answered, within 20 s.
async fn joined(
    what: &str,
    run: tokio::task::JoinHandle<Result<usize, betting_db::StoreError>>,
) -> usize {
    tokio::time::timeout(Duration::from_secs(20), run)
        .await
        .unwrap_or_else(|_| panic!("{what} did not end"))
        .expect("join")
        .unwrap_or_else(|e| panic!("{what} failed: {e}"))
}

fn matcher(db: &Db) -> Matcher {
    Matcher::new(db.pool.clone()).with_batch(BATCH, PER_USER)
}

// --- The finding: a batch shortened by a cancel stops the run ----------------

/// Six A bets (users 1-6), three B bets (users 11-13), oldest A first. The
/// two oldest A bets are cancelled by a transaction that commits while the
/// run's candidates read waits for them: side A comes back as a3, a4 (cut
/// to the batch of 4 before the re-check dropped two), taken for the whole
/// side; b1, b2 are matched and the run stops, leaving b3 with a5 and a6.
///
/// The root cause predates 4ac49eb (a run's own bets are left too), but
/// 4ac49eb makes the jobs queued behind such a run rely on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn attack16_a_batch_shortened_by_a_concurrent_cancel_does_not_end_the_run() {
    let db = db().await;
    let mut a = Vec::new();
    for user in 1..=6 {
        a.push(bet(&db, user, user, "A").await);
    }
    let mut b = Vec::new();
    for user in 11..=13 {
        b.push(bet(&db, user, user, "B").await);
    }
    let cancel = hold_cancelled(&db, &a[..2]).await;
    let run = {
        let matcher = matcher(&db);
        tokio::spawn(async move { matcher.match_group(ROUND, Decimal::ONE).await })
    };
    candidates_read_waits(&db).await;
    cancel.commit().await.expect("commit the cancels");
    let pairs = joined("the run", run).await;
    assert_eq!(
        (pairs, matchable_pairs_left(&db).await),
        (3, 0),
        "the run stopped with matchable pairs left (b3 is {})",
        status_of(&db, b[2]).await
    );
}

/// The same with every candidate of a side cancelled under the read: the
/// batch pairs nothing, which the run takes as proof that no pair is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn attack16_a_batch_emptied_by_concurrent_cancels_is_no_proof_that_nothing_is_left() {
    let db = db().await;
    let mut a = Vec::new();
    for user in 1..=5 {
        a.push(bet(&db, user, user, "A").await);
    }
    let b1 = bet(&db, 11, 11, "B").await;
    let cancel = hold_cancelled(&db, &a[..4]).await;
    let run = {
        let matcher = matcher(&db);
        tokio::spawn(async move { matcher.match_group(ROUND, Decimal::ONE).await })
    };
    candidates_read_waits(&db).await;
    cancel.commit().await.expect("commit the cancels");
    let pairs = joined("the run", run).await;
    assert_eq!(
        (pairs, status_of(&db, a[4]).await, status_of(&db, b1).await),
        (1, "MATCHED".to_owned(), "MATCHED".to_owned()),
        "a5 and b1 were left PENDING"
    );
}

/// What 4ac49eb changes: a run waits for the round's lock; B bets commit
/// and their job is done at once (coalesced behind the run); the run then
/// loses two candidates to a cancel as above and stops. The job's own run
/// (what it did before 4ac49eb) would have read after the waiting run
/// committed and matched b3 with a5: now b3 stays PENDING until another
/// job of the group comes or the reconciler sweeps it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn attack16_a_job_coalesced_behind_a_run_that_stops_early_is_left_unmatched() {
    let db = db().await;
    let mut a = Vec::new();
    for user in 1..=6 {
        a.push(bet(&db, user, user, "A").await);
    }
    let matcher = matcher(&db);
    let round_lock = hold_round(&db).await;
    let waiting_run = {
        let matcher = matcher.clone();
        let bet = a[2];
        tokio::spawn(async move { matcher.match_bet(bet).await })
    };
    advisory_waiters(&db, 1).await;

    // A placing batch's bets, committed, and their job: done at once.
    let mut b = Vec::new();
    for user in 11..=13 {
        b.push(bet(&db, 100 + user, user, "B").await);
    }
    let coalesced = tokio::time::timeout(Duration::from_secs(5), matcher.match_bet(b[0]))
        .await
        .expect("the job is done at once")
        .expect("the job");
    assert_eq!(coalesced, 0);

    // Two cancels (or timeout refunds) of the oldest A bets, under way
    // when the waiting run reads.
    let cancel = hold_cancelled(&db, &a[..2]).await;
    round_lock.commit().await.expect("release the round's lock");
    candidates_read_waits(&db).await;
    cancel.commit().await.expect("commit the cancels");
    let pairs = joined("the waiting run", waiting_run).await;

    assert_eq!(
        (
            pairs,
            status_of(&db, b[2]).await,
            matchable_pairs_left(&db).await
        ),
        (3, "MATCHED".to_owned(), 0),
        "the coalesced job's bet b3 was left PENDING beside a5 and a6"
    );
}

// --- Held ----------------------------------------------------------------------

/// A waiting run whose future is dropped (a worker's shutdown aborts it
/// after the grace period and hands its job back) releases its
/// registration: a job of the group taken afterwards runs itself (waits for
/// the lock) and matches the pair.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn attack16_an_aborted_waiting_run_leaves_no_registration_behind() {
    let WaitingRun {
        db,
        a1,
        matcher,
        round_lock,
        run: waiting_run,
    } = a_waiting_run().await;
    waiting_run.abort();
    assert!(
        waiting_run.await.expect_err("aborted").is_cancelled(),
        "the run was aborted"
    );

    let b1 = bet(&db, 2, 2, "B").await;
    let job = spawn_match(&matcher, b1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !job.is_finished(),
        "the job was coalesced behind an aborted run"
    );
    round_lock.commit().await.expect("release the round's lock");
    let pairs = joined("the job", job).await;
    assert_eq!(pairs, 1);
    assert_matched(&db, &[a1, b1]).await;
}

/// A waiting run that fails before it reads (its lock wait cancelled: a
/// statement timeout, an operator's pg_cancel_backend) returns an error, so
/// its job is retried (a store failure is `Retry` or `Unavailable`, never
/// `Permanent`); the retry, reading later still, matches the bets of the
/// job that was coalesced behind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn attack16_a_waiting_run_that_fails_before_reading_is_retried_and_covers_the_job() {
    let WaitingRun {
        db,
        a1,
        matcher,
        round_lock,
        run: waiting_run,
    } = a_waiting_run().await;
    let b1 = bet(&db, 2, 2, "B").await;
    let coalesced = tokio::time::timeout(Duration::from_secs(5), matcher.match_bet(b1))
        .await
        .expect("the job is done at once")
        .expect("the job");
    assert_eq!(coalesced, 0);

    let cancelled: i64 = sqlx::query_scalar(
        "SELECT count(*) FILTER (WHERE pg_cancel_backend(pid)) FROM pg_locks \
         WHERE locktype = 'advisory' AND NOT granted \
         AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
    )
    .fetch_one(&db.pool)
    .await
    .expect("cancel the waiting run's statement");
    assert_eq!(cancelled, 1);
    let failed = tokio::time::timeout(Duration::from_secs(20), waiting_run)
        .await
        .expect("the waiting run ends")
        .expect("join");
    let error = failed.expect_err("the waiting run failed");
    assert!(
        !matches!(
            betting_jobs::store_failure(error),
            betting_queue::JobError::Permanent(_)
        ),
        "its job would not be retried"
    );
    assert_eq!(status_of(&db, b1).await, "PENDING");

    round_lock.commit().await.expect("release the round's lock");
    // The retry of the waiting run's job.
    let pairs = tokio::time::timeout(Duration::from_secs(20), matcher.match_bet(a1))
        .await
        .expect("the retry ends")
        .expect("the retry");
    assert_eq!(pairs, 1);
    assert_eq!(status_of(&db, b1).await, "MATCHED");
}

/// The registry's key is `(String, Decimal)`: a run registered with the
/// stake as `1` (scale 0) and a job reading `1.00000000` from NUMERIC(30,8)
/// are one group (rust_decimal's `Hash` normalises, like its `Eq`), and the
/// run, whose SQL compares numerically, matches the job's bets.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn attack16_a_waiting_run_keyed_by_a_differently_scaled_stake_covers_the_job() {
    let db = db().await;
    let a1 = bet(&db, 1, 1, "A").await;
    let matcher = matcher(&db);
    let round_lock = hold_round(&db).await;
    let scaled: Decimal = "1".parse().expect("decimal");
    assert_eq!(scaled.scale(), 0);
    let waiting_run = {
        let matcher = matcher.clone();
        tokio::spawn(async move { matcher.match_group(ROUND, scaled).await })
    };
    advisory_waiters(&db, 1).await;
    let b1 = bet(&db, 2, 2, "B").await;
    let stored: Decimal = sqlx::query_scalar("SELECT amount FROM bets WHERE bet_id = $1")
        .bind(b1)
        .fetch_one(&db.pool)
        .await
        .expect("amount");
    assert_eq!(stored.scale(), 8);
    let coalesced = tokio::time::timeout(Duration::from_secs(5), matcher.match_bet(b1))
        .await
        .expect("the job is done at once")
        .expect("the job");
    assert_eq!(coalesced, 0);
    round_lock.commit().await.expect("release the round's lock");
    let pairs = joined("the waiting run", waiting_run).await;
    assert_eq!(pairs, 1);
    assert_matched(&db, &[a1, b1]).await;
}

/// A waiting run that finds its round closed when it gets the lock returns
/// at once (releasing its registration); the job coalesced behind it would
/// have found the same, under the same lock: its bets cannot be matched in
/// a closed round, and are the close's (or `refund_stranded`'s) to refund.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn attack16_a_waiting_run_that_finds_its_round_closed_matches_nothing_and_unregisters() {
    let WaitingRun {
        db,
        a1,
        matcher,
        mut round_lock,
        run: waiting_run,
    } = a_waiting_run().await;
    let b1 = bet(&db, 2, 2, "B").await;
    let coalesced = tokio::time::timeout(Duration::from_secs(5), matcher.match_bet(b1))
        .await
        .expect("the job is done at once")
        .expect("the job");
    assert_eq!(coalesced, 0);
    sqlx::query("UPDATE rounds SET status = 'CLOSED' WHERE round_id = $1")
        .bind(ROUND)
        .execute(&mut *round_lock)
        .await
        .expect("close");
    round_lock.commit().await.expect("release the round's lock");
    let pairs = joined("the waiting run", waiting_run).await;
    assert_eq!(pairs, 0);
    // The job's own run (what it did before 4ac49eb) finds the same.
    let own = tokio::time::timeout(Duration::from_secs(20), matcher.match_bet(b1))
        .await
        .expect("the job's own run ends")
        .expect("the job's own run");
    assert_eq!(own, 0);
    assert_eq!(status_of(&db, a1).await, "PENDING");
    assert_eq!(status_of(&db, b1).await, "PENDING");
}
