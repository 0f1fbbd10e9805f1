//! Random sequences of operations — deposits, bets, cancels, closes, settles,
//! voids and crashes — always end in balanced books and a clean audit.

use std::time::Duration;

use betting_api::pb;
use betting_bets::recovery::RecoverySettings;
use betting_reconciler::ReconcilerSettings;
use proptest::prelude::*;
use rust_decimal::Decimal;

use betting_test_kit::{TestApp, authed, dec};

const USERS: i64 = 4;
const ROUNDS: usize = 3;

#[derive(Debug, Clone)]
enum Op {
    Deposit {
        user: i64,
        amount: u32,
    },
    Place {
        user: i64,
        round: usize,
        side_a: bool,
        amount: u32,
    },
    /// A PlaceBet whose process "dies" right after the stake is taken.
    CrashingPlace {
        user: i64,
        round: usize,
        side_a: bool,
        amount: u32,
    },
    Cancel {
        nth: usize,
    },
    Close {
        round: usize,
    },
    Settle {
        round: usize,
        side_a: bool,
    },
    Void {
        round: usize,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let user = 1..=USERS;
    let round = 0..ROUNDS;
    // Few distinct stakes, so that bets do match.
    let stake = prop_oneof![Just(1_u32), Just(2), Just(5)];
    prop_oneof![
        1 => (user.clone(), 1..50_u32).prop_map(|(user, amount)| Op::Deposit { user, amount }),
        10 => (user.clone(), round.clone(), any::<bool>(), stake.clone())
            .prop_map(|(user, round, side_a, amount)| Op::Place { user, round, side_a, amount }),
        1 => (user, round.clone(), any::<bool>(), stake)
            .prop_map(|(user, round, side_a, amount)| Op::CrashingPlace { user, round, side_a, amount }),
        2 => (0..20_usize).prop_map(|nth| Op::Cancel { nth }),
        1 => round.clone().prop_map(|round| Op::Close { round }),
        1 => (round.clone(), any::<bool>()).prop_map(|(round, side_a)| Op::Settle { round, side_a }),
        1 => round.prop_map(|round| Op::Void { round }),
    ]
}

fn side(a: bool) -> pb::Side {
    if a { pb::Side::A } else { pb::Side::B }
}

async fn run(ops: Vec<Op>) {
    let app = TestApp::spawn().await;
    let rounds: Vec<String> = (0..ROUNDS).map(|i| format!("p{i}")).collect();
    for r in &rounds {
        app.open_round(r).await;
    }
    // Everyone starts with something to bet.
    let mut deposited = Decimal::ZERO;
    for user in 1..=USERS {
        app.deposit(user, "20").await;
        deposited += dec("20");
    }
    let mut placed: Vec<(i64, String)> = Vec::new();
    for (i, op) in ops.into_iter().enumerate() {
        match op {
            Op::Deposit { user, amount } => {
                app.deposit(user, &amount.to_string()).await;
                deposited += Decimal::from(amount);
            }
            Op::Place {
                user,
                round,
                side_a,
                amount,
            } => {
                // Refusals (funds, closed rounds) are part of the game.
                if let Ok(r) = app
                    .place(
                        user,
                        &rounds[round],
                        side(side_a),
                        &amount.to_string(),
                        &format!("k{i}"),
                    )
                    .await
                {
                    placed.push((user, r.into_inner().bet.expect("bet").bet_id));
                }
            }
            Op::CrashingPlace {
                user,
                round,
                side_a,
                amount,
            } => {
                app.betting().faults().set_fail_after_stake(true);
                let _ = app
                    .place(
                        user,
                        &rounds[round],
                        side(side_a),
                        &amount.to_string(),
                        &format!("k{i}"),
                    )
                    .await;
                app.betting().faults().set_fail_after_stake(false);
            }
            Op::Cancel { nth } => {
                if let Some((user, bet)) = placed.get(nth) {
                    let _ = app
                        .bets()
                        .cancel_bet(authed(
                            pb::CancelBetRequest {
                                bet_id: bet.clone(),
                            },
                            &app.player(*user),
                        ))
                        .await;
                }
            }
            Op::Close { round } => {
                let _ = app
                    .rounds()
                    .close_round(authed(
                        pb::CloseRoundRequest {
                            round_id: rounds[round].clone(),
                        },
                        &app.game_token(),
                    ))
                    .await;
            }
            Op::Settle { round, side_a } => {
                let _ = app.settle_round(&rounds[round], side(side_a)).await;
            }
            Op::Void { round } => {
                let _ = app.void_round(&rounds[round]).await;
            }
        }
    }
    // Quiesce: recover crashed bets, let the workers finish, then end every round.
    app.betting()
        .recover(&RecoverySettings {
            placing_grace: Duration::ZERO,
            ..Default::default()
        })
        .await;
    let reconciler = app.reconciler_with(ReconcilerSettings {
        sweep_after: Duration::ZERO,
        retry_after: Duration::ZERO,
        ..Default::default()
    });
    reconciler.pass().await.expect("reconcile");
    for r in &rounds {
        let _ = app.settle_round(r, pb::Side::A).await;
    }
    reconciler.pass().await.expect("reconcile");
    for r in &rounds {
        app.wait_for_round_done(r).await;
    }
    app.assert_books_balanced().await;
    app.assert_audit_clean().await;
    // Money is conserved: what users hold plus what escrow holds is what came in.
    let held: Option<Decimal> = sqlx::query_scalar("SELECT sum(balance) FROM wallets")
        .fetch_one(&app.pool)
        .await
        .expect("sum");
    assert_eq!(held.unwrap_or_default() + app.escrow().await, deposited);
    assert_eq!(
        app.escrow().await,
        dec("0"),
        "every round ended, so escrow is empty"
    );
    let (bets, settled): (i64, i64) =
        sqlx::query_as("SELECT count(*), count(*) FILTER (WHERE status = 'SETTLED') FROM bets")
            .fetch_one(&app.pool)
            .await
            .expect("counts");
    if std::env::var("TEST_LOG").is_ok() {
        eprintln!("case: {bets} bets, {settled} settled");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    fn any_sequence_ends_with_clean_books(ops in proptest::collection::vec(op(), 1..40)) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(run(ops));
    }
}
