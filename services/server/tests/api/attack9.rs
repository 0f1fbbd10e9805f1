//! Attack review 9: request deadlines, the wallet's per-user gate, the
//! verified money RPCs, per-user limits. Each test here demonstrates a
//! finding; a failing test is a bug on the code it was written against.

use std::time::Duration;

use betting_api::pb;
use betting_bets::recovery::RecoverySettings;
use betting_config::UserLimits;
use betting_test_kit::{TestApp, authed, dec, fresh_database, settings};
use tonic::Code;

async fn bet_status(app: &TestApp, key: &str) -> String {
    sqlx::query_scalar("SELECT status FROM bets WHERE idempotency_key = $1")
        .bind(key)
        .fetch_one(&app.pool)
        .await
        .expect("bet row")
}

fn redis() -> String {
    std::env::var("REDIS_URL").expect("REDIS_URL")
}

/// Finding 4a: `place_bet` checks `min_stake` (service.rs:148) BEFORE it
/// looks the key up (service.rs:253). A client whose PlaceBet died after the
/// stake was taken (the bet is placed, its stake held; in the three-step
/// saga this finding was made on, PLACING) retries with the same
/// key on an instance whose minimum stake was raised meanwhile (a rolling
/// config change): the retry is answered INVALID_ARGUMENT — a definitive
/// "nothing was done" — yet the recovery pass then finishes the bet and the
/// stake stays taken. The retry of an existing key must be answered from the
/// bet, whatever the limits are now.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn attack9_a_retry_of_a_placed_bet_is_refused_by_a_raised_min_stake() {
    let database = fresh_database().await;
    // The instance the bet was placed on: no minimum.
    let old = TestApp::spawn_with(settings(&database, &redis())).await;
    old.deposit(1, "100").await;
    old.open_round("r").await;
    old.betting().faults().set_fail_after_stake(true);
    let first = old.place(1, "r", pb::Side::A, "1", "k").await;
    old.betting().faults().set_fail_after_stake(false);
    assert_eq!(
        first.expect_err("crashed after the stake").code(),
        Code::Internal
    );
    assert_eq!(
        bet_status(&old, "k").await,
        "PENDING",
        "placed with its stake, the reply lost"
    );
    assert_eq!(old.balance(1).await, dec("99"), "the stake is held");

    // The instance the retry lands on: the operator raised the minimum.
    let mut s = settings(&database, &redis());
    s.limits = UserLimits {
        min_stake: dec("5"),
        ..UserLimits::off()
    };
    let new = TestApp::spawn_with(s).await;
    let retry = new.place(1, "r", pb::Side::A, "1", "k").await;

    // Whatever the retry was told, the recovery pass finishes the bet.
    old.betting()
        .recover(&RecoverySettings {
            placing_grace: Duration::ZERO,
            ..RecoverySettings::default()
        })
        .await;
    let status = bet_status(&old, "k").await;
    let balance = old.balance(1).await;
    assert!(
        retry.is_ok(),
        "the same-key retry of a bet whose stake is held was refused ({:?}: {}); \
         afterwards the bet is {status} and the balance {balance}: the client was told \
         'invalid request' while its 1 was taken",
        retry.as_ref().err().map(tonic::Status::code),
        retry
            .as_ref()
            .err()
            .map(tonic::Status::message)
            .unwrap_or_default(),
    );
}

/// Finding 4b: the open-bets cap is checked for every request whose key
/// `find_by_key` did not find (service.rs:253-256), so a client retry racing
/// its own original (both before the original's insert) counts the original's
/// freshly inserted PLACING bet and is refused TOO_MANY_OPEN_BETS — for a bet
/// that was placed under that very key. With a cap of 1 and a user with no
/// open bet, every same-key PlaceBet must answer the one bet.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn attack9_same_key_retries_racing_at_the_open_bet_cap_get_the_bet() {
    let database = fresh_database().await;
    let mut s = settings(&database, &redis());
    s.limits = UserLimits {
        user_max_open_bets: 1,
        ..UserLimits::off()
    };
    let app = TestApp::spawn_with(s).await;
    app.deposit(1, "1000").await;
    app.open_round("cap").await;
    let mut refused = Vec::new();
    for round in 0..10 {
        let key = format!("k{round}");
        let calls = (0..16).map(|_| app.place(1, "cap", pb::Side::A, "1", &key));
        let answers = futures::future::join_all(calls).await;
        let mut bet_id = None;
        for answer in answers {
            match answer {
                Ok(r) => bet_id = r.into_inner().bet.map(|b| b.bet_id),
                Err(e) => refused.push(format!("{key}: {:?} {}", e.code(), e.message())),
            }
        }
        // Free the place for the next key.
        if let Some(bet_id) = bet_id {
            app.bets()
                .cancel_bet(authed(pb::CancelBetRequest { bet_id }, &app.player(1)))
                .await
                .expect("cancel");
        }
    }
    assert!(
        refused.is_empty(),
        "same-key PlaceBets of one bet were refused by the open-bets cap: {refused:?}"
    );
    app.assert_books_balanced().await;
}

/// Finding 1: `betting_db::begin` (db/src/lib.rs:83) drops
/// `pool.begin_with("BEGIN; SET LOCAL statement_timeout ...")` when the
/// request's time runs out. If that happens after the BEGIN was sent but
/// before its reply (the edge's timeout dropping the handler there, or
/// `begin`'s own timeout), sqlx has not yet counted the transaction
/// (sqlx-postgres `begin` increments the depth only after the reply), so
/// neither its guard nor `Transaction::drop` queues a ROLLBACK: the pooled
/// connection goes back to the pool INSIDE an open transaction, with the
/// dead request's tiny `statement_timeout`. Every later autocommit statement
/// on it (mark_pending, mark_rejected, refund outbox `done`, ...) is
/// uncommitted and undone by the next rollback on that connection; once a
/// statement exceeds the leftover timeout the connection is stuck in an
/// aborted transaction and every use fails until it is recycled.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn attack9_a_deadline_during_begin_leaves_a_pooled_connection_in_a_transaction() {
    let database = fresh_database().await;
    let pool = betting_db::connect_lazy(
        &database,
        &betting_db::PoolSettings {
            max_connections: 1,
            ..betting_db::PoolSettings::default()
        },
    )
    .expect("pool");
    // Warm the one connection up.
    let base: String = sqlx::query_scalar("SHOW statement_timeout")
        .fetch_one(&pool)
        .await
        .expect("show");
    let mut leaked = None;
    'outer: for attempt in 0..3000u64 {
        // Deadlines spread over the first 2 ms: some fall between the BEGIN
        // going out and its reply coming back.
        let budget = Duration::from_micros((attempt * 37) % 2_000);
        let deadline = tokio::time::Instant::now() + budget;
        let _ = betting_deadline::scope(deadline, async {
            // As the edge does: the handler future is dropped at the deadline.
            tokio::time::timeout_at(deadline, async {
                let tx = betting_db::begin(&pool).await;
                if let Ok(tx) = tx {
                    let _ = tx.rollback().await;
                }
            })
            .await
        })
        .await;
        // Outside any request, on the same (only) connection.
        match sqlx::query_scalar::<_, String>("SHOW statement_timeout")
            .fetch_one(&pool)
            .await
        {
            Ok(now) if now == base => continue 'outer,
            Ok(now) => {
                leaked = Some(format!(
                    "attempt {attempt}: statement_timeout is {now} (not {base}) outside any request"
                ));
            }
            Err(e) => leaked = Some(format!("attempt {attempt}: the connection fails: {e}")),
        }
        break 'outer;
    }
    if let Some(what) = &leaked {
        // Show the money-path consequence: an autocommit write on that
        // connection is not committed (another session does not see it).
        let _ = sqlx::query("CREATE TABLE IF NOT EXISTS attack9_probe (x INT)")
            .execute(&pool)
            .await;
        let other = sqlx::PgPool::connect(&database)
            .await
            .expect("other session");
        let seen: Result<Option<String>, _> =
            sqlx::query_scalar("SELECT to_regclass('attack9_probe')::TEXT")
                .fetch_one(&other)
                .await;
        // The next transaction on that connection that rolls back (any
        // refusal, any error) takes the "committed" autocommit write with it.
        if let Ok(tx) = betting_db::begin(&pool).await {
            let _ = tx.rollback().await;
        }
        let after_rollback: Result<Option<String>, _> =
            sqlx::query_scalar("SELECT to_regclass('attack9_probe')::TEXT")
                .fetch_one(&pool)
                .await;
        panic!(
            "a deadline inside betting_db::begin returned a connection to the pool inside an \
             open transaction: {what}; an autocommit write on it (reported OK) is seen by \
             another session as {seen:?}, and after the next rollback on the pool as \
             {after_rollback:?} (None: gone for good; Err 25P02: the pooled connection is stuck in an aborted transaction and fails every statement until recycled)"
        );
    }
}
