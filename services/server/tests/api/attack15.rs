//! Attack review 15: the status moves of commit eddc9df, which compare a
//! row's status with a column of the ids' rows (`betting_db::from_status`)
//! instead of a constant, under READ COMMITTED's re-check of a row that a
//! concurrent transaction changed (EvalPlanQual), and with repeated ids and
//! statuses in their arrays.
//!
//! Under EvalPlanQual PostgreSQL re-evaluates the statement's conditions on
//! the new version of the target (or locked) row only; the rows it was
//! joined with (an `unnest`, a subquery) are those of the first evaluation.
//! A status compared with a joined row's column is therefore re-checked
//! against that one status, the one the old version had: right when the
//! statement moves rows out of one status (the three statements with
//! `from_status`, the matcher's lock), wrong when it moves them out of any
//! of several (`refund_bets` with `[PENDING, MATCHED]`), where `= ANY($4)`
//! accepted a new version in any of them.
//!
//! Each interleaving is pinned: a transaction of the test's own changes and
//! holds a bet's row, the statement under test starts and is seen waiting
//! for that row's lock, then the holder commits (or rolls back).

use std::time::Duration;

use betting_bets::matcher::Matcher;
use betting_db::actions::Actor;
use betting_domain::{BetId, BetStatus, RefundReason, RoundId};
use betting_settlement::RoundStore;
use rust_decimal::Decimal;
use uuid::Uuid;

use crate::rows::{self, Db};

const ROUND: &str = "attack15";

async fn db() -> Db {
    rows::db(ROUND, 6).await
}

async fn bet(db: &Db, nth: i64, user: i64, side: &str, status: &str) -> Uuid {
    rows::bet(db, nth, user, side, status).await
}

async fn status_of(db: &Db, bet: Uuid) -> (String, Option<Uuid>) {
    sqlx::query_as("SELECT status, match_id FROM bets WHERE bet_id = $1")
        .bind(bet)
        .fetch_one(&db.pool)
        .await
        .expect("bet")
}

async fn refunds_owed(db: &Db, bet: Uuid) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM wallet_commands WHERE bet_id = $1 AND kind = 'REFUND'")
        .bind(bet)
        .fetch_one(&db.pool)
        .await
        .expect("wallet commands")
}

/// A transaction holding `bets` after moving them PENDING -> MATCHED into one
/// new match (what the matcher's transaction does), not yet committed.
async fn hold_matched(
    db: &Db,
    a: Uuid,
    b: Uuid,
) -> (sqlx::Transaction<'static, sqlx::Postgres>, Uuid) {
    let mut tx = db.pool.begin().await.expect("begin");
    let m = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO matches (match_id, round_id, bet_a_id, bet_b_id, amount) VALUES ($1, $2, $3, $4, 1)",
    )
    .bind(m)
    .bind(ROUND)
    .bind(a)
    .bind(b)
    .execute(&mut *tx)
    .await
    .expect("match");
    let moved = sqlx::query(
        "UPDATE bets SET status = 'MATCHED', match_id = $1, version = version + 1 \
         WHERE bet_id IN ($2, $3) AND status = 'PENDING'",
    )
    .bind(m)
    .bind(a)
    .bind(b)
    .execute(&mut *tx)
    .await
    .expect("mark matched")
    .rows_affected();
    assert_eq!(moved, 2);
    (tx, m)
}

// --- The finding: several statuses, re-checked against one ---------------

/// `refund_bets` promises to refund each bet "still in one of the `from`
/// statuses". A bet that was PENDING when the statement read it and that a
/// concurrent transaction moved to MATCHED (also in `from`) while the
/// statement waited for its row is still in one of them; with
/// `b.status = ANY($4)` the re-check on the new version passed and it was
/// refunded. With `FROM due, unnest($4) AS f(from_status) WHERE b.status =
/// f.from_status` the re-check compares MATCHED with the joined row's
/// PENDING (the only `f` row the old version joined), fails, and the bets
/// are silently left MATCHED: not refunded, no refund owed.
#[tokio::test]
async fn attack15_refund_from_several_statuses_rechecks_the_new_version_against_all_of_them() {
    let db = db().await;
    let a = bet(&db, 1, 1, "A", "PENDING").await;
    let b = bet(&db, 2, 2, "B", "PENDING").await;
    let (holder, m) = hold_matched(&db, a, b).await;

    let pool = db.pool.clone();
    let refund = tokio::spawn(async move {
        let mut tx = pool.begin().await.expect("begin");
        let refunded = betting_refunds::refund_bets(
            &mut tx,
            &[
                (BetId::from(a), RefundReason::RoundVoided),
                (BetId::from(b), RefundReason::RoundVoided),
            ],
            &[BetStatus::Pending, BetStatus::Matched],
            None,
        )
        .await
        .expect("refund");
        tx.commit().await.expect("commit");
        refunded.len()
    });
    rows::row_lock_waiter(&db.pool, "WITH due").await;
    holder.commit().await.expect("commit the match");
    let refunded = tokio::time::timeout(Duration::from_secs(20), refund)
        .await
        .expect("the refund ends")
        .expect("the refund task");

    let sa = status_of(&db, a).await;
    let sb = status_of(&db, b).await;
    assert_eq!(
        refunded, 2,
        "both bets were MATCHED, one of the `from` statuses, when the refund \
         took their rows; they were left {sa:?} and {sb:?} (match {m})"
    );
    assert_eq!(sa.0, "REFUNDED");
    assert_eq!(sb.0, "REFUNDED");
    assert_eq!(refunds_owed(&db, a).await, 1);
    assert_eq!(refunds_owed(&db, b).await, 1);
}

// --- Held: the production path of the finding ------------------------------

/// The only caller with several statuses is the void ([PENDING, MATCHED]),
/// and the only move between them is the matcher's, which holds the round's
/// advisory lock as the void does: the void waits for the whole matching
/// transaction and reads the bets MATCHED in a fresh snapshot, so no
/// EvalPlanQual re-check between the two statuses happens on this path.
#[tokio::test]
async fn attack15_void_waits_for_a_matching_transaction_and_refunds_what_it_matched() {
    let db = db().await;
    let a = bet(&db, 1, 1, "A", "PENDING").await;
    let b = bet(&db, 2, 2, "B", "PENDING").await;
    let c = bet(&db, 3, 3, "A", "PENDING").await;
    // The matcher's transaction: the round's lock, then the match.
    let mut holder = db.pool.begin().await.expect("begin");
    betting_db::lock_round(&mut holder, ROUND)
        .await
        .expect("round lock");
    let m = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO matches (match_id, round_id, bet_a_id, bet_b_id, amount) \
         VALUES ($1, $2, $3, $4, 1)",
    )
    .bind(m)
    .bind(ROUND)
    .bind(a)
    .bind(b)
    .execute(&mut *holder)
    .await
    .expect("match");
    sqlx::query(
        "UPDATE bets SET status = 'MATCHED', match_id = $1, version = version + 1 \
         WHERE bet_id IN ($2, $3)",
    )
    .bind(m)
    .bind(a)
    .bind(b)
    .execute(&mut *holder)
    .await
    .expect("mark matched");

    let pool = db.pool.clone();
    let void = tokio::spawn(async move {
        RoundStore::new(pool)
            .void(
                &RoundId::parse(ROUND).expect("round id"),
                "attack15",
                &Actor::new("attack15", "admin"),
            )
            .await
            .expect("void")
            .refunds
            .len()
    });
    // The void waits for the round's advisory lock.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND wait_event_type = 'Lock' \
               AND wait_event = 'advisory'",
        )
        .fetch_one(&db.pool)
        .await
        .expect("pg_stat_activity");
        if waiting > 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the void never waited"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    holder.commit().await.expect("commit the match");
    let refunds = tokio::time::timeout(Duration::from_secs(20), void)
        .await
        .expect("the void ends")
        .expect("the void task");
    assert_eq!(refunds, 3, "the matched pair and the unmatched bet");
    for bet in [a, b, c] {
        assert_eq!(status_of(&db, bet).await.0, "REFUNDED");
        assert_eq!(refunds_owed(&db, bet).await, 1);
    }
}

// --- Held: the matcher's lock re-checks the locked row ---------------------

/// Three PENDING bets, A1 (user 1), B1 (user 2), B2 (user 3), oldest
/// first; a transaction holds B1 after changing it (`change`), the matcher
/// runs and waits for B1's lock, then the holder ends (`commit`).
async fn match_while_b1_is_held(
    change: &'static str,
    commit: bool,
) -> (Db, Uuid, Uuid, Uuid, usize) {
    let db = db().await;
    let a1 = bet(&db, 1, 1, "A", "PENDING").await;
    let b1 = bet(&db, 2, 2, "B", "PENDING").await;
    let b2 = bet(&db, 3, 3, "B", "PENDING").await;
    let mut holder = db.pool.begin().await.expect("begin");
    let changed = sqlx::query(change)
        .bind(b1)
        .execute(&mut *holder)
        .await
        .expect(change)
        .rows_affected();
    assert_eq!(changed, 1);
    let matcher = Matcher::new(db.pool.clone());
    let run = tokio::spawn(async move { matcher.match_group(ROUND, Decimal::ONE).await });
    rows::row_lock_waiter(&db.pool, "SELECT b.created_at").await;
    if commit {
        holder.commit().await.expect("commit");
    } else {
        holder.rollback().await.expect("rollback");
    }
    let pairs = tokio::time::timeout(Duration::from_secs(20), run)
        .await
        .expect("the matcher ends")
        .expect("the matcher task")
        .expect("the matcher");
    (db, a1, b1, b2, pairs)
}

async fn matched_with(db: &Db, a: Uuid) -> Option<Uuid> {
    sqlx::query_scalar("SELECT bet_b_id FROM matches WHERE bet_a_id = $1")
        .bind(a)
        .fetch_optional(&db.pool)
        .await
        .expect("matches")
}

/// B1 cancelled (PENDING -> REFUNDED) while the matcher waits for it: the
/// join condition `b.status = c.status` is re-checked on the committed
/// version (REFUNDED against the inner read's PENDING) and drops B1; the
/// subquery is not run again, so A1 is matched with nobody in this batch
/// but B2 (read with it), never with the refunded B1.
#[tokio::test]
async fn attack15_matcher_drops_a_bet_cancelled_while_it_waited_for_its_lock() {
    let (db, a1, b1, b2, pairs) = match_while_b1_is_held(
        "UPDATE bets SET status = 'REFUNDED', refund_reason = 'CANCELLED', version = version + 1 \
         WHERE bet_id = $1",
        true,
    )
    .await;
    assert_eq!(pairs, 1);
    assert_eq!(matched_with(&db, a1).await, Some(b2));
    assert_eq!(status_of(&db, b1).await, ("REFUNDED".to_owned(), None));
    assert_eq!(status_of(&db, a1).await.0, "MATCHED");
    assert_eq!(status_of(&db, b2).await.0, "MATCHED");
}

/// B1 changed but still PENDING when the holder commits: the re-check
/// passes on the new version and B1, the oldest, is matched.
#[tokio::test]
async fn attack15_matcher_keeps_a_bet_still_pending_after_a_concurrent_change() {
    let (db, a1, b1, b2, pairs) = match_while_b1_is_held(
        "UPDATE bets SET version = version + 1, updated_at = now() WHERE bet_id = $1",
        true,
    )
    .await;
    assert_eq!(pairs, 1);
    assert_eq!(matched_with(&db, a1).await, Some(b1));
    assert_eq!(status_of(&db, b1).await.0, "MATCHED");
    assert_eq!(status_of(&db, b2).await, ("PENDING".to_owned(), None));
}

/// A cancel that rolls back leaves B1 PENDING, and the matcher takes it.
#[tokio::test]
async fn attack15_matcher_takes_a_bet_whose_cancel_rolled_back() {
    let (db, a1, b1, _b2, pairs) = match_while_b1_is_held(
        "UPDATE bets SET status = 'REFUNDED', refund_reason = 'CANCELLED', version = version + 1 \
         WHERE bet_id = $1",
        false,
    )
    .await;
    assert_eq!(pairs, 1);
    assert_eq!(matched_with(&db, a1).await, Some(b1));
}

// --- Held: refunds with repeated bets and statuses --------------------------

/// A bet named twice and statuses repeated: the cross join with the
/// (deduplicated) statuses yields one row per named bet, the repeated bet is
/// refunded once, returned once, and owed one refund.
#[tokio::test]
async fn attack15_refund_of_a_repeated_bet_with_repeated_statuses_is_one_refund() {
    let db = db().await;
    let a = bet(&db, 1, 1, "A", "PENDING").await;
    let b = bet(&db, 2, 2, "B", "PENDING").await;
    let mut conn = db.pool.acquire().await.expect("conn");
    let refunded = betting_refunds::refund_bets(
        &mut conn,
        &[
            (BetId::from(a), RefundReason::Cancelled),
            (BetId::from(a), RefundReason::RoundVoided),
            (BetId::from(b), RefundReason::Cancelled),
        ],
        &[
            BetStatus::Pending,
            BetStatus::Matched,
            BetStatus::Pending,
            BetStatus::Pending,
        ],
        None,
    )
    .await
    .expect("refund");
    drop(conn);
    assert_eq!(refunded.len(), 2, "each bet once");
    for bet in [a, b] {
        assert_eq!(status_of(&db, bet).await.0, "REFUNDED");
        assert_eq!(refunds_owed(&db, bet).await, 1);
        let version: i64 = sqlx::query_scalar("SELECT version FROM bets WHERE bet_id = $1")
            .bind(bet)
            .fetch_one(&db.pool)
            .await
            .expect("version");
        assert_eq!(version, 1, "refunded once");
    }
}

/// A bet refunded (cancelled) by another transaction while a refund from
/// [PENDING] waits for it: not refunded twice, one refund owed.
#[tokio::test]
async fn attack15_refund_racing_a_refund_refunds_once() {
    let db = db().await;
    let a = bet(&db, 1, 1, "A", "PENDING").await;
    let mut holder = db.pool.begin().await.expect("begin");
    let first = betting_refunds::refund_bets(
        &mut holder,
        &[(BetId::from(a), RefundReason::Cancelled)],
        &[BetStatus::Pending],
        None,
    )
    .await
    .expect("first refund");
    assert_eq!(first.len(), 1);
    let pool = db.pool.clone();
    let second = tokio::spawn(async move {
        let mut tx = pool.begin().await.expect("begin");
        let n = betting_refunds::refund_bets(
            &mut tx,
            &[(BetId::from(a), RefundReason::MatchTimeout)],
            &[BetStatus::Pending, BetStatus::Matched],
            None,
        )
        .await
        .expect("second refund")
        .len();
        tx.commit().await.expect("commit");
        n
    });
    rows::row_lock_waiter(&db.pool, "WITH due").await;
    holder.commit().await.expect("commit");
    let n = tokio::time::timeout(Duration::from_secs(20), second)
        .await
        .expect("ends")
        .expect("task");
    assert_eq!(n, 0);
    assert_eq!(refunds_owed(&db, a).await, 1);
    let reason: String = sqlx::query_scalar("SELECT refund_reason FROM bets WHERE bet_id = $1")
        .bind(a)
        .fetch_one(&db.pool)
        .await
        .expect("reason");
    assert_eq!(reason, "CANCELLED");
}
