//! The workers as real, separate `betting` processes, killed with SIGKILL in
//! the middle of their work: not a job lost, not a cent. Every process is
//! held in a [`ChildGuard`], so a failing test leaves none running.

use std::{
    process::{Command, Stdio},
    time::Duration,
};

use betting_api::pb;
use betting_test_kit::{
    API_ONLY, ChildGuard, SECRET, TestApp, dec, eventually, fresh_database, service_url, settings,
};

/// Starts `betting serve --role matcher --role settler` against the app's
/// stores, as the services' restricted PostgreSQL role like every app.
fn worker(app: &TestApp, database_url: &str) -> ChildGuard {
    ChildGuard::spawn(
        Command::new(env!("CARGO_BIN_EXE_betting"))
            .args(["serve", "--role", "matcher", "--role", "settler"])
            .env("DATABASE_URL", service_url(database_url))
            .env("REDIS_URL", std::env::var("REDIS_URL").expect("REDIS_URL"))
            .env("BETTING_REDIS_NAMESPACE", &app.namespace)
            .env("BETTING_JWT_SECRET", SECRET)
            .env(
                "BETTING_WALLET_ENDPOINT",
                format!("http://{}", app.channel_addr()),
            )
            .env("BETTING_LISTEN_ADDR", "127.0.0.1:0")
            .env("BETTING_METRICS_ADDR", "127.0.0.1:0")
            // A dead worker's jobs come back after six seconds (the shortest lease
            // the default 1 s fetch poll allows), and the reconciler looks often.
            .env("BETTING_QUEUE_VISIBILITY_MS", "6000")
            .env("BETTING_RECONCILE_INTERVAL_MS", "300")
            .env("BETTING_WORKER_CONCURRENCY", "4")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(if std::env::var("TEST_LOG").is_ok() {
                Stdio::inherit()
            } else {
                Stdio::null()
            }),
    )
    .expect("start a worker process")
}

/// How long each step may take (the loop this replaces polled 600 times, 50 ms apart).
const STEP: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn workers_killed_with_sigkill_lose_nothing() {
    let url = fresh_database().await;
    let mut s = settings(&url, &std::env::var("REDIS_URL").expect("REDIS_URL"));
    // The API in this process; every worker in child processes.
    s.roles = API_ONLY.to_vec();
    let app = TestApp::spawn_with(s).await;
    const PAIRS: i64 = 40;
    for user in 1..=4 {
        app.deposit(user, "1000").await;
    }
    app.open_round("chaos").await;

    let mut first = worker(&app, &url);
    for i in 0..PAIRS {
        // Users 1,2 back A; 3,4 back B; equal stakes so every bet finds a partner.
        let stake = format!("{}", 1 + i % 3);
        app.place_ok(1 + i % 2, "chaos", pb::Side::A, &stake).await;
        app.place_ok(3 + i % 2, "chaos", pb::Side::B, &stake).await;
    }
    // Kill the first worker while it is matching.
    eventually("some bets are matched", STEP, async || {
        (app.count_bets("MATCHED").await > 0).then_some(())
    })
    .await;
    first.kill().expect("SIGKILL");
    first.wait().expect("reap");

    let mut second = worker(&app, &url);
    eventually("every bet is matched", STEP, async || {
        (app.count_bets("MATCHED").await == 2 * PAIRS).then_some(())
    })
    .await;
    app.settle_round("chaos", pb::Side::B)
        .await
        .expect("settle");
    // Kill the second while it is paying.
    eventually("some bets are settled", STEP, async || {
        (app.count_bets("SETTLED").await > 0).then_some(())
    })
    .await;
    second.kill().expect("SIGKILL");
    second.wait().expect("reap");

    let mut third = worker(&app, &url);
    eventually("every bet is settled", STEP, async || {
        (app.count_bets("SETTLED").await == 2 * PAIRS).then_some(())
    })
    .await;
    let round = app.wait_for_round_done("chaos").await;
    third.kill().expect("stop");
    third.wait().expect("reap");

    let stats = round.stats.expect("stats");
    assert_eq!((stats.matches, stats.settled_matches), (PAIRS, PAIRS));
    // B won every match: users 3 and 4 won what 1 and 2 staked.
    let staked_by_a: rust_decimal::Decimal = (0..PAIRS)
        .map(|i| rust_decimal::Decimal::from(1 + i % 3))
        .sum();
    let total_a = app.balance(1).await + app.balance(2).await;
    let total_b = app.balance(3).await + app.balance(4).await;
    assert_eq!(total_a, dec("2000") - staked_by_a);
    assert_eq!(total_b, dec("2000") + staked_by_a);
    assert_eq!(app.escrow().await, dec("0"));
    app.assert_books_balanced().await;
    app.assert_audit_clean().await;
}
