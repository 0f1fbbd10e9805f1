//! Redis losing everything in the middle of a run.

use std::time::Duration;

use betting_api::pb;
use fred::prelude::ClientLike;

use betting_test_kit::{TestApp, TestRedis, dec, fresh_database, poll_until, settings};

async fn wait_until(app: &TestApp, status: &str, n: i64) {
    let reached = poll_until(Duration::from_secs(30), async || {
        (app.count_bets(status).await == n).then_some(())
    })
    .await;
    if reached.is_some() {
        return;
    }
    panic!("never {n} bets {status}: {}", app.count_bets(status).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn flushall_mid_run_delays_work_but_loses_none() {
    // A Redis of our own: FLUSHALL must not hit the other tests.
    let redis = TestRedis::start();
    let redis_url = redis.url();
    let url = fresh_database().await;
    let mut s = settings(&url, &redis_url);
    s.reconcile_interval_ms = 200;
    // The shortest lease the default 1 s fetch poll allows.
    s.queue_visibility_ms = 6000;
    let app = TestApp::spawn_with(s).await;
    let admin = fred::prelude::Client::new(
        fred::prelude::Config::from_url(&redis_url).expect("url"),
        None,
        None,
        None,
    );
    // As before: a bounded wait; FLUSHALL below fails if it never connected.
    poll_until(Duration::from_secs(5), async || admin.init().await.ok()).await;

    const PAIRS: i64 = 25;
    for user in 1..=2 {
        app.deposit(user, "500").await;
    }
    app.open_round("flush").await;
    for _ in 0..PAIRS {
        app.place_ok(1, "flush", pb::Side::A, "4").await;
        app.place_ok(2, "flush", pb::Side::B, "4").await;
    }
    // Everything queued so far is gone.
    let _: () = admin.flushall(false).await.expect("FLUSHALL");
    wait_until(&app, "MATCHED", 2 * PAIRS).await;

    app.settle_round("flush", pb::Side::A)
        .await
        .expect("settle");
    let _: () = admin.flushall(false).await.expect("FLUSHALL");
    wait_until(&app, "SETTLED", 2 * PAIRS).await;
    app.wait_for_round_done("flush").await;

    assert_eq!(app.balance(1).await, dec("600"));
    assert_eq!(app.balance(2).await, dec("400"));
    app.assert_books_balanced().await;
    app.assert_audit_clean().await;
}
