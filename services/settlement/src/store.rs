//! Rounds in PostgreSQL.

use betting_db::{
    ChangedBet, NullableText, StoreError,
    actions::{ActionKind, Actor, PrivilegedAction},
};
use betting_domain::{BetStatus, MatchStatus, RefundReason, RoundId, RoundStatus, Side};
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use sqlx::PgPool;
use uuid::Uuid;

use crate::SettlementError;

/// A round as stored, decoded: a value its type refuses fails the read
/// ([`StoreError::Corrupt`]).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct RoundRow {
    pub round_id: String,
    #[sqlx(try_from = "String")]
    pub status: RoundStatus,
    #[sqlx(try_from = "NullableText")]
    pub winning_side: Option<Side>,
    pub void_reason: Option<String>,
    pub version: i64,
    pub created_at: DateTime<Utc>,
    pub closed_at: Option<DateTime<Utc>>,
    pub settled_at: Option<DateTime<Utc>>,
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
    pub matches: i64,
    pub settled_matches: i64,
    pub outstanding_jobs: i64,
}

/// Records a round transition in the privileged-action trail, inside the
/// transition's transaction: a transition that rolls back leaves no row, and
/// one that commits always has its row. A retry that changes nothing (the
/// round already in the asked-for state) records nothing.
async fn record(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    actor: &Actor,
    kind: ActionKind,
    round: &RoundId,
    detail: Vec<(&'static str, String)>,
) -> Result<(), sqlx::Error> {
    let action = PrivilegedAction {
        actor,
        kind,
        target: format!("round:{round}"),
        idempotency_key: None,
        detail,
    };
    betting_db::actions::record(tx, &action).await
}

/// A round's change of state and the refunds it made owed.
#[derive(Debug, Clone)]
pub struct Transition {
    pub round: RoundRow,
    /// False when the round already was in the asked-for state (a retry).
    pub changed: bool,
    /// The bets refunded by this change (each now owed `REFUND:{bet_id}`).
    pub refunds: Vec<betting_streams::BetNote>,
}

/// A match with what a settler needs to pay it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct MatchView {
    pub match_id: Uuid,
    pub round_id: String,
    pub amount: Decimal,
    #[sqlx(try_from = "String")]
    pub status: MatchStatus,
    #[sqlx(try_from = "String")]
    pub round_status: RoundStatus,
    /// The round's winner (NULL until the round is settled).
    #[sqlx(try_from = "NullableText")]
    pub winning_side: Option<Side>,
    pub bet_a_id: Uuid,
    pub user_a: i64,
    pub bet_b_id: Uuid,
    pub user_b: i64,
}

macro_rules! round_columns {
    () => {
        "round_id, status, winning_side, void_reason, version, created_at, closed_at, settled_at"
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

    /// A new OPEN round; `None` if the id is taken. `actor`'s action is
    /// recorded with the insert, in its transaction.
    pub async fn insert(
        &self,
        round: &RoundId,
        actor: &Actor,
    ) -> Result<Option<RoundRow>, StoreError> {
        let mut tx = betting_db::begin(&self.pool).await?;
        let row: Option<RoundRow> = sqlx::query_as(concat!(
            "INSERT INTO rounds (round_id) VALUES ($1) ON CONFLICT (round_id) DO NOTHING RETURNING ",
            round_columns!()
        ))
        .bind(round.as_str())
        .fetch_optional(&mut *tx)
        .await?;
        if row.is_some() {
            record(&mut tx, actor, ActionKind::RoundOpen, round, Vec::new()).await?;
        }
        tx.commit().await?;
        Ok(row)
    }

    pub async fn get(&self, round: &RoundId) -> Result<Option<RoundRow>, StoreError> {
        Ok(sqlx::query_as(concat!(
            "SELECT ",
            round_columns!(),
            " FROM rounds WHERE round_id = $1"
        ))
        .bind(round.as_str())
        .fetch_optional(&self.pool)
        .await?)
    }

    /// Locks the round (advisory lock and row) for a change of state.
    async fn lock(
        tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
        round: &RoundId,
    ) -> Result<RoundRow, SettlementError> {
        betting_db::lock_round(tx, round.as_str()).await?;
        sqlx::query_as(concat!(
            "SELECT ",
            round_columns!(),
            " FROM rounds WHERE round_id = $1 FOR UPDATE"
        ))
        .bind(round.as_str())
        .fetch_optional(&mut **tx)
        .await?
        .ok_or(SettlementError::RoundNotFound)
    }

    /// OPEN -> CLOSED, refunding the round's unmatched bets.
    pub async fn close(
        &self,
        round: &RoundId,
        actor: &Actor,
    ) -> Result<Transition, SettlementError> {
        let mut tx = betting_db::begin(&self.pool).await?;
        let row = Self::lock(&mut tx, round).await?;
        match row.status {
            RoundStatus::Open => {}
            RoundStatus::Closed => return Ok(unchanged(row)),
            status => return Err(SettlementError::WrongState(status.as_db())),
        }
        let row: RoundRow = sqlx::query_as(concat!(
            "UPDATE rounds SET status = 'CLOSED', closed_at = now(), version = version + 1 \
             WHERE round_id = $1 RETURNING ",
            round_columns!()
        ))
        .bind(round.as_str())
        .fetch_one(&mut *tx)
        .await?;
        record(&mut tx, actor, ActionKind::RoundClose, round, Vec::new()).await?;
        refund_and_commit(tx, row, &[BetStatus::Pending], RefundReason::RoundClosed).await
    }

    /// OPEN or CLOSED -> SETTLED with the winning side, refunding unmatched bets.
    pub async fn settle(
        &self,
        round: &RoundId,
        winner: Side,
        actor: &Actor,
    ) -> Result<Transition, SettlementError> {
        let mut tx = betting_db::begin(&self.pool).await?;
        let row = Self::lock(&mut tx, round).await?;
        match row.status {
            RoundStatus::Open | RoundStatus::Closed => {}
            RoundStatus::Settled if row.winning_side == Some(winner) => {
                return Ok(unchanged(row));
            }
            RoundStatus::Settled => return Err(SettlementError::OtherOutcome),
            status => return Err(SettlementError::WrongState(status.as_db())),
        }
        let row: RoundRow = sqlx::query_as(concat!(
            "UPDATE rounds SET status = 'SETTLED', winning_side = $2, settled_at = now(), \
               closed_at = coalesce(closed_at, now()), version = version + 1 \
             WHERE round_id = $1 RETURNING ",
            round_columns!()
        ))
        .bind(round.as_str())
        .bind(winner.as_db())
        .fetch_one(&mut *tx)
        .await?;
        let detail = vec![("winning_side", winner.as_db().to_owned())];
        record(&mut tx, actor, ActionKind::RoundSettle, round, detail).await?;
        refund_and_commit(tx, row, &[BetStatus::Pending], RefundReason::RoundClosed).await
    }

    /// OPEN or CLOSED -> VOIDED: every bet, matched or not, is refunded and
    /// every match voided, in one transaction.
    pub async fn void(
        &self,
        round: &RoundId,
        reason: &str,
        actor: &Actor,
    ) -> Result<Transition, SettlementError> {
        let mut tx = betting_db::begin(&self.pool).await?;
        let row = Self::lock(&mut tx, round).await?;
        match row.status {
            RoundStatus::Open | RoundStatus::Closed => {}
            RoundStatus::Voided => return Ok(unchanged(row)),
            status => return Err(SettlementError::WrongState(status.as_db())),
        }
        let row: RoundRow = sqlx::query_as(concat!(
            "UPDATE rounds SET status = 'VOIDED', void_reason = $2, \
               closed_at = coalesce(closed_at, now()), version = version + 1 \
             WHERE round_id = $1 RETURNING ",
            round_columns!()
        ))
        .bind(round.as_str())
        .bind(reason)
        .fetch_one(&mut *tx)
        .await?;
        sqlx::query("UPDATE matches SET status = 'VOIDED' WHERE round_id = $1 AND status = 'OPEN'")
            .bind(round.as_str())
            .execute(&mut *tx)
            .await?;
        let detail = vec![("reason", reason.to_owned())];
        record(&mut tx, actor, ActionKind::RoundVoid, round, detail).await?;
        refund_and_commit(
            tx,
            row,
            &[BetStatus::Pending, BetStatus::Matched],
            RefundReason::RoundVoided,
        )
        .await
    }

    /// The unpaid matches of a round.
    pub async fn open_matches(&self, round: &RoundId) -> Result<Vec<Uuid>, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT match_id FROM matches WHERE round_id = $1 AND status = 'OPEN'",
        )
        .bind(round.as_str())
        .fetch_all(&self.pool)
        .await?)
    }

    /// Unpaid matches of settled rounds, settled more than `age` ago (lost
    /// settle jobs), with their rounds, in id order after `after`, so that a
    /// caller pages through all of them across calls.
    pub async fn unpaid_matches(
        &self,
        age: std::time::Duration,
        after: Option<Uuid>,
        limit: i64,
    ) -> Result<Vec<(Uuid, String)>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT m.match_id, m.round_id FROM matches m JOIN rounds r USING (round_id) \
             WHERE m.status = 'OPEN' AND r.status = 'SETTLED' \
               AND r.settled_at < now() - make_interval(secs => $1) \
               AND ($2::UUID IS NULL OR m.match_id > $2) \
             ORDER BY m.match_id LIMIT $3",
        )
        .bind(age.as_secs_f64())
        .bind(after)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?)
    }

    pub async fn match_view(&self, match_id: Uuid) -> Result<Option<MatchView>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT m.match_id, m.round_id, m.amount, m.status, r.status AS round_status, \
               r.winning_side, m.bet_a_id, a.user_id AS user_a, m.bet_b_id, b.user_id AS user_b \
             FROM matches m JOIN rounds r USING (round_id) \
               JOIN bets a ON a.bet_id = m.bet_a_id JOIN bets b ON b.bet_id = m.bet_b_id \
             WHERE m.match_id = $1",
        )
        .bind(match_id)
        .fetch_optional(&self.pool)
        .await?)
    }

    /// A page of a round's OPEN matches, in id order after `after`: a
    /// settle-round job's next batch.
    pub async fn open_match_views(
        &self,
        round: &str,
        after: Option<Uuid>,
        limit: i64,
    ) -> Result<Vec<MatchView>, StoreError> {
        // Always `match_id > $2`, the first page after the nil UUID (never
        // a match's id): one statement whose plan, generic or not, bounds
        // the index scan by the cursor.
        Ok(sqlx::query_as(
            "SELECT m.match_id, m.round_id, m.amount, m.status, r.status AS round_status, \
               r.winning_side, m.bet_a_id, a.user_id AS user_a, m.bet_b_id, b.user_id AS user_b \
             FROM matches m JOIN rounds r USING (round_id) \
               JOIN bets a ON a.bet_id = m.bet_a_id JOIN bets b ON b.bet_id = m.bet_b_id \
             WHERE m.round_id = $1 AND m.status = 'OPEN' AND m.match_id > $2 \
             ORDER BY m.match_id LIMIT $3",
        )
        .bind(round)
        .bind(after.unwrap_or(Uuid::nil()))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Records paid matches of one round in one transaction: each match
    /// (still OPEN) and its two bets (still MATCHED) SETTLED, with results
    /// and payouts. Returns the bets that changed; a match recorded already
    /// changes nothing.
    pub async fn mark_matches_settled(
        &self,
        matches: &[Uuid],
        winner: Side,
    ) -> Result<Vec<betting_streams::BetNote>, StoreError> {
        if matches.is_empty() {
            return Ok(Vec::new());
        }
        let mut tx = betting_db::begin(&self.pool).await?;
        let changed: Vec<(Uuid, Uuid, Uuid)> = sqlx::query_as(
            "UPDATE matches SET status = 'SETTLED', winning_side = $2, settled_at = now() \
             WHERE match_id = ANY($1) AND status = 'OPEN' RETURNING match_id, bet_a_id, bet_b_id",
        )
        .bind(matches)
        .bind(winner.as_db())
        .fetch_all(&mut *tx)
        .await?;
        if changed.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<Uuid> = changed.iter().map(|(id, _, _)| *id).collect();
        let bet_ids: Vec<Uuid> = changed.iter().flat_map(|(_, a, b)| [*a, *b]).collect();
        // The bets by primary key, not by an index of bets by match
        // (migration 20261207000001_narrow_bet_indexes keeps that index for
        // the previous release only); each must still name its match.
        let bets: Vec<ChangedBet> = sqlx::query_as(
            "UPDATE bets SET status = 'SETTLED', \
               result = CASE WHEN side = $3 THEN 'WON' ELSE 'LOST' END, \
               payout = CASE WHEN side = $3 THEN amount * 2 ELSE 0 END, \
               version = version + 1, updated_at = now() \
             WHERE bet_id = ANY($1) AND match_id = ANY($2) AND status = 'MATCHED' \
             RETURNING user_id, bet_id, round_id, version",
        )
        .bind(&bet_ids)
        .bind(&ids)
        .bind(winner.as_db())
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(bets
            .into_iter()
            .map(|b| betting_streams::BetNote::changed(b.user_id, b.bet_id, b.round_id, b.version))
            .collect())
    }

    /// Rounds created, closed or settled since `from`, at most `limit`: the
    /// hubs' sweep (which takes `limit` rounds for "maybe more").
    pub async fn changed_since(
        &self,
        from: DateTime<Utc>,
        limit: i64,
    ) -> Result<Vec<String>, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT round_id FROM rounds \
             WHERE greatest(created_at, closed_at, settled_at) >= $1 LIMIT $2",
        )
        .bind(from)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?)
    }

    pub async fn totals(&self, round: &RoundId) -> Result<RoundTotals, StoreError> {
        let rows: Vec<StatusTotals> = sqlx::query_as(
            "SELECT status, count(*) AS bets, sum(amount) AS staked, sum(payout) AS paid_out \
             FROM bets \
             WHERE round_id = $1 AND status IN ('PENDING', 'MATCHED', 'SETTLED', 'REFUNDED') \
             GROUP BY status",
        )
        .bind(round.as_str())
        .fetch_all(&self.pool)
        .await?;
        let mut totals = RoundTotals::default();
        for row in rows {
            totals.staked += row.staked;
            match row.status {
                BetStatus::Pending => totals.pending = row.bets,
                BetStatus::Matched => totals.matched = row.bets,
                BetStatus::Settled => {
                    totals.settled = row.bets;
                    totals.paid_out += row.paid_out.unwrap_or_default();
                }
                // REFUNDED: the query selects no other.
                _ => {
                    totals.refunded = row.bets;
                    totals.refunded_amount += row.staked;
                }
            }
        }
        let (matches, settled_matches, open_matches): (i64, i64, i64) = sqlx::query_as(
            "SELECT count(*), count(*) FILTER (WHERE status = 'SETTLED'), \
               count(*) FILTER (WHERE status = 'OPEN') \
             FROM matches WHERE round_id = $1",
        )
        .bind(round.as_str())
        .fetch_one(&self.pool)
        .await?;
        let owed: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM wallet_commands c JOIN bets b USING (bet_id) \
             WHERE b.round_id = $1 AND c.done_at IS NULL",
        )
        .bind(round.as_str())
        .fetch_one(&self.pool)
        .await?;
        let settled: bool =
            sqlx::query_scalar("SELECT status = 'SETTLED' FROM rounds WHERE round_id = $1")
                .bind(round.as_str())
                .fetch_optional(&self.pool)
                .await?
                .unwrap_or(false);
        totals.matches = matches;
        totals.settled_matches = settled_matches;
        totals.outstanding_jobs = owed + if settled { open_matches } else { 0 };
        Ok(totals)
    }
}

/// One status's line of a round's bets, as [`RoundStore::totals`] reads it.
#[derive(sqlx::FromRow)]
struct StatusTotals {
    #[sqlx(try_from = "String")]
    status: BetStatus,
    bets: i64,
    staked: Decimal,
    paid_out: Option<Decimal>,
}

/// Ends a transition: refunds the round's bets in `statuses` (recording the
/// refunds owed) in the same transaction, and commits.
async fn refund_and_commit(
    mut tx: sqlx::Transaction<'_, sqlx::Postgres>,
    round: RoundRow,
    statuses: &[BetStatus],
    reason: RefundReason,
) -> Result<Transition, SettlementError> {
    let refunds =
        betting_refunds::Refunds::round(&mut tx, &round.round_id, statuses, reason).await?;
    tx.commit().await?;
    Ok(Transition {
        round,
        changed: true,
        refunds,
    })
}

fn unchanged(round: RoundRow) -> Transition {
    Transition {
        round,
        changed: false,
        refunds: Vec::new(),
    }
}
