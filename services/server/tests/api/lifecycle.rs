//! Whole rounds through the API and the workers, and the races between them.

use std::time::Duration;

use betting_api::{pb, pb_internal as pbi};
use betting_bets::matcher::Matcher;
use futures::future::join_all;
use tonic::Code;
use uuid::Uuid;

use betting_test_kit::{API_ONLY, TestApp, authed, dec, eventually, expect_code, reason};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_whole_round_pays_winners_and_refunds_the_rest() {
    let app = TestApp::spawn().await;
    for user in [1, 2, 3] {
        app.deposit(user, "100").await;
    }
    app.open_round("r").await;
    let a = app.place_ok(1, "r", pb::Side::A, "10").await;
    let b = app.place_ok(2, "r", pb::Side::B, "10").await;
    // Another stake: nobody to match it.
    let lonely = app.place_ok(3, "r", pb::Side::A, "7").await;
    let a = app.wait_for_bet(1, &a.bet_id, pb::BetStatus::Matched).await;
    let b = app.wait_for_bet(2, &b.bet_id, pb::BetStatus::Matched).await;
    assert_eq!(a.match_id, b.match_id);
    assert!(!a.match_id.is_empty());

    let round = app.settle_round("r", pb::Side::A).await.expect("settle");
    assert_eq!(round.status, pb::RoundStatus::Settled as i32);
    assert_eq!(round.winning_side, Some(pb::Side::A as i32));
    let a = app.wait_for_bet(1, &a.bet_id, pb::BetStatus::Settled).await;
    let b = app.wait_for_bet(2, &b.bet_id, pb::BetStatus::Settled).await;
    let lonely = app
        .wait_for_bet(3, &lonely.bet_id, pb::BetStatus::Refunded)
        .await;
    assert_eq!(
        (a.result, a.payout.as_deref()),
        (Some(pb::BetResult::Won as i32), Some("20"))
    );
    assert_eq!(
        (b.result, b.payout.as_deref()),
        (Some(pb::BetResult::Lost as i32), Some("0"))
    );
    assert_eq!(
        lonely.refund_reason,
        Some(pb::RefundReason::RoundClosed as i32)
    );

    let round = app.wait_for_round_done("r").await;
    let stats = round.stats.expect("stats");
    assert_eq!((stats.settled_bets, stats.refunded_bets), (2, 1));
    assert_eq!((stats.matches, stats.settled_matches), (1, 1));
    assert_eq!(stats.total_staked, "27");
    assert_eq!(stats.total_paid_out, "20");
    assert_eq!(stats.total_refunded, "7");
    assert_eq!(app.balance(1).await, dec("110"));
    assert_eq!(app.balance(2).await, dec("90"));
    assert_eq!(app.balance(3).await, dec("100"));
    assert_eq!(app.escrow().await, dec("0"));
    app.assert_books_balanced().await;
    app.assert_audit_clean().await;

    // Settling again with the same outcome is a no-op; another outcome is refused.
    app.settle_round("r", pb::Side::A)
        .await
        .expect("same outcome again");
    let status = expect_code(
        app.settle_round("r", pb::Side::B).await,
        Code::FailedPrecondition,
    );
    assert_eq!(reason(&status), "ROUND_SETTLED_OTHERWISE");
    expect_code(app.void_round("r").await, Code::FailedPrecondition);
    assert_eq!(app.balance(1).await, dec("110"));

    // The admin RPC agrees with the audit.
    let audit = app
        .admin()
        .run_audit(authed(
            pb::RunAuditRequest {},
            &app.token(0, betting_auth::Role::Admin),
        ))
        .await
        .expect("audit rpc")
        .into_inner();
    assert!(audit.checks_run >= 7);
    // Only admins audit: none of the roles that move money or run rounds.
    for token in [app.cashier_token(), app.game_token(), app.service_token()] {
        expect_code(
            app.admin()
                .run_audit(authed(pb::RunAuditRequest {}, &token))
                .await,
            Code::PermissionDenied,
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn voiding_refunds_matched_and_unmatched_bets() {
    let app = TestApp::spawn().await;
    for user in [1, 2, 3] {
        app.deposit(user, "50").await;
    }
    app.open_round("v").await;
    let a = app.place_ok(1, "v", pb::Side::A, "20").await;
    let b = app.place_ok(2, "v", pb::Side::B, "20").await;
    app.wait_for_bet(1, &a.bet_id, pb::BetStatus::Matched).await;
    let c = app.place_ok(3, "v", pb::Side::B, "5").await;
    let round = app.void_round("v").await.expect("void");
    assert_eq!(round.status, pb::RoundStatus::Voided as i32);
    assert_eq!(round.void_reason, "game server crashed");
    for (user, bet) in [(1, &a), (2, &b), (3, &c)] {
        let bet = app
            .wait_for_bet(user, &bet.bet_id, pb::BetStatus::Refunded)
            .await;
        assert_eq!(
            bet.refund_reason,
            Some(pb::RefundReason::RoundVoided as i32)
        );
    }
    app.wait_for_round_done("v").await;
    for user in [1, 2, 3] {
        assert_eq!(app.balance(user).await, dec("50"));
    }
    app.void_round("v").await.expect("voiding again is a no-op");
    expect_code(
        app.settle_round("v", pb::Side::A).await,
        Code::FailedPrecondition,
    );
    app.assert_audit_clean().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn closing_refunds_unmatched_bets_and_stops_new_ones() {
    let app = TestApp::spawn().await;
    app.deposit(1, "10").await;
    app.open_round("c").await;
    let bet = app.place_ok(1, "c", pb::Side::A, "10").await;
    app.rounds()
        .close_round(authed(
            pb::CloseRoundRequest {
                round_id: "c".into(),
            },
            &app.game_token(),
        ))
        .await
        .expect("close");
    let bet = app
        .wait_for_bet(1, &bet.bet_id, pb::BetStatus::Refunded)
        .await;
    assert_eq!(
        bet.refund_reason,
        Some(pb::RefundReason::RoundClosed as i32)
    );
    app.wait_for_round_done("c").await;
    assert_eq!(app.balance(1).await, dec("10"));
    expect_code(
        app.place(1, "c", pb::Side::A, "1", "late").await,
        Code::FailedPrecondition,
    );
    app.assert_audit_clean().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_bet_nobody_takes_is_refunded_after_the_match_timeout() {
    let app = TestApp::spawn().await;
    app.deposit(1, "10").await;
    app.open_round("t").await;
    let bet = app.place_ok(1, "t", pb::Side::A, "4").await;
    // A pass finds nothing to do while the app's own reconciler holds the
    // pass lock, and skips a bet the matcher holds right now (SKIP LOCKED):
    // run passes until one has run and the bet was free, counting refunds.
    let reconciler = app.reconciler_with(betting_reconciler::ReconcilerSettings {
        match_timeout: Duration::ZERO,
        ..Default::default()
    });
    // Every pass before the one that timed the bet out counted none.
    let timed_out = eventually(
        "a pass times the bet out",
        Duration::from_secs(5),
        async || {
            let report = reconciler.pass().await.expect("pass");
            (report.timed_out > 0).then_some(report.timed_out)
        },
    )
    .await;
    assert_eq!(timed_out, 1);
    let bet = app
        .wait_for_bet(1, &bet.bet_id, pb::BetStatus::Refunded)
        .await;
    assert_eq!(
        bet.refund_reason,
        Some(pb::RefundReason::MatchTimeout as i32)
    );
    app.wait_for_round_done("t").await;
    assert_eq!(app.balance(1).await, dec("10"));
    app.assert_audit_clean().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn users_are_never_matched_against_themselves_nor_unequal_stakes() {
    let app = TestApp::spawn().await;
    app.deposit(1, "100").await;
    app.deposit(2, "100").await;
    app.open_round("s").await;
    let a = app.place_ok(1, "s", pb::Side::A, "10").await;
    let b_self = app.place_ok(1, "s", pb::Side::B, "10").await;
    let b_other_amount = app.place_ok(2, "s", pb::Side::B, "11").await;
    Matcher::new(app.pool.clone())
        .match_bet(a.bet_id.parse().expect("uuid"))
        .await
        .expect("match");
    for (user, bet) in [(1, &a), (1, &b_self), (2, &b_other_amount)] {
        assert_eq!(
            app.bet(user, &bet.bet_id).await.status,
            pb::BetStatus::Pending as i32
        );
    }
    let b = app.place_ok(2, "s", pb::Side::B, "10").await;
    let b = app.wait_for_bet(2, &b.bet_id, pb::BetStatus::Matched).await;
    let a = app.wait_for_bet(1, &a.bet_id, pb::BetStatus::Matched).await;
    assert_eq!(a.match_id, b.match_id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancel_racing_the_matcher_has_exactly_one_winner() {
    let app = TestApp::spawn_roles(API_ONLY).await;
    app.deposit(1, "1000").await;
    app.deposit(2, "1000").await;
    app.open_round("race").await;
    let matcher = Matcher::new(app.pool.clone());
    let (mut cancelled, mut matched) = (0, 0);
    for _ in 0..30 {
        let a = app.place_ok(1, "race", pb::Side::A, "5").await;
        let b = app.place_ok(2, "race", pb::Side::B, "5").await;
        let a_id: Uuid = a.bet_id.parse().expect("uuid");
        let mut bets_client = app.bets();
        let cancel = bets_client.cancel_bet(authed(
            pb::CancelBetRequest {
                bet_id: a.bet_id.clone(),
            },
            &app.player(1),
        ));
        let (cancel, made) = tokio::join!(cancel, matcher.match_bet(a_id));
        let made = made.expect("matcher");
        let a_now = app.bet(1, &a.bet_id).await;
        let b_now = app.bet(2, &b.bet_id).await;
        match cancel {
            Ok(_) => {
                cancelled += 1;
                assert_eq!(made, 0);
                assert_eq!(a_now.status, pb::BetStatus::Refunded as i32);
                assert_eq!(b_now.status, pb::BetStatus::Pending as i32);
                // Leave b for the next iteration's a.
                app.bets()
                    .cancel_bet(authed(
                        pb::CancelBetRequest {
                            bet_id: b.bet_id.clone(),
                        },
                        &app.player(2),
                    ))
                    .await
                    .expect("cancel b");
            }
            Err(status) => {
                matched += 1;
                assert_eq!(status.code(), Code::FailedPrecondition);
                assert_eq!(made, 1);
                assert_eq!(a_now.status, pb::BetStatus::Matched as i32);
                assert_eq!(b_now.status, pb::BetStatus::Matched as i32);
            }
        }
    }
    assert_eq!(cancelled + matched, 30);
    app.assert_books_balanced().await;
    app.assert_audit_clean().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_matchers_on_one_round_match_every_bet_once() {
    let app = TestApp::spawn_roles(API_ONLY).await;
    for user in 1..=8 {
        app.deposit(user, "1000").await;
    }
    let one = Matcher::new(app.pool.clone());
    let two = Matcher::new(app.pool.clone());
    for iteration in 0..5 {
        let round = format!("m{iteration}");
        app.open_round(&round).await;
        let mut bets = Vec::new();
        for i in 0..24_i64 {
            let user = i % 8 + 1;
            let side = if i % 2 == 0 { pb::Side::A } else { pb::Side::B };
            bets.push(app.place_ok(user, &round, side, "3").await);
        }
        // Every bet's job runs at once, split between two matchers.
        let runs = bets.iter().enumerate().map(|(i, bet)| {
            let matcher = if i % 2 == 0 { one.clone() } else { two.clone() };
            let id: Uuid = bet.bet_id.parse().expect("uuid");
            async move { matcher.match_bet(id).await.expect("match") }
        });
        let made: usize = join_all(runs).await.into_iter().sum();
        assert_eq!(made, 12, "every pair made exactly once");
    }
    let unmatched: i64 = sqlx::query_scalar("SELECT count(*) FROM bets WHERE status = 'PENDING'")
        .fetch_one(&app.pool)
        .await
        .expect("count");
    assert_eq!(unmatched, 0);
    let wrong: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM matches m JOIN bets a ON a.bet_id = m.bet_a_id \
         JOIN bets b ON b.bet_id = m.bet_b_id \
         WHERE a.user_id = b.user_id OR a.side = b.side OR a.amount <> b.amount",
    )
    .fetch_one(&app.pool)
    .await
    .expect("count");
    assert_eq!(wrong, 0);
    app.assert_audit_clean().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_same_settle_job_on_two_settlers_pays_once() {
    let app = TestApp::spawn_roles(&[
        betting_config::ProcessRole::Wallet,
        betting_config::ProcessRole::Betting,
        betting_config::ProcessRole::Settlement,
        betting_config::ProcessRole::Matcher,
    ])
    .await;
    app.deposit(1, "1000").await;
    app.deposit(2, "1000").await;
    app.open_round("p").await;
    let mut pairs = Vec::new();
    for _ in 0..15 {
        let a = app.place_ok(1, "p", pb::Side::A, "2").await;
        let b = app.place_ok(2, "p", pb::Side::B, "2").await;
        pairs.push((a, b));
    }
    for (a, _) in &pairs {
        app.wait_for_bet(1, &a.bet_id, pb::BetStatus::Matched).await;
    }
    app.settle_round("p", pb::Side::B).await.expect("settle");
    let wallet = || {
        betting_wallet_client::WalletClient::new(
            &format!("http://{}", app.channel_addr()),
            betting_auth::ServiceCredentials::new(betting_auth::TokenMinter::new(
                betting_test_kit::SECRET.as_bytes(),
                None,
                None,
            )),
        )
        .expect("client")
    };
    let settler_one = betting_settlement::settler::SettleHandler::new(
        betting_settlement::RoundStore::new(app.pool.clone()),
        wallet(),
    );
    let settler_two = betting_settlement::settler::SettleHandler::new(
        betting_settlement::RoundStore::new(app.pool.clone()),
        wallet(),
    );
    for (a, _) in &pairs {
        let match_id: Uuid = app.bet(1, &a.bet_id).await.match_id.parse().expect("uuid");
        let (one, two) = tokio::join!(settler_one.settle(match_id), settler_two.settle(match_id));
        let recorded = [one.expect("settler one"), two.expect("settler two")];
        assert_eq!(recorded.iter().filter(|r| **r).count(), 1, "recorded once");
    }
    let payouts: i64 =
        sqlx::query_scalar("SELECT count(*) FROM ledger_entries WHERE kind = 'PAYOUT'")
            .fetch_one(&app.pool)
            .await
            .expect("count");
    assert_eq!(payouts, 15);
    assert_eq!(app.balance(2).await, dec("1030"));
    assert_eq!(app.balance(1).await, dec("970"));
    app.assert_audit_clean().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn settle_racing_void_has_exactly_one_winner() {
    let app = TestApp::spawn().await;
    app.deposit(1, "1000").await;
    app.deposit(2, "1000").await;
    let (mut settled, mut voided) = (0, 0);
    for i in 0..10 {
        let round = format!("sv-{i}");
        app.open_round(&round).await;
        let a = app.place_ok(1, &round, pb::Side::A, "10").await;
        app.place_ok(2, &round, pb::Side::B, "10").await;
        app.wait_for_bet(1, &a.bet_id, pb::BetStatus::Matched).await;
        let (s, v) = tokio::join!(
            app.settle_round(&round, pb::Side::A),
            app.void_round(&round)
        );
        match (s, v) {
            (Ok(_), Err(e)) => {
                assert_eq!(e.code(), Code::FailedPrecondition);
                settled += 1;
            }
            (Err(e), Ok(_)) => {
                assert_eq!(e.code(), Code::FailedPrecondition);
                voided += 1;
            }
            other => panic!("both or neither won: {other:?}"),
        }
        app.wait_for_round_done(&round).await;
    }
    assert_eq!(settled + voided, 10);
    // Each settled round moved 10 from user 2 to user 1.
    assert_eq!(
        app.balance(1).await,
        dec("1000") + dec("10") * rust_decimal::Decimal::from(settled)
    );
    assert_eq!(
        app.balance(2).await,
        dec("1000") - dec("10") * rust_decimal::Decimal::from(settled)
    );
    app.assert_audit_clean().await;
}

#[tokio::test]
async fn the_wallet_refuses_to_refund_a_paid_bet_or_pay_a_refunded_one() {
    let app = TestApp::spawn().await;
    app.deposit(1, "100").await;
    app.deposit(2, "100").await;
    app.open_round("g").await;
    let a = app.place_ok(1, "g", pb::Side::A, "10").await;
    let b = app.place_ok(2, "g", pb::Side::B, "10").await;
    let a = app.wait_for_bet(1, &a.bet_id, pb::BetStatus::Matched).await;
    app.settle_round("g", pb::Side::A).await.expect("settle");
    app.wait_for_bet(1, &a.bet_id, pb::BetStatus::Settled).await;
    // A refund of the paid bet, straight to the wallet, is refused.
    for (user, bet) in [(1, &a), (2, &b)] {
        let status = expect_code(
            app.stakes()
                .refund_stake(authed(
                    pbi::RefundStakeRequest {
                        user_id: user,
                        amount: "10".into(),
                        idempotency_key: format!("REFUND:{}", bet.bet_id),
                        bet_id: bet.bet_id.clone(),
                    },
                    &app.service_token(),
                ))
                .await,
            Code::FailedPrecondition,
        );
        assert_eq!(reason(&status), "ALREADY_PAID");
    }
    // Paying more than twice the stake, or someone outside the match, is refused.
    let status = expect_code(
        app.stakes()
            .pay_winnings(authed(
                pbi::PayWinningsRequest {
                    user_id: 3,
                    amount: "20".into(),
                    idempotency_key: format!("SETTLE:{}", Uuid::now_v7()),
                    match_id: Uuid::now_v7().to_string(),
                    bet_ids: vec![Uuid::now_v7().to_string(), Uuid::now_v7().to_string()],
                },
                &app.service_token(),
            ))
            .await,
        Code::InvalidArgument,
    );
    assert_eq!(betting_test_kit::bad_fields(&status), ["idempotency_key"]);
    assert_eq!(app.balance(1).await, dec("110"));
    app.assert_audit_clean().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_user_with_many_bets_cannot_hide_a_pair_from_the_matcher() {
    let app = TestApp::spawn_roles(API_ONLY).await;
    app.deposit(1, "1000").await;
    app.deposit(2, "10").await;
    app.open_round("crowded").await;
    // User 1 fills both sides, more than a (small) batch holds; they cannot match themselves.
    for _ in 0..12 {
        app.place_ok(1, "crowded", pb::Side::A, "1").await;
        app.place_ok(1, "crowded", pb::Side::B, "1").await;
    }
    // The newest bet, by someone else, behind all of them.
    let late = app.place_ok(2, "crowded", pb::Side::B, "1").await;
    let matcher = Matcher::new(app.pool.clone()).with_batch(8, 3);
    let made = matcher
        .match_bet(late.bet_id.parse().expect("uuid"))
        .await
        .expect("match");
    assert_eq!(made, 1);
    assert_eq!(
        app.bet(2, &late.bet_id).await.status,
        pb::BetStatus::Matched as i32
    );
    app.assert_audit_clean().await;
}

/// A match job that finds a run of its group waiting for the round's lock
/// (not yet read) is done at once: that run reads after the job's bets
/// were committed and matches them. A job of another group still runs
/// itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_match_job_behind_a_waiting_run_of_its_group_is_done_by_that_run() {
    let app = TestApp::spawn_roles(API_ONLY).await;
    for user in 1..=6 {
        app.deposit(user, "100").await;
    }
    app.open_round("r").await;
    let first = app.place_ok(1, "r", pb::Side::A, "10").await;
    let first_b = app.place_ok(2, "r", pb::Side::B, "10").await;
    let matcher = Matcher::new(app.pool.clone());

    // The round's lock held, as a transaction of another matcher would.
    let mut holder = app.pool.begin().await.expect("begin");
    betting_db::lock_round(&mut holder, "r")
        .await
        .expect("hold the round's lock");
    let waiting_run = {
        let matcher = matcher.clone();
        let bet: Uuid = first.bet_id.parse().expect("uuid");
        tokio::spawn(async move { matcher.match_bet(bet).await })
    };
    // It waits for the lock (registered before it).
    crate::rows::advisory_waiters(&app.pool, 1).await;

    // Bets of the same group, committed now; their job is done at once.
    let second = app.place_ok(3, "r", pb::Side::A, "10").await;
    let second_b = app.place_ok(4, "r", pb::Side::B, "10").await;
    let bet: Uuid = second.bet_id.parse().expect("uuid");
    let done = tokio::time::timeout(Duration::from_secs(5), matcher.match_bet(bet))
        .await
        .expect("the job must not wait for the round's lock")
        .expect("match job");
    assert_eq!(done, 0, "it matched nothing itself");

    // Another stake is another group: its job waits for the lock.
    let other = app.place_ok(5, "r", pb::Side::A, "7").await;
    let other_b = app.place_ok(6, "r", pb::Side::B, "7").await;
    let other_run = {
        let matcher = matcher.clone();
        let bet: Uuid = other.bet_id.parse().expect("uuid");
        tokio::spawn(async move { matcher.match_bet(bet).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !other_run.is_finished(),
        "another group's job ran past the held lock"
    );

    holder.commit().await.expect("release the round's lock");
    let pairs = waiting_run.await.expect("join").expect("waiting run");
    assert_eq!(
        pairs, 2,
        "the waiting run matched its own pair and the second"
    );
    assert_eq!(other_run.await.expect("join").expect("other run"), 1);
    for (user, bet) in [
        (1, &first),
        (2, &first_b),
        (3, &second),
        (4, &second_b),
        (5, &other),
        (6, &other_b),
    ] {
        let bet = app.bet(user, &bet.bet_id).await;
        assert_eq!(bet.status, pb::BetStatus::Matched as i32, "{bet:?}");
    }
    app.assert_audit_clean().await;
}
