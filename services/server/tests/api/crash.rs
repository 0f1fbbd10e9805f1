//! A crash between the wallet debit and the bet becoming PENDING.

use betting_api::pb;
use betting_bets::recovery::RecoverySettings;
use betting_reconciler::ReconcilerSettings;
use std::time::Duration;
use tonic::Code;

use betting_test_kit::{API_ONLY, TestApp, authed, dec, eventually, expect_code};

async fn bet_status(app: &TestApp, key: &str) -> String {
    sqlx::query_scalar("SELECT status FROM bets WHERE idempotency_key = $1")
        .bind(key)
        .fetch_one(&app.pool)
        .await
        .expect("bet row")
}

/// A PlaceBet that dies right after the wallet's answer: the stake and the
/// bet were one transaction, so the bet is placed (PENDING, shown to its
/// owner) with its stake, nothing is left for recovery, and the client's
/// retry is answered from the bet.
#[tokio::test]
async fn a_bet_whose_request_died_after_placement_is_placed_whole() {
    let app = TestApp::spawn().await;
    app.deposit(42, "100").await;
    app.open_round("r").await;
    app.betting().faults().set_fail_after_stake(true);
    let status = expect_code(
        app.place(42, "r", pb::Side::A, "25", "crashy").await,
        Code::Internal,
    );
    assert_eq!(
        status.message(),
        "internal error",
        "no internals reach the client"
    );
    app.betting().faults().set_fail_after_stake(false);

    assert_eq!(bet_status(&app, "crashy").await, "PENDING");
    assert_eq!(app.balance(42).await, dec("75"));
    assert_eq!(app.escrow().await, dec("25"));
    app.assert_books_balanced().await;
    let listed = app
        .bets()
        .list_bets(authed(pb::ListBetsRequest::default(), &app.player(42)))
        .await
        .expect("list")
        .into_inner();
    assert_eq!(listed.bets.len(), 1, "the placed bet is shown");

    let report = app
        .betting()
        .recover(&RecoverySettings {
            placing_grace: Duration::ZERO,
            ..RecoverySettings::default()
        })
        .await;
    assert_eq!(report.recovered, 0, "nothing is half-placed");

    let retried = app
        .place(42, "r", pb::Side::A, "25", "crashy")
        .await
        .expect("retry")
        .into_inner();
    let bet = retried.bet.expect("bet");
    assert_eq!(bet.status, pb::BetStatus::Pending as i32);
    assert_eq!(bet.bet_id, listed.bets[0].bet_id, "the same bet");
    assert_eq!(retried.balance, "75");
    assert_eq!(app.balance(42).await, dec("75"), "one stake");
    app.assert_books_balanced().await;
}

/// A bet an older release's instance left PLACING with its stake held (it
/// died between HoldStake and the PENDING update): the recovery pass makes
/// it PENDING without a second debit, and the retry gets it.
#[tokio::test]
async fn the_recovery_pass_finishes_a_legacy_bet_whose_request_died() {
    let app = TestApp::spawn().await;
    app.deposit(42, "100").await;
    app.open_round("r").await;
    app.legacy_placing(42, "r", "25", "crashy", true).await;

    // In between: the stake is held, the bet is not yet visible, the books balance.
    assert_eq!(bet_status(&app, "crashy").await, "PLACING");
    assert_eq!(app.balance(42).await, dec("75"));
    assert_eq!(app.escrow().await, dec("25"));
    app.assert_books_balanced().await;
    let listed = app
        .bets()
        .list_bets(authed(pb::ListBetsRequest::default(), &app.player(42)))
        .await
        .expect("list")
        .into_inner();
    assert!(listed.bets.is_empty(), "a PLACING bet is not shown");

    let report = app
        .betting()
        .recover(&RecoverySettings {
            placing_grace: Duration::ZERO,
            ..RecoverySettings::default()
        })
        .await;
    assert_eq!(report.recovered, 1);
    assert_eq!(bet_status(&app, "crashy").await, "PENDING");
    assert_eq!(
        app.balance(42).await,
        dec("75"),
        "recovery does not debit again"
    );

    // The client's retry now gets the same bet.
    let retried = app
        .place(42, "r", pb::Side::A, "25", "crashy")
        .await
        .expect("retry")
        .into_inner();
    assert_eq!(
        retried.bet.expect("bet").status,
        pb::BetStatus::Pending as i32
    );
    assert_eq!(retried.balance, "75");
    app.assert_books_balanced().await;
}

#[tokio::test]
async fn a_client_retry_finishes_a_bet_whose_request_died() {
    let app = TestApp::spawn().await;
    app.deposit(42, "100").await;
    app.open_round("r").await;
    app.betting().faults().set_fail_after_stake(true);
    expect_code(
        app.place(42, "r", pb::Side::B, "40", "k").await,
        Code::Internal,
    );
    app.betting().faults().set_fail_after_stake(false);
    let retried = app
        .place(42, "r", pb::Side::B, "40", "k")
        .await
        .expect("retry")
        .into_inner();
    assert_eq!(
        retried.bet.expect("bet").status,
        pb::BetStatus::Pending as i32
    );
    assert_eq!(retried.balance, "60");
    assert_eq!(app.balance(42).await, dec("60"));
    let stakes: i64 =
        sqlx::query_scalar("SELECT count(*) FROM ledger_entries WHERE kind = 'STAKE'")
            .fetch_one(&app.pool)
            .await
            .expect("count");
    assert_eq!(stakes, 1);
    app.assert_books_balanced().await;
}

#[tokio::test]
async fn a_bet_written_before_the_debit_is_resolved_without_money_lost() {
    // The process died after writing the PLACING row and before calling the
    // wallet: nothing is debited yet. Recovery either places it (funds
    // there) or rejects it (funds gone meanwhile) — never half of each.
    let app = TestApp::spawn().await;
    app.deposit(42, "10").await;
    app.open_round("r").await;
    for (key, amount) in [("fits", "10"), ("does-not-fit", "1")] {
        sqlx::query(
            "INSERT INTO bets (bet_id, user_id, idempotency_key, round_id, side, amount, status) \
             VALUES ($1, 42, $2, 'r', 'A', $3::NUMERIC, 'PLACING')",
        )
        .bind(uuid::Uuid::now_v7())
        .bind(key)
        .bind(amount)
        .execute(&app.pool)
        .await
        .expect("insert placing bet");
    }
    let report = app
        .betting()
        .recover(&RecoverySettings {
            placing_grace: Duration::ZERO,
            ..RecoverySettings::default()
        })
        .await;
    assert_eq!(report.recovered, 2);
    assert_eq!(bet_status(&app, "fits").await, "PENDING");
    assert_eq!(bet_status(&app, "does-not-fit").await, "REJECTED");
    assert_eq!(app.balance(42).await, dec("0"));
    assert_eq!(app.escrow().await, dec("10"));
    app.assert_books_balanced().await;
}

/// A Redis client of the test's own, on the suite's server.
async fn own_redis() -> fred::prelude::Client {
    use fred::prelude::ClientLike;
    let redis = fred::prelude::Client::new(
        fred::prelude::Config::from_url(&std::env::var("REDIS_URL").expect("REDIS_URL"))
            .expect("url"),
        None,
        None,
        None,
    );
    redis.init().await.expect("redis");
    redis
}

/// A graceful stop waits for the last placing batch to send its match jobs,
/// which go out after the batch's answers, before the stores close. Found
/// by the attack review: with the jobs sent after the answers, a stop
/// right after the last answer closed Redis under the batch, and the job
/// waited for a reconciler pass (seconds, on an instance that runs one).
#[tokio::test]
async fn a_graceful_stop_sends_the_last_batchs_match_jobs() {
    use fred::prelude::HashesInterface;

    let app = TestApp::spawn_roles(API_ONLY).await;
    app.deposit(42, "10").await;
    app.open_round("r").await;
    // As if Redis were slow: the batch answers, then waits to send.
    app.betting()
        .faults()
        .set_match_jobs_delay(Duration::from_millis(500));
    let bet = app
        .place(42, "r", pb::Side::A, "10", "last")
        .await
        .expect("place")
        .into_inner()
        .bet
        .expect("bet");
    let jobs = format!("{}:{{match}}:jobs", app.namespace);
    app.stop().await;
    let redis = own_redis().await;
    let job: Option<String> = redis
        .hget(&jobs, format!("match:{}", bet.bet_id))
        .await
        .expect("hget");
    assert!(
        job.is_some(),
        "the match job was sent before the stop ended"
    );
}

#[tokio::test]
async fn a_lost_match_job_is_re_derived_from_postgres() {
    // No matcher: the job must sit in Redis for this test to look at it.
    let app = TestApp::spawn_roles(API_ONLY).await;
    app.deposit(42, "10").await;
    app.open_round("r").await;
    let bet = app
        .place(42, "r", pb::Side::A, "10", "q")
        .await
        .expect("place")
        .into_inner()
        .bet
        .expect("bet");
    let queue = app.betting().match_queue();
    let id = format!("match:{}", bet.bet_id);
    // Sent right after PlaceBet's answer.
    eventually(
        "the match job is enqueued",
        Duration::from_secs(5),
        async || queue.job(&id).await.expect("redis"),
    )
    .await;
    // Redis loses everything (only this test's keys, to leave others alone).
    let redis = own_redis().await;
    use fred::prelude::KeysInterface;
    let keys = vec![
        format!("{}:{{match}}:jobs", app.namespace),
        format!("{}:{{match}}:wait", app.namespace),
    ];
    let deleted: i64 = redis.del(keys).await.expect("del");
    assert_eq!(deleted, 2);
    assert!(queue.job(&id).await.expect("redis").is_none());

    let report = app
        .reconciler_with(ReconcilerSettings {
            sweep_after: Duration::ZERO,
            ..ReconcilerSettings::default()
        })
        .pass()
        .await
        .expect("reconcile");
    assert!(report.ran);
    assert_eq!(report.match_jobs, 1);
    assert!(
        queue.job(&id).await.expect("redis").is_some(),
        "the reconciler put the job back"
    );
    assert_eq!(queue.depth().await.expect("depth"), 1);
}
