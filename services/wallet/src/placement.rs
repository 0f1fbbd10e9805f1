//! Placement: a new bet's stake and its row in one transaction
//! (PlaceStakes, [`crate::Ledger::place_stakes`]).
//!
//! BettingService used to place a bet in three commits: the row
//! `PLACING`, the stake (HoldStake), the row `PENDING`. The wallet and the
//! bets share one database (`due.rs` already checks refunds and payouts
//! against the bets in the movement's transaction), so the stake and the
//! row can be one fact: the wallet's hold transaction writes the bet's row
//! as well, `PENDING` with the balance after the stake (what the old third
//! step wrote), or `REJECTED` when the stake is refused for want of funds.
//! One commit for a whole batch of new bets, and no state in which a stake
//! is held without its bet or a bet is written without its stake.
//!
//! The steps, all in the hold's transaction (`Ledger::hold_stakes_once`):
//!
//! 1. every stake key's lock (`BET:{bet_id}`: the bet ids are new, so these
//!    are new keys), the keys' earlier decisions, and the new holds' wallet
//!    rows, as for HoldStakes;
//! 2. each hold decided in request order against the locked balances;
//! 3. [`write_bets`]: one INSERT of the decided bets' rows, each only if its
//!    round is open, `ON CONFLICT DO NOTHING` (the bet key
//!    `(user_id, idempotency_key)` and the bet id are unique);
//! 4. the balances, the ledger rows and the refusals, as for HoldStakes;
//!    one commit.
//!
//! If a row was not written (its round is not open, or its bet key is
//! taken), the transaction is rolled back whole, because the holds decided
//! after it counted its stake; the wave runs again with that placement left
//! undecided (`Busy`), and its caller places it alone, which answers why
//! (`ROUND_NOT_OPEN`, or `IDEMPOTENCY_KEY_REUSED`: BettingService then
//! answers from the bet the key names). Both are rare: a bet on a closing
//! round, a retry racing its original.
//!
//! Interleavings and crash points considered:
//!
//! - *Crash or lost reply after the commit*: the bet is placed (PENDING, its
//!   stake held). The client's retry (a new bet id, the same bet key) finds
//!   the row by key, in BettingService or here (the key is taken), and is
//!   answered from it. The match job and the change note the crashed
//!   instance did not send are re-derived by the reconciler (every PENDING
//!   bet) and the streams' sweep (every changed row).
//! - *Crash before the commit*: nothing happened; the retry places it.
//! - *A retry racing its original* (two bet ids, one bet key), in one batch
//!   or two, on one instance or two: the second INSERT of the key waits for
//!   the first's transaction (the unique index), then writes nothing if it
//!   committed; the second placement is rolled back and answered from the
//!   first bet. If the first rolled back, the second writes its row. Rows
//!   are written in the order of the bet key, so two batches carrying keys
//!   in opposite orders never wait on each other in a cycle.
//! - *The same bet id twice* (a PlaceStakes repeated after a lost reply): the
//!   second is in a later wave, or a later call, and is a replay of the
//!   stake's key; its row was written with the stake, so nothing more is.
//! - *The round closes meanwhile*: the INSERT reads the round as the close
//!   left it. A row written before the close committed is a PENDING bet of a
//!   round that is no longer open, which the reconciler refunds
//!   ("stranded"), as it refunds a bet that raced a close before.
//! - *Insufficient funds*: the refusal is recorded under the stake's key and
//!   the row written REJECTED, together; every retry of the bet key finds
//!   the REJECTED row and is answered INSUFFICIENT_FUNDS, as before.
//! - *A wallet row another movement holds*: the batch answers `Busy` without
//!   writing the bet; the caller places it alone (`wait`), behind the user's
//!   turn and the row's lock.
//! - *Rolling out*: a betting instance of an older release writes PLACING
//!   rows and calls HoldStake/HoldStakes, which are unchanged. A newer
//!   betting instance needs a wallet that serves PlaceStakes (roll the
//!   wallet out first): an older wallet answers UNIMPLEMENTED, which moved
//!   nothing.

use std::collections::HashSet;

use uuid::Uuid;

use crate::{
    WalletError,
    ledger::{Batch, Decision},
};

/// Writes the bet row of every new hold of `batch` the way it was decided:
/// `PENDING` (version 1, the balance after its stake) when held, `REJECTED`
/// when refused for want of funds; a hold left undecided (`Busy`) writes
/// nothing. Returns the first hold whose row was not written, with the
/// reason to answer it (the caller then rolls the transaction back).
pub(crate) async fn write_bets(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    batch: &Batch<'_>,
) -> Result<Option<(usize, WalletError)>, WalletError> {
    let mut rows: Vec<(usize, Option<rust_decimal::Decimal>)> = Vec::new();
    for &i in &batch.new {
        match batch.decisions.get(&i) {
            Some(Decision::Move(_, balance)) => rows.push((i, Some(*balance))),
            Some(Decision::Record(WalletError::InsufficientFunds)) => rows.push((i, None)),
            _ => {}
        }
    }
    if rows.is_empty() {
        return Ok(None);
    }
    let t = batch.movements;
    let mut ids = Vec::with_capacity(rows.len());
    let mut users = Vec::with_capacity(rows.len());
    let mut keys = Vec::with_capacity(rows.len());
    let mut rounds = Vec::with_capacity(rows.len());
    let mut sides = Vec::with_capacity(rows.len());
    let mut amounts = Vec::with_capacity(rows.len());
    let mut balances = Vec::with_capacity(rows.len());
    for &(i, balance) in &rows {
        let Some(bet) = &t[i].bet else {
            return Err(
                betting_db::StoreError::Corrupt("a placement without its bet".into()).into(),
            );
        };
        let id = Uuid::parse_str(&t[i].reference).map_err(|_| {
            betting_db::StoreError::Corrupt("a stake's reference is no bet id".into())
        })?;
        ids.push(id);
        users.push(t[i].user.get());
        keys.push(bet.key.as_str());
        rounds.push(bet.round.as_str());
        sides.push(bet.side.as_db());
        amounts.push(t[i].amount.as_decimal());
        balances.push(balance);
    }
    // In the order of the bet key (see the module doc); a PENDING row at
    // version 1 and a REJECTED one at 0, as the PLACING saga leaves them.
    let written: HashSet<Uuid> = sqlx::query_scalar(
        "INSERT INTO bets (bet_id, user_id, idempotency_key, round_id, side, amount, status, \
           reject_reason, balance_after, version) \
         SELECT v.bet_id, v.user_id, v.key, v.round_id, v.side, v.amount, \
           CASE WHEN v.balance IS NULL THEN 'REJECTED' ELSE 'PENDING' END, \
           CASE WHEN v.balance IS NULL THEN 'INSUFFICIENT_FUNDS' END, \
           v.balance, CASE WHEN v.balance IS NULL THEN 0 ELSE 1 END \
         FROM unnest($1::UUID[], $2::BIGINT[], $3::TEXT[], $4::TEXT[], $5::TEXT[], \
                     $6::NUMERIC[], $7::NUMERIC[]) \
           WITH ORDINALITY AS v(bet_id, user_id, key, round_id, side, amount, balance, n) \
         WHERE EXISTS (SELECT 1 FROM rounds r WHERE r.round_id = v.round_id AND r.status = 'OPEN') \
         ORDER BY v.user_id, v.key, v.n \
         ON CONFLICT DO NOTHING \
         RETURNING bet_id",
    )
    .bind(&ids)
    .bind(&users)
    .bind(&keys)
    .bind(&rounds)
    .bind(&sides)
    .bind(&amounts)
    .bind(&balances)
    .fetch_all(&mut **tx)
    .await?
    .into_iter()
    .collect();
    let Some(missing) = rows
        .iter()
        .zip(&ids)
        .position(|(_, id)| !written.contains(id))
    else {
        return Ok(None);
    };
    let open: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM rounds WHERE round_id = $1 AND status = 'OPEN')",
    )
    .bind(rounds[missing])
    .fetch_one(&mut **tx)
    .await?;
    let refusal = if open {
        WalletError::BetKeyTaken
    } else {
        WalletError::RoundNotOpen
    };
    Ok(Some((rows[missing].0, refusal)))
}
