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
//! 2. [`Known`]: the same statement reads which of the placements' rounds
//!    are open and which of their bet keys name a bet already. A placement
//!    whose round is not open or whose key is taken is refused
//!    (`ROUND_NOT_OPEN`, `IDEMPOTENCY_KEY_REUSED`: BettingService then
//!    answers from the bet the key names) before anything is decided, and a
//!    replayed stake whose bet is not the one asked for (another round,
//!    side or key) is a reused key;
//! 3. each other hold decided in request order against the locked balances;
//! 4. the balances, the ledger rows, the refusals and the decided bets'
//!    rows ([`BetRows`], [`insert_bets!`]) in one statement: each row only
//!    if its round is open, `ON CONFLICT DO NOTHING` (the bet key
//!    `(user_id, idempotency_key)` and the bet id are unique); one commit.
//!
//! A bet key twice among a call's new placements: only the first is
//! decided; the others are answered `Busy` (placed alone by their callers,
//! after this transaction, when whether the key is taken is known). So no
//! row of the INSERT conflicts with another row of the same INSERT.
//!
//! If a row was not written all the same (a race the read could not see:
//! another transaction wrote the key, or closed the round, in between), the
//! transaction is rolled back whole, because the holds decided after it
//! counted its stake; the wave runs again with every such placement refused
//! as in step 2. Both answers are final: the conflicting row is another
//! transaction's, and committed (the INSERT waited for it, and would have
//! written its own row had that one rolled back), bets are never deleted,
//! and rounds never reopen. So past a race this is one more run. (The first
//! version also refused a duplicate key of the same INSERT this way, which
//! was not final: if the rerun then could not place the first, a client
//! was told the key was taken by a bet that never committed, found by the
//! full suite's same-key races.)
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
//!   committed; the second's transaction is undone and run again with that
//!   placement refused IDEMPOTENCY_KEY_REUSED, and BettingService answers it
//!   from the first bet. If the first rolled back, the second writes its
//!   row. (A retry after the first committed is refused by the read.) Rows
//!   are written in the order of the bet key, so two batches carrying keys
//!   in opposite orders never wait on each other in a cycle.
//! - *The same bet id twice* (a PlaceStakes repeated after a lost reply): the
//!   second is in a later wave, or a later call, and is a replay of the
//!   stake's key; its row was written with the stake, so nothing more is.
//!   A replay naming another round, side or bet key than that row is a
//!   reused key (`IDEMPOTENCY_KEY_REUSED`), never "held".
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
//! - *Hostile input at the batch*: bets on closed or unknown rounds and
//!   retries of placed bets are refused by the read, without a rerun; a
//!   race reruns the batch once. The stake is checked against the largest
//!   stake a bet may have (as PlaceBet checks it), so no bet the settler
//!   could not pay is written. The wallet does not apply BettingService's
//!   own limits (the minimum stake, open bets): they are its configuration.
//! - *A leaked service token*: it could already take any player's money
//!   into escrow with HoldStake; with PlaceStakes it can also stake it on a
//!   bet the player did not place. The service token is trusted that far,
//!   as it is for HoldStake.
//! - *Rolling out*: a betting instance of an older release writes PLACING
//!   rows and calls HoldStake/HoldStakes, which are unchanged. A newer
//!   betting instance facing an older wallet gets UNIMPLEMENTED, which moved
//!   nothing, and places that bet the older way (PLACING, HoldStake,
//!   PENDING); so either role may roll out first.

use std::collections::{HashMap, HashSet};

use rust_decimal::Decimal;
use uuid::Uuid;

use crate::{
    Transfer, WalletError,
    ledger::{Batch, Decision},
};

/// Why a placement's bet row cannot be written: an answer for good (bets
/// are never deleted, and rounds never reopen).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unwritten {
    RoundNotOpen,
    KeyTaken,
}

impl Unwritten {
    pub(crate) fn refusal(self) -> WalletError {
        match self {
            Unwritten::RoundNotOpen => WalletError::RoundNotOpen,
            Unwritten::KeyTaken => WalletError::BetKeyTaken,
        }
    }
}

/// A bet found under a placement's bet key.
struct KnownBet {
    bet_id: Uuid,
    round_id: String,
    side: String,
    amount: Decimal,
}

/// What the bets and rounds say of a call's placements, read in its
/// transaction before anything is decided: which of their rounds are open,
/// and which of their bet keys name a bet already. It spares the batch a
/// rerun for the common refusals (a bet on a closed round, a client's
/// retry of a placed bet) and checks a replayed stake's bet.
///
/// Read by `Batch::open`'s statement ([`known_rows!`]), from the snapshot
/// its decisions and wallet rows are read from, after the keys' locks: one
/// round trip fewer than reading it alone. Not for a lone placement, whose
/// statement waits for the wallet row: its snapshot is taken before the
/// wait, so it would miss a key taken or a round closed by the transaction
/// it waited for (whose bet INSERT then writes nothing, and the placement
/// runs again). A lone placement reads them in a statement of its own,
/// after the wait (found by the attack review:
/// `a_lone_placement_reads_keys_and_rounds_as_its_wait_left_them`).
#[derive(Default)]
pub(crate) struct Known {
    open: HashSet<String>,
    by_key: HashMap<(i64, String), KnownBet>,
}

/// The rows of [`Known`] in the columns of `Batch::open`'s statement (see
/// there), over `$users` (each placement's user), `$rounds` (the
/// placements' rounds) and `$keys` (each placement's bet key): an open
/// round as an `'o'` row (the round in `reference`), a bet under one of the
/// keys as a `'k'` row (the bet id in `transfer_id`, its key in
/// `idempotency_key`, its side in `reason`, its round in `reference`).
/// UNION ALL branches of that statement in a batch, or a statement of its
/// own for a lone placement (after its wait for the wallet row).
macro_rules! known_rows {
    ($users:literal, $rounds:literal, $keys:literal) => {
        concat!(
            "SELECT 'o' AS src, NULL::BIGINT AS entry_id, NULL::UUID AS transfer_id, \
               NULL::TEXT AS idempotency_key, NULL::TEXT AS kind, NULL::BIGINT AS user_id, \
               NULL::TEXT AS counterparty, NULL::NUMERIC AS amount, \
               NULL::NUMERIC AS balance_after, round_id AS reference, \
               NULL::TIMESTAMPTZ AS created_at, NULL::TEXT AS reason \
             FROM rounds WHERE round_id = ANY(",
            $rounds,
            ") AND status = 'OPEN' \
             UNION ALL \
             SELECT 'k', NULL, b.bet_id, b.idempotency_key, NULL, b.user_id, NULL, b.amount, NULL, \
               b.round_id, NULL, b.side \
             FROM bets b JOIN unnest(",
            $users,
            "::BIGINT[], ",
            $keys,
            "::TEXT[]) AS v(u, k) \
               ON b.user_id = v.u AND b.idempotency_key = v.k"
        )
    };
}
pub(crate) use known_rows;

impl Known {
    /// The rounds (sorted, once each) and the bet keys (one per placement)
    /// [`known_rows!`] reads.
    pub(crate) fn asked(holds: &[Transfer]) -> Result<(Vec<&str>, Vec<&str>), WalletError> {
        let mut rounds: Vec<&str> = Vec::with_capacity(holds.len());
        let mut keys = Vec::with_capacity(holds.len());
        for t in holds {
            let bet = placed(t)?;
            rounds.push(bet.round.as_str());
            keys.push(bet.key.as_str());
        }
        rounds.sort_unstable();
        rounds.dedup();
        Ok((rounds, keys))
    }

    /// Adds one row of [`known_rows!`] (`src` `'o'` or `'k'`).
    pub(crate) fn add(
        &mut self,
        src: &str,
        row: &sqlx::postgres::PgRow,
    ) -> Result<(), WalletError> {
        use sqlx::Row;
        let get = |e: sqlx::Error| WalletError::from(betting_db::StoreError::from(e));
        let round_id: String = row.try_get("reference").map_err(get)?;
        match src {
            "o" => {
                self.open.insert(round_id);
            }
            _ => {
                let user_id: i64 = row.try_get("user_id").map_err(get)?;
                let key: String = row.try_get("idempotency_key").map_err(get)?;
                self.by_key.insert(
                    (user_id, key),
                    KnownBet {
                        bet_id: row.try_get("transfer_id").map_err(get)?,
                        round_id,
                        side: row.try_get("reason").map_err(get)?,
                        amount: row.try_get("amount").map_err(get)?,
                    },
                );
            }
        }
        Ok(())
    }

    /// Why this new placement's row cannot be written, if it cannot.
    pub(crate) fn unwritable(&self, t: &Transfer) -> Option<Unwritten> {
        let bet = t.bet.as_ref()?;
        if !self.open.contains(bet.round.as_str()) {
            Some(Unwritten::RoundNotOpen)
        } else if self
            .by_key
            .contains_key(&(t.user.get(), bet.key.as_str().to_owned()))
        {
            Some(Unwritten::KeyTaken)
        } else {
            None
        }
    }

    /// Whether a placement whose stake the ledger decided before (a replay)
    /// asks for the bet that decision wrote: its bet key names the stake's
    /// bet, with the same round, side and amount. Otherwise its answer is a
    /// reused key, as a movement replayed with another payload is.
    pub(crate) fn replays(&self, t: &Transfer) -> bool {
        let Some(bet) = &t.bet else {
            return true;
        };
        self.by_key
            .get(&(t.user.get(), bet.key.as_str().to_owned()))
            .is_some_and(|b| {
                b.bet_id.to_string() == t.reference
                    && b.round_id == bet.round.as_str()
                    && b.side == bet.side.as_db()
                    && b.amount == t.amount.as_decimal()
            })
    }
}

fn placed(t: &Transfer) -> Result<&crate::BetPlacement, WalletError> {
    t.bet
        .as_ref()
        .ok_or_else(|| betting_db::StoreError::Corrupt("a placement without its bet".into()).into())
}

/// The bet rows of a batch's decided placements, written by the batch's
/// own write statement ([`insert_bets!`], in `Batch::write`): `PENDING`
/// (version 1, the balance after its stake) when held, `REJECTED` when
/// refused for want of funds; a hold otherwise refused or left undecided
/// (`Busy`) writes nothing. One statement for the balances, the ledger
/// rows, the refusals and the bets: one round trip fewer than writing the
/// bets on their own, and the rows' locks held that much less.
pub(crate) struct BetRows<'a> {
    /// Each row's hold, in `batch.movements`.
    holds: Vec<usize>,
    ids: Vec<Uuid>,
    users: Vec<i64>,
    keys: Vec<&'a str>,
    rounds: Vec<&'a str>,
    sides: Vec<&'static str>,
    amounts: Vec<Decimal>,
    balances: Vec<Option<Decimal>>,
}

/// The bets CTE of `Batch::write`'s statement, `b`, over `$16`–`$22`
/// (bound by [`BetRows::bind`]); its rows come back as `'b'` rows, the bet
/// id in `transfer_id`, with their `created_at` (and `updated_at`: one
/// clock reading a row, so the two are equal and the placement's answer
/// can carry the row whole: `Posted::bet_written_at`).
///
/// In the order of the bet key (see the module doc); a PENDING row at
/// version 1 and a REJECTED one at 0, as the PLACING saga left them. Stamped
/// with the clock, not the transaction's start: a lone placement may have
/// waited seconds for its wallet row, and the streams' sweep and resumes
/// read changes by `updated_at` with a margin of seconds. A row is written
/// only if its round is open, as the statement reads it.
macro_rules! insert_bets {
    () => {
        "b AS ( \
           INSERT INTO bets (bet_id, user_id, idempotency_key, round_id, side, amount, status, \
             reject_reason, balance_after, version, created_at, updated_at) \
           SELECT v.bet_id, v.user_id, v.key, v.round_id, v.side, v.amount, \
             CASE WHEN v.balance IS NULL THEN 'REJECTED' ELSE 'PENDING' END, \
             CASE WHEN v.balance IS NULL THEN 'INSUFFICIENT_FUNDS' END, \
             v.balance, CASE WHEN v.balance IS NULL THEN 0 ELSE 1 END, v.at, v.at \
           FROM (SELECT *, clock_timestamp() AS at \
                 FROM unnest($16::UUID[], $17::BIGINT[], $18::TEXT[], $19::TEXT[], $20::TEXT[], \
                             $21::NUMERIC[], $22::NUMERIC[]) \
                   WITH ORDINALITY AS u(bet_id, user_id, key, round_id, side, amount, balance, n)) v \
           WHERE EXISTS (SELECT 1 FROM rounds r WHERE r.round_id = v.round_id AND r.status = 'OPEN') \
           ORDER BY v.user_id, v.key, v.n \
           ON CONFLICT DO NOTHING \
           RETURNING bet_id, created_at), "
    };
}
pub(crate) use insert_bets;

impl<'a> BetRows<'a> {
    /// The rows `batch`'s decisions call for.
    pub(crate) fn of(batch: &Batch<'a>) -> Result<Self, WalletError> {
        let t = batch.movements;
        let mut rows = BetRows {
            holds: Vec::new(),
            ids: Vec::new(),
            users: Vec::new(),
            keys: Vec::new(),
            rounds: Vec::new(),
            sides: Vec::new(),
            amounts: Vec::new(),
            balances: Vec::new(),
        };
        for &i in &batch.new {
            let balance = match batch.decisions.get(&i) {
                Some(Decision::Move(_, balance)) => Some(*balance),
                Some(Decision::Record(WalletError::InsufficientFunds)) => None,
                _ => continue,
            };
            let bet = placed(&t[i])?;
            let id = Uuid::parse_str(&t[i].reference).map_err(|_| {
                betting_db::StoreError::Corrupt("a stake's reference is no bet id".into())
            })?;
            rows.holds.push(i);
            rows.ids.push(id);
            rows.users.push(t[i].user.get());
            rows.keys.push(bet.key.as_str());
            rows.rounds.push(bet.round.as_str());
            rows.sides.push(bet.side.as_db());
            rows.amounts.push(t[i].amount.as_decimal());
            rows.balances.push(balance);
        }
        Ok(rows)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Binds `$16`–`$22` of [`insert_bets!`].
    pub(crate) fn bind<'q>(
        &'q self,
        query: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
        query
            .bind(&self.ids)
            .bind(&self.users)
            .bind(&self.keys)
            .bind(&self.rounds)
            .bind(&self.sides)
            .bind(&self.amounts)
            .bind(&self.balances)
    }

    /// The holds whose rows the statement did not write (`written`: the
    /// bet ids it did), each with why: a race the pre-read could not see.
    /// The caller then rolls the transaction back.
    pub(crate) async fn unwritten(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
        written: &HashMap<Uuid, chrono::DateTime<chrono::Utc>>,
    ) -> Result<Vec<(usize, Unwritten)>, WalletError> {
        let missing: Vec<usize> = (0..self.ids.len())
            .filter(|&n| !written.contains_key(&self.ids[n]))
            .collect();
        if missing.is_empty() {
            return Ok(Vec::new());
        }
        let asked: Vec<&str> = missing.iter().map(|&n| self.rounds[n]).collect();
        let open: HashSet<String> = sqlx::query_scalar(
            "SELECT round_id FROM rounds WHERE round_id = ANY($1) AND status = 'OPEN'",
        )
        .bind(&asked)
        .fetch_all(&mut **tx)
        .await?
        .into_iter()
        .collect();
        Ok(missing
            .into_iter()
            .map(|n| {
                let why = if open.contains(self.rounds[n]) {
                    Unwritten::KeyTaken
                } else {
                    Unwritten::RoundNotOpen
                };
                (self.holds[n], why)
            })
            .collect())
    }
}
