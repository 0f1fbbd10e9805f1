//! Whether a refund or payout is owed: the internal money RPCs verify what
//! they are asked against the betting side's own records (bets, matches,
//! rounds), in the movement's transaction, instead of trusting the caller.
//! A service token that leaks, or a bug in a caller, can then move no money
//! the books do not owe:
//!
//! - **RefundStake** returns a stake only for a bet the betting side has
//!   marked REFUNDED (every refund owed is decided by `refund_bets`, which
//!   marks the bet and writes the outbox row in one statement), owned by the
//!   user asked for, of the amount asked for, and not part of a live match
//!   (a REFUNDED bet's match, if any, was voided with its round). A MATCHED
//!   or PENDING bet is refused: its stake is still at stake.
//! - **PayWinnings** pays only a match of a SETTLED round, naming exactly
//!   that match's two bets, to the owner of the bet on the winning side, twice
//!   the match's stake.
//!
//! Interleavings considered:
//!
//! - *Refund racing a match* (a cancel or a timeout against the matcher):
//!   both move the bet out of PENDING with a conditional UPDATE, so exactly
//!   one wins. If the match won, the bet is MATCHED and a refund asked for it
//!   is refused here; if the refund won, the bet is REFUNDED for good (no
//!   statement moves a bet out of REFUNDED), so reading it under READ
//!   COMMITTED without a lock is enough: what we read cannot change.
//! - *Payout racing the round's settlement*: the settler only asks after it
//!   read SETTLED, and SETTLED is final (a void or another outcome after a
//!   settle is refused by the round's transition under its lock), as is the
//!   winning side. A payout asked before the round settled is refused and,
//!   unlike the guard's refusals, not recorded under the key: the real
//!   payout, once the round is settled, must still go through.
//! - *Payout retried after the round was voided*: impossible once the round
//!   is SETTLED (void after settle is refused); a round voided first has its
//!   matches VOIDED, and a payout for them is refused here.
//! - *A replay* (the key's movement exists) is answered from the ledger
//!   before this check; the original was checked when it was made.

use std::collections::HashMap;

use rust_decimal::Decimal;
use uuid::Uuid;

use crate::{Guard, Transfer, WalletError};

/// A bet as the refund check reads it.
#[derive(sqlx::FromRow)]
struct RefundedBet {
    user_id: i64,
    amount: Decimal,
    status: String,
    match_status: Option<String>,
}

/// A match as the payout check reads it.
#[derive(sqlx::FromRow)]
pub(crate) struct PaidMatch {
    match_id: Uuid,
    amount: Decimal,
    status: String,
    round_status: String,
    winning_side: Option<String>,
    bet_a_id: Uuid,
    side_a: String,
    user_a: i64,
    bet_b_id: Uuid,
    side_b: String,
    user_b: i64,
}

/// Refuses a refund or payout the books do not owe (see the module doc).
pub(crate) async fn check(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    t: &Transfer,
) -> Result<(), WalletError> {
    match &t.guard {
        Guard::None => Ok(()),
        Guard::Refund { bet } => {
            let row: Option<RefundedBet> = sqlx::query_as(
                "SELECT b.user_id, b.amount, b.status, m.status AS match_status \
                 FROM bets b LEFT JOIN matches m ON m.match_id = b.match_id \
                 WHERE b.bet_id = $1",
            )
            .bind(bet)
            .fetch_optional(&mut **tx)
            .await?;
            let row = row.ok_or(WalletError::RefundNotDue("no such bet"))?;
            if row.status != "REFUNDED" {
                return Err(WalletError::RefundNotDue("the bet is not refunded"));
            }
            if row.match_status.as_deref().is_some_and(|s| s != "VOIDED") {
                return Err(WalletError::RefundNotDue("the bet is in a live match"));
            }
            if row.user_id != t.user.get() || row.amount != t.amount.as_decimal() {
                return Err(WalletError::RefundNotDue(
                    "the bet's owner or stake is another",
                ));
            }
            Ok(())
        }
        Guard::Payout { match_id, .. } => {
            let matches = payout_matches(tx, &[*match_id]).await?;
            payout_due(matches.get(match_id), t)
        }
    }
}

/// The matches payouts name, read for [`payout_due`] (one query for a batch).
pub(crate) async fn payout_matches(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    ids: &[Uuid],
) -> Result<HashMap<Uuid, PaidMatch>, WalletError> {
    let rows: Vec<PaidMatch> = sqlx::query_as(
        "SELECT m.match_id, m.amount, m.status, r.status AS round_status, r.winning_side, \
           m.bet_a_id, a.side AS side_a, a.user_id AS user_a, \
           m.bet_b_id, b.side AS side_b, b.user_id AS user_b \
         FROM matches m JOIN rounds r USING (round_id) \
           JOIN bets a ON a.bet_id = m.bet_a_id JOIN bets b ON b.bet_id = m.bet_b_id \
         WHERE m.match_id = ANY($1)",
    )
    .bind(ids)
    .fetch_all(&mut **tx)
    .await?;
    Ok(rows.into_iter().map(|m| (m.match_id, m)).collect())
}

/// Whether a payout is owed, given its match as read (see the module doc).
pub(crate) fn payout_due(m: Option<&PaidMatch>, t: &Transfer) -> Result<(), WalletError> {
    let Guard::Payout { bets, .. } = &t.guard else {
        return Err(WalletError::PayoutNotDue("not a payout"));
    };
    let m = m.ok_or(WalletError::PayoutNotDue("no such match"))?;
    let mut asked = bets.to_vec();
    let mut actual = vec![m.bet_a_id, m.bet_b_id];
    asked.sort();
    actual.sort();
    if asked != actual {
        return Err(WalletError::PayoutNotDue("the bets are not the match's"));
    }
    if m.round_status != "SETTLED" || m.status == "VOIDED" {
        return Err(WalletError::PayoutNotDue("the round is not settled"));
    }
    let winner = match m.winning_side.as_deref() {
        Some(side) if side == m.side_a => m.user_a,
        Some(side) if side == m.side_b => m.user_b,
        _ => return Err(WalletError::PayoutNotDue("the match has no winner")),
    };
    if winner != t.user.get() {
        return Err(WalletError::PayoutNotDue("the user did not win the match"));
    }
    if t.amount.as_decimal() != m.amount * Decimal::TWO {
        return Err(WalletError::PayoutNotDue(
            "the amount is not twice the match's stake",
        ));
    }
    Ok(())
}
