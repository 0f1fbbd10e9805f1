//! Attack review 11: the batched settle path (`SettleHandler::settle_round`
//! over `Ledger::pay_winnings_batch`) against the lone per-match job, its
//! queue (a zombie settler past its lease, a redelivery, a lost reply), a
//! refused payout inside a round's pages, the states a stopped placing batch
//! leaves behind, and repeated idempotency keys in and across the batch
//! RPCs. Each test pins one interleaving of the review's brief and asserts
//! what money safety demands of it: every owed payout paid exactly once,
//! nothing paid twice, nothing left without either a job or a dead-letter
//! entry whose money is counted, every bet in exactly one terminal outcome.

use std::{net::SocketAddr, time::Duration};

use betting_api::{pb, pb_internal as pbi};
use betting_auth::{ServiceCredentials, TokenMinter};
use betting_bets::{matcher::Matcher, recovery::RecoverySettings};
use betting_jobs::{JobKind, SettleRoundJob};
use betting_queue::{FailOutcome, Handler, Job, JobError, Queue, QueueSettings};
use betting_reconciler::ReconcilerSettings;
use betting_settlement::{RoundStore, settler::SettleHandler};
use betting_test_kit::{
    API_ONLY, SECRET, TestApp, authed, dec, eventually, fresh_database, settings,
};
use betting_wallet_client::WalletClient;
use rust_decimal::Decimal;
use tokio::sync::{oneshot, watch};
use tonic::Code;
use uuid::Uuid;

/// One matched pair of a round; its A side wins (every round here is
/// settled A).
#[derive(Debug, Clone, Copy)]
struct Pair {
    match_id: Uuid,
    bet_a: Uuid,
    bet_b: Uuid,
    user_a: i64,
    user_b: i64,
}

fn redis_url() -> String {
    std::env::var("REDIS_URL").expect("REDIS_URL")
}

fn wallet_client(endpoint: &str) -> WalletClient {
    WalletClient::new(
        endpoint,
        ServiceCredentials::new(TokenMinter::new(SECRET.as_bytes(), None, None)),
    )
    .expect("wallet client")
}

/// A settler of the app's rounds, as the settle role builds one.
fn settler(app: &TestApp) -> SettleHandler {
    SettleHandler::new(
        RoundStore::new(app.pool.clone()),
        wallet_client(&format!("http://{}", app.addr)),
    )
}

/// `pairs` matched pairs of `stake` in a new round: users `first ..
/// first + pairs` on A against the next `pairs` users on B, each funded
/// with exactly the stake. Returned in match id order, the order a
/// settle-round job pages through them.
async fn matched_round(
    app: &TestApp,
    round: &str,
    first: i64,
    pairs: i64,
    stake: &str,
) -> Vec<Pair> {
    app.open_round(round).await;
    let users: Vec<i64> = (first..first + 2 * pairs).collect();
    for &user in &users {
        app.genesis(user, dec(stake)).await;
    }
    // Placed a chunk at a time: the group commit batches each chunk.
    for chunk in users.chunks(32) {
        futures::future::join_all(chunk.iter().map(|&user| {
            let side = if user < first + pairs {
                pb::Side::A
            } else {
                pb::Side::B
            };
            app.place_ok(user, round, side, stake)
        }))
        .await;
    }
    let matched = Matcher::new(app.pool.clone())
        .match_group(round, dec(stake))
        .await
        .expect("match");
    assert_eq!(matched as i64, pairs, "every bet is matched");
    pairs_of(app, round).await
}

async fn pairs_of(app: &TestApp, round: &str) -> Vec<Pair> {
    let rows: Vec<(Uuid, Uuid, Uuid, i64, i64)> = sqlx::query_as(
        "SELECT m.match_id, m.bet_a_id, m.bet_b_id, a.user_id, b.user_id FROM matches m \
         JOIN bets a ON a.bet_id = m.bet_a_id JOIN bets b ON b.bet_id = m.bet_b_id \
         WHERE m.round_id = $1 ORDER BY m.match_id",
    )
    .bind(round)
    .fetch_all(&app.pool)
    .await
    .expect("matches");
    rows.into_iter()
        .map(|(match_id, bet_a, bet_b, user_a, user_b)| Pair {
            match_id,
            bet_a,
            bet_b,
            user_a,
            user_b,
        })
        .collect()
}

/// The payouts the ledger holds for a match: (user, amount).
async fn payouts_of(app: &TestApp, matched: Uuid) -> Vec<(i64, Decimal)> {
    sqlx::query_as(
        "SELECT user_id, amount FROM ledger_entries WHERE kind = 'PAYOUT' AND reference = $1",
    )
    .bind(matched.to_string())
    .fetch_all(&app.pool)
    .await
    .expect("payouts")
}

async fn wallet_balance(app: &TestApp, user: i64) -> Decimal {
    sqlx::query_scalar::<_, Decimal>("SELECT balance FROM wallets WHERE user_id = $1")
        .bind(user)
        .fetch_optional(&app.pool)
        .await
        .expect("wallet")
        .unwrap_or_default()
}

async fn match_status(app: &TestApp, matched: Uuid) -> String {
    sqlx::query_scalar("SELECT status FROM matches WHERE match_id = $1")
        .bind(matched)
        .fetch_one(&app.pool)
        .await
        .expect("match status")
}

async fn bet_status(app: &TestApp, bet: Uuid) -> String {
    sqlx::query_scalar("SELECT status FROM bets WHERE bet_id = $1")
        .bind(bet)
        .fetch_one(&app.pool)
        .await
        .expect("bet status")
}

/// Every pair's winner paid twice the stake exactly once, its loser
/// nothing, the match and both bets SETTLED.
async fn assert_paid_once(app: &TestApp, pairs: &[Pair], stake: &str) {
    let payout = dec(stake) * Decimal::TWO;
    for p in pairs {
        assert_eq!(
            payouts_of(app, p.match_id).await,
            vec![(p.user_a, payout)],
            "match {} paid once, to its winner",
            p.match_id
        );
        assert_eq!(wallet_balance(app, p.user_a).await, payout);
        assert_eq!(wallet_balance(app, p.user_b).await, Decimal::ZERO);
        assert_eq!(match_status(app, p.match_id).await, "SETTLED");
        assert_eq!(bet_status(app, p.bet_a).await, "SETTLED");
        assert_eq!(bet_status(app, p.bet_b).await, "SETTLED");
    }
}

/// Makes the wallet refuse a match's payout for good, as it would for books
/// that are corrupt: its key's refusal recorded, which every later payout
/// of the key replays.
async fn refuse_payout(app: &TestApp, p: &Pair, stake: &str) {
    sqlx::query(
        "INSERT INTO wallet_refusals (idempotency_key, kind, user_id, amount, reference, reason) \
         VALUES ($1, 'PAYOUT', $2, $3, $4, 'NO_MATCHING_STAKE')",
    )
    .bind(format!("SETTLE:{}", p.match_id))
    .bind(p.user_a)
    .bind(dec(stake) * Decimal::TWO)
    .bind(p.match_id.to_string())
    .execute(&app.pool)
    .await
    .expect("record a refusal");
}

/// The payout a settler asks for a pair (its A side won).
fn payout(p: &Pair, stake: &str) -> pbi::PayWinningsRequest {
    pbi::PayWinningsRequest {
        user_id: p.user_a,
        amount: (dec(stake) * Decimal::TWO).to_string(),
        idempotency_key: format!("SETTLE:{}", p.match_id),
        match_id: p.match_id.to_string(),
        bet_ids: vec![p.bet_a.to_string(), p.bet_b.to_string()],
    }
}

async fn pay_batch(
    app: &TestApp,
    payouts: Vec<pbi::PayWinningsRequest>,
) -> Vec<pbi::PayoutOutcome> {
    app.stakes()
        .pay_winnings_batch(authed(
            pbi::PayWinningsBatchRequest { payouts },
            &app.service_token(),
        ))
        .await
        .expect("pay winnings batch")
        .into_inner()
        .outcomes
}

/// An outcome as (paid, replayed, refusal reason).
fn outcome(o: &pbi::PayoutOutcome) -> (bool, bool, String) {
    match &o.outcome {
        Some(pbi::payout_outcome::Outcome::Paid(_)) => (true, o.replayed, String::new()),
        Some(pbi::payout_outcome::Outcome::Refused(r)) => (false, false, r.reason.clone()),
        None => panic!("an outcome without a body: {o:?}"),
    }
}

fn hold_outcome(o: &pbi::HoldStakeOutcome) -> (bool, bool, String) {
    match &o.outcome {
        Some(pbi::hold_stake_outcome::Outcome::Held(_)) => (true, o.replayed, String::new()),
        Some(pbi::hold_stake_outcome::Outcome::Refused(r)) => (false, false, r.reason.clone()),
        None => panic!("an outcome without a body: {o:?}"),
    }
}

/// Fetches the next job of `queue` as `consumer` (after taking its lease).
async fn fetch_job(queue: &Queue, blocking: &fred::prelude::Client, consumer: &str) -> Job {
    queue.heartbeat(consumer).await.expect("lease");
    eventually("a job is waiting", Duration::from_secs(10), async || {
        queue
            .fetch(blocking, consumer, Duration::from_millis(200))
            .await
            .expect("fetch")
    })
    .await
}

/// A TCP link to `upstream` that holds every connection until the returned
/// sender says `true`: a settler whose network (or process) stalls. The
/// receiver fires when the first connection arrives, i.e. when the stalled
/// settler makes its first wallet call.
async fn stalled_link(
    upstream: SocketAddr,
) -> (SocketAddr, oneshot::Receiver<()>, watch::Sender<bool>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (open, opened) = watch::channel(false);
    let (arrived, first) = oneshot::channel();
    tokio::spawn(async move {
        let mut arrived = Some(arrived);
        while let Ok((mut inbound, _)) = listener.accept().await {
            if let Some(arrived) = arrived.take() {
                let _ = arrived.send(());
            }
            let mut opened = opened.clone();
            tokio::spawn(async move {
                if opened.wait_for(|open| *open).await.is_err() {
                    return;
                }
                let Ok(mut outbound) = tokio::net::TcpStream::connect(upstream).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            });
        }
    });
    (addr, first, open)
}

/// Interleaving 1, both orders: a settle-round job racing lone per-match
/// settle jobs for the same matches (lone jobs first for some, then the
/// round job and the rest at once, then the round job redelivered; and the
/// round job first, then lone jobs racing its redelivery). The key
/// `SETTLE:{match}` makes the wallet decide each match once, and the
/// conditional bookkeeping records each match by exactly one job.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn attack11_a_round_job_racing_lone_jobs_pays_each_match_once() {
    let app = TestApp::spawn_roles(API_ONLY).await;
    let stake = "3";
    let lone = settler(&app);
    let round_job = settler(&app);

    let early = matched_round(&app, "lone-first", 1, 12, stake).await;
    app.settle_round("lone-first", pb::Side::A)
        .await
        .expect("settle");
    let mut recorded = 0;
    for p in &early[..4] {
        assert!(lone.settle(p.match_id).await.expect("lone job"));
        recorded += 1;
    }
    let (by_round, by_lone) = tokio::join!(
        round_job.settle_round("lone-first"),
        futures::future::join_all(early[4..].iter().map(|p| lone.settle(p.match_id))),
    );
    recorded += by_round.expect("round job");
    recorded += by_lone
        .into_iter()
        .map(|r| usize::from(r.expect("lone job")))
        .sum::<usize>();
    assert_eq!(recorded, 12, "each match recorded by exactly one job");
    assert_eq!(
        round_job
            .settle_round("lone-first")
            .await
            .expect("redelivered"),
        0
    );
    assert_paid_once(&app, &early, stake).await;

    let late = matched_round(&app, "round-first", 101, 12, stake).await;
    app.settle_round("round-first", pb::Side::A)
        .await
        .expect("settle");
    assert_eq!(
        round_job
            .settle_round("round-first")
            .await
            .expect("round job"),
        12
    );
    let (again, by_lone) = tokio::join!(
        round_job.settle_round("round-first"),
        futures::future::join_all(late.iter().map(|p| lone.settle(p.match_id))),
    );
    assert_eq!(again.expect("redelivered"), 0);
    for result in by_lone {
        assert!(!result.expect("lone job"), "nothing left to record");
    }
    assert_paid_once(&app, &late, stake).await;
    app.assert_books_balanced().await;
    app.assert_audit_clean().await;
}

/// Interleaving 1 with a zombie: a settler takes the round's job, reads its
/// page and stalls in its wallet call past its lease; the reaper hands the
/// job to a live settler, which pays and records the whole round and acks;
/// then the zombie's call goes through. Every payout replays, the zombie
/// records nothing, its late ack finds nothing, and the queue is empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn attack11_a_zombie_round_job_and_its_redelivery_pay_each_match_once() {
    let app = TestApp::spawn_roles(API_ONLY).await;
    let stake = "2";
    let pairs = matched_round(&app, "z", 1, 8, stake).await;
    app.settle_round("z", pb::Side::A).await.expect("settle");

    let settle = &app.queues.settle;
    // The zombie's handle: the same queue with a lease that is over at once.
    let short = Queue::new(
        settle.client().clone(),
        &app.namespace,
        settle.name(),
        QueueSettings {
            visibility_timeout: Duration::from_millis(1),
            ..settle.settings().clone()
        },
    );
    let blocking = betting_queue::connect(&redis_url()).expect("redis");
    let job = fetch_job(&short, &blocking, "zombie").await;
    assert_eq!(job.id, SettleRoundJob::new("z").id());

    let (link, arrived, open) = stalled_link(app.addr).await;
    let zombie = SettleHandler::new(
        RoundStore::new(app.pool.clone()),
        wallet_client(&format!("http://{link}")),
    );
    let zombie_job = job.clone();
    let zombie_run = tokio::spawn(async move { zombie.handle(&zombie_job).await });
    arrived
        .await
        .expect("the zombie read its page and calls the wallet");

    // Its lease is over: the reaper hands the job on, an attempt counted.
    eventually("the zombie is reaped", Duration::from_secs(5), async || {
        (short.reap_expired().await.expect("reap") > 0).then_some(())
    })
    .await;
    let redelivered = fetch_job(settle, &blocking, "live").await;
    assert_eq!(redelivered.id, job.id);
    assert_eq!(redelivered.attempts, 1);
    assert_eq!(settler(&app).settle_round("z").await.expect("live run"), 8);
    settle.ack("live", &redelivered.id).await.expect("ack");
    assert_paid_once(&app, &pairs, stake).await;

    // The zombie wakes up.
    open.send(true).expect("open the link");
    zombie_run
        .await
        .expect("zombie task")
        .expect("the zombie's run replays");
    settle.ack("zombie", &job.id).await.expect("zombie ack");
    let stats = settle.stats().await.expect("stats");
    assert_eq!(
        (stats.waiting, stats.delayed, stats.in_flight, stats.dead),
        (0, 0, 0, 0),
        "{stats:?}"
    );
    assert_eq!(
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM ledger_entries WHERE kind = 'PAYOUT'")
            .fetch_one(&app.pool)
            .await
            .expect("count"),
        8
    );
    assert_paid_once(&app, &pairs, stake).await;
    app.assert_books_balanced().await;
    app.assert_audit_clean().await;
}

/// Interleaving 1 and 4 together: the same zombie schedule, in a round with
/// a payout the wallet refuses. The live run pays the rest and dies for
/// good; the zombie's later run finds the same refusal and its failure
/// finds the job dead already. The job is dead exactly once, its money
/// counted, the reconciler does not resurrect it, and nothing was paid
/// twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn attack11_a_refused_payout_under_a_zombie_and_its_redelivery_ends_dead_and_counted() {
    let app = TestApp::spawn_roles(API_ONLY).await;
    let stake = "2";
    let pairs = matched_round(&app, "zr", 1, 8, stake).await;
    let refused = pairs[3];
    refuse_payout(&app, &refused, stake).await;
    app.settle_round("zr", pb::Side::A).await.expect("settle");

    let settle = &app.queues.settle;
    let short = Queue::new(
        settle.client().clone(),
        &app.namespace,
        settle.name(),
        QueueSettings {
            visibility_timeout: Duration::from_millis(1),
            ..settle.settings().clone()
        },
    );
    let blocking = betting_queue::connect(&redis_url()).expect("redis");
    let job = fetch_job(&short, &blocking, "zombie").await;
    let (link, arrived, open) = stalled_link(app.addr).await;
    let zombie = SettleHandler::new(
        RoundStore::new(app.pool.clone()),
        wallet_client(&format!("http://{link}")),
    );
    let zombie_job = job.clone();
    let zombie_run = tokio::spawn(async move { zombie.handle(&zombie_job).await });
    arrived.await.expect("the zombie calls the wallet");
    eventually("the zombie is reaped", Duration::from_secs(5), async || {
        (short.reap_expired().await.expect("reap") > 0).then_some(())
    })
    .await;

    let redelivered = fetch_job(settle, &blocking, "live").await;
    let live = settler(&app).handle(&redelivered).await;
    assert!(matches!(live, Err(JobError::Permanent(_))), "{live:?}");
    let outcome = settle
        .fail("live", &redelivered, "refused", true)
        .await
        .expect("fail");
    assert_eq!(outcome, FailOutcome::Dead);

    open.send(true).expect("open the link");
    let late = zombie_run.await.expect("zombie task");
    assert!(matches!(late, Err(JobError::Permanent(_))), "{late:?}");
    let outcome = settle
        .fail("zombie", &job, "refused", true)
        .await
        .expect("fail");
    assert_eq!(outcome, FailOutcome::Unknown, "dead once");

    let paid: Vec<Pair> = pairs
        .iter()
        .copied()
        .filter(|p| p.match_id != refused.match_id)
        .collect();
    assert_paid_once(&app, &paid, stake).await;
    assert!(payouts_of(&app, refused.match_id).await.is_empty());
    assert_eq!(match_status(&app, refused.match_id).await, "OPEN");
    assert_eq!(bet_status(&app, refused.bet_a).await, "MATCHED");
    assert_eq!(
        betting_reconciler::stuck::dead_money(&app.pool, settle)
            .await
            .expect("dead money"),
        dec(stake) * Decimal::TWO
    );
    let report = app
        .reconciler_with(ReconcilerSettings {
            retry_after: Duration::ZERO,
            ..Default::default()
        })
        .pass()
        .await
        .expect("pass");
    assert_eq!(report.settle_jobs, 1, "the unpaid match is seen");
    let stats = settle.stats().await.expect("stats");
    assert_eq!(
        (stats.waiting, stats.delayed, stats.in_flight, stats.dead),
        (0, 0, 0, 1),
        "{stats:?}"
    );
    app.assert_books_balanced().await;
}

/// Interleaving 2: the settler's page call commits and then its reply is
/// lost (or the settler is killed before `mark_matches_settled`): every
/// payout is in the ledger, no match recorded. A VoidRound now is refused
/// (SETTLED is final) and moves nothing; the redelivered job records every
/// match and pays nothing again. Then a VoidRound racing the round's own
/// SettleRound: exactly one wins, and the settle job (if any) pays only
/// what the winner left owed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn attack11_a_page_paid_before_the_settler_died_is_recorded_once_and_void_cannot_interrupt() {
    let app = TestApp::spawn_roles(API_ONLY).await;
    let stake = "4";
    let pairs = matched_round(&app, "crash", 1, 10, stake).await;
    app.settle_round("crash", pb::Side::A)
        .await
        .expect("settle");

    // What the dead settler's page call did.
    let outcomes = pay_batch(&app, pairs.iter().map(|p| payout(p, stake)).collect()).await;
    assert!(
        outcomes
            .iter()
            .all(|o| outcome(o) == (true, false, String::new())),
        "{outcomes:?}"
    );
    for p in &pairs {
        assert_eq!(match_status(&app, p.match_id).await, "OPEN");
    }

    let void = app.void_round("crash").await;
    assert_eq!(
        void.expect_err("a settled round is not voided").code(),
        Code::FailedPrecondition
    );
    let owed: i64 = sqlx::query_scalar("SELECT count(*) FROM wallet_commands")
        .fetch_one(&app.pool)
        .await
        .expect("count");
    assert_eq!(owed, 0, "the refused void owes no refund");

    let settler = settler(&app);
    assert_eq!(settler.settle_round("crash").await.expect("redelivery"), 10);
    assert_eq!(settler.settle_round("crash").await.expect("again"), 0);
    assert_paid_once(&app, &pairs, stake).await;

    // A void racing the settlement itself.
    let race = matched_round(&app, "race", 101, 6, stake).await;
    let (settled, voided) = tokio::join!(
        app.settle_round("race", pb::Side::A),
        app.void_round("race")
    );
    assert!(
        settled.is_ok() != voided.is_ok(),
        "exactly one transition wins: {settled:?} {voided:?}"
    );
    let recorded = settler.settle_round("race").await;
    if settled.is_ok() {
        assert_eq!(recorded.expect("settle job"), 6);
        assert_paid_once(&app, &race, stake).await;
    } else {
        // Every match voided: nothing left to pay; the refunds are owed.
        assert_eq!(recorded.expect("settle job"), 0);
        let refunder = betting_refunds::Refunder::new(
            betting_refunds::Outbox::new(app.pool.clone()),
            wallet_client(&format!("http://{}", app.addr)),
        );
        let keys: Vec<String> = sqlx::query_scalar("SELECT idempotency_key FROM wallet_commands")
            .fetch_all(&app.pool)
            .await
            .expect("owed");
        assert_eq!(keys.len(), 12);
        for key in keys {
            refunder.execute_key(&key).await.expect("refund");
        }
        for p in &race {
            assert!(payouts_of(&app, p.match_id).await.is_empty());
            assert_eq!(wallet_balance(&app, p.user_a).await, dec(stake));
            assert_eq!(wallet_balance(&app, p.user_b).await, dec(stake));
        }
    }
    app.assert_books_balanced().await;
    app.assert_audit_clean().await;
}

/// Interleaving 4: a round of more than one page (300 matches: 256, then
/// 44) whose wallet refuses three payouts — one in the middle of the first
/// page, the last of the first page and the first of the second (the
/// cursor's boundary). Every other match, in both pages, is paid exactly
/// once; the job dies for good and its money (the three payouts) is
/// counted; the reconciler sees the unpaid matches but does not resurrect
/// the job; a requeued run pays nothing twice; and the audit reports the
/// stuck bets.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn attack11_refused_payouts_inside_and_at_the_edge_of_a_page_leave_the_rest_paid_once() {
    let app = TestApp::spawn_roles(API_ONLY).await;
    let stake = "1";
    let pairs = matched_round(&app, "big", 1, 300, stake).await;
    let refused = [pairs[100], pairs[255], pairs[256]];
    for p in &refused {
        refuse_payout(&app, p, stake).await;
    }
    app.settle_round("big", pb::Side::A).await.expect("settle");

    let settle = &app.queues.settle;
    let blocking = betting_queue::connect(&redis_url()).expect("redis");
    let job = fetch_job(settle, &blocking, "settler").await;
    assert_eq!(job.id, SettleRoundJob::new("big").id());
    let result = settler(&app).handle(&job).await;
    let Err(JobError::Permanent(why)) = &result else {
        panic!("the job fails for good: {result:?}");
    };
    assert!(why.contains("3 matches"), "{why}");
    assert_eq!(
        settle.fail("settler", &job, why, true).await.expect("fail"),
        FailOutcome::Dead
    );

    let is_refused = |p: &Pair| refused.iter().any(|r| r.match_id == p.match_id);
    let paid: Vec<Pair> = pairs.iter().copied().filter(|p| !is_refused(p)).collect();
    assert_eq!(paid.len(), 297);
    assert_paid_once(&app, &paid, stake).await;
    for p in &refused {
        assert!(payouts_of(&app, p.match_id).await.is_empty());
        assert_eq!(match_status(&app, p.match_id).await, "OPEN");
        assert_eq!(wallet_balance(&app, p.user_a).await, Decimal::ZERO);
    }
    assert_eq!(
        betting_reconciler::stuck::dead_money(&app.pool, settle)
            .await
            .expect("dead money"),
        dec("6"),
        "the three refused payouts"
    );
    let report = app
        .reconciler_with(ReconcilerSettings {
            retry_after: Duration::ZERO,
            ..Default::default()
        })
        .pass()
        .await
        .expect("pass");
    assert_eq!(report.settle_jobs, 1);
    let stats = settle.stats().await.expect("stats");
    assert_eq!((stats.waiting, stats.dead), (0, 1), "{stats:?}");

    // An operator requeues it: the same refusals, nothing paid twice.
    assert!(settle.retry_dead(&job.id).await.expect("requeue"));
    let again = fetch_job(settle, &blocking, "settler").await;
    let rerun = settler(&app).handle(&again).await;
    assert!(matches!(rerun, Err(JobError::Permanent(_))), "{rerun:?}");
    assert_paid_once(&app, &paid, stake).await;
    let total: Decimal = sqlx::query_scalar(
        "SELECT coalesce(sum(amount), 0) FROM ledger_entries WHERE kind = 'PAYOUT'",
    )
    .fetch_one(&app.pool)
    .await
    .expect("sum");
    assert_eq!(total, dec("594"));
    app.assert_books_balanced().await;

    // The audit reports the six bets the refusals left MATCHED, and only them.
    let report = betting_audit::run(
        &app.pool,
        &betting_audit::AuditSettings {
            quiescence: Duration::ZERO,
            match_timeout: Duration::from_secs(300),
        },
    )
    .await
    .expect("audit");
    assert!(
        report.violations.iter().all(|v| v.check == "OVERDUE_BET"),
        "{:#?}",
        report.violations
    );
    for p in &refused {
        for bet in [p.bet_a, p.bet_b] {
            assert!(
                report
                    .violations
                    .iter()
                    .any(|v| v.detail.contains(&bet.to_string()) && v.detail.contains("MATCHED")),
                "bet {bet} is reported: {:#?}",
                report.violations
            );
        }
    }
}

/// Interleaving 3: a betting instance stops in the middle of placing
/// batches — one batch "died" right after its PlaceStakes (the bets placed
/// PENDING with their stakes, or REJECTED for want of funds, none of them
/// answered or announced), and an older release's batch died before its
/// HoldStakes (PLACING rows, nothing held) — and a round closes meanwhile. Once the
/// instance has stopped, another instance's recovery pass and reconciler
/// drive every bet to exactly one outcome: PENDING or MATCHED with its
/// stake held once, REFUNDED with its stake held and returned once, or
/// REJECTED with nothing taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn attack11_bets_left_placing_by_a_stopped_instance_each_reach_one_outcome() {
    let database = fresh_database().await;
    let mut first_settings = settings(&database, &redis_url());
    first_settings.roles = API_ONLY.to_vec();
    let first = TestApp::spawn_with(first_settings).await;
    first.open_round("open").await;
    first.open_round("closing").await;
    // Users 1-8 can pay their stake of 5; users 9 and 10 cannot.
    for user in 1..=8 {
        first.genesis(user, dec("5")).await;
    }
    first.genesis(9, dec("1")).await;

    // A batch that dies right after its PlaceStakes.
    first.betting().faults().set_fail_after_stake(true);
    let asks: Vec<(i64, &str, pb::Side)> = vec![
        (1, "open", pb::Side::A),
        (2, "open", pb::Side::B),
        (3, "open", pb::Side::A),
        (4, "closing", pb::Side::A),
        (5, "closing", pb::Side::B),
        (9, "open", pb::Side::B),
        (10, "closing", pb::Side::A),
    ];
    let answers = futures::future::join_all(asks.iter().map(|&(user, round, side)| {
        let first = &first;
        async move {
            first
                .place(user, round, side, "5", &format!("k{user}"))
                .await
        }
    }))
    .await;
    first.betting().faults().set_fail_after_stake(false);
    assert!(answers.iter().all(Result::is_err), "{answers:?}");
    // Placed whole: nothing half-placed is left behind.
    assert_eq!(first.count_bets("PLACING").await, 0);
    assert_eq!(first.count_bets("PENDING").await, 5);
    assert_eq!(first.count_bets("REJECTED").await, 2);
    // An older release's batch that dies before its HoldStakes: its rows,
    // as its INSERT wrote them.
    for (user, round) in [(6, "open"), (7, "closing"), (8, "open")] {
        sqlx::query(
            "INSERT INTO bets (bet_id, user_id, idempotency_key, round_id, side, amount, status) \
             VALUES ($1, $2, $3, $4, 'B', 5, 'PLACING')",
        )
        .bind(Uuid::now_v7())
        .bind(user)
        .bind(format!("k{user}"))
        .bind(round)
        .execute(&first.pool)
        .await
        .expect("a PLACING row");
    }
    assert_eq!(first.count_bets("PLACING").await, 3);
    first
        .rounds()
        .close_round(authed(
            pb::CloseRoundRequest {
                round_id: "closing".into(),
            },
            &first.game_token(),
        ))
        .await
        .expect("close");
    first.stop().await;

    // Another instance takes over.
    let second = TestApp::spawn_with(settings(&database, &redis_url())).await;
    let report = second
        .betting()
        .recover(&RecoverySettings {
            placing_grace: Duration::ZERO,
            ..RecoverySettings::default()
        })
        .await;
    assert_eq!((report.recovered, report.failures), (3, 0), "{report:?}");
    // A whole pass after the recovery (the instance's own first pass, at
    // start-up, may hold the pass lock a moment: then ours does not run).
    let reconciler = second.reconciler_with(ReconcilerSettings {
        retry_after: Duration::ZERO,
        ..Default::default()
    });
    eventually(
        "a reconciler pass runs",
        Duration::from_secs(15),
        async || reconciler.pass().await.expect("pass").ran.then_some(()),
    )
    .await;
    eventually(
        "the open round's bets are matched",
        Duration::from_secs(15),
        async || {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM bets WHERE round_id = 'open' AND status = 'PENDING'",
            )
            .fetch_one(&second.pool)
            .await
            .expect("count");
            (waiting == 1).then_some(())
        },
    )
    .await;
    eventually(
        "every refund is carried out",
        Duration::from_secs(15),
        async || {
            let left: i64 =
                sqlx::query_scalar("SELECT count(*) FROM wallet_commands WHERE done_at IS NULL")
                    .fetch_one(&second.pool)
                    .await
                    .expect("count");
            (left == 0).then_some(())
        },
    )
    .await;

    let rows: Vec<(i64, String, String)> =
        sqlx::query_as("SELECT user_id, round_id, status FROM bets ORDER BY user_id")
            .fetch_all(&second.pool)
            .await
            .expect("bets");
    for (user, round, status) in &rows {
        let stakes: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM ledger_entries s JOIN bets b ON s.reference = b.bet_id::TEXT \
             WHERE s.kind = 'STAKE' AND b.user_id = $1",
        )
        .bind(user)
        .fetch_one(&second.pool)
        .await
        .expect("stakes");
        let refunds: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM ledger_entries WHERE kind = 'REFUND' AND user_id = $1",
        )
        .bind(user)
        .fetch_one(&second.pool)
        .await
        .expect("refunds");
        let balance = wallet_balance(&second, *user).await;
        match (*user, round.as_str(), status.as_str()) {
            (9 | 10, _, "REJECTED") => {
                assert_eq!((stakes, refunds), (0, 0), "user {user}");
                assert_eq!(balance, if *user == 9 { dec("1") } else { dec("0") });
            }
            (_, "open", "PENDING" | "MATCHED") => {
                assert_eq!((stakes, refunds), (1, 0), "user {user}");
                assert_eq!(balance, Decimal::ZERO, "user {user}");
            }
            (_, "closing", "REFUNDED") => {
                assert_eq!((stakes, refunds), (1, 1), "user {user}");
                assert_eq!(balance, dec("5"), "user {user}");
            }
            other => panic!("bet of user {user} ended {other:?}"),
        }
    }
    assert_eq!(rows.len(), 10);
    second.assert_books_balanced().await;
    second.assert_audit_clean().await;
}

/// Interleaving 5, payouts: repeated keys inside one PayWinningsBatch — the
/// loser first (not due, not recorded), then the real payout, a repeat of
/// it, the same key naming another match's bets and the same key to the
/// loser (reused keys) — and two concurrent batches carrying the same keys
/// in opposite orders. Each match is paid once, a reused key moves nothing
/// and records no bet as paid.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn attack11_repeated_payout_keys_in_and_across_batches_pay_once() {
    let app = TestApp::spawn_roles(API_ONLY).await;
    let stake = "5";
    let pairs = matched_round(&app, "keys", 1, 4, stake).await;
    app.settle_round("keys", pb::Side::A).await.expect("settle");
    let [p0, p1, p2, p3] = [pairs[0], pairs[1], pairs[2], pairs[3]];

    let mut to_loser = payout(&p0, stake);
    to_loser.user_id = p0.user_b;
    let mut other_bets = payout(&p1, stake);
    other_bets.bet_ids = vec![p2.bet_a.to_string(), p2.bet_b.to_string()];
    let mut p1_to_loser = payout(&p1, stake);
    p1_to_loser.user_id = p1.user_b;
    let outcomes = pay_batch(
        &app,
        vec![
            to_loser,
            payout(&p0, stake),
            payout(&p0, stake),
            payout(&p1, stake),
            other_bets,
            p1_to_loser,
        ],
    )
    .await;
    let got: Vec<_> = outcomes.iter().map(outcome).collect();
    assert_eq!(
        got,
        vec![
            (false, false, "PAYOUT_NOT_DUE".to_owned()),
            (true, false, String::new()),
            (true, true, String::new()),
            (true, false, String::new()),
            (false, false, "IDEMPOTENCY_KEY_REUSED".to_owned()),
            (false, false, "IDEMPOTENCY_KEY_REUSED".to_owned()),
        ]
    );
    let p2_paid: i64 =
        sqlx::query_scalar("SELECT count(*) FROM payout_bets WHERE bet_id = ANY($1)")
            .bind(vec![p2.bet_a, p2.bet_b])
            .fetch_one(&app.pool)
            .await
            .expect("count");
    assert_eq!(p2_paid, 0, "a reused key records no bet as paid");

    // Two batches with the same keys in opposite orders, at once.
    let (one, two) = tokio::join!(
        pay_batch(&app, vec![payout(&p2, stake), payout(&p3, stake)]),
        pay_batch(&app, vec![payout(&p3, stake), payout(&p2, stake)]),
    );
    let one: Vec<_> = one.iter().map(outcome).collect();
    let two: Vec<_> = two.iter().map(outcome).collect();
    assert!(
        one.iter().chain(&two).all(|(paid, _, _)| *paid),
        "{one:?} {two:?}"
    );
    // Per match: exactly one of the two answers is the original.
    assert!(one[0].1 != two[1].1, "p2: {one:?} {two:?}");
    assert!(one[1].1 != two[0].1, "p3: {one:?} {two:?}");

    for p in &pairs {
        assert_eq!(
            payouts_of(&app, p.match_id).await,
            vec![(p.user_a, dec("10"))]
        );
        assert_eq!(wallet_balance(&app, p.user_a).await, dec("10"));
        assert_eq!(wallet_balance(&app, p.user_b).await, Decimal::ZERO);
    }
    // The settle job then only records.
    assert_eq!(settler(&app).settle_round("keys").await.expect("job"), 4);
    assert_paid_once(&app, &pairs, stake).await;
    app.assert_books_balanced().await;
    app.assert_audit_clean().await;
}

/// Interleaving 5, stakes: a key twice in one HoldStakes with the same
/// payload (a replay), with another amount (a reused key), a refused key
/// repeated, and two concurrent HoldStakes with the same keys in opposite
/// orders. Each key takes its stake at most once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn attack11_repeated_stake_keys_in_and_across_batches_hold_once() {
    let app = TestApp::spawn_roles(API_ONLY).await;
    for user in [1, 2, 3] {
        app.genesis(user, dec("10")).await;
    }
    let hold = |user: i64, amount: &str, bet: Uuid| pbi::HoldStakeRequest {
        user_id: user,
        amount: amount.into(),
        idempotency_key: format!("BET:{bet}"),
        bet_id: bet.to_string(),
    };
    let hold_stakes = async |holds: Vec<pbi::HoldStakeRequest>| {
        app.stakes()
            .hold_stakes(authed(
                pbi::HoldStakesRequest { holds },
                &app.service_token(),
            ))
            .await
            .expect("hold stakes")
            .into_inner()
            .outcomes
            .iter()
            .map(hold_outcome)
            .collect::<Vec<_>>()
    };
    let (a, b, c) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    let got = hold_stakes(vec![
        hold(1, "4", a),
        hold(1, "4", a),
        hold(1, "5", a),
        hold(2, "11", b),
        hold(2, "11", b),
        hold(2, "3", c),
    ])
    .await;
    assert_eq!(
        got,
        vec![
            (true, false, String::new()),
            (true, true, String::new()),
            (false, false, "IDEMPOTENCY_KEY_REUSED".to_owned()),
            (false, false, "INSUFFICIENT_FUNDS".to_owned()),
            (false, false, "INSUFFICIENT_FUNDS".to_owned()),
            (true, false, String::new()),
        ]
    );
    assert_eq!(wallet_balance(&app, 1).await, dec("6"));
    assert_eq!(wallet_balance(&app, 2).await, dec("7"));

    let keys: Vec<Uuid> = (0..3).map(|_| Uuid::now_v7()).collect();
    let forward: Vec<_> = keys.iter().map(|&k| hold(3, "2", k)).collect();
    let backward: Vec<_> = keys.iter().rev().map(|&k| hold(3, "2", k)).collect();
    let (one, two) = tokio::join!(hold_stakes(forward), hold_stakes(backward));
    // The key locks serialise the two: one holds every stake, the other
    // (which waited for its keys) replays every one.
    for (i, key) in keys.iter().enumerate() {
        let first = &one[i];
        let second = &two[keys.len() - 1 - i];
        let mut answers = [first.clone(), second.clone()];
        answers.sort();
        assert_eq!(
            answers,
            [(true, false, String::new()), (true, true, String::new())],
            "key {key}"
        );
    }
    let stakes: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM ledger_entries WHERE kind = 'STAKE' AND user_id = 3",
    )
    .fetch_one(&app.pool)
    .await
    .expect("count");
    assert_eq!(stakes, 3);
    assert_eq!(wallet_balance(&app, 3).await, dec("4"));
    app.assert_books_balanced().await;
}

/// Interleaving 1 across pages: two deliveries of one round's job (a
/// zombie's and its redelivery, or a reconciler's duplicate after an ack)
/// run at once over a round of two pages. Every match is recorded by
/// exactly one of them and paid once; neither fails (no deadlock between
/// two batches over the same keys, bets and wallets).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn attack11_two_deliveries_of_a_round_job_at_once_pay_each_match_once() {
    let app = TestApp::spawn_roles(API_ONLY).await;
    let stake = "1";
    let pairs = matched_round(&app, "twice", 1, 300, stake).await;
    app.settle_round("twice", pb::Side::A)
        .await
        .expect("settle");
    let (one, two) = (settler(&app), settler(&app));
    let (a, b) = tokio::join!(one.settle_round("twice"), two.settle_round("twice"));
    let (a, b) = (a.expect("first delivery"), b.expect("second delivery"));
    assert_eq!(a + b, 300, "each match recorded once: {a} + {b}");
    assert_paid_once(&app, &pairs, stake).await;
    app.assert_books_balanced().await;
    app.assert_audit_clean().await;
}

/// Interleaving 1 mid-page: a round job has read its page and is stalled in
/// its wallet call (before the wallet sees it) while lone per-match jobs pay
/// and record some of the page's matches; then its call goes through. The
/// page's payouts those jobs made replay, the rest are paid, and every match
/// is recorded by exactly one job.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn attack11_lone_jobs_paying_inside_a_stalled_round_page_pay_each_match_once() {
    let app = TestApp::spawn_roles(API_ONLY).await;
    let stake = "2";
    let pairs = matched_round(&app, "mid", 1, 10, stake).await;
    app.settle_round("mid", pb::Side::A).await.expect("settle");

    let (link, arrived, open) = stalled_link(app.addr).await;
    let stalled = SettleHandler::new(
        RoundStore::new(app.pool.clone()),
        wallet_client(&format!("http://{link}")),
    );
    let round_run = tokio::spawn(async move { stalled.settle_round("mid").await });
    arrived.await.expect("the round job calls the wallet");
    let lone = settler(&app);
    let mut recorded = 0;
    for p in pairs.iter().step_by(2) {
        assert!(lone.settle(p.match_id).await.expect("lone job"));
        recorded += 1;
    }
    open.send(true).expect("open the link");
    recorded += round_run
        .await
        .expect("round task")
        .expect("the round job finishes");
    assert_eq!(recorded, 10, "each match recorded by exactly one job");
    assert_paid_once(&app, &pairs, stake).await;
    app.assert_books_balanced().await;
    app.assert_audit_clean().await;
}

/// A PlaceBet in a task of its own, with its own deadline.
fn spawn_place(
    app: &TestApp,
    user: i64,
    key: &str,
    timeout: Duration,
) -> tokio::task::JoinHandle<Result<pb::PlaceBetResponse, tonic::Status>> {
    let bets = app.bets();
    let token = app.player(user);
    let key = key.to_owned();
    tokio::spawn(async move {
        let mut request = authed(
            pb::PlaceBetRequest {
                round_id: "r".into(),
                side: pb::Side::A as i32,
                amount: "1".into(),
                idempotency_key: key,
            },
            &token,
        );
        request.set_timeout(timeout);
        bets.clone()
            .place_bet(request)
            .await
            .map(tonic::Response::into_inner)
    })
}

/// An uncommitted PLACING row for `(user, key)`: an INSERT of that key
/// waits on this transaction.
async fn hold_key(
    pool: &sqlx::PgPool,
    user: i64,
    key: &str,
) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let mut tx = pool.begin().await.expect("begin");
    sqlx::query(
        "INSERT INTO bets (bet_id, user_id, idempotency_key, round_id, side, amount, status) \
         VALUES ($1, $2, $3, 'r', 'A', 1, 'PLACING')",
    )
    .bind(Uuid::now_v7())
    .bind(user)
    .bind(key)
    .execute(&mut *tx)
    .await
    .expect("hold a key");
    tx
}

/// Interleaving 3, the caller side: a placing batch outlives one of its
/// callers (its deadline passed while the batch waited), and that caller's
/// bet is answered "place it alone" (its wallet row was held by another
/// movement). The lone placement runs in the caller's task, so nobody runs
/// it: the bet is not placed and nothing is taken — not "placed as if it
/// had waited", as `placer.rs` says of the others — until its retry places
/// it, once. (In the three-step saga this was a PLACING row with nothing
/// held, left to the recovery pass.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn attack11_a_gone_callers_busy_bet_is_not_placed() {
    let app = TestApp::spawn_roles(API_ONLY).await;
    app.open_round("r").await;
    for user in [1, 2, 9, 10] {
        app.genesis(user, dec("10")).await;
    }
    let long = Duration::from_secs(30);
    // Keep every batch slot busy, so that the next batch gathers: each
    // slot's placement waits on its key (a user of its own, so that no
    // slot's wallet row is another's and none is answered "busy").
    let mut slots = Vec::new();
    let mut slot_bets = Vec::new();
    for n in 0..betting_bets::PLACE_BATCH_SLOTS {
        let key = format!("slot-{n}");
        let user = 9 + n as i64;
        slots.push(hold_key(&app.pool, user, &key).await);
        slot_bets.push(spawn_place(&app, user, &key, long));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // User 1's wallet row is held by another movement.
    let mut row = app.pool.begin().await.expect("begin");
    sqlx::query("SELECT balance FROM wallets WHERE user_id = 1 FOR UPDATE")
        .execute(&mut *row)
        .await
        .expect("lock the row");
    // The next batch: [user 1 "gone" (1 s deadline), user 2 "stays"], and
    // its INSERT waits on "stays" for longer than "gone" waits.
    let stays_key = hold_key(&app.pool, 2, "stays").await;
    let gone = spawn_place(&app, 1, "gone", Duration::from_secs(1));
    tokio::time::sleep(Duration::from_millis(50)).await;
    let stays = spawn_place(&app, 2, "stays", long);
    tokio::time::sleep(Duration::from_millis(300)).await;
    slots.remove(0).rollback().await.expect("free a slot");
    let gone = gone.await.expect("task");
    assert!(gone.is_err(), "the caller gave up: {gone:?}");

    stays_key.rollback().await.expect("let the batch go on");
    let stays = stays.await.expect("task").expect("placed");
    assert_eq!(stays.balance, "9");
    for slot in slots {
        slot.rollback().await.expect("free a slot");
    }
    for task in slot_bets {
        task.await.expect("task").expect("a slot's bet");
    }
    let written: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM bets WHERE user_id = 1 AND idempotency_key = 'gone'",
    )
    .fetch_one(&app.pool)
    .await
    .expect("count");
    assert_eq!(written, 0, "the batch did not place it");
    row.rollback().await.expect("free the row");
    assert_eq!(
        wallet_balance(&app, 1).await,
        dec("10"),
        "nothing was taken"
    );

    let report = app
        .betting()
        .recover(&RecoverySettings {
            placing_grace: Duration::ZERO,
            ..RecoverySettings::default()
        })
        .await;
    assert_eq!((report.recovered, report.failures), (0, 0));
    let retry = app
        .place(1, "r", pb::Side::A, "1", "gone")
        .await
        .expect("the retry")
        .into_inner();
    assert_eq!(
        retry.bet.expect("bet").status,
        pb::BetStatus::Pending as i32
    );
    assert_eq!(wallet_balance(&app, 1).await, dec("9"), "one stake, once");
    assert_eq!(app.count_bets("PLACING").await, 0);
    app.assert_books_balanced().await;
}

/// Pipelined round batches (`ROUND_BATCHES_IN_FLIGHT` at once) that pay the
/// same winners: 800 matches (four pages) whose A sides are two users and B
/// sides two others, so every batch in flight — and those of a second job
/// racing the first — takes the same two wallet rows. Nothing deadlocks,
/// each match is paid exactly once, and the two jobs' counts add up to the
/// round.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn attack11_pipelined_batches_sharing_winners_pay_each_match_once() {
    let app = TestApp::spawn_roles(API_ONLY).await;
    app.open_round("shared").await;
    let (winners, losers) = ([1_i64, 2], [3_i64, 4]);
    let per_user = 400;
    for &user in winners.iter().chain(&losers) {
        app.genesis(user, Decimal::from(per_user)).await;
    }
    for _ in 0..per_user / 25 {
        futures::future::join_all(
            winners
                .iter()
                .chain(&losers)
                .flat_map(|&user| {
                    let side = if winners.contains(&user) {
                        pb::Side::A
                    } else {
                        pb::Side::B
                    };
                    (0..25).map(move |_| (user, side))
                })
                .map(|(user, side)| app.place_ok(user, "shared", side, "1")),
        )
        .await;
    }
    let matched = Matcher::new(app.pool.clone())
        .match_group("shared", dec("1"))
        .await
        .expect("match");
    assert_eq!(matched, 800);
    app.settle_round("shared", pb::Side::A)
        .await
        .expect("settle");

    let (first, second) = (settler(&app), settler(&app));
    let (one, two) = tokio::join!(first.settle_round("shared"), second.settle_round("shared"));
    assert_eq!(
        one.expect("job one") + two.expect("job two"),
        800,
        "each match recorded by exactly one job"
    );
    let (payouts, distinct, total): (i64, i64, Decimal) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT reference), coalesce(sum(amount), 0) \
         FROM ledger_entries WHERE kind = 'PAYOUT'",
    )
    .fetch_one(&app.pool)
    .await
    .expect("payouts");
    assert_eq!((payouts, distinct, total), (800, 800, dec("1600")));
    for &user in &winners {
        assert_eq!(wallet_balance(&app, user).await, dec("800"), "user {user}");
    }
    for &user in &losers {
        assert_eq!(
            wallet_balance(&app, user).await,
            Decimal::ZERO,
            "user {user}"
        );
    }
    let open: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM matches WHERE round_id = 'shared' AND status <> 'SETTLED'",
    )
    .fetch_one(&app.pool)
    .await
    .expect("count");
    assert_eq!(open, 0);
    app.assert_books_balanced().await;
    app.assert_audit_clean().await;
}

/// A zombie with several batches in flight: a settler reads the round's
/// first pages and stalls in all their wallet calls at once (600 matches:
/// three pages); a live settler pays and records the whole round; then the
/// zombie's calls go through. Every one of its payouts replays, it records
/// nothing, and each match is paid once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn attack11_a_zombie_with_batches_in_flight_pays_nothing_twice() {
    let app = TestApp::spawn_roles(API_ONLY).await;
    let stake = "1";
    let pairs = matched_round(&app, "zz", 1, 600, stake).await;
    app.settle_round("zz", pb::Side::A).await.expect("settle");

    let (link, arrived, open) = stalled_link(app.addr).await;
    let zombie = SettleHandler::new(
        RoundStore::new(app.pool.clone()),
        wallet_client(&format!("http://{link}")),
    );
    let zombie_run = tokio::spawn(async move { zombie.settle_round("zz").await });
    arrived
        .await
        .expect("the zombie read its pages and calls the wallet");
    // Let it read and send every batch it may have in flight.
    tokio::time::sleep(Duration::from_millis(300)).await;

    assert_eq!(
        settler(&app).settle_round("zz").await.expect("live run"),
        600
    );
    assert_paid_once(&app, &pairs, stake).await;

    open.send(true).expect("open the link");
    assert_eq!(
        zombie_run
            .await
            .expect("zombie task")
            .expect("the zombie's run replays"),
        0,
        "the zombie records nothing"
    );
    let (payouts, distinct): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT reference) FROM ledger_entries WHERE kind = 'PAYOUT'",
    )
    .fetch_one(&app.pool)
    .await
    .expect("count");
    assert_eq!((payouts, distinct), (600, 600));
    assert_paid_once(&app, &pairs, stake).await;
    app.assert_books_balanced().await;
    app.assert_audit_clean().await;
}

// Attack review 14: the pipelined round batches (`ROUND_BATCHES_IN_FLIGHT`
// at once, each a task): a failure of one batch while its siblings are in
// flight, a refusal and an outage in sibling batches, lone jobs, placing
// traffic and two round jobs over the same wallets, and the round's
// transitions racing batches in flight.

/// Makes every wallet call that pays `matched` fail as a whole after
/// holding its locks for `hold`: the batch's transaction is rolled back and
/// the call answered INTERNAL (UNAVAILABLE to the settler), as a wallet
/// failing mid-call would.
async fn inject_outage(app: &TestApp, matched: Uuid, hold: Duration) {
    for statement in [
        "CREATE TABLE attack14_outages (reference TEXT PRIMARY KEY, hold FLOAT8 NOT NULL)",
        "CREATE FUNCTION attack14_outage() RETURNS trigger LANGUAGE plpgsql AS $$ \
         DECLARE held FLOAT8; \
         BEGIN \
           SELECT hold INTO held FROM attack14_outages WHERE reference = NEW.reference; \
           IF FOUND THEN \
             PERFORM pg_sleep(held); \
             RAISE EXCEPTION 'attack14 injected outage'; \
           END IF; \
           RETURN NEW; \
         END; $$",
        "CREATE TRIGGER attack14_outage BEFORE INSERT ON ledger_entries FOR EACH ROW \
         WHEN (NEW.kind = 'PAYOUT') EXECUTE FUNCTION attack14_outage()",
    ] {
        sqlx::query(statement)
            .execute(&app.pool)
            .await
            .expect("outage trigger");
    }
    sqlx::query("INSERT INTO attack14_outages (reference, hold) VALUES ($1, $2)")
        .bind(matched.to_string())
        .bind(hold.as_secs_f64())
        .execute(&app.pool)
        .await
        .expect("outage");
}

async fn lift_outage(app: &TestApp) {
    sqlx::query("DROP TRIGGER attack14_outage ON ledger_entries")
        .execute(&app.pool)
        .await
        .expect("drop trigger");
}

async fn open_matches(app: &TestApp, round: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM matches WHERE round_id = $1 AND status = 'OPEN'")
        .bind(round)
        .fetch_one(&app.pool)
        .await
        .expect("count")
}

/// A wallet failure in one batch while its siblings are in flight: 600
/// matches (pages of 256, 256, 88). The second page's wallet call holds its
/// locks for seconds and then fails as a whole; meanwhile the third page is
/// paid and its bookkeeping waits on a row lock (a lone job's, say) that
/// goes only after the failure. The job ends UNAVAILABLE (deferred), the
/// second page unpaid; the third is recorded by the job or, if the failure
/// dropped its batch (paid, not recorded), by the retry, whose payouts
/// replay. The retry records every match left and pays the second page:
/// each match paid exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn attack14_an_outage_in_one_batch_with_a_paid_sibling_in_flight_then_the_retry_pays_once() {
    let app = TestApp::spawn_roles(API_ONLY).await;
    let stake = "1";
    let pairs = matched_round(&app, "out", 1, 600, stake).await;
    app.settle_round("out", pb::Side::A).await.expect("settle");
    let hold = Duration::from_secs(3);
    inject_outage(&app, pairs[300].match_id, hold).await;
    let mut lock = app.pool.begin().await.expect("begin");
    sqlx::query("SELECT 1 FROM matches WHERE match_id = $1 FOR UPDATE")
        .bind(pairs[550].match_id)
        .execute(&mut *lock)
        .await
        .expect("lock a third-page match");

    let started = tokio::time::Instant::now();
    let run = {
        let settler = settler(&app);
        tokio::spawn(async move { settler.settle_round("out").await })
    };
    // The third page is paid while the second's call still holds on.
    eventually(
        "the third page is paid",
        Duration::from_secs(20),
        async || {
            let paid: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM ledger_entries WHERE kind = 'PAYOUT' AND reference = ANY($1)",
            )
            .bind(
                pairs[512..]
                    .iter()
                    .map(|p| p.match_id.to_string())
                    .collect::<Vec<_>>(),
            )
            .fetch_one(&app.pool)
            .await
            .expect("count");
            (paid == 88).then_some(())
        },
    )
    .await;
    // The second page's call fails; then the row lock goes.
    tokio::time::sleep_until(started + hold + Duration::from_secs(1)).await;
    lock.commit().await.expect("release the row");
    let first = tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("the job ends")
        .expect("job task");
    assert!(matches!(first, Err(JobError::Unavailable(_))), "{first:?}");
    lift_outage(&app).await;

    // The second page unpaid, nothing paid twice.
    for p in &pairs[256..512] {
        assert!(payouts_of(&app, p.match_id).await.is_empty());
    }
    let (payouts, distinct): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT reference) FROM ledger_entries WHERE kind = 'PAYOUT'",
    )
    .fetch_one(&app.pool)
    .await
    .expect("count");
    assert_eq!((payouts, distinct), (344, 344));
    // Whatever bookkeeping the failure dropped has ended (rolled back).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let left = open_matches(&app, "out").await;
    assert!(left == 256 || left == 344, "{left} matches left open");
    let retried = tokio::time::timeout(Duration::from_secs(60), settler(&app).settle_round("out"))
        .await
        .expect("the retry ends")
        .expect("the retry pays the rest");
    assert_eq!(retried as i64, left, "the retry records every match left");
    assert_paid_once(&app, &pairs, stake).await;
    assert_eq!(
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM ledger_entries WHERE kind = 'PAYOUT'")
            .fetch_one(&app.pool)
            .await
            .expect("count"),
        600
    );
    app.assert_books_balanced().await;
    app.assert_audit_clean().await;
}

/// A refused payout in the first and in the third page while the second
/// page's wallet call fails: the job is deferred (UNAVAILABLE: nothing is
/// dead, no money counted as dead) rather than dead with the second page
/// unpaid. Its next delivery pays the second page, replays the refusals and
/// dies for good; the dead money is exactly the two refused payouts.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn attack14_a_refusal_and_an_outage_in_sibling_batches_defer_then_die_counted() {
    let app = TestApp::spawn_roles(API_ONLY).await;
    let stake = "2";
    let pairs = matched_round(&app, "ro", 1, 600, stake).await;
    let refused = [pairs[10], pairs[520]];
    for p in &refused {
        refuse_payout(&app, p, stake).await;
    }
    app.settle_round("ro", pb::Side::A).await.expect("settle");
    inject_outage(&app, pairs[300].match_id, Duration::from_millis(500)).await;

    let settle = &app.queues.settle;
    let first = tokio::time::timeout(Duration::from_secs(30), settler(&app).settle_round("ro"))
        .await
        .expect("the first run ends");
    assert!(matches!(first, Err(JobError::Unavailable(_))), "{first:?}");
    assert_eq!(
        betting_reconciler::stuck::dead_money(&app.pool, settle)
            .await
            .expect("dead money"),
        Decimal::ZERO,
        "nothing is dead yet"
    );
    for p in &pairs[256..512] {
        assert!(payouts_of(&app, p.match_id).await.is_empty());
    }
    lift_outage(&app).await;

    let blocking = betting_queue::connect(&redis_url()).expect("redis");
    let job = fetch_job(settle, &blocking, "settler").await;
    assert_eq!(job.id, SettleRoundJob::new("ro").id());
    let second = tokio::time::timeout(Duration::from_secs(60), settler(&app).handle(&job))
        .await
        .expect("the second run ends");
    let Err(JobError::Permanent(why)) = &second else {
        panic!("the job fails for good: {second:?}");
    };
    assert!(why.contains("2 matches"), "{why}");
    assert_eq!(
        settle.fail("settler", &job, why, true).await.expect("fail"),
        FailOutcome::Dead
    );
    let is_refused = |p: &Pair| refused.iter().any(|r| r.match_id == p.match_id);
    let paid: Vec<Pair> = pairs.iter().copied().filter(|p| !is_refused(p)).collect();
    assert_paid_once(&app, &paid, stake).await;
    for p in &refused {
        assert!(payouts_of(&app, p.match_id).await.is_empty());
        assert_eq!(match_status(&app, p.match_id).await, "OPEN");
        assert_eq!(bet_status(&app, p.bet_a).await, "MATCHED");
        assert_eq!(bet_status(&app, p.bet_b).await, "MATCHED");
    }
    assert_eq!(
        betting_reconciler::stuck::dead_money(&app.pool, settle)
            .await
            .expect("dead money"),
        dec(stake) * Decimal::from(4),
        "the two refused payouts"
    );
    let stats = settle.stats().await.expect("stats");
    assert_eq!((stats.waiting, stats.dead), (0, 1), "{stats:?}");
    app.assert_books_balanced().await;
}

/// Two round jobs with batches in flight (800 matches, four pages, whose
/// winners are two users), lone per-match jobs for every tenth match, and
/// the winners placing bets in another round and depositing at the same
/// time: every movement touches the same two wallet rows. Nothing
/// deadlocks or fails; each match is recorded by exactly one job and paid
/// once, and each balance is exactly what its movements say.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn attack14_round_jobs_lone_jobs_and_placing_over_the_same_wallets_pay_once() {
    let app = TestApp::spawn_roles(API_ONLY).await;
    app.open_round("busy").await;
    app.open_round("next").await;
    let (winners, losers) = ([1_i64, 2], [3_i64, 4]);
    let per_user = 400;
    for &user in winners.iter().chain(&losers) {
        app.genesis(user, Decimal::from(per_user)).await;
    }
    for _ in 0..per_user / 25 {
        futures::future::join_all(
            winners
                .iter()
                .chain(&losers)
                .flat_map(|&user| {
                    let side = if winners.contains(&user) {
                        pb::Side::A
                    } else {
                        pb::Side::B
                    };
                    (0..25).map(move |_| (user, side))
                })
                .map(|(user, side)| app.place_ok(user, "busy", side, "1")),
        )
        .await;
    }
    let matched = Matcher::new(app.pool.clone())
        .match_group("busy", dec("1"))
        .await
        .expect("match");
    assert_eq!(matched, 800);
    app.settle_round("busy", pb::Side::A).await.expect("settle");
    let matches: Vec<Uuid> = pairs_of(&app, "busy")
        .await
        .iter()
        .map(|p| p.match_id)
        .collect();

    let (one, two, lone) = (settler(&app), settler(&app), settler(&app));
    let traffic = async {
        for &user in &winners {
            app.deposit(user, "50").await;
        }
        // Each winner's 40 bets of 1 in another round, while the payouts run.
        for _ in 0..4 {
            futures::future::join_all(
                winners
                    .iter()
                    .flat_map(|&user| (0..10).map(move |_| user))
                    .map(|user| app.place_ok(user, "next", pb::Side::A, "1")),
            )
            .await;
        }
    };
    let lone_jobs = futures::future::join_all(
        matches
            .iter()
            .step_by(10)
            .map(|&m| lone.settle(m))
            .collect::<Vec<_>>(),
    );
    let ((a, b), by_lone, ()) = tokio::time::timeout(Duration::from_secs(120), async {
        tokio::join!(
            async { tokio::join!(one.settle_round("busy"), two.settle_round("busy")) },
            lone_jobs,
            traffic,
        )
    })
    .await
    .expect("no deadlock");
    let lone_recorded: usize = by_lone
        .into_iter()
        .map(|r| usize::from(r.expect("lone job")))
        .sum();
    assert_eq!(
        a.expect("job one") + b.expect("job two") + lone_recorded,
        800,
        "each match recorded by exactly one job"
    );
    let (payouts, distinct, total): (i64, i64, Decimal) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT reference), coalesce(sum(amount), 0) \
         FROM ledger_entries WHERE kind = 'PAYOUT'",
    )
    .fetch_one(&app.pool)
    .await
    .expect("payouts");
    assert_eq!((payouts, distinct, total), (800, 800, dec("1600")));
    for &user in &winners {
        // 400 staked and 400 won twice over, 50 deposited, 40 staked again.
        assert_eq!(wallet_balance(&app, user).await, dec("810"), "user {user}");
    }
    for &user in &losers {
        assert_eq!(wallet_balance(&app, user).await, Decimal::ZERO);
    }
    assert_eq!(open_matches(&app, "busy").await, 0);
    let settled: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM bets WHERE round_id = 'busy' AND status = 'SETTLED'",
    )
    .fetch_one(&app.pool)
    .await
    .expect("count");
    assert_eq!(settled, 1600);
    app.assert_books_balanced().await;
    app.assert_audit_clean().await;
}

/// VoidRound and CloseRound racing a round job whose three batches are in
/// flight (stalled in their wallet calls): both are refused (SETTLED is
/// final) and owe nothing; the job then pays every match once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn attack14_void_and_close_racing_batches_in_flight_move_nothing() {
    let app = TestApp::spawn_roles(API_ONLY).await;
    let stake = "1";
    let pairs = matched_round(&app, "vr", 1, 600, stake).await;
    app.settle_round("vr", pb::Side::A).await.expect("settle");

    let (link, arrived, open) = stalled_link(app.addr).await;
    let stalled = SettleHandler::new(
        RoundStore::new(app.pool.clone()),
        wallet_client(&format!("http://{link}")),
    );
    let run = tokio::spawn(async move { stalled.settle_round("vr").await });
    arrived.await.expect("the job calls the wallet");
    tokio::time::sleep(Duration::from_millis(300)).await;

    let void = app.void_round("vr").await;
    assert_eq!(
        void.expect_err("a settled round is not voided").code(),
        Code::FailedPrecondition
    );
    let close = app
        .rounds()
        .close_round(authed(
            pb::CloseRoundRequest {
                round_id: "vr".into(),
            },
            &app.game_token(),
        ))
        .await;
    assert!(close.is_err(), "a settled round is not closed: {close:?}");
    let owed: i64 = sqlx::query_scalar("SELECT count(*) FROM wallet_commands")
        .fetch_one(&app.pool)
        .await
        .expect("count");
    assert_eq!(owed, 0, "nothing is owed back");

    open.send(true).expect("open the link");
    let recorded = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("the job ends")
        .expect("job task")
        .expect("the job pays");
    assert_eq!(recorded, 600);
    assert_paid_once(&app, &pairs, stake).await;
    app.assert_books_balanced().await;
    app.assert_audit_clean().await;
}

/// A settler's pool logged in as a role of its own, allowed what the round
/// store needs (so the test can take a privilege away mid-job).
async fn settler_pool(app: &TestApp, role: &str) -> sqlx::PgPool {
    for statement in [
        format!("CREATE ROLE {role} LOGIN"),
        format!("GRANT USAGE ON SCHEMA public TO {role}"),
        format!("GRANT SELECT ON rounds TO {role}"),
        format!("GRANT SELECT, UPDATE ON matches, bets TO {role}"),
    ] {
        sqlx::raw_sql(sqlx::AssertSqlSafe(statement))
            .execute(&app.pool)
            .await
            .expect("settler role");
    }
    let options = (*app.pool.connect_options()).clone().username(role);
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(8)
        .connect_with(options)
        .await
        .expect("settler pool")
}

/// A failure that is not an outage (the store answers an error: the job is
/// retried, an attempt counted) while sibling batches are in flight, on
/// the job's last attempt. 780 matches: pages of 256, 256, 256 and 12. The
/// three first pages are paid; their bookkeeping waits on row locks (lone
/// jobs', say); the first page's lock goes, it is recorded, the read of
/// the fourth page fails, and then the other locks go. The job dies, and the dead money must be what is
/// still unpaid: the fourth page's payouts. Sequentially (before the
/// pipelining) a read that failed came after every page before it had been
/// recorded, so the count was exact; now the failure drops the two paid
/// siblings before their bookkeeping, and the dead job's count takes their
/// payouts, made already, as money still owed (and their bets stay MATCHED
/// with their payouts made).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn attack14_a_failure_with_paid_siblings_in_flight_counts_paid_money_as_dead() {
    let app = TestApp::spawn_roles(API_ONLY).await;
    let stake = "1";
    let pairs = matched_round(&app, "dm", 1, 780, stake).await;
    app.settle_round("dm", pb::Side::A).await.expect("settle");
    let role = format!("attack14_{}", Uuid::new_v4().simple());
    let pool = settler_pool(&app, &role).await;

    // The job's delivery, on its last attempt.
    let settle = &app.queues.settle;
    let last = Queue::new(
        settle.client().clone(),
        &app.namespace,
        settle.name(),
        QueueSettings {
            max_attempts: 1,
            ..settle.settings().clone()
        },
    );
    let blocking = betting_queue::connect(&redis_url()).expect("redis");
    let job = fetch_job(&last, &blocking, "settler").await;
    assert_eq!(job.id, SettleRoundJob::new("dm").id());

    let lock = async |matched: Uuid| {
        let mut tx = app.pool.begin().await.expect("begin");
        sqlx::query("SELECT 1 FROM matches WHERE match_id = $1 FOR UPDATE")
            .bind(matched)
            .execute(&mut *tx)
            .await
            .expect("lock");
        tx
    };
    let first_page = lock(pairs[100].match_id).await;
    let second_page = lock(pairs[300].match_id).await;
    let third_page = lock(pairs[600].match_id).await;
    let run = {
        let settler = SettleHandler::new(
            RoundStore::new(pool.clone()),
            wallet_client(&format!("http://{}", app.addr)),
        );
        let job = job.clone();
        tokio::spawn(async move { settler.handle(&job).await })
    };
    eventually(
        "the first three pages are paid",
        Duration::from_secs(30),
        async || {
            let paid: i64 =
                sqlx::query_scalar("SELECT count(*) FROM ledger_entries WHERE kind = 'PAYOUT'")
                    .fetch_one(&app.pool)
                    .await
                    .expect("count");
            (paid == 768).then_some(())
        },
    )
    .await;
    // The fourth page's read will fail (not an outage).
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "REVOKE SELECT ON rounds FROM {role}"
    )))
    .execute(&app.pool)
    .await
    .expect("revoke");
    first_page.commit().await.expect("release the first page");
    // The first page is recorded and the fourth page's read fails; then the
    // other two pages' locks go too (a job that waits for its batches in
    // flight records them now).
    tokio::time::sleep(Duration::from_secs(1)).await;
    second_page.commit().await.expect("release");
    third_page.commit().await.expect("release");
    let result = tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("the job ends")
        .expect("job task");
    let Err(error @ JobError::Retry(_)) = &result else {
        panic!("the store's error is retried: {result:?}");
    };
    assert_eq!(
        last.fail("settler", &job, &error.to_string(), false)
            .await
            .expect("fail"),
        FailOutcome::Dead,
        "its last attempt"
    );
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "GRANT SELECT ON rounds TO {role}"
    )))
    .execute(&app.pool)
    .await
    .expect("grant");

    // Whatever the dropped bookkeeping does, it ends (rolled back).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let unpaid: Vec<Pair> = {
        let mut unpaid = Vec::new();
        for p in &pairs {
            if payouts_of(&app, p.match_id).await.is_empty() {
                unpaid.push(*p);
            }
        }
        unpaid
    };
    assert_eq!(unpaid.len(), 12, "the fourth page is unpaid");
    let paid_not_recorded: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM matches m WHERE m.round_id = 'dm' AND m.status = 'OPEN' \
         AND EXISTS (SELECT 1 FROM ledger_entries e \
                     WHERE e.kind = 'PAYOUT' AND e.reference = m.match_id::TEXT)",
    )
    .fetch_one(&app.pool)
    .await
    .expect("count");
    assert_eq!(
        betting_reconciler::stuck::dead_money(&app.pool, settle)
            .await
            .expect("dead money"),
        dec(stake) * Decimal::TWO * Decimal::from(unpaid.len()),
        "the dead job holds up the unpaid payouts only \
         ({paid_not_recorded} matches paid and left OPEN by the dropped batches)"
    );
    assert_eq!(paid_not_recorded, 0, "no paid match is left unrecorded");

    // An operator requeues it: the rest is paid, nothing twice.
    assert!(settle.retry_dead(&job.id).await.expect("requeue"));
    let again = fetch_job(settle, &blocking, "settler").await;
    settler(&app).handle(&again).await.expect("the rerun pays");
    assert_paid_once(&app, &pairs, stake).await;
    app.assert_books_balanced().await;
    app.assert_audit_clean().await;
}

/// The keyset cursor past matches that leave the partial index mid-job: a
/// round job of 800 matches (pages of 256, 256, 256, 32) reads its first
/// three pages and stalls in all three wallet calls; lone jobs pay and
/// record the matches on every page boundary (the last match of a page,
/// which is the cursor of the next read, and the first of the next page),
/// so they leave `matches_open_by_round_idx` before the job reads its
/// fourth page after one of them. Then the calls go through. Each match is
/// recorded by exactly one job and paid once; the fourth page is read from
/// the cursor whatever the index holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn attack14_lone_jobs_paying_the_page_boundaries_under_batches_in_flight_pay_once() {
    let app = TestApp::spawn_roles(API_ONLY).await;
    let stake = "1";
    let pairs = matched_round(&app, "edge", 1, 800, stake).await;
    app.settle_round("edge", pb::Side::A).await.expect("settle");

    let (link, arrived, open) = stalled_link(app.addr).await;
    let stalled = SettleHandler::new(
        RoundStore::new(app.pool.clone()),
        wallet_client(&format!("http://{link}")),
    );
    let run = tokio::spawn(async move { stalled.settle_round("edge").await });
    arrived.await.expect("the job calls the wallet");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let lone = settler(&app);
    let mut recorded = 0;
    for i in [0, 255, 256, 511, 512, 767, 768, 799] {
        assert!(lone.settle(pairs[i].match_id).await.expect("lone job"));
        recorded += 1;
    }
    open.send(true).expect("open the link");
    recorded += tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("the job ends")
        .expect("job task")
        .expect("the job pays");
    assert_eq!(recorded, 800, "each match recorded by exactly one job");
    assert_paid_once(&app, &pairs, stake).await;
    app.assert_books_balanced().await;
    app.assert_audit_clean().await;
}

/// Refunds of the winners racing pipelined batches: the two winners of 800
/// matches (four pages) also hold 40 unmatched bets in another round,
/// which is voided while two round jobs pay them; the refunds run at once,
/// each its own wallet movement on the same two wallet rows as every batch.
/// Nothing deadlocks; each payout is made once, each refund once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn attack14_refunds_of_the_winners_racing_pipelined_batches_each_move_once() {
    let app = TestApp::spawn_roles(API_ONLY).await;
    app.open_round("paid").await;
    app.open_round("voided").await;
    let (winners, losers) = ([1_i64, 2], [3_i64, 4]);
    for &user in &winners {
        app.genesis(user, dec("440")).await;
    }
    for &user in &losers {
        app.genesis(user, dec("400")).await;
    }
    for _ in 0..16 {
        futures::future::join_all(
            winners
                .iter()
                .chain(&losers)
                .flat_map(|&user| {
                    let side = if winners.contains(&user) {
                        pb::Side::A
                    } else {
                        pb::Side::B
                    };
                    (0..25).map(move |_| (user, side))
                })
                .map(|(user, side)| app.place_ok(user, "paid", side, "1")),
        )
        .await;
    }
    for _ in 0..4 {
        futures::future::join_all(
            winners
                .iter()
                .flat_map(|&user| (0..5).map(move |_| user))
                .map(|user| app.place_ok(user, "voided", pb::Side::A, "2")),
        )
        .await;
    }
    let matched = Matcher::new(app.pool.clone())
        .match_group("paid", dec("1"))
        .await
        .expect("match");
    assert_eq!(matched, 800);
    app.settle_round("paid", pb::Side::A).await.expect("settle");

    let refunder = betting_refunds::Refunder::new(
        betting_refunds::Outbox::new(app.pool.clone()),
        wallet_client(&format!("http://{}", app.addr)),
    );
    let refunds = async {
        app.void_round("voided").await.expect("void");
        let keys: Vec<String> = sqlx::query_scalar("SELECT idempotency_key FROM wallet_commands")
            .fetch_all(&app.pool)
            .await
            .expect("owed");
        assert_eq!(keys.len(), 40);
        futures::future::join_all(keys.iter().map(|key| refunder.execute_key(key))).await
    };
    let (one, two) = (settler(&app), settler(&app));
    let ((a, b), refunded) = tokio::time::timeout(Duration::from_secs(120), async {
        tokio::join!(
            async { tokio::join!(one.settle_round("paid"), two.settle_round("paid")) },
            refunds,
        )
    })
    .await
    .expect("no deadlock");
    assert_eq!(a.expect("job one") + b.expect("job two"), 800);
    for r in refunded {
        r.expect("refund");
    }
    let (payouts, distinct): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT reference) FROM ledger_entries WHERE kind = 'PAYOUT'",
    )
    .fetch_one(&app.pool)
    .await
    .expect("payouts");
    assert_eq!((payouts, distinct), (800, 800));
    let (refunds, distinct): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT idempotency_key) FROM ledger_entries WHERE kind = 'REFUND'",
    )
    .fetch_one(&app.pool)
    .await
    .expect("refunds");
    assert_eq!((refunds, distinct), (40, 40));
    for &user in &winners {
        // 440 - 400 - 40 staked, 800 won, 40 refunded.
        assert_eq!(wallet_balance(&app, user).await, dec("840"), "user {user}");
    }
    for &user in &losers {
        assert_eq!(wallet_balance(&app, user).await, Decimal::ZERO);
    }
    let refunded: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM bets WHERE round_id = 'voided' AND status = 'REFUNDED'",
    )
    .fetch_one(&app.pool)
    .await
    .expect("count");
    assert_eq!(refunded, 40);
    app.assert_books_balanced().await;
    app.assert_audit_clean().await;
}

/// Settles as the settler does, except that its first run panics inside a
/// batch task, which `settle_round` resumes on the job's task once it has
/// joined it (`std::panic::resume_unwind`).
struct PanicsOnce {
    settler: SettleHandler,
    panicked: std::sync::atomic::AtomicBool,
}

impl Handler for PanicsOnce {
    async fn handle(&self, job: &Job) -> Result<(), JobError> {
        if !self
            .panicked
            .swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            let mut batches = tokio::task::JoinSet::new();
            batches.spawn(async { panic!("attack14: a payout batch panics") });
            if let Some(Err(e)) = batches.join_next().await
                && e.is_panic()
            {
                std::panic::resume_unwind(e.into_panic());
            }
        }
        self.settler.handle(job).await
    }
}

/// A panic inside a batch task, under a real queue worker: the panic is
/// resumed on the job's task, which ends without an outcome recorded. The
/// job must run again (the round's money is owed, and no dead-letter entry
/// counts it): here within a few leases of a live consumer.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn attack14_a_panicking_batch_under_a_worker_leaves_its_job_to_run_again() {
    let app = TestApp::spawn_roles(API_ONLY).await;
    let stake = "1";
    let pairs = matched_round(&app, "pn", 1, 4, stake).await;
    app.settle_round("pn", pb::Side::A).await.expect("settle");
    let settle = &app.queues.settle;
    let quick = Queue::new(
        settle.client().clone(),
        &app.namespace,
        settle.name(),
        QueueSettings {
            visibility_timeout: Duration::from_secs(2),
            ..settle.settings().clone()
        },
    );
    let handler = PanicsOnce {
        settler: settler(&app),
        panicked: std::sync::atomic::AtomicBool::new(false),
    };
    crate::attack::run_worker(
        quick.clone(),
        handler,
        Duration::from_secs(20),
        async || {
            open_matches(&app, "pn").await == 0
                && quick
                    .stats()
                    .await
                    .is_ok_and(|s| (s.waiting, s.delayed, s.in_flight, s.dead) == (0, 0, 0, 0))
        },
    )
    .await;
    let stats = quick.stats().await.expect("stats");
    assert_eq!(
        (stats.waiting, stats.delayed, stats.in_flight, stats.dead),
        (0, 0, 0, 0),
        "the job ran again and was acked: {stats:?}"
    );
    assert_paid_once(&app, &pairs, stake).await;
    app.assert_books_balanced().await;
    app.assert_audit_clean().await;
}
