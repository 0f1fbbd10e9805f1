//! The audit catches what it claims to. A whole history made through the API
//! audits clean; then each case breaks one fact in the database, the way only
//! someone with superuser access could (append-only triggers and foreign keys
//! off), and the check named for that fact must report it. Other checks may
//! report the same damage too: these tests only ask that the named one does.

use std::{collections::HashSet, time::Duration};

use betting_api::pb;
use betting_audit::{AuditReport, AuditSettings};
use sqlx::AssertSqlSafe;

use betting_test_kit::{TestApp, authed, eventually};

/// A history with every kind of movement, left quiet and audited clean:
/// users 1-3 deposit 100 and user 3 withdraws 20; in round "s" user 1 (A, 10)
/// and user 2 (B, 10) are matched and A wins, while user 3's bet (A, 7) is
/// cancelled; round "v" is voided with a matched pair and a lone bet in it;
/// round "o" stays open with a PENDING bet of user 3 on each side (4 each,
/// never matched: same user).
struct Books {
    app: TestApp,
    /// User 1's winning bet in round "s".
    winner: pb::Bet,
    /// User 3's cancelled, refunded bet in round "s".
    cancelled: pb::Bet,
    /// User 3's PENDING bets in the open round "o".
    open_a: pb::Bet,
    open_b: pb::Bet,
}

impl Books {
    async fn build() -> Self {
        let app = TestApp::spawn().await;
        for user in [1, 2, 3] {
            app.deposit(user, "100").await;
        }
        app.wallet()
            .withdraw(authed(
                pb::WithdrawRequest {
                    user_id: 3,
                    amount: "20".into(),
                    idempotency_key: "withdraw-3".into(),
                    reference: String::new(),
                },
                &app.cashier_token(),
            ))
            .await
            .expect("withdraw");

        app.open_round("s").await;
        let winner = app.place_ok(1, "s", pb::Side::A, "10").await;
        let loser = app.place_ok(2, "s", pb::Side::B, "10").await;
        // Nobody bets 7 on B: it stays PENDING until cancelled.
        let cancelled = app.place_ok(3, "s", pb::Side::A, "7").await;
        app.bets()
            .cancel_bet(authed(
                pb::CancelBetRequest {
                    bet_id: cancelled.bet_id.clone(),
                },
                &app.player(3),
            ))
            .await
            .expect("cancel");
        app.wait_for_bet(1, &winner.bet_id, pb::BetStatus::Matched)
            .await;
        app.settle_round("s", pb::Side::A).await.expect("settle");
        let winner = app
            .wait_for_bet(1, &winner.bet_id, pb::BetStatus::Settled)
            .await;
        app.wait_for_bet(2, &loser.bet_id, pb::BetStatus::Settled)
            .await;
        let cancelled = app
            .wait_for_bet(3, &cancelled.bet_id, pb::BetStatus::Refunded)
            .await;

        app.open_round("v").await;
        let voided = [
            (1, app.place_ok(1, "v", pb::Side::A, "5").await),
            (2, app.place_ok(2, "v", pb::Side::B, "5").await),
            (3, app.place_ok(3, "v", pb::Side::B, "3").await),
        ];
        app.wait_for_bet(1, &voided[0].1.bet_id, pb::BetStatus::Matched)
            .await;
        app.void_round("v").await.expect("void");
        for (user, bet) in &voided {
            app.wait_for_bet(*user, &bet.bet_id, pb::BetStatus::Refunded)
                .await;
        }

        app.open_round("o").await;
        let open_a = app.place_ok(3, "o", pb::Side::A, "4").await;
        let open_b = app.place_ok(3, "o", pb::Side::B, "4").await;

        for round in ["s", "v", "o"] {
            app.wait_for_round_done(round).await;
        }
        wait_until_quiet(&app).await;
        app.assert_audit_clean().await;
        Self {
            app,
            winner,
            cancelled,
            open_a,
            open_b,
        }
    }

    /// Runs `statements` in one transaction with triggers and foreign keys
    /// off (`session_replication_role = replica`), as a superuser could.
    async fn corrupt(&self, statements: &[String]) {
        let mut tx = self.app.pool.begin().await.expect("begin");
        sqlx::query("SET LOCAL session_replication_role = replica")
            .execute(&mut *tx)
            .await
            .expect("replica role");
        for statement in statements {
            sqlx::query(AssertSqlSafe(statement.as_str()))
                .execute(&mut *tx)
                .await
                .unwrap_or_else(|e| panic!("{statement}: {e}"));
        }
        tx.commit().await.expect("commit");
    }

    async fn audit(&self) -> AuditReport {
        betting_audit::run(
            &self.app.pool,
            &AuditSettings {
                quiescence: Duration::ZERO,
                ..AuditSettings::default()
            },
        )
        .await
        .expect("audit runs")
    }
}

/// Waits until no job is waiting, delayed or in flight in any queue.
async fn wait_until_quiet(app: &TestApp) {
    let queues = [&app.queues.matches, &app.queues.settle, &app.queues.refund];
    eventually("the queues emptied", Duration::from_secs(15), async || {
        let mut busy = 0;
        for queue in queues {
            let stats = queue.stats().await.expect("queue stats");
            assert_eq!(stats.dead, 0, "a job died: {stats:?}");
            busy += stats.waiting + stats.delayed + stats.in_flight;
        }
        (busy == 0).then_some(())
    })
    .await;
}

/// One way to break the books, and the check that must notice.
#[derive(Debug, Clone, Copy)]
enum Case {
    WalletBalanceChanged,
    WalletFromNowhere,
    RefundWithoutStake,
    MoreWithdrawnThanDeposited,
    StakeDiffersFromBet,
    KeyUsedTwice,
    StakeTakenTwice,
    PaidTheLoser,
    PairLeftUnmatched,
    BetPendingTooLong,
    BalanceAfterRewritten,
    RefundLost,
    RoundUnsettledAfterPayout,
    RejectedAfterStake,
    MatchNamesAnotherBet,
    BetNamesNoMatch,
    MatchSidesSwapped,
    MatchOfOneUser,
    MatchStatusDisagrees,
}

impl Case {
    /// The check that must report this case.
    fn check(self) -> &'static str {
        match self {
            Case::WalletBalanceChanged => "WALLET_LEDGER_MISMATCH",
            Case::WalletFromNowhere
            | Case::RefundWithoutStake
            | Case::MoreWithdrawnThanDeposited => "ACCOUNTS_NOT_ZERO",
            Case::StakeDiffersFromBet => "ESCROW_MISMATCH",
            Case::KeyUsedTwice | Case::StakeTakenTwice => "DUPLICATE_KEY",
            Case::PaidTheLoser => "PAYOUT_WRONG",
            Case::PairLeftUnmatched => "MATCHABLE_PAIR_WAITING",
            Case::BetPendingTooLong => "OVERDUE_BET",
            Case::BalanceAfterRewritten => "LEDGER_CHAIN_BROKEN",
            Case::RefundLost => "REFUND_MISSING",
            Case::RoundUnsettledAfterPayout => "PAYOUT_UNSETTLED_ROUND",
            Case::RejectedAfterStake => "REJECTED_WITH_STAKE",
            Case::MatchNamesAnotherBet
            | Case::BetNamesNoMatch
            | Case::MatchSidesSwapped
            | Case::MatchOfOneUser
            | Case::MatchStatusDisagrees => "MATCH_LINK_BROKEN",
        }
    }

    /// Breaks `books`; returns a part of the detail the check must give.
    async fn apply(self, books: &Books) -> String {
        let (statements, detail) = match self {
            Case::WalletBalanceChanged => (
                vec!["UPDATE wallets SET balance = balance + 1 WHERE user_id = 1".into()],
                "wallet of user 1 holds".into(),
            ),
            // A wallet the ledger never heard of, holding money nobody paid in.
            Case::WalletFromNowhere => (
                vec!["INSERT INTO wallets (user_id, balance) VALUES (99, 50)".into()],
                "came in".into(),
            ),
            // A refund of a stake that was never taken.
            Case::RefundWithoutStake => {
                let bet = uuid::Uuid::now_v7();
                (
                    vec![ledger_insert(
                        &format!("REFUND:{bet}"),
                        "REFUND",
                        1,
                        1000,
                        &bet.to_string(),
                    )],
                    "ESCROW account holds".into(),
                )
            }
            Case::MoreWithdrawnThanDeposited => (
                vec![ledger_insert("withdraw-more", "WITHDRAWAL", 2, -1000, "")],
                "EXTERNAL account holds".into(),
            ),
            Case::StakeDiffersFromBet => (
                vec![format!(
                    "UPDATE bets SET amount = 5 WHERE bet_id = '{}'",
                    books.open_a.bet_id
                )],
                "escrow holds".into(),
            ),
            // The unique index would refuse it: this database is the test's own.
            Case::KeyUsedTwice => (
                vec![
                    "ALTER TABLE ledger_entries \
                     DROP CONSTRAINT ledger_entries_idempotency_key_unique"
                        .into(),
                    "INSERT INTO ledger_entries (transfer_id, idempotency_key, kind, user_id, \
                       counterparty, amount, balance_after, reference) \
                     SELECT gen_random_uuid(), idempotency_key, kind, user_id, counterparty, \
                       amount, balance_after, reference \
                     FROM ledger_entries WHERE idempotency_key = 'withdraw-3'"
                        .into(),
                ],
                "idempotency key withdraw-3 used 2 times".into(),
            ),
            // The same bet staked again under another key.
            Case::StakeTakenTwice => (
                vec![ledger_insert(
                    "again",
                    "STAKE",
                    1,
                    -10,
                    &books.winner.bet_id,
                )],
                format!("STAKE {} recorded 2 times", books.winner.bet_id),
            ),
            Case::PaidTheLoser => (
                vec![format!(
                    "UPDATE matches SET winning_side = 'B' WHERE match_id = '{}'",
                    books.winner.match_id
                )],
                "not the winner".into(),
            ),
            // User 3's B bet now belongs to user 1: the matcher should have paired it.
            Case::PairLeftUnmatched => (
                vec![format!(
                    "UPDATE bets SET user_id = 1 WHERE bet_id = '{}'",
                    books.open_b.bet_id
                )],
                books.open_b.bet_id.clone(),
            ),
            Case::BetPendingTooLong => (
                vec![format!(
                    "UPDATE bets SET created_at = now() - interval '1 hour' WHERE bet_id = '{}'",
                    books.open_a.bet_id
                )],
                format!("bet {} has been PENDING since", books.open_a.bet_id),
            ),
            // User 2's first entry claims one more than it left.
            Case::BalanceAfterRewritten => (
                vec![
                    "UPDATE ledger_entries SET balance_after = balance_after + 1 \
                     WHERE entry_id = (SELECT min(entry_id) FROM ledger_entries WHERE user_id = 2)"
                        .into(),
                ],
                "user 2: entry".into(),
            ),
            // Neither the refund owed nor the refund paid survives.
            Case::RefundLost => {
                let key = format!("REFUND:{}", books.cancelled.bet_id);
                (
                    vec![
                        format!("DELETE FROM wallet_commands WHERE idempotency_key = '{key}'"),
                        format!("DELETE FROM ledger_entries WHERE idempotency_key = '{key}'"),
                    ],
                    books.cancelled.bet_id.clone(),
                )
            }
            Case::RoundUnsettledAfterPayout => (
                vec![
                    "UPDATE rounds SET status = 'CLOSED', winning_side = NULL \
                     WHERE round_id = 's'"
                        .into(),
                ],
                "its round s is CLOSED".into(),
            ),
            Case::RejectedAfterStake => (
                vec![format!(
                    "UPDATE bets SET status = 'REJECTED', reject_reason = 'INSUFFICIENT_FUNDS' \
                     WHERE bet_id = '{}'",
                    books.open_a.bet_id
                )],
                books.open_a.bet_id.clone(),
            ),
            // The winner's match now names user 3's cancelled bet in its
            // place (a dangling link no foreign key stops any more).
            Case::MatchNamesAnotherBet => (
                vec![format!(
                    "UPDATE matches SET bet_a_id = '{}' WHERE bet_a_id = '{}'",
                    books.cancelled.bet_id, books.winner.bet_id
                )],
                books.winner.bet_id.clone(),
            ),
            // The winner names a match that was never made.
            Case::BetNamesNoMatch => (
                vec![format!(
                    "UPDATE bets SET match_id = gen_random_uuid() WHERE bet_id = '{}'",
                    books.winner.bet_id
                )],
                "no such match".into(),
            ),
            // The winner (the match's first bet) moved to side B: the
            // settler, paying the first bet when A wins, would pay a B bet.
            Case::MatchSidesSwapped => (
                vec![format!(
                    "UPDATE bets SET side = 'B' WHERE bet_id = '{}'",
                    books.winner.bet_id
                )],
                format!("bet {} (side B, user 1", books.winner.bet_id),
            ),
            // The loser's bet handed to the winner's user: a user matched
            // against themselves.
            Case::MatchOfOneUser => (
                vec![format!(
                    "UPDATE bets SET user_id = 1 \
                     WHERE bet_id = (SELECT bet_b_id FROM matches WHERE bet_a_id = '{}')",
                    books.winner.bet_id
                )],
                format!(
                    "bet {} (side A, user 1, SETTLED) with bet",
                    books.winner.bet_id
                ),
            ),
            // The winner back to MATCHED while its match stays SETTLED.
            Case::MatchStatusDisagrees => (
                vec![format!(
                    "UPDATE bets SET status = 'MATCHED', result = NULL, payout = NULL \
                     WHERE bet_id = '{}'",
                    books.winner.bet_id
                )],
                format!(
                    "(SETTLED) pairs bet {} (side A, user 1, MATCHED)",
                    books.winner.bet_id
                ),
            ),
        };
        books.corrupt(&statements).await;
        detail
    }
}

/// An entry the wallet never posted. Its balance_after continues the user's
/// chain (as far as it can without going below zero), so that only what the
/// case means to break is broken.
fn ledger_insert(key: &str, kind: &str, user: i64, amount: i64, reference: &str) -> String {
    let counterparty = if kind == "WITHDRAWAL" {
        "EXTERNAL"
    } else {
        "ESCROW"
    };
    format!(
        "INSERT INTO ledger_entries (transfer_id, idempotency_key, kind, user_id, counterparty, \
           amount, balance_after, reference) \
         SELECT gen_random_uuid(), '{key}', '{kind}', {user}, '{counterparty}', {amount}, \
           greatest(0, coalesce((SELECT balance_after FROM ledger_entries WHERE user_id = {user} \
             ORDER BY entry_id DESC LIMIT 1), 0) + {amount}), '{reference}'"
    )
}

/// Builds the books, breaks them as `case` says, and expects its check to fire.
async fn fires(case: Case) {
    let books = Books::build().await;
    let detail = case.apply(&books).await;
    let report = books.audit().await;
    assert!(
        report
            .violations
            .iter()
            .any(|v| v.check == case.check() && v.detail.contains(&detail)),
        "{case:?}: expected {} with {detail:?}, got {:#?}",
        case.check(),
        report.violations
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_whole_history_audits_clean_with_every_check_run() {
    let books = Books::build().await;
    let report = books.audit().await;
    assert!(report.is_clean(), "{:#?}", report.violations);
    let checks = betting_audit::check_names().count();
    assert_eq!(report.checks_run as usize, checks);
    // The admin RPC runs the same checks.
    let audit = books
        .app
        .admin()
        .run_audit(authed(
            pb::RunAuditRequest {},
            &books.app.token(0, betting_auth::Role::Admin),
        ))
        .await
        .expect("audit rpc")
        .into_inner();
    assert!(audit.clean, "{:#?}", audit.violations);
    assert_eq!(audit.checks_run as usize, checks);
}

/// One test per case, and a check that every check of the audit has a case.
macro_rules! cases {
    ($($test:ident => $case:ident,)*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $test() {
                fires(Case::$case).await;
            }
        )*

        #[test]
        fn every_check_has_a_case_that_makes_it_fire() {
            let covered: HashSet<&str> = [$(Case::$case.check()),*].into();
            for check in betting_audit::check_names() {
                assert!(covered.contains(check), "no case makes {check} fire");
            }
        }
    };
}

cases! {
    wallet_ledger_mismatch_catches_a_changed_balance => WalletBalanceChanged,
    accounts_not_zero_catches_a_wallet_from_nowhere => WalletFromNowhere,
    accounts_not_zero_catches_escrow_below_zero => RefundWithoutStake,
    accounts_not_zero_catches_more_withdrawn_than_deposited => MoreWithdrawnThanDeposited,
    escrow_mismatch_catches_a_stake_that_differs_from_its_bet => StakeDiffersFromBet,
    duplicate_key_catches_a_key_used_twice => KeyUsedTwice,
    duplicate_key_catches_a_stake_taken_twice => StakeTakenTwice,
    payout_wrong_catches_paying_the_loser => PaidTheLoser,
    matchable_pair_waiting_catches_a_pair_left_unmatched => PairLeftUnmatched,
    overdue_bet_catches_a_bet_pending_too_long => BetPendingTooLong,
    ledger_chain_broken_catches_a_rewritten_balance_after => BalanceAfterRewritten,
    refund_missing_catches_a_lost_refund => RefundLost,
    payout_unsettled_round_catches_a_round_reopened_after_payout => RoundUnsettledAfterPayout,
    rejected_with_stake_catches_a_rejected_bet_that_was_staked => RejectedAfterStake,
    match_link_broken_catches_a_match_naming_another_bet => MatchNamesAnotherBet,
    match_link_broken_catches_a_bet_naming_no_match => BetNamesNoMatch,
    match_link_broken_catches_a_match_with_its_sides_swapped => MatchSidesSwapped,
    match_link_broken_catches_a_match_of_one_user => MatchOfOneUser,
    match_link_broken_catches_a_bet_whose_status_left_its_match => MatchStatusDisagrees,
}
