//! Rounds in PostgreSQL.

use betting_domain::{RoundId, RoundStatus, Side};
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use sqlx::PgPool;

use crate::SettlementError;

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct RoundRow {
    pub round_id: String,
    pub status: String,
    pub winning_side: Option<String>,
    pub version: i64,
    pub created_at: DateTime<Utc>,
    pub closed_at: Option<DateTime<Utc>>,
    pub settled_at: Option<DateTime<Utc>>,
}

impl RoundRow {
    pub fn status(&self) -> Result<RoundStatus, SettlementError> {
        RoundStatus::from_db(&self.status).ok_or_else(|| {
            SettlementError::Internal(anyhow::anyhow!("stored round has status {:?}", self.status))
        })
    }

    pub fn winning_side(&self) -> Option<Side> {
        self.winning_side.as_deref().and_then(Side::from_db)
    }
}

/// Bet counts and money totals of a round.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoundTotals {
    pub pending: i64,
    pub matched: i64,
    pub settled: i64,
    pub refunded: i64,
    pub staked: Decimal,
    pub paid_out: Decimal,
    pub refunded_amount: Decimal,
}

macro_rules! round_columns {
    () => {
        "round_id, status, winning_side, version, created_at, closed_at, settled_at"
    };
}

#[derive(Clone)]
pub struct RoundStore {
    pool: PgPool,
}

impl RoundStore {
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    /// A new OPEN round; `None` if the id is taken.
    pub async fn insert(&self, round: &RoundId) -> Result<Option<RoundRow>, SettlementError> {
        Ok(sqlx::query_as(concat!(
            "INSERT INTO rounds (round_id) VALUES ($1) ON CONFLICT (round_id) DO NOTHING RETURNING ",
            round_columns!()
        ))
        .bind(round.as_str())
        .fetch_optional(&self.pool)
        .await?)
    }

    pub async fn get(&self, round: &RoundId) -> Result<Option<RoundRow>, SettlementError> {
        Ok(sqlx::query_as(concat!(
            "SELECT ",
            round_columns!(),
            " FROM rounds WHERE round_id = $1"
        ))
        .bind(round.as_str())
        .fetch_optional(&self.pool)
        .await?)
    }

    /// OPEN -> CLOSED; `None` if the round was not OPEN.
    pub async fn close(&self, round: &RoundId) -> Result<Option<RoundRow>, SettlementError> {
        Ok(sqlx::query_as(concat!(
            "UPDATE rounds SET status = 'CLOSED', closed_at = now(), version = version + 1 \
             WHERE round_id = $1 AND status = 'OPEN' RETURNING ",
            round_columns!()
        ))
        .bind(round.as_str())
        .fetch_optional(&self.pool)
        .await?)
    }

    pub async fn totals(&self, round: &RoundId) -> Result<RoundTotals, SettlementError> {
        let rows: Vec<(String, i64, Decimal, Option<Decimal>)> = sqlx::query_as(
            "SELECT status, count(*), sum(amount), sum(payout) FROM bets \
             WHERE round_id = $1 AND status IN ('PENDING', 'MATCHED', 'SETTLED', 'REFUNDED') \
             GROUP BY status",
        )
        .bind(round.as_str())
        .fetch_all(&self.pool)
        .await?;
        let mut totals = RoundTotals::default();
        for (status, count, staked, payout) in rows {
            totals.staked += staked;
            match status.as_str() {
                "PENDING" => totals.pending = count,
                "MATCHED" => totals.matched = count,
                "SETTLED" => {
                    totals.settled = count;
                    totals.paid_out += payout.unwrap_or_default();
                }
                _ => {
                    totals.refunded = count;
                    totals.refunded_amount += staked;
                }
            }
        }
        Ok(totals)
    }
}
