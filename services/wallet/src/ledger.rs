//! The ledger: storage of wallets and movements.

use std::{collections::HashMap, sync::Arc};

use betting_db::StoreError;
use betting_domain::{
    Account, Amount, EntryKind, IdempotencyKey, RoundId, ServiceError, Side, UserId,
};
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use sqlx::PgPool;
use uuid::Uuid;

use betting_db::actions::{ActionKind, Actor, PrivilegedAction};

use crate::{
    WalletError, due,
    gate::UserGate,
    placement::{BetRows, Known, Unwritten},
};

/// Deposits may fill a wallet up to 10^15. Refunds and payouts are credited
/// past it (the money is owed); the column's CHECK is a far higher backstop.
pub const DEPOSIT_LIMIT: Decimal = Decimal::from_parts(2_764_472_320, 232_830, 0, false, 0);

/// A movement to post.
#[derive(Debug, Clone)]
pub struct Transfer {
    pub kind: EntryKind,
    pub user: UserId,
    pub amount: Amount,
    pub key: IdempotencyKey,
    /// A bet id for stakes and refunds, a match id for payouts, free text otherwise.
    pub reference: String,
    /// What must hold for the movement to be allowed, checked in its transaction.
    pub guard: Guard,
    /// Who asked, for a deposit or withdrawal: recorded in the
    /// privileged-action trail in the movement's own transaction.
    pub actor: Option<Actor>,
    /// For a stake of [`Ledger::place_stakes`]: the new bet it is for, whose
    /// row is written in the stake's transaction.
    pub bet: Option<BetPlacement>,
}

/// A new bet whose row a placement writes with its stake
/// ([`Ledger::place_stakes`]); its id is the stake's reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BetPlacement {
    pub round: RoundId,
    pub side: Side,
    /// The PlaceBet's key, unique per user among bets.
    pub key: IdempotencyKey,
}

/// Conditions checked under lock in the movement's own transaction, so that a
/// refund and a payout of the same bet can never both happen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Guard {
    None,
    /// Return a bet's stake: held by this user, for this amount, and the bet
    /// was not paid out.
    Refund {
        bet: Uuid,
    },
    /// Pay a match: both stakes held, each of `stake`, neither refunded nor
    /// paid before; the winner owns one of them and gets both.
    Payout {
        match_id: Uuid,
        bets: [Uuid; 2],
        stake: Decimal,
    },
}

/// One posted movement, as stored.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Entry {
    pub entry_id: i64,
    pub transfer_id: Uuid,
    pub idempotency_key: String,
    #[sqlx(try_from = "String")]
    pub kind: EntryKind,
    pub user_id: i64,
    #[sqlx(try_from = "String")]
    pub counterparty: Account,
    /// The signed change of the user's wallet.
    pub amount: Decimal,
    pub balance_after: Decimal,
    pub reference: String,
    pub created_at: DateTime<Utc>,
}

/// A wallet's balance at some moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalletView {
    pub user_id: i64,
    pub balance: Decimal,
    pub updated_at: Option<DateTime<Utc>>,
}

/// The outcome of [`Ledger::post`].
#[derive(Debug, Clone)]
pub struct Posted {
    pub entry: Entry,
    /// The wallet right after this movement (for a replay: right after the original).
    pub wallet: WalletView,
    /// Whether this was a retry answered from the original.
    pub replayed: bool,
    /// A placement's bet row, written by this movement: when (its
    /// `created_at` and `updated_at`). The row is then exactly what the
    /// placement asked for (see `placement.rs`), so its caller need not read
    /// it back.
    pub bet_written_at: Option<DateTime<Utc>>,
}

/// Wallets and the ledger in PostgreSQL.
#[derive(Clone)]
pub struct Ledger {
    pool: PgPool,
    gate: Arc<UserGate>,
}

/// The columns of [`Entry`], as a literal so queries stay `&'static str`.
macro_rules! entry_columns {
    () => {
        "entry_id, transfer_id, idempotency_key, kind, user_id, counterparty, \
         amount, balance_after, reference, created_at"
    };
}

impl Ledger {
    pub fn new(pool: PgPool) -> Self {
        Self {
            pool,
            gate: Arc::default(),
        }
    }

    /// Posts a movement exactly once per idempotency key, or refuses it for
    /// good.
    ///
    /// The contract: the same key and payload get the same answer, whatever
    /// the concurrency — the original entry, or the original refusal; the same
    /// key with another payload is refused and changes nothing. Every attempt
    /// takes the key's lock first and decides under it, with a fresh snapshot
    /// (READ COMMITTED: each statement sees everything committed before it
    /// started, and the lock is granted only after the previous holder
    /// committed or rolled back). So for one key exactly one decision is ever
    /// made, and every later or concurrent attempt finds it:
    ///
    /// - a retry racing the original waits for its lock, then replays it;
    /// - a refusal (insufficient funds, balance limit) is recorded under the
    ///   key in the same transaction, so a late retry cannot turn it into a
    ///   movement when the balance has changed meanwhile;
    /// - a reply lost after commit is recovered by the retry's replay.
    ///
    /// The debit itself is one conditional UPDATE, which also locks the
    /// wallet row, so concurrent debits with different keys serialise on it
    /// and can never overdraw; the CHECK constraint is the backstop.
    pub async fn post(&self, transfer: &Transfer) -> Result<Posted, WalletError> {
        let t = transfer;
        // The user's turn first, so waiting for it holds no connection.
        let _turn = self.gate.enter(t.user).await?;
        let mut tx = betting_db::begin(&self.pool).await?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('wallet-key:' || $1, 0))")
            .bind(t.key.as_str())
            .execute(&mut *tx)
            .await?;
        // Dropping `tx` on any early return rolls back (and unlocks).
        if let Some(existing) = entry_by_key(&mut tx, t.key.as_str()).await? {
            if let Guard::Payout { bets, .. } = &t.guard {
                // A payout's key names the match; the bets it paid must be
                // the ones asked for, too.
                let mut paid = paid_bets(&mut tx, existing.entry_id).await?;
                let mut asked = bets.to_vec();
                paid.sort();
                asked.sort();
                if paid != asked {
                    return Err(WalletError::IdempotencyConflict);
                }
            }
            return replay(existing, t);
        }
        if let Some(refusal) = refusal_by_key(&mut tx, t.key.as_str()).await? {
            return Err(refusal.replay(t));
        }
        // Whether the betting side owes this refund or payout at all
        // (`due.rs`). Its refusals are not recorded under the key: "not due
        // yet" may become due (a round settled later), and the key must then
        // still be free. A payout is checked first, so that a payout asked
        // wrongly (a loser, a wrong amount) never records a guard refusal
        // that would then block the real one; a refund after the guard, whose
        // answers (ALREADY_PAID, NO_MATCHING_STAKE) stay the key's as before.
        let payout = matches!(t.guard, Guard::Payout { .. });
        if payout {
            due::check(&mut tx, t).await?;
        }
        if let Err(refusal) = check_guard(&mut tx, t).await {
            // A guard's refusal is the key's answer for good, like any other.
            if let Some(reason) = refusal.recorded_reason() {
                record_refusal(&mut tx, t, reason).await?;
                tx.commit().await?;
            }
            return Err(refusal);
        }
        if !payout {
            due::check(&mut tx, t).await?;
        }
        let (counterparty, credit) = t.kind.counterparty();
        let delta = if credit {
            t.amount.as_decimal()
        } else {
            -t.amount.as_decimal()
        };
        let wallet: Option<(Decimal, DateTime<Utc>)> = if credit {
            // A credit creates the wallet on first use. Deposits may fill a
            // wallet up to the limit; money owed back (refunds, payouts) is
            // always credited, so it can never be stuck behind the limit.
            let limit = (t.kind == EntryKind::Deposit).then_some(DEPOSIT_LIMIT);
            sqlx::query_as(
                "INSERT INTO wallets AS w (user_id, balance) VALUES ($1, $2) \
                 ON CONFLICT (user_id) DO UPDATE \
                   SET balance = w.balance + EXCLUDED.balance, updated_at = now() \
                   WHERE $3::NUMERIC IS NULL OR w.balance + EXCLUDED.balance <= $3 \
                 RETURNING balance, updated_at",
            )
            .bind(t.user.get())
            .bind(delta)
            .bind(limit)
            .fetch_optional(&mut *tx)
            .await?
        } else {
            // A missing wallet holds nothing: no row, no debit.
            sqlx::query_as(
                "UPDATE wallets SET balance = balance + $2, updated_at = now() \
                 WHERE user_id = $1 AND balance + $2 >= 0 \
                 RETURNING balance, updated_at",
            )
            .bind(t.user.get())
            .bind(delta)
            .fetch_optional(&mut *tx)
            .await?
        };
        let Some((balance, updated_at)) = wallet else {
            let refusal = if credit {
                WalletError::BalanceLimit
            } else {
                WalletError::InsufficientFunds
            };
            record_refusal(&mut tx, t, refusal.reason().as_str()).await?;
            tx.commit().await?;
            return Err(refusal);
        };
        // The key lock makes the key new here; its unique index is the backstop.
        let entry: Entry = sqlx::query_as(concat!(
            "INSERT INTO ledger_entries \
               (transfer_id, idempotency_key, kind, user_id, counterparty, amount, balance_after, reference) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
             RETURNING ", entry_columns!(), ""
        ))
        .bind(Uuid::now_v7())
        .bind(t.key.as_str())
        .bind(t.kind.as_db())
        .bind(t.user.get())
        .bind(counterparty.as_db())
        .bind(delta)
        .bind(balance)
        .bind(&t.reference)
        .fetch_one(&mut *tx)
        .await?;
        if let Guard::Payout { bets, .. } = &t.guard {
            // The primary key makes "each bet paid at most once" a database fact.
            sqlx::query("INSERT INTO payout_bets (bet_id, entry_id) SELECT unnest($1::UUID[]), $2")
                .bind(&bets[..])
                .bind(entry.entry_id)
                .execute(&mut *tx)
                .await?;
        }
        if let Some(actor) = &t.actor {
            let kind = match t.kind {
                EntryKind::Deposit => Some(ActionKind::Deposit),
                EntryKind::Withdrawal => Some(ActionKind::Withdrawal),
                _ => None,
            };
            if let Some(kind) = kind {
                let action = PrivilegedAction {
                    actor,
                    kind,
                    target: format!("user:{}", t.user.get()),
                    idempotency_key: Some(t.key.as_str()),
                    detail: vec![
                        ("amount", t.amount.as_decimal().to_string()),
                        ("entry_id", entry.entry_id.to_string()),
                        ("reference", t.reference.clone()),
                    ],
                };
                betting_db::actions::record(&mut tx, &action).await?;
            }
        }
        tx.commit().await?;
        Ok(Posted {
            entry,
            wallet: WalletView {
                user_id: t.user.get(),
                balance,
                updated_at: Some(updated_at),
            },
            replayed: false,
            bet_written_at: None,
        })
    }

    /// Holds many bets' stakes in one transaction (group commit): each hold
    /// gets exactly the answer [`Ledger::post`] would give it alone — the
    /// stake held, the key's earlier answer replayed, `InsufficientFunds`
    /// recorded under its key, or a reused key refused — and one user's
    /// refusal never fails another's hold. Only an error of the whole call
    /// (`Err`, nothing committed) leaves every hold undecided.
    ///
    /// Every hold must be a stake (`EntryKind::Stake`, no guard, no actor):
    /// the service builds them so. The same contract as `post`, made for a
    /// batch ([`Batch`]):
    ///
    /// - every key's advisory lock is taken first, in the order of the
    ///   lock's hash (the lock is on the hash), so two batches, or a batch
    ///   and a single movement (which takes one key lock), never wait on each
    ///   other in a cycle; then the keys' earlier decisions are read with a
    ///   fresh snapshot, as `post` does;
    /// - the same statement locks the wallet rows of the new holds' users,
    ///   `FOR UPDATE SKIP LOCKED` in user order (rows after keys, as in
    ///   `post`); a row another movement holds is skipped, and the undecided
    ///   holds on it answered `Busy` (nothing recorded: the caller holds them
    ///   alone), so a held row never stalls the batch and two batches never
    ///   wait on each other's rows; debits are decided in request order
    ///   against the locked balances, each never below zero;
    /// - one statement writes it all: an UPDATE of each user's new balance
    ///   (as a delta, checked against the balance computed here), an INSERT
    ///   of the ledger rows (in request order, so each user's `balance_after`
    ///   chain follows entry ids, their count checked) and an INSERT of the
    ///   refusals, each a CTE; one commit. Five round trips with BEGIN and the
    ///   commit, whatever the batch's size (one more when a new hold's row
    ///   was skipped or is missing: which of the two).
    /// - a key twice in one call runs in a later wave ([`Wave`]).
    pub async fn hold_stakes(
        &self,
        holds: &[Transfer],
    ) -> Result<Vec<Result<Posted, WalletError>>, WalletError> {
        self.in_waves(holds, Wave::Stakes).await
    }

    /// Places new bets (PlaceStakes): each hold is decided exactly as
    /// [`Self::hold_stakes`] decides it, and in the same transaction the
    /// bet row of each new hold is written (`placement.rs` has the protocol
    /// and the interleavings), so a stake and its bet commit together or
    /// not at all. Every hold carries its [`BetPlacement`]. With `wait`
    /// (exactly one hold: a lone placement) a wallet row another movement
    /// holds is waited for, behind the user's turn, instead of answered
    /// `Busy`.
    pub async fn place_stakes(
        &self,
        holds: &[Transfer],
        wait: bool,
    ) -> Result<Vec<Result<Posted, WalletError>>, WalletError> {
        if holds.is_empty() {
            // Every placement of the call was malformed (refused by the service).
            return Ok(Vec::new());
        }
        if holds.iter().any(|t| t.bet.is_none()) || (wait && holds.len() != 1) {
            return Err(StoreError::Corrupt(
                "a placement without its bet, or a waiting one with others".into(),
            )
            .into());
        }
        // Alone, the user's turn first, as `post` takes it.
        let _turn = match wait {
            true => Some(self.gate.enter(holds[0].user).await?),
            false => None,
        };
        self.in_waves(holds, Wave::Placements { wait }).await
    }

    /// One wave of [`Self::place_stakes`]. A placement whose bet row could
    /// not be written though the pre-read found its round open and its key
    /// new (a race: another transaction wrote the key, or closed the round,
    /// meanwhile) undoes the transaction, and the wave runs again with those
    /// placements answered why (`ROUND_NOT_OPEN`, `IDEMPOTENCY_KEY_REUSED`:
    /// final, as bets are never deleted and rounds never reopen), since the
    /// holds decided after them counted their stakes. Each run leaves out at
    /// least one more, so this ends; past a race, it is one run.
    async fn place_stakes_once(
        &self,
        holds: &[Transfer],
        wait: bool,
    ) -> Result<Vec<Result<Posted, WalletError>>, WalletError> {
        let mut left_out: Vec<(usize, Unwritten)> = Vec::new();
        loop {
            match self
                .hold_stakes_once(
                    holds,
                    Mode::Place {
                        wait,
                        left_out: &left_out,
                    },
                )
                .await?
            {
                Held::Done(answers) => return Ok(answers),
                Held::Unwritten(unwritten) => left_out.extend(unwritten),
            }
        }
    }

    /// One wave of [`Self::hold_stakes`] or [`Self::place_stakes`]: every
    /// key once.
    async fn hold_stakes_once(
        &self,
        holds: &[Transfer],
        mode: Mode<'_>,
    ) -> Result<Held, WalletError> {
        if holds.is_empty() {
            return Ok(Held::Done(Vec::new()));
        }
        let mut tx = betting_db::begin(&self.pool).await?;
        // A wallet row another movement holds is skipped, never waited for:
        // one user's held row must not stall everyone else's bets in the
        // batch. Its holds are answered `Busy` (nothing recorded) and the
        // caller holds them alone, behind the per-user gate. The rows are
        // locked by the statement that reads the keys' earlier decisions
        // (one round trip fewer), from the same snapshot: exactly the users
        // of the holds new to the ledger.
        let locks = match mode {
            Mode::Place { wait: true, .. } => WalletLocks::Wait,
            _ => WalletLocks::SkipLocked,
        };
        let place = matches!(mode, Mode::Place { .. });
        let (mut batch, locked, known) = Batch::open(&mut tx, holds, locks, place).await?;
        let users = batch.users_of_new();
        let mut balances: HashMap<i64, Decimal> = locked.into_iter().collect();
        // The statement decided "new" from the rows `Batch` decides from, so
        // anything else is a bug; and the count below, which tells a skipped
        // row from a missing one, relies on it.
        if balances
            .keys()
            .any(|user| users.binary_search(user).is_err())
        {
            return Err(StoreError::Corrupt(
                "a batch locked the wallet of a user with no new hold".into(),
            )
            .into());
        }
        let busy: Vec<i64> = if balances.len() < users.len() {
            // Of the rest, those whose row exists were skipped (held); the
            // others have no wallet, which holds nothing.
            sqlx::query_scalar("SELECT user_id FROM wallets WHERE user_id = ANY($1)")
                .bind(&users)
                .fetch_all(&mut *tx)
                .await?
                .into_iter()
                .filter(|u| !balances.contains_key(u))
                .collect()
        } else {
            Vec::new()
        };
        let before = balances.clone();
        // A placement's bet first: its round open and its key new, as
        // `open` read them, and a replayed stake's bet the one asked for.
        let left_out = match mode {
            Mode::Place { left_out, .. } => left_out,
            Mode::Hold => &[][..],
        };
        if let Some(known) = &known {
            for (i, t) in holds.iter().enumerate() {
                if !batch.new.contains(&i) && !known.replays(t) {
                    batch.refuse_replay(i, WalletError::IdempotencyConflict);
                }
            }
        }
        // A bet key twice among a call's new placements (a client's retry
        // racing its original into one batch): only the first is decided
        // here. The others are left to their callers to place alone
        // (`Busy`), after this transaction: whether the key is then taken
        // depends on whether this transaction writes the first, which
        // nothing here may answer for before it commits.
        let mut bet_keys: std::collections::HashSet<(i64, &str)> = std::collections::HashSet::new();
        // In request order: each debit against what the earlier ones left.
        for i in batch.new.clone() {
            let t = &holds[i];
            if let Some(bet) = &t.bet
                && !bet_keys.insert((t.user.get(), bet.key.as_str()))
            {
                batch.decide(i, Decision::Skip(WalletError::Busy(crate::gate::UserBusy)));
                continue;
            }
            let unwritten = left_out
                .iter()
                .find(|(j, _)| *j == i)
                .map(|(_, why)| *why)
                .or_else(|| known.as_ref().and_then(|k| k.unwritable(t)));
            if let Some(why) = unwritten {
                batch.decide(i, Decision::Skip(why.refusal()));
                continue;
            }
            if busy.contains(&t.user.get()) {
                batch.decide(i, Decision::Skip(WalletError::Busy(crate::gate::UserBusy)));
                continue;
            }
            // A missing wallet holds nothing.
            match balances.get_mut(&t.user.get()) {
                Some(balance) if *balance >= t.amount.as_decimal() => {
                    *balance -= t.amount.as_decimal();
                    batch.decide(i, Decision::Move(-t.amount.as_decimal(), *balance));
                }
                _ => batch.decide(i, Decision::Record(WalletError::InsufficientFunds)),
            }
        }
        let bets = place.then(|| BetRows::of(&batch)).transpose()?;
        let (answers, written) = batch
            .write(&mut tx, EntryKind::Stake, &before, &balances, bets.as_ref())
            .await?;
        if let Some(bets) = &bets {
            let unwritten = bets.unwritten(&mut tx, &written).await?;
            if !unwritten.is_empty() {
                // Dropping `tx` rolls it all back.
                return Ok(Held::Unwritten(unwritten));
            }
        }
        tx.commit().await?;
        Ok(Held::Done(answers))
    }

    /// Pays many matches in one transaction (the settler's batches): each
    /// payout gets exactly the answer [`Ledger::post`] would give it alone,
    /// and one refused payout never fails another. Every payout must carry
    /// its `Guard::Payout` (the service builds them so).
    ///
    /// `post`'s steps for a payout, made for a batch ([`Batch`]): every key's
    /// lock in hash order and the keys' earlier decisions (a replay also
    /// compares the bets it paid); then whether each new payout is due
    /// (`due.rs`: refused, not recorded); then every bet's lock, sorted by
    /// bet id as `post` sorts them (so a batch and a lone movement over the
    /// same bets never deadlock); then the guard, as `post` checks it (a
    /// refusal recorded under its key), with the bets paid earlier in the
    /// batch counted as paid; then the winners' wallet rows `FOR UPDATE` in
    /// user order (created empty if missing, as `post`'s credit would), the
    /// credits in request order, one statement for the UPDATE, the ledger
    /// INSERT and the refusal INSERT, one `payout_bets` INSERT, one commit.
    /// A key twice in one call runs in a later wave ([`Wave`]).
    pub async fn pay_winnings_batch(
        &self,
        payouts: &[Transfer],
    ) -> Result<Vec<Result<Posted, WalletError>>, WalletError> {
        self.in_waves(payouts, Wave::Payouts).await
    }

    /// One wave of [`Self::pay_winnings_batch`]: every key once.
    async fn pay_winnings_once(
        &self,
        payouts: &[Transfer],
    ) -> Result<Vec<Result<Posted, WalletError>>, WalletError> {
        if payouts.is_empty() {
            return Ok(Vec::new());
        }
        let mut tx = betting_db::begin(&self.pool).await?;
        let (mut batch, _, _) = Batch::open(&mut tx, payouts, WalletLocks::None, false).await?;
        // A replayed payout must have paid the bets asked for.
        let replayed: Vec<i64> = batch.entries.values().map(|e| e.entry_id).collect();
        if !replayed.is_empty() {
            let paid: Vec<(i64, Uuid)> =
                sqlx::query_as("SELECT entry_id, bet_id FROM payout_bets WHERE entry_id = ANY($1)")
                    .bind(&replayed)
                    .fetch_all(&mut *tx)
                    .await?;
            for (i, t) in payouts.iter().enumerate() {
                let (Some(entry), Guard::Payout { bets, .. }) =
                    (batch.entries.get(t.key.as_str()), &t.guard)
                else {
                    continue;
                };
                let mut by_entry: Vec<Uuid> = paid
                    .iter()
                    .filter(|(e, _)| *e == entry.entry_id)
                    .map(|(_, b)| *b)
                    .collect();
                let mut asked = bets.to_vec();
                by_entry.sort();
                asked.sort();
                if by_entry != asked {
                    batch.answers[i] = Some(Err(WalletError::IdempotencyConflict));
                }
            }
        }

        // Due (not recorded), checked first as `post` checks a payout.
        let match_ids: Vec<Uuid> = batch
            .new
            .iter()
            .filter_map(|&i| match &payouts[i].guard {
                Guard::Payout { match_id, .. } => Some(*match_id),
                _ => None,
            })
            .collect();
        let matches = due::payout_matches(&mut tx, &match_ids).await?;
        for i in batch.new.clone() {
            let t = &payouts[i];
            let match_id = match &t.guard {
                Guard::Payout { match_id, .. } => *match_id,
                _ => Uuid::nil(),
            };
            if let Err(e) = due::payout_due(matches.get(&match_id), t) {
                batch.decide(i, Decision::Skip(e));
            }
        }

        // The guard, under every bet's lock.
        let mut bets: Vec<Uuid> = batch
            .undecided()
            .flat_map(|i| match &payouts[i].guard {
                Guard::Payout { bets, .. } => bets.to_vec(),
                _ => Vec::new(),
            })
            .collect();
        bets.sort();
        bets.dedup();
        sqlx::query(
            "SELECT count(pg_advisory_xact_lock(hashtextextended('bet:' || b::TEXT, 0))) \
             FROM (SELECT b FROM unnest($1::UUID[]) AS b ORDER BY b) AS locks",
        )
        .bind(&bets)
        .execute(&mut *tx)
        .await?;
        let references: Vec<String> = bets.iter().map(Uuid::to_string).collect();
        let rows: Vec<(String, i64, Decimal)> = sqlx::query_as(
            "SELECT reference, user_id, -amount FROM ledger_entries \
             WHERE kind = 'STAKE' AND reference = ANY($1)",
        )
        .bind(&references)
        .fetch_all(&mut *tx)
        .await?;
        // The stakes held per bet (a stake's reference is its bet id).
        let mut stakes: HashMap<Uuid, Vec<HeldStake>> = HashMap::new();
        for (reference, user_id, held) in rows {
            if let Ok(bet) = Uuid::parse_str(&reference) {
                stakes
                    .entry(bet)
                    .or_default()
                    .push(HeldStake { user_id, held });
            }
        }
        let mut paid: std::collections::HashSet<Uuid> =
            sqlx::query_scalar("SELECT bet_id FROM payout_bets WHERE bet_id = ANY($1)")
                .bind(&bets)
                .fetch_all(&mut *tx)
                .await?
                .into_iter()
                .collect();
        let refund_keys: Vec<String> = bets
            .iter()
            .map(|b| IdempotencyKey::refund(betting_domain::BetId::from(*b)).to_string())
            .collect();
        let refunded: std::collections::HashSet<String> = sqlx::query_scalar(
            "SELECT idempotency_key FROM ledger_entries WHERE idempotency_key = ANY($1)",
        )
        .bind(&refund_keys)
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .collect();

        let mut winners: Vec<i64> = batch.undecided().map(|i| payouts[i].user.get()).collect();
        winners.sort_unstable();
        winners.dedup();
        // A credit creates the wallet on first use, as `post`'s does.
        sqlx::query(
            "INSERT INTO wallets (user_id, balance) SELECT u, 0 FROM unnest($1::BIGINT[]) AS u \
             ON CONFLICT (user_id) DO NOTHING",
        )
        .bind(&winners)
        .execute(&mut *tx)
        .await?;
        let locked: Vec<(i64, Decimal)> = sqlx::query_as(
            "SELECT user_id, balance FROM wallets WHERE user_id = ANY($1) \
             ORDER BY user_id FOR UPDATE",
        )
        .bind(&winners)
        .fetch_all(&mut *tx)
        .await?;
        let mut balances: HashMap<i64, Decimal> = locked.into_iter().collect();
        let before = balances.clone();
        for i in batch.undecided().collect::<Vec<_>>() {
            let t = &payouts[i];
            let Guard::Payout { bets, stake, .. } = &t.guard else {
                continue;
            };
            let held: Vec<HeldStake> = bets
                .iter()
                .flat_map(|b| stakes.get(b).into_iter().flatten())
                .cloned()
                .collect();
            let was_paid = bets.iter().any(|b| paid.contains(b));
            let was_refunded = bets.iter().any(|b| {
                refunded
                    .contains(&IdempotencyKey::refund(betting_domain::BetId::from(*b)).to_string())
            });
            if let Err(refusal) = payout_guard(&held, was_paid, was_refunded, t, *stake) {
                batch.decide(
                    i,
                    match refusal.recorded_reason() {
                        Some(_) => Decision::Record(refusal),
                        None => Decision::Skip(refusal),
                    },
                );
                continue;
            }
            let credit = t.amount.as_decimal();
            match balances.get_mut(&t.user.get()) {
                // The column's backstop, far past the deposit limit: refused
                // as `post` refuses it (its CHECK rolls `post` back, so
                // nothing is recorded).
                Some(balance) if *balance + credit <= BALANCE_BACKSTOP => {
                    *balance += credit;
                    paid.extend(bets.iter().copied());
                    batch.decide(i, Decision::Move(credit, *balance));
                }
                Some(_) => batch.decide(i, Decision::Skip(WalletError::BalanceLimit)),
                None => {
                    return Err(StoreError::Corrupt(format!(
                        "the wallet of {} was neither found nor created",
                        t.user
                    ))
                    .into());
                }
            }
        }
        let moved: Vec<(usize, Uuid, Uuid)> = batch
            .moved()
            .filter_map(|i| match &payouts[i].guard {
                Guard::Payout { bets, .. } => Some((i, bets[0], bets[1])),
                _ => None,
            })
            .collect();
        let answers = batch
            .write(&mut tx, EntryKind::Payout, &before, &balances, None)
            .await?
            .0;
        // The primary key makes "each bet paid at most once" a database fact.
        if !moved.is_empty() {
            let mut bet_ids = Vec::new();
            let mut entry_ids = Vec::new();
            for (i, a, b) in &moved {
                if let Some(Ok(posted)) = answers.get(*i) {
                    bet_ids.extend([*a, *b]);
                    entry_ids.extend([posted.entry.entry_id; 2]);
                }
            }
            sqlx::query(
                "INSERT INTO payout_bets (bet_id, entry_id) \
                 SELECT * FROM unnest($1::UUID[], $2::BIGINT[])",
            )
            .bind(&bet_ids)
            .bind(&entry_ids)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(answers)
    }

    /// Runs a batch as consecutive transactions ("waves") in which every key
    /// appears once: a key's second movement goes in the next wave, after
    /// the first's commit, so it is answered exactly as a lone call made
    /// after the first would be (a replay, the same refusal, a reused key,
    /// or — when the first was refused without being recorded — its own
    /// decision). Answers come back in request order; a batch without a
    /// repeated key is one wave.
    async fn in_waves(
        &self,
        movements: &[Transfer],
        wave: Wave,
    ) -> Result<Vec<Result<Posted, WalletError>>, WalletError> {
        // The wave of each movement: one more than its key's previous one.
        let mut seen: HashMap<&str, usize> = HashMap::new();
        let waves: Vec<usize> = movements
            .iter()
            .map(|t| {
                let n = seen.get(t.key.as_str()).map_or(0, |w| w + 1);
                seen.insert(t.key.as_str(), n);
                n
            })
            .collect();
        let mut answers: Vec<Option<Result<Posted, WalletError>>> =
            movements.iter().map(|_| None).collect();
        for n in 0..=waves.iter().copied().max().unwrap_or(0) {
            let members: Vec<usize> = (0..movements.len()).filter(|&i| waves[i] == n).collect();
            let batch: Vec<Transfer> = members.iter().map(|&i| movements[i].clone()).collect();
            let posted = match wave {
                Wave::Stakes => match self.hold_stakes_once(&batch, Mode::Hold).await? {
                    Held::Done(answers) => answers,
                    Held::Unwritten(_) => {
                        return Err(StoreError::Corrupt("a hold wrote a bet".into()).into());
                    }
                },
                Wave::Placements { wait } => self.place_stakes_once(&batch, wait).await?,
                Wave::Payouts => self.pay_winnings_once(&batch).await?,
            };
            for (i, answer) in members.into_iter().zip(posted) {
                answers[i] = Some(answer);
            }
        }
        Ok(answers
            .into_iter()
            .map(|a| a.unwrap_or(Err(WalletError::IdempotencyConflict)))
            .collect())
    }

    pub async fn wallet(&self, user: UserId) -> Result<WalletView, WalletError> {
        let row: Option<(Decimal, DateTime<Utc>)> =
            sqlx::query_as("SELECT balance, updated_at FROM wallets WHERE user_id = $1")
                .bind(user.get())
                .fetch_optional(&self.pool)
                .await?;
        Ok(match row {
            Some((balance, updated_at)) => WalletView {
                user_id: user.get(),
                balance,
                updated_at: Some(updated_at),
            },
            None => WalletView {
                user_id: user.get(),
                balance: Decimal::ZERO,
                updated_at: None,
            },
        })
    }

    /// A page of a user's entries, newest first, strictly before `before`.
    pub async fn entries(
        &self,
        user: UserId,
        before: Option<i64>,
        limit: i64,
    ) -> Result<Vec<Entry>, WalletError> {
        Ok(sqlx::query_as(concat!(
            "SELECT ",
            entry_columns!(),
            " FROM ledger_entries \
             WHERE user_id = $1 AND ($2::BIGINT IS NULL OR entry_id < $2) \
             ORDER BY entry_id DESC LIMIT $3"
        ))
        .bind(user.get())
        .bind(before)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?)
    }
}

/// The wallets table's CHECK backstop on a balance (10^18).
const BALANCE_BACKSTOP: Decimal = Decimal::from_parts(2_808_348_672, 232_830_643, 0, false, 0);

/// Which batch [`Ledger::in_waves`] runs.
#[derive(Clone, Copy)]
enum Wave {
    Stakes,
    Placements { wait: bool },
    Payouts,
}

/// What [`Ledger::hold_stakes_once`] does besides holding.
#[derive(Clone, Copy)]
enum Mode<'a> {
    /// Holds only (HoldStakes).
    Hold,
    /// Writes each new hold's bet too (PlaceStakes); `left_out` are answered
    /// why their rows could not be written.
    Place {
        wait: bool,
        left_out: &'a [(usize, Unwritten)],
    },
}

/// The end of one transaction of [`Ledger::hold_stakes_once`].
enum Held {
    /// Committed: every hold's answer.
    Done(Vec<Result<Posted, WalletError>>),
    /// Rolled back: the bets of these holds could not be written.
    Unwritten(Vec<(usize, Unwritten)>),
}

/// Which wallet rows [`Batch::open`] locks.
#[derive(Clone, Copy, PartialEq, Eq)]
enum WalletLocks {
    /// None (payouts lock their winners' rows themselves).
    None,
    /// The new holds' users', skipping rows another transaction holds.
    SkipLocked,
    /// The new holds' users', waiting for them (a lone placement).
    Wait,
}

/// What a batch decided for one movement.
pub(crate) enum Decision {
    /// Moved: the signed change of the wallet and the balance right after.
    Move(Decimal, Decimal),
    /// Refused for good: recorded under its key.
    Record(WalletError),
    /// Refused, not recorded (not due, busy, a backstop): the key stays free.
    Skip(WalletError),
}

/// The shared part of [`Ledger::hold_stakes`] and
/// [`Ledger::pay_winnings_batch`]: the keys' locks and earlier decisions,
/// each movement's answer, and the writes.
pub(crate) struct Batch<'a> {
    pub(crate) movements: &'a [Transfer],
    /// Answers known so far (replays, refusals, decisions).
    answers: Vec<Option<Result<Posted, WalletError>>>,
    entries: HashMap<String, Entry>,
    /// The movements whose keys are new to the ledger, in request order.
    pub(crate) new: Vec<usize>,
    pub(crate) decisions: HashMap<usize, Decision>,
}

impl<'a> Batch<'a> {
    /// Takes every key's lock in hash order (the lock is on the hash: two
    /// batches, or a batch and a lone movement, never wait in a cycle) and
    /// answers what the keys decided before. Every key appears once (a wave
    /// of [`Ledger::in_waves`]).
    ///
    /// With `lock_wallets` (holds and placements), the same statement that reads those
    /// decisions locks the wallet rows of the movements new to the ledger
    /// (keys with neither an entry nor a refusal, decided from the same
    /// snapshot, so exactly [`Batch::users_of_new`]) that no other
    /// transaction holds (`FOR UPDATE SKIP LOCKED`, in user order) and
    /// answers their balances: one round trip, not three. A replay's user is
    /// not locked, so a replay never makes another batch's hold of that user
    /// `Busy`. The statement runs after the keys' locks are taken, so its
    /// snapshot holds every decision made under them.
    ///
    /// With `place` (placements, which lock wallets), the placements'
    /// [`Known`] as well: in a batch from the same statement and snapshot; a
    /// lone placement (`Wait`) in a statement of its own after the wait.
    async fn open(
        tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
        movements: &'a [Transfer],
        lock_wallets: WalletLocks,
        place: bool,
    ) -> Result<(Batch<'a>, Vec<(i64, Decimal)>, Option<Known>), WalletError> {
        use sqlx::{FromRow, Row};
        let keys: Vec<&str> = movements.iter().map(|t| t.key.as_str()).collect();
        // The aggregate consumes the sorted subquery row by row, so the locks
        // are taken in hash order.
        sqlx::query(
            "SELECT count(pg_advisory_xact_lock(h)) FROM ( \
               SELECT DISTINCT hashtextextended('wallet-key:' || k, 0) AS h \
               FROM unnest($1::TEXT[]) AS k ORDER BY h) AS locks",
        )
        .bind(&keys)
        .execute(&mut **tx)
        .await?;
        // Up to three kinds of row in one result, told apart by `src`: the
        // keys' entries ('e'), their recorded refusals ('r', in the entry's
        // columns of the same name, plus `reason`), and the locked wallets
        // ('w': `user_id`, and the balance as `balance_after`).
        macro_rules! decisions {
            () => {
                concat!(
                    "SELECT 'e' AS src, ",
                    entry_columns!(),
                    ", NULL::TEXT AS reason FROM ledger_entries WHERE idempotency_key = ANY($1) \
                     UNION ALL \
                     SELECT 'r', NULL, NULL, idempotency_key, kind, user_id, NULL, amount, NULL, \
                       reference, NULL, reason FROM wallet_refusals WHERE idempotency_key = ANY($1)"
                )
            };
        }
        // The wallet rows of the holds new to the ledger, locked in user
        // order; `$lock` is how a row another transaction holds is met.
        macro_rules! locked_wallets {
            ($lock:literal) => {
                concat!(
                    "WITH w AS (SELECT user_id, balance FROM wallets WHERE user_id IN ( \
                       SELECT m.u FROM unnest($1::TEXT[], $2::BIGINT[]) AS m(k, u) \
                       WHERE NOT EXISTS (SELECT 1 FROM ledger_entries e WHERE e.idempotency_key = m.k) \
                         AND NOT EXISTS (SELECT 1 FROM wallet_refusals f WHERE f.idempotency_key = m.k)) \
                     ORDER BY user_id ",
                    $lock,
                    ") ",
                    decisions!(),
                    " UNION ALL \
                     SELECT 'w', NULL, NULL, NULL, NULL, user_id, NULL, NULL, balance, NULL, NULL, NULL \
                     FROM w"
                )
            };
        }
        let users: Vec<i64> = movements.iter().map(|t| t.user.get()).collect();
        let (rounds, bet_keys) = match place {
            true => Known::asked(movements)?,
            false => (Vec::new(), Vec::new()),
        };
        // A batch never waits for a wallet row (SKIP LOCKED), so its
        // statement's snapshot is as good as any later one's for the
        // placements' bets and rounds; a lone placement's statement may wait
        // for its row, and reads them after (see `Known`).
        let known_after = place && lock_wallets == WalletLocks::Wait;
        let with_known = place && !known_after;
        let query = match (lock_wallets, with_known) {
            (WalletLocks::SkipLocked, false) => {
                sqlx::query(locked_wallets!("FOR UPDATE SKIP LOCKED"))
            }
            (WalletLocks::Wait, false) => sqlx::query(locked_wallets!("FOR UPDATE")),
            (WalletLocks::SkipLocked, true) => sqlx::query(concat!(
                locked_wallets!("FOR UPDATE SKIP LOCKED"),
                " UNION ALL ",
                crate::placement::known_rows!("$2", "$3", "$4")
            )),
            (WalletLocks::None, false) => sqlx::query(decisions!()),
            (WalletLocks::Wait | WalletLocks::None, true) => {
                return Err(
                    StoreError::Corrupt("a placement's batch that locks no wallet".into()).into(),
                );
            }
        };
        let query = match lock_wallets {
            WalletLocks::None => query.bind(&keys),
            _ => query.bind(&keys).bind(&users),
        };
        let query = match with_known {
            true => query.bind(&rounds).bind(&bet_keys),
            false => query,
        };
        let mut rows = query.fetch_all(&mut **tx).await?;
        if known_after {
            rows.extend(
                sqlx::query(crate::placement::known_rows!("$1", "$2", "$3"))
                    .bind(&users)
                    .bind(&rounds)
                    .bind(&bet_keys)
                    .fetch_all(&mut **tx)
                    .await?,
            );
        }
        let mut known = Known::default();
        let mut entries = Vec::new();
        let mut refusals = Vec::new();
        let mut locked = Vec::new();
        for row in &rows {
            let src: &str = row.try_get("src").map_err(StoreError::from)?;
            match src {
                "e" => entries.push(Entry::from_row(row).map_err(StoreError::from)?),
                "r" => refusals.push(KeyedRefusal::from_row(row).map_err(StoreError::from)?),
                "o" | "k" if place => known.add(src, row)?,
                "w" => locked.push((
                    row.try_get::<i64, _>("user_id").map_err(StoreError::from)?,
                    row.try_get::<Decimal, _>("balance_after")
                        .map_err(StoreError::from)?,
                )),
                other => {
                    return Err(StoreError::Corrupt(format!(
                        "a batch's decisions named a row source {other:?}"
                    ))
                    .into());
                }
            }
        }
        let entries: HashMap<String, Entry> = entries
            .into_iter()
            .map(|e| (e.idempotency_key.clone(), e))
            .collect();
        let refusals: HashMap<String, Refusal> = refusals
            .into_iter()
            .map(|r| (r.idempotency_key, r.refusal))
            .collect();
        let mut batch = Batch {
            movements,
            answers: movements.iter().map(|_| None).collect(),
            entries,
            new: Vec::new(),
            decisions: HashMap::new(),
        };
        for (i, t) in movements.iter().enumerate() {
            if let Some(existing) = batch.entries.get(t.key.as_str()) {
                batch.answers[i] = Some(replay(existing.clone(), t));
            } else if let Some(refusal) = refusals.get(t.key.as_str()) {
                batch.answers[i] = Some(Err(refusal.replay(t)));
            } else {
                batch.new.push(i);
            }
        }
        Ok((batch, locked, place.then_some(known)))
    }

    /// The users of the movements new to the ledger, sorted, once each.
    fn users_of_new(&self) -> Vec<i64> {
        let mut users: Vec<i64> = self
            .new
            .iter()
            .map(|&i| self.movements[i].user.get())
            .collect();
        users.sort_unstable();
        users.dedup();
        users
    }

    /// Answers a movement the ledger had decided before with `refusal`
    /// instead of its replay (a placement naming another bet than its
    /// stake's).
    fn refuse_replay(&mut self, i: usize, refusal: WalletError) {
        self.answers[i] = Some(Err(refusal));
    }

    fn decide(&mut self, i: usize, decision: Decision) {
        self.decisions.insert(i, decision);
    }

    /// New movements not decided yet, in request order.
    fn undecided(&self) -> impl Iterator<Item = usize> + '_ {
        self.new
            .iter()
            .copied()
            .filter(|i| !self.decisions.contains_key(i))
    }

    /// Movements decided `Move`, in request order.
    fn moved(&self) -> impl Iterator<Item = usize> + '_ {
        self.new
            .iter()
            .copied()
            .filter(|i| matches!(self.decisions.get(i), Some(Decision::Move(..))))
    }

    /// Writes the decisions — each user's balance as one delta (checked
    /// against what was computed from the locked rows), the ledger rows in
    /// request order (so each user's `balance_after` chain follows entry
    /// ids), the recorded refusals, and a placement's `bets` rows — and
    /// answers every movement, with the ids of the bets written.
    async fn write(
        mut self,
        tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
        kind: EntryKind,
        before: &HashMap<i64, Decimal>,
        after: &HashMap<i64, Decimal>,
        bets: Option<&BetRows<'_>>,
    ) -> Result<
        (
            Vec<Result<Posted, WalletError>>,
            HashMap<Uuid, DateTime<Utc>>,
        ),
        WalletError,
    > {
        let t = self.movements;
        let changed: Vec<(i64, Decimal, Decimal)> = after
            .iter()
            .filter_map(|(user, now)| {
                let was = before.get(user).copied().unwrap_or_default();
                (*now != was).then_some((*user, *now - was, *now))
            })
            .collect();
        let moved: Vec<(usize, Decimal, Decimal)> = self
            .new
            .iter()
            .filter_map(|&i| match self.decisions.get(&i) {
                Some(Decision::Move(delta, balance)) => Some((i, *delta, *balance)),
                _ => None,
            })
            .collect();
        let recorded: Vec<(usize, &'static str)> = self
            .new
            .iter()
            .filter_map(|&i| match self.decisions.get(&i) {
                Some(Decision::Record(e)) => e.recorded_reason().map(|r| (i, r)),
                _ => None,
            })
            .collect();
        let mut updated_at: HashMap<i64, DateTime<Utc>> = HashMap::new();
        let mut written: HashMap<Uuid, DateTime<Utc>> = HashMap::new();
        let bets = bets.filter(|b| !b.is_empty());
        if !changed.is_empty() || !moved.is_empty() || !recorded.is_empty() || bets.is_some() {
            use sqlx::{FromRow, Row};
            // The writes in one statement (one round trip): each is a
            // CTE, so each runs once and in full whether or not its rows are
            // read; they write different tables, so their order within the
            // statement does not matter (the ledger rows' foreign key reads
            // the wallet rows, which this transaction holds already and whose
            // key no write changes; a bet row waits only for another
            // transaction's row of its bet key, in key order: see
            // `placement.rs`). The entries come back as 'l' rows, the
            // wallets' new balances as 'w' rows (in the entry's `user_id`
            // and `balance_after`, with `wallet_updated_at`), and a
            // placement's bets written as 'b' rows (the bet id in
            // `transfer_id`, with its `created_at`).
            let (counterparty, _) = kind.counterparty();
            macro_rules! writes {
                () => {
                    concat!(
                        "w AS ( \
                           UPDATE wallets AS w SET balance = w.balance + v.delta, updated_at = now() \
                           FROM unnest($1::BIGINT[], $2::NUMERIC[]) AS v(user_id, delta) \
                           WHERE w.user_id = v.user_id RETURNING w.user_id, w.balance, w.updated_at), \
                         l AS ( \
                           INSERT INTO ledger_entries \
                             (transfer_id, idempotency_key, kind, user_id, counterparty, amount, balance_after, reference) \
                           SELECT t, k, $5, u, $6, a, b, r \
                           FROM unnest($3::UUID[], $4::TEXT[], $7::BIGINT[], $8::NUMERIC[], $9::NUMERIC[], $10::TEXT[]) \
                             WITH ORDINALITY AS v(t, k, u, a, b, r, n) \
                           ORDER BY n RETURNING ", entry_columns!(), "), \
                         f AS ( \
                           INSERT INTO wallet_refusals (idempotency_key, kind, user_id, amount, reference, reason) \
                           SELECT k, $5, u, a, r, x \
                           FROM unnest($11::TEXT[], $12::BIGINT[], $13::NUMERIC[], $14::TEXT[], $15::TEXT[]) \
                             AS v(k, u, a, r, x)) \
                         SELECT 'l' AS src, ", entry_columns!(), ", NULL::TIMESTAMPTZ AS wallet_updated_at FROM l \
                         UNION ALL \
                         SELECT 'w', NULL, NULL, NULL, NULL, user_id, NULL, NULL, balance, NULL, NULL, updated_at \
                         FROM w"
                    )
                };
            }
            let query = match bets {
                None => sqlx::query(concat!("WITH ", writes!())),
                Some(_) => sqlx::query(concat!(
                    "WITH ",
                    crate::placement::insert_bets!(),
                    writes!(),
                    " UNION ALL \
                     SELECT 'b', NULL, bet_id, NULL, NULL, NULL, NULL, NULL, NULL, NULL, created_at, NULL \
                     FROM b"
                )),
            };
            let query = query
                .bind(changed.iter().map(|c| c.0).collect::<Vec<_>>())
                .bind(changed.iter().map(|c| c.1).collect::<Vec<_>>())
                .bind(moved.iter().map(|_| Uuid::now_v7()).collect::<Vec<_>>())
                .bind(
                    moved
                        .iter()
                        .map(|&(i, _, _)| t[i].key.as_str())
                        .collect::<Vec<_>>(),
                )
                .bind(kind.as_db())
                .bind(counterparty.as_db())
                .bind(
                    moved
                        .iter()
                        .map(|&(i, _, _)| t[i].user.get())
                        .collect::<Vec<_>>(),
                )
                .bind(moved.iter().map(|&(_, delta, _)| delta).collect::<Vec<_>>())
                .bind(
                    moved
                        .iter()
                        .map(|&(_, _, balance)| balance)
                        .collect::<Vec<_>>(),
                )
                .bind(
                    moved
                        .iter()
                        .map(|&(i, _, _)| t[i].reference.as_str())
                        .collect::<Vec<_>>(),
                )
                .bind(
                    recorded
                        .iter()
                        .map(|&(i, _)| t[i].key.as_str())
                        .collect::<Vec<_>>(),
                )
                .bind(
                    recorded
                        .iter()
                        .map(|&(i, _)| t[i].user.get())
                        .collect::<Vec<_>>(),
                )
                .bind(
                    recorded
                        .iter()
                        .map(|&(i, _)| t[i].amount.as_decimal())
                        .collect::<Vec<_>>(),
                )
                .bind(
                    recorded
                        .iter()
                        .map(|&(i, _)| t[i].reference.as_str())
                        .collect::<Vec<_>>(),
                )
                .bind(
                    recorded
                        .iter()
                        .map(|&(_, reason)| reason)
                        .collect::<Vec<_>>(),
                );
            let query = match bets {
                Some(bets) => bets.bind(query),
                None => query,
            };
            let rows = query.fetch_all(&mut **tx).await?;
            let mut balances: Vec<(i64, Decimal, DateTime<Utc>)> = Vec::new();
            let mut entries = 0;
            for row in &rows {
                let src: &str = row.try_get("src").map_err(StoreError::from)?;
                match src {
                    "l" => {
                        let entry = Entry::from_row(row).map_err(StoreError::from)?;
                        self.entries.insert(entry.idempotency_key.clone(), entry);
                        entries += 1;
                    }
                    "b" => {
                        written.insert(
                            row.try_get("transfer_id").map_err(StoreError::from)?,
                            row.try_get("created_at").map_err(StoreError::from)?,
                        );
                    }
                    "w" => balances.push((
                        row.try_get("user_id").map_err(StoreError::from)?,
                        row.try_get("balance_after").map_err(StoreError::from)?,
                        row.try_get("wallet_updated_at").map_err(StoreError::from)?,
                    )),
                    other => {
                        return Err(StoreError::Corrupt(format!(
                            "a batch's writes named a row source {other:?}"
                        ))
                        .into());
                    }
                }
            }
            // The rows are locked by this transaction: anything else is a bug.
            let expected: HashMap<i64, Decimal> = changed.iter().map(|c| (c.0, c.2)).collect();
            if balances.len() != expected.len()
                || balances.iter().any(|(u, b, _)| expected.get(u) != Some(b))
            {
                return Err(StoreError::Corrupt(
                    "a batch found wallet balances other than it locked".into(),
                )
                .into());
            }
            if entries != moved.len() {
                return Err(StoreError::Corrupt(format!(
                    "a batch wrote {entries} ledger entries of {}",
                    moved.len()
                ))
                .into());
            }
            updated_at = balances.into_iter().map(|(u, _, at)| (u, at)).collect();
        }

        let decisions = std::mem::take(&mut self.decisions);
        for (i, decision) in decisions {
            self.answers[i] = Some(match decision {
                Decision::Move(_, balance) => {
                    let Some(entry) = self.entries.get(t[i].key.as_str()).cloned() else {
                        return Err(StoreError::Corrupt(format!(
                            "a batch lost the entry of {}",
                            t[i].key
                        ))
                        .into());
                    };
                    Ok(Posted {
                        entry,
                        wallet: WalletView {
                            user_id: t[i].user.get(),
                            balance,
                            updated_at: updated_at.get(&t[i].user.get()).copied(),
                        },
                        replayed: false,
                        bet_written_at: Uuid::parse_str(&t[i].reference)
                            .ok()
                            .and_then(|bet| written.get(&bet).copied()),
                    })
                }
                Decision::Record(e) | Decision::Skip(e) => Err(e),
            });
        }
        let answers = self
            .answers
            .into_iter()
            .map(|a| a.unwrap_or(Err(WalletError::IdempotencyConflict)))
            .collect();
        Ok((answers, written))
    }
}

/// A payout's guard, decided from what was read under its bets' locks:
/// both stakes held, of the stake each, one of them the winner's, the
/// payout twice the stake, neither bet paid nor refunded.
fn payout_guard(
    stakes: &[HeldStake],
    paid: bool,
    refunded: bool,
    t: &Transfer,
    stake: Decimal,
) -> Result<(), WalletError> {
    if paid {
        return Err(WalletError::AlreadyPaid);
    }
    let held = stakes.len() == 2
        && stakes.iter().all(|s| s.held == stake)
        && stakes.iter().any(|s| s.user_id == t.user.get())
        && t.amount.as_decimal() == stake * Decimal::TWO;
    if refunded {
        Err(WalletError::AlreadyRefunded)
    } else if held {
        Ok(())
    } else {
        Err(WalletError::NoMatchingStake)
    }
}

/// Locks the bets a guarded movement is about and checks its conditions.
/// Runs under the key's lock, after the key was found new.
async fn check_guard(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    t: &Transfer,
) -> Result<(), WalletError> {
    let bets: Vec<Uuid> = match &t.guard {
        Guard::None => return Ok(()),
        Guard::Refund { bet } => vec![*bet],
        Guard::Payout { bets, .. } => {
            let mut bets = bets.to_vec();
            bets.sort();
            bets
        }
    };
    // Serialise every refund and payout of these bets; sorted, so two
    // movements over the same pair never deadlock.
    for bet in &bets {
        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('bet:' || $1::TEXT, 0))")
            .bind(bet)
            .execute(&mut **tx)
            .await?;
    }
    let references: Vec<String> = bets.iter().map(Uuid::to_string).collect();
    let stakes: Vec<HeldStake> = sqlx::query_as(
        "SELECT user_id, -amount AS held FROM ledger_entries \
         WHERE kind = 'STAKE' AND reference = ANY($1)",
    )
    .bind(&references)
    .fetch_all(&mut **tx)
    .await?;
    let paid: i64 = sqlx::query_scalar("SELECT count(*) FROM payout_bets WHERE bet_id = ANY($1)")
        .bind(&bets)
        .fetch_one(&mut **tx)
        .await?;
    match &t.guard {
        Guard::None => Ok(()),
        Guard::Refund { .. } => {
            if paid > 0 {
                return Err(WalletError::AlreadyPaid);
            }
            let held = stakes.len() == 1
                && stakes[0].user_id == t.user.get()
                && stakes[0].held == t.amount.as_decimal();
            if held {
                Ok(())
            } else {
                Err(WalletError::NoMatchingStake)
            }
        }
        Guard::Payout { stake, .. } => {
            let refund_keys: Vec<String> = bets
                .iter()
                .map(|b| {
                    betting_domain::IdempotencyKey::refund(betting_domain::BetId::from(*b))
                        .to_string()
                })
                .collect();
            let refunded: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM ledger_entries WHERE idempotency_key = ANY($1)",
            )
            .bind(&refund_keys)
            .fetch_one(&mut **tx)
            .await?;
            payout_guard(&stakes, paid > 0, refunded > 0, t, *stake)
        }
    }
}

async fn entry_by_key(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    key: &str,
) -> Result<Option<Entry>, WalletError> {
    Ok(sqlx::query_as(concat!(
        "SELECT ",
        entry_columns!(),
        " FROM ledger_entries WHERE idempotency_key = $1"
    ))
    .bind(key)
    .fetch_optional(&mut **tx)
    .await?)
}

/// A stake held for one of a guard's bets (its STAKE entry).
#[derive(Debug, Clone, sqlx::FromRow)]
struct HeldStake {
    user_id: i64,
    /// The amount taken from the wallet (positive).
    held: Decimal,
}

/// A movement the wallet refused for good, as stored under its key.
#[derive(Debug, Clone, sqlx::FromRow)]
struct Refusal {
    #[sqlx(try_from = "String")]
    kind: EntryKind,
    user_id: i64,
    amount: Decimal,
    reference: String,
    reason: String,
}

impl Refusal {
    /// The original refusal for a retry, or a reused-key refusal.
    fn replay(&self, t: &Transfer) -> WalletError {
        let same = self.kind == t.kind
            && self.user_id == t.user.get()
            && self.amount == t.amount.as_decimal()
            && self.reference == t.reference;
        match (same, self.reason.as_str()) {
            (false, _) => WalletError::IdempotencyConflict,
            (true, "BALANCE_LIMIT") => WalletError::BalanceLimit,
            (true, "NO_MATCHING_STAKE") => WalletError::NoMatchingStake,
            (true, "ALREADY_PAID") => WalletError::AlreadyPaid,
            (true, "ALREADY_REFUNDED") => WalletError::AlreadyRefunded,
            (true, _) => WalletError::InsufficientFunds,
        }
    }
}

/// A refusal with its key, as a batch reads them.
#[derive(Debug, Clone, sqlx::FromRow)]
struct KeyedRefusal {
    idempotency_key: String,
    #[sqlx(flatten)]
    refusal: Refusal,
}

/// The bets a payout entry paid.
async fn paid_bets(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    entry_id: i64,
) -> Result<Vec<Uuid>, WalletError> {
    Ok(
        sqlx::query_scalar("SELECT bet_id FROM payout_bets WHERE entry_id = $1")
            .bind(entry_id)
            .fetch_all(&mut **tx)
            .await?,
    )
}

async fn refusal_by_key(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    key: &str,
) -> Result<Option<Refusal>, WalletError> {
    Ok(sqlx::query_as(
        "SELECT kind, user_id, amount, reference, reason FROM wallet_refusals \
         WHERE idempotency_key = $1",
    )
    .bind(key)
    .fetch_optional(&mut **tx)
    .await?)
}

async fn record_refusal(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    t: &Transfer,
    reason: &str,
) -> Result<(), WalletError> {
    sqlx::query(
        "INSERT INTO wallet_refusals (idempotency_key, kind, user_id, amount, reference, reason) \
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(t.key.as_str())
    .bind(t.kind.as_db())
    .bind(t.user.get())
    .bind(t.amount.as_decimal())
    .bind(&t.reference)
    .bind(reason)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Answers a retry from the original entry, or refuses a reused key.
fn replay(existing: Entry, t: &Transfer) -> Result<Posted, WalletError> {
    let same = existing.kind == t.kind
        && existing.user_id == t.user.get()
        && existing.amount.abs() == t.amount.as_decimal()
        && existing.reference == t.reference;
    if !same {
        return Err(WalletError::IdempotencyConflict);
    }
    Ok(Posted {
        wallet: WalletView {
            user_id: existing.user_id,
            balance: existing.balance_after,
            updated_at: Some(existing.created_at),
        },
        entry: existing,
        replayed: true,
        bet_written_at: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_deposit_limit_is_ten_to_the_fifteenth() {
        assert_eq!(DEPOSIT_LIMIT, Decimal::from(1_000_000_000_000_000_i64));
    }

    /// The batch refuses a credit past the column's CHECK, as `post`'s
    /// CHECK violation does: the two bounds must be the same number.
    #[test]
    fn the_balance_backstop_is_the_columns_check() {
        assert_eq!(
            BALANCE_BACKSTOP,
            Decimal::from(1_000_000_000_000_000_000_i64)
        );
    }
}
