//! The `wallet_commands` outbox: refunds owed, until carried out.

use std::time::Duration;

use betting_db::StoreError;
use betting_domain::{Amount, BetId, EntryKind, IdempotencyKey, UserId};
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use sqlx::PgPool;
use uuid::Uuid;

use crate::refund::REFUND_KIND;

/// A refund owed to a user, as recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwedRefund {
    pub key: IdempotencyKey,
    pub user: UserId,
    pub amount: Amount,
    pub bet: BetId,
    pub attempts: i32,
    pub done_at: Option<DateTime<Utc>>,
}

/// The row as stored; decoded into [`OwedRefund`] at this boundary.
#[derive(sqlx::FromRow)]
struct CommandRow {
    idempotency_key: String,
    #[sqlx(try_from = "String")]
    kind: EntryKind,
    user_id: i64,
    amount: Decimal,
    bet_id: Option<Uuid>,
    attempts: i32,
    done_at: Option<DateTime<Utc>>,
}

impl TryFrom<CommandRow> for OwedRefund {
    type Error = StoreError;

    fn try_from(row: CommandRow) -> Result<Self, StoreError> {
        let corrupt = |what: &str| {
            StoreError::Corrupt(format!(
                "wallet command {} has an impossible {what}",
                row.idempotency_key
            ))
        };
        if row.kind != REFUND_KIND {
            return Err(corrupt("kind"));
        }
        Ok(Self {
            key: IdempotencyKey::parse(&row.idempotency_key).map_err(|_| corrupt("key"))?,
            user: UserId::new(row.user_id).map_err(|_| corrupt("user"))?,
            amount: Amount::try_from_decimal(row.amount).map_err(|_| corrupt("amount"))?,
            bet: row.bet_id.map(BetId::from).ok_or_else(|| corrupt("bet"))?,
            attempts: row.attempts,
            done_at: row.done_at,
        })
    }
}

/// A page of [`Outbox::due`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DuePage {
    /// The refunds of the page that decode.
    pub refunds: Vec<OwedRefund>,
    /// Rows read, skipped ones included: fewer than asked means the end.
    pub rows: usize,
    /// The key of the last row read: the next page starts after it.
    pub last_key: Option<String>,
}

macro_rules! command_columns {
    () => {
        "idempotency_key, kind, user_id, amount, bet_id, attempts, done_at"
    };
}

#[derive(Clone)]
pub struct Outbox {
    pool: PgPool,
}

impl Outbox {
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The refund recorded under `key`, done or not.
    pub async fn get(&self, key: &str) -> Result<Option<OwedRefund>, StoreError> {
        let row: Option<CommandRow> = sqlx::query_as(concat!(
            "SELECT ",
            command_columns!(),
            " FROM wallet_commands WHERE idempotency_key = $1"
        ))
        .bind(key)
        .fetch_optional(&self.pool)
        .await?;
        row.map(OwedRefund::try_from).transpose()
    }

    /// Refunds not yet carried out, older than `age` (younger ones are still
    /// being carried out by the request that wrote them), in key order after
    /// `after`: a caller pages through all of them across calls, so refunds
    /// that never complete cannot hide the ones behind them.
    ///
    /// Only refunds: the table's other kind is not this outbox's to carry
    /// out. A row that does not decode (a refund naming no bet, say) is
    /// logged and skipped, never allowed to fail the page: one bad row must
    /// not stop every refund behind it (the audit reports it). The page says
    /// where the next one starts, past skipped rows too.
    pub async fn due(
        &self,
        age: Duration,
        after: Option<&str>,
        limit: i64,
    ) -> Result<DuePage, StoreError> {
        let rows: Vec<CommandRow> = sqlx::query_as(concat!(
            "SELECT ",
            command_columns!(),
            " FROM wallet_commands \
             WHERE done_at IS NULL AND kind = $4 \
               AND created_at < now() - make_interval(secs => $1) \
               AND ($2::TEXT IS NULL OR idempotency_key > $2) \
             ORDER BY idempotency_key LIMIT $3"
        ))
        .bind(age.as_secs_f64())
        .bind(after)
        .bind(limit)
        .bind(REFUND_KIND.as_db())
        .fetch_all(&self.pool)
        .await?;
        let mut page = DuePage {
            rows: rows.len(),
            last_key: rows.last().map(|r| r.idempotency_key.clone()),
            refunds: Vec::with_capacity(rows.len()),
        };
        for row in rows {
            match OwedRefund::try_from(row) {
                Ok(owed) => page.refunds.push(owed),
                Err(error) => tracing::error!(%error, "an owed refund cannot be read; skipped"),
            }
        }
        Ok(page)
    }

    pub async fn done(&self, key: &IdempotencyKey) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE wallet_commands SET done_at = now(), attempts = attempts + 1 \
             WHERE idempotency_key = $1 AND done_at IS NULL",
        )
        .bind(key.as_str())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn failed(&self, key: &IdempotencyKey, error: &str) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE wallet_commands SET attempts = attempts + 1, last_error = $2 \
             WHERE idempotency_key = $1 AND done_at IS NULL",
        )
        .bind(key.as_str())
        .bind(error)
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}
