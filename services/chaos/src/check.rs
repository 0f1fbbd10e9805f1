//! After the run, once everything is healed and quiet: the client's books
//! against PostgreSQL, and `betting audit`.
//!
//! - every acknowledged PlaceBet exists, with its stake, side and round;
//!   no bet exists that no answer acknowledged (a REJECTED bet holds no
//!   money and is not shown to its player, so it is not counted);
//! - each user's balance = deposits − withdrawals − stakes + payouts +
//!   refunds, computed from the client's own books and its bets' outcomes;
//! - total money (every wallet and the escrow) = total deposits −
//!   withdrawals, exactly;
//! - no ledger key was used twice, no bet is left non-terminal, nothing
//!   is owed, no job is waiting or dead;
//! - every request that stored something, asked again, gets the same answer.

use std::{
    collections::{HashMap, HashSet},
    time::Duration,
};

use betting_books::Side;
use betting_queue::{Queue, QueueSettings};
use futures::StreamExt;
use rust_decimal::Decimal;
use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

use crate::load::{CancelSeen, Load, Outcome};

/// The figures the report gives beside the violations.
#[derive(Debug, Default, Serialize)]
pub struct Tally {
    pub bets: i64,
    pub settled: i64,
    pub refunded: i64,
    pub rejected: i64,
    /// Client's expected total minus the server's, in money: exactly "0".
    pub money_difference: String,
    pub duplicate_ledger_keys: i64,
    pub not_terminal: i64,
    pub acknowledged_missing: usize,
}

#[derive(sqlx::FromRow)]
struct BetRow {
    bet_id: Uuid,
    user_id: i64,
    round_id: String,
    side: String,
    amount: Decimal,
    status: String,
    result: Option<String>,
    refund_reason: Option<String>,
}

#[derive(sqlx::FromRow)]
struct RoundRow {
    round_id: String,
    status: String,
    winning_side: Option<String>,
}

fn side_name(side: Side) -> &'static str {
    match side {
        Side::A => "A",
        Side::B => "B",
    }
}

/// How a round ended, against every end the game server asked of it: a
/// round SETTLED with a winner nobody asked for, or VOIDED though nobody
/// voided it, pays the wrong players while every sum still agrees.
fn round_story(round: &RoundRow, asked: &[Outcome]) -> Option<String> {
    let fits = |o: &Outcome| match (round.status.as_str(), o) {
        ("SETTLED", Outcome::Settled(side)) => {
            round.winning_side.as_deref() == Some(side_name(*side))
        }
        ("VOIDED", Outcome::Voided) => true,
        _ => false,
    };
    match round.status.as_str() {
        "SETTLED" | "VOIDED" if !asked.iter().any(fits) => Some(format!(
            "round {} ended {} (winner {:?}), but the game server asked {asked:?}",
            round.round_id, round.status, round.winning_side
        )),
        _ => None,
    }
}

/// A bet's end against what the client asked: its round's end, and its
/// cancel. The money check takes a bet's outcome from its row, so a bet
/// paid as WON for the losing side, refunded as voided in a settled round,
/// or LOST after its cancel was acknowledged would pass it.
fn bet_story(bet: &BetRow, round: Option<&RoundRow>, cancel: Option<CancelSeen>) -> Vec<String> {
    let mut found = Vec::new();
    let id = bet.bet_id;
    if cancel.is_some_and(|c| c.acknowledged)
        && !(bet.status == "REFUNDED" && bet.refund_reason.as_deref() == Some("CANCELLED"))
    {
        found.push(format!(
            "bet {id}: its cancel was acknowledged, but it ended {} ({:?}, {:?})",
            bet.status, bet.result, bet.refund_reason
        ));
    }
    match (bet.status.as_str(), bet.refund_reason.as_deref()) {
        ("REFUNDED", Some("CANCELLED")) if cancel.is_none() => {
            found.push(format!(
                "bet {id} was refunded as cancelled, but no cancel was sent"
            ));
        }
        // A refusal is final: the bet had left PENDING, and a bet cancelled
        // before is answered OK again.
        ("REFUNDED", Some("CANCELLED")) if cancel.is_some_and(|c| c.refused) => {
            found.push(format!(
                "bet {id} was refunded as cancelled, but its cancel was refused"
            ));
        }
        ("REFUNDED", Some("ROUND_VOIDED")) if round.is_none_or(|r| r.status != "VOIDED") => {
            found.push(format!(
                "bet {id} was refunded as voided, but its round is {:?}",
                round.map(|r| r.status.as_str())
            ));
        }
        ("SETTLED", _) => match round {
            Some(r) if r.status == "SETTLED" => {
                let won = r.winning_side.as_deref() == Some(bet.side.as_str());
                let want = if won { "WON" } else { "LOST" };
                if bet.result.as_deref() != Some(want) {
                    found.push(format!(
                        "bet {id} on {} ended {:?} in round {} won by {:?}",
                        bet.side, bet.result, r.round_id, r.winning_side
                    ));
                }
            }
            other => found.push(format!(
                "bet {id} is SETTLED, but its round is {:?}",
                other.map(|r| r.status.as_str())
            )),
        },
        _ => {}
    }
    found
}

/// What is not finished yet: non-terminal bets, open rounds, unpaid
/// matches, owed refunds, waiting or dead jobs. Empty once quiet.
pub async fn stuck(pool: &PgPool, queues: &[Queue]) -> Vec<String> {
    let mut stuck = Vec::new();
    let counts: Result<Vec<(String, i64)>, _> = sqlx::query_as(
        "SELECT 'bets ' || status, count(*) FROM bets \
           WHERE status IN ('PLACING', 'PENDING', 'MATCHED') GROUP BY status \
         UNION ALL SELECT 'rounds ' || status, count(*) FROM rounds \
           WHERE status IN ('OPEN', 'CLOSED') GROUP BY status \
         UNION ALL SELECT 'open matches', count(*) FROM matches \
           WHERE status = 'OPEN' HAVING count(*) > 0 \
         UNION ALL SELECT 'refunds owed', count(*) FROM wallet_commands \
           WHERE done_at IS NULL HAVING count(*) > 0",
    )
    .fetch_all(pool)
    .await;
    match counts {
        Ok(rows) => stuck.extend(rows.into_iter().map(|(what, n)| format!("{n} {what}"))),
        Err(error) => stuck.push(format!("cannot read the tables: {error}")),
    }
    for queue in queues {
        match queue.stats().await {
            Ok(s) if s.waiting + s.delayed + s.in_flight + s.dead > 0 => stuck.push(format!(
                "queue {}: {} waiting, {} delayed, {} in flight, {} dead",
                s.queue, s.waiting, s.delayed, s.in_flight, s.dead
            )),
            Ok(_) => {}
            Err(error) => stuck.push(format!("queue {}: {error}", queue.name())),
        }
    }
    stuck
}

/// After healing, before the rounds end: once matching is quiet (the match
/// queue empty), no open round may hold a PENDING A and a PENDING B of one
/// amount from two users — the audit's MATCHABLE_PAIR_WAITING, which the
/// final audit cannot see (every round has ended by then, and a pair left
/// waiting long enough is refunded MATCH_TIMEOUT, which hides it). A pair
/// is reported only if it is still there on a second look, `settle` later
/// (a bet just placed is matched by a job that may not be queued yet).
pub async fn matchable_pairs(
    pool: &PgPool,
    queues: &[Queue],
    within: Duration,
) -> anyhow::Result<Vec<String>> {
    let deadline = std::time::Instant::now() + within;
    let settle = Duration::from_secs(3);
    let matching = queues
        .iter()
        .find(|q| q.name() == betting_jobs::MATCH.name)
        .ok_or_else(|| anyhow::anyhow!("no match queue"))?;
    let settings = betting_audit::AuditSettings {
        quiescence: settle,
        match_timeout: Duration::from_secs(3600),
    };
    let mut first_look: Option<Vec<String>> = None;
    loop {
        let quiet = matches!(matching.stats().await,
            Ok(s) if s.waiting + s.delayed + s.in_flight == 0);
        if quiet {
            let pairs: Vec<String> = betting_audit::run(pool, &settings)
                .await?
                .violations
                .into_iter()
                .filter(|v| v.check == "MATCHABLE_PAIR_WAITING")
                .map(|v| format!("audit {} (matching quiet): {}", v.check, v.detail))
                .collect();
            match first_look {
                _ if pairs.is_empty() => return Ok(Vec::new()),
                Some(_) => return Ok(pairs),
                None => first_look = Some(pairs),
            }
            tokio::time::sleep(settle).await;
            continue;
        }
        if std::time::Instant::now() > deadline {
            return Ok(vec![format!(
                "the match queue was not quiet within {within:?} of healing"
            )]);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Bets refunded because nothing matched them in time.
pub async fn match_timeout_refunds(pool: &PgPool) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar(
        "SELECT count(*) FROM bets WHERE status = 'REFUNDED' AND refund_reason = 'MATCH_TIMEOUT'",
    )
    .fetch_one(pool)
    .await?)
}

/// The queues of the run's namespace, read straight from Redis.
pub fn queues(redis_url: &str, namespace: &str) -> anyhow::Result<Vec<Queue>> {
    let client = betting_queue::connect(redis_url)?;
    Ok([
        betting_jobs::MATCH.name,
        betting_jobs::SETTLE.name,
        betting_jobs::REFUND.name,
    ]
    .into_iter()
    .map(|name| Queue::new(client.clone(), namespace, name, QueueSettings::default()))
    .collect())
}

/// Every check of a quiet system: the violations, and the figures.
pub async fn check(
    pool: &PgPool,
    load: &Load,
    queues: &[Queue],
) -> anyhow::Result<(Vec<String>, Tally)> {
    let mut violations: Vec<String> = stuck(pool, queues)
        .await
        .into_iter()
        .map(|s| format!("stuck: {s}"))
        .collect();
    let mut tally = Tally::default();

    // Every request that stored something, once more: same answers.
    let replays = load
        .books
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .replays();
    // Concurrently: a long run has a hundred thousand of them.
    futures::stream::iter(replays.iter().enumerate())
        .for_each_concurrent(32, |(i, request)| load.resend(request, i))
        .await;
    let (acknowledged, net, unresolved, books_violations) = {
        let mut books = load.books.lock().unwrap_or_else(|p| p.into_inner());
        (
            books.acknowledged(),
            books.net_external(),
            books.unresolved.len() + books.unresolved_cancels.len(),
            std::mem::take(&mut books.violations),
        )
    };
    violations.extend(books_violations);
    if unresolved > 0 {
        violations.push(format!("{unresolved} requests never resolved"));
    }

    let bets: Vec<BetRow> = sqlx::query_as(
        "SELECT bet_id, user_id, round_id, side, amount, status, result, refund_reason FROM bets",
    )
    .fetch_all(pool)
    .await?;
    let rounds: Vec<RoundRow> = sqlx::query_as("SELECT round_id, status, winning_side FROM rounds")
        .fetch_all(pool)
        .await?;
    {
        let asked = load.outcomes.lock().unwrap_or_else(|p| p.into_inner());
        for round in &rounds {
            let asked = asked.get(&round.round_id).map_or(&[][..], Vec::as_slice);
            violations.extend(round_story(round, asked));
        }
    }
    let rounds: HashMap<&str, &RoundRow> =
        rounds.iter().map(|r| (r.round_id.as_str(), r)).collect();
    let cancels = load
        .books
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .cancels();
    let mut expected: HashMap<i64, Decimal> = net.clone();
    let mut seen = HashSet::new();
    for bet in &bets {
        tally.bets += 1;
        let id = bet.bet_id.to_string();
        seen.insert(id.clone());
        if bet.status == "REJECTED" {
            tally.rejected += 1;
            if acknowledged.contains_key(&id) {
                violations.push(format!("acknowledged bet {id} was rejected"));
            }
            continue;
        }
        violations.extend(bet_story(
            bet,
            rounds.get(bet.round_id.as_str()).copied(),
            cancels.get(&id).copied(),
        ));
        let Some(request) = acknowledged.get(&id) else {
            violations.push(format!(
                "user {} has bet {id} ({}) that no answer acknowledged",
                bet.user_id, bet.status
            ));
            continue;
        };
        let side = match request.side {
            Side::A => "A",
            Side::B => "B",
        };
        if request.user != bet.user_id
            || request.round != bet.round_id
            || side != bet.side
            || request.stake != bet.amount
        {
            violations.push(format!("bet {id} differs from its request {request:?}"));
        }
        let change = match (bet.status.as_str(), bet.result.as_deref()) {
            ("SETTLED", Some("WON")) => {
                tally.settled += 1;
                bet.amount
            }
            ("SETTLED", Some("LOST")) => {
                tally.settled += 1;
                -bet.amount
            }
            ("REFUNDED", _) => {
                tally.refunded += 1;
                Decimal::ZERO
            }
            (status, result) => {
                tally.not_terminal += 1;
                violations.push(format!("bet {id} ended {status} ({result:?})"));
                Decimal::ZERO
            }
        };
        *expected.entry(bet.user_id).or_default() += change;
    }
    for id in acknowledged.keys() {
        if !seen.contains(id) {
            tally.acknowledged_missing += 1;
            violations.push(format!("acknowledged bet {id} is missing"));
        }
    }

    let balances: Vec<(i64, Decimal)> = sqlx::query_as("SELECT user_id, balance FROM wallets")
        .fetch_all(pool)
        .await?;
    let balances: HashMap<i64, Decimal> = balances.into_iter().collect();
    for &user in &load.users {
        let want = expected.get(&user).copied().unwrap_or_default();
        let have = balances.get(&user).copied().unwrap_or_default();
        if want != have {
            violations.push(format!(
                "user {user} holds {have}, but the client's books say {want}"
            ));
        }
    }
    for user in balances.keys() {
        if !load.users.contains(user) {
            violations.push(format!("a wallet of user {user}, whom no client used"));
        }
    }

    // Total money: every wallet and the escrow against what came in.
    let escrow: Option<Decimal> =
        sqlx::query_scalar("SELECT balance FROM account_balances WHERE account = 'ESCROW'")
            .fetch_optional(pool)
            .await?
            .flatten();
    let total: Decimal = balances.values().copied().sum::<Decimal>() + escrow.unwrap_or_default();
    let came_in: Decimal = net.values().copied().sum();
    let difference = came_in - total;
    tally.money_difference = difference.normalize().to_string();
    if !difference.is_zero() {
        violations.push(format!(
            "total money {total} (escrow {}) differs from deposits - withdrawals {came_in}",
            escrow.unwrap_or_default()
        ));
    }
    if let Some(escrow) = escrow.filter(|e| !e.is_zero()) {
        violations.push(format!("escrow holds {escrow} with no bet open"));
    }

    tally.duplicate_ledger_keys = sqlx::query_scalar(
        // The key is UNIQUE in the schema, so counting keys alone could
        // never find one: count a bet's stake or refund, or a match's
        // payout, moved twice under any keys.
        "SELECT count(*) FROM (SELECT idempotency_key FROM ledger_entries \
         GROUP BY idempotency_key HAVING count(*) > 1 \
         UNION ALL SELECT kind || ' ' || reference FROM ledger_entries \
         WHERE kind IN ('STAKE', 'REFUND', 'PAYOUT') \
         GROUP BY kind, reference HAVING count(*) > 1) d",
    )
    .fetch_one(pool)
    .await?;
    if tally.duplicate_ledger_keys > 0 {
        violations.push(format!(
            "{} ledger keys used more than once",
            tally.duplicate_ledger_keys
        ));
    }

    let audit = betting_audit::run(
        pool,
        &betting_audit::AuditSettings {
            quiescence: Duration::ZERO,
            match_timeout: Duration::from_secs(3600),
        },
    )
    .await?;
    violations.extend(
        audit
            .violations
            .into_iter()
            .map(|v| format!("audit {}: {}", v.check, v.detail)),
    );
    // The books' findings while replaying.
    violations.append(
        &mut load
            .books
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .violations,
    );
    Ok((violations, tally))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bet(side: &str, status: &str, result: Option<&str>, reason: Option<&str>) -> BetRow {
        BetRow {
            bet_id: Uuid::nil(),
            user_id: 1,
            round_id: "r".into(),
            side: side.into(),
            amount: Decimal::ONE,
            status: status.into(),
            result: result.map(Into::into),
            refund_reason: reason.map(Into::into),
        }
    }

    fn round(status: &str, winner: Option<&str>) -> RoundRow {
        RoundRow {
            round_id: "r".into(),
            status: status.into(),
            winning_side: winner.map(Into::into),
        }
    }

    #[test]
    fn a_round_ends_as_the_game_server_asked() {
        let settled_a = round("SETTLED", Some("A"));
        assert!(round_story(&settled_a, &[Outcome::Settled(Side::A)]).is_none());
        // A lost answer, then another end: either may be the one that took.
        assert!(round_story(&settled_a, &[Outcome::Voided, Outcome::Settled(Side::A)]).is_none());
        assert!(round_story(&settled_a, &[Outcome::Settled(Side::B)]).is_some());
        assert!(round_story(&settled_a, &[Outcome::Voided]).is_some());
        assert!(round_story(&settled_a, &[]).is_some());
        assert!(round_story(&round("VOIDED", None), &[Outcome::Voided]).is_none());
        assert!(round_story(&round("VOIDED", None), &[Outcome::Settled(Side::A)]).is_some());
    }

    #[test]
    fn a_bet_ends_as_its_round_and_its_cancel_say() {
        let won_by_a = round("SETTLED", Some("A"));
        let sound =
            |b: &BetRow, r: &RoundRow, c: Option<CancelSeen>| bet_story(b, Some(r), c).is_empty();
        assert!(sound(
            &bet("A", "SETTLED", Some("WON"), None),
            &won_by_a,
            None
        ));
        assert!(sound(
            &bet("B", "SETTLED", Some("LOST"), None),
            &won_by_a,
            None
        ));
        // Paid for the losing side: every sum agrees, the players are wrong.
        assert!(!sound(
            &bet("B", "SETTLED", Some("WON"), None),
            &won_by_a,
            None
        ));
        assert!(!sound(
            &bet("A", "SETTLED", Some("LOST"), None),
            &won_by_a,
            None
        ));
        // Refunded as voided in a settled round.
        assert!(!sound(
            &bet("A", "REFUNDED", None, Some("ROUND_VOIDED")),
            &won_by_a,
            None
        ));
        assert!(sound(
            &bet("A", "REFUNDED", None, Some("ROUND_VOIDED")),
            &round("VOIDED", None),
            None
        ));
        // Unmatched at the settle: refunded as closed.
        assert!(sound(
            &bet("A", "REFUNDED", None, Some("ROUND_CLOSED")),
            &won_by_a,
            None
        ));
        // A cancel acknowledged, then the bet matched and lost anyway.
        let acked = Some(CancelSeen {
            acknowledged: true,
            refused: false,
        });
        assert!(!sound(
            &bet("B", "SETTLED", Some("LOST"), None),
            &won_by_a,
            acked
        ));
        assert!(sound(
            &bet("B", "REFUNDED", None, Some("CANCELLED")),
            &won_by_a,
            acked
        ));
        // A cancel whose answer was lost may or may not have taken.
        let asked = Some(CancelSeen::default());
        assert!(sound(
            &bet("B", "REFUNDED", None, Some("CANCELLED")),
            &won_by_a,
            asked
        ));
        assert!(sound(
            &bet("B", "SETTLED", Some("LOST"), None),
            &won_by_a,
            asked
        ));
        // Refused (it had matched), then refunded as cancelled anyway.
        let refused = Some(CancelSeen {
            acknowledged: false,
            refused: true,
        });
        assert!(!sound(
            &bet("B", "REFUNDED", None, Some("CANCELLED")),
            &won_by_a,
            refused
        ));
        assert!(sound(
            &bet("B", "SETTLED", Some("LOST"), None),
            &won_by_a,
            refused
        ));
        // Refunded as cancelled though nobody cancelled it.
        assert!(!sound(
            &bet("B", "REFUNDED", None, Some("CANCELLED")),
            &won_by_a,
            None
        ));
    }
}
