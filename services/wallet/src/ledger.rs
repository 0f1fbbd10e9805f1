//! The ledger: storage of wallets and movements.

use betting_domain::{Account, Amount, EntryKind, IdempotencyKey, UserId};
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use sqlx::PgPool;
use uuid::Uuid;

use crate::WalletError;

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
    pub kind: String,
    pub user_id: i64,
    pub counterparty: String,
    /// The signed change of the user's wallet.
    pub amount: Decimal,
    pub balance_after: Decimal,
    pub reference: String,
    pub created_at: DateTime<Utc>,
}

impl Entry {
    pub fn kind(&self) -> Option<EntryKind> {
        EntryKind::from_db(&self.kind)
    }

    pub fn counterparty(&self) -> Option<Account> {
        Account::from_db(&self.counterparty)
    }
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
}

/// Wallets and the ledger in PostgreSQL.
#[derive(Clone)]
pub struct Ledger {
    pool: PgPool,
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
        Self { pool }
    }

    /// Posts a movement exactly once per idempotency key.
    ///
    /// A retry with the same key and payload gets the original entry back; the
    /// same key with another payload is refused and changes nothing. The
    /// balance check and the debit are one conditional UPDATE, which also locks
    /// the wallet row, so concurrent debits serialise on it and can never
    /// overdraw; the CHECK constraint is the backstop.
    pub async fn post(&self, transfer: &Transfer) -> Result<Posted, WalletError> {
        // A concurrent request with the same key can win the race between our
        // lookup and our insert; then we roll back and answer from its entry.
        // Two rounds always suffice: after a lost race the entry exists.
        for _ in 0..2 {
            if let Some(existing) = self.find_by_key(transfer.key.as_str()).await? {
                return replay(existing, transfer);
            }
            if let Some(posted) = self.try_post(transfer).await? {
                return Ok(posted);
            }
        }
        match self.find_by_key(transfer.key.as_str()).await? {
            Some(existing) => replay(existing, transfer),
            None => Err(WalletError::Internal(anyhow::anyhow!(
                "idempotency race did not resolve for key {}",
                transfer.key
            ))),
        }
    }

    /// One attempt; `None` when another request with the same key committed first.
    async fn try_post(&self, t: &Transfer) -> Result<Option<Posted>, WalletError> {
        let (counterparty, credit) = t.kind.counterparty();
        let delta = if credit {
            t.amount.as_decimal()
        } else {
            -t.amount.as_decimal()
        };
        let mut tx = self.pool.begin().await?;
        if !check_guard(&mut tx, t).await? {
            // The same movement committed while we waited for the lock: answer from it.
            return Ok(None);
        }
        let wallet: Option<(Decimal, DateTime<Utc>)> = if credit {
            // A credit creates the wallet on first use.
            sqlx::query_as(
                "INSERT INTO wallets AS w (user_id, balance) VALUES ($1, $2) \
                 ON CONFLICT (user_id) DO UPDATE \
                   SET balance = w.balance + EXCLUDED.balance, updated_at = now() \
                 RETURNING balance, updated_at",
            )
            .bind(t.user.get())
            .bind(delta)
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
            return Err(WalletError::InsufficientFunds);
        };
        let entry: Option<Entry> = sqlx::query_as(concat!(
            "INSERT INTO ledger_entries \
               (transfer_id, idempotency_key, kind, user_id, counterparty, amount, balance_after, reference) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
             ON CONFLICT ON CONSTRAINT ledger_entries_idempotency_key_unique DO NOTHING \
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
        .fetch_optional(&mut *tx)
        .await?;
        let Some(entry) = entry else {
            // Dropping the transaction rolls the balance change back.
            return Ok(None);
        };
        if let Guard::Payout { bets, .. } = &t.guard {
            // The primary key makes "each bet paid at most once" a database fact.
            sqlx::query("INSERT INTO payout_bets (bet_id, entry_id) SELECT unnest($1::UUID[]), $2")
                .bind(&bets[..])
                .bind(entry.entry_id)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(Some(Posted {
            entry,
            wallet: WalletView {
                user_id: t.user.get(),
                balance,
                updated_at: Some(updated_at),
            },
            replayed: false,
        }))
    }

    pub async fn find_by_key(&self, key: &str) -> Result<Option<Entry>, WalletError> {
        Ok(sqlx::query_as(concat!(
            "SELECT ",
            entry_columns!(),
            " FROM ledger_entries WHERE idempotency_key = $1"
        ))
        .bind(key)
        .fetch_optional(&self.pool)
        .await?)
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

/// Locks the bets a guarded movement is about and checks its conditions.
/// `Ok(false)` when this very movement (same key) committed while we waited.
async fn check_guard(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    t: &Transfer,
) -> Result<bool, WalletError> {
    let bets: Vec<Uuid> = match &t.guard {
        Guard::None => return Ok(true),
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
    let done: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM ledger_entries WHERE idempotency_key = $1)",
    )
    .bind(t.key.as_str())
    .fetch_one(&mut **tx)
    .await?;
    if done {
        return Ok(false);
    }
    let references: Vec<String> = bets.iter().map(Uuid::to_string).collect();
    let stakes: Vec<(String, i64, Decimal)> = sqlx::query_as(
        "SELECT reference, user_id, -amount FROM ledger_entries \
         WHERE kind = 'STAKE' AND reference = ANY($1)",
    )
    .bind(&references)
    .fetch_all(&mut **tx)
    .await?;
    let paid: i64 = sqlx::query_scalar("SELECT count(*) FROM payout_bets WHERE bet_id = ANY($1)")
        .bind(&bets)
        .fetch_one(&mut **tx)
        .await?;
    if paid > 0 {
        return Err(WalletError::AlreadyPaid);
    }
    match &t.guard {
        Guard::None => Ok(true),
        Guard::Refund { .. } => {
            let held = stakes.len() == 1
                && stakes[0].1 == t.user.get()
                && stakes[0].2 == t.amount.as_decimal();
            if held {
                Ok(true)
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
            let held = stakes.len() == 2
                && stakes.iter().all(|s| s.2 == *stake)
                && stakes.iter().any(|s| s.1 == t.user.get())
                && t.amount.as_decimal() == *stake * Decimal::TWO;
            if refunded > 0 {
                Err(WalletError::AlreadyRefunded)
            } else if held {
                Ok(true)
            } else {
                Err(WalletError::NoMatchingStake)
            }
        }
    }
}

/// Answers a retry from the original entry, or refuses a reused key.
fn replay(existing: Entry, t: &Transfer) -> Result<Posted, WalletError> {
    let same = existing.kind == t.kind.as_db()
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
    })
}
