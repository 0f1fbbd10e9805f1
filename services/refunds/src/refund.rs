//! Refunding bets: the one statement, and the selections that feed it.

use std::time::Duration;

use betting_db::{ChangedBet, StoreError};
use betting_domain::{
    BetId, BetStatus, EntryKind, IdempotencyKey, RefundReason, RoundStatus, UserId,
};
use betting_streams::BetNote;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

/// The outbox's kind for a refund: the ledger movement it owes.
pub(crate) const REFUND_KIND: EntryKind = EntryKind::Refund;

/// Refunds, inside the caller's transaction, each of `bets` that is still in
/// one of the `from` statuses (and, with `owner`, belongs to that user), and
/// records the refund it is owed — its stake, under `REFUND:{bet_id}` — in
/// the same statement. Returns the bets it refunded; a bet that had moved on
/// meanwhile is left alone, so the caller's selection may be stale.
///
/// A bet leaves `from` once, so a refund is recorded at most once per bet;
/// `ON CONFLICT DO NOTHING` only makes a repeat harmless.
pub async fn refund_bets(
    conn: &mut PgConnection,
    bets: &[(BetId, RefundReason)],
    from: &[BetStatus],
    owner: Option<UserId>,
) -> Result<Vec<BetNote>, StoreError> {
    if bets.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<Uuid> = bets.iter().map(|(bet, _)| bet.as_uuid()).collect();
    let reasons: Vec<&str> = bets.iter().map(|(_, reason)| reason.as_db()).collect();
    let keys: Vec<String> = bets
        .iter()
        .map(|(bet, _)| IdempotencyKey::refund(*bet).as_str().to_owned())
        .collect();
    // The statuses as one joined row's column (`OFFSET 0` keeps the subquery
    // from being flattened into a constant), so that `b.status = ANY(..)` is
    // a join condition and the bets are found by primary key, never through
    // a status index (`betting_db::from_status`). One row holding every
    // status, not a row per status: a bet a concurrent transaction moved
    // from one of them to another while this statement waited for its row
    // is re-checked (EvalPlanQual) against the joined row the old version
    // matched, which must accept the new status too.
    let from: Vec<&str> = from.iter().map(|s| s.as_db()).collect();
    let refunded: Vec<ChangedBet> = sqlx::query_as(
        "WITH due AS ( \
           SELECT * FROM unnest($1::UUID[], $2::TEXT[], $3::TEXT[]) AS d (bet_id, reason, key) \
         ), refunded AS ( \
           UPDATE bets b SET status = 'REFUNDED', refund_reason = due.reason, \
             version = b.version + 1, updated_at = now() \
           FROM due, (SELECT $4::TEXT[] AS from_statuses OFFSET 0) AS f \
           WHERE b.bet_id = due.bet_id AND b.status = ANY(f.from_statuses) \
             AND ($5::BIGINT IS NULL OR b.user_id = $5) \
           RETURNING b.bet_id, b.user_id, b.amount, b.round_id, b.version, due.key \
         ), owed AS ( \
           INSERT INTO wallet_commands (idempotency_key, kind, user_id, amount, bet_id) \
           SELECT key, $6, user_id, amount, bet_id FROM refunded \
           ON CONFLICT (idempotency_key) DO NOTHING \
         ) \
         SELECT user_id, bet_id, round_id, version FROM refunded",
    )
    .bind(&ids)
    .bind(&reasons)
    .bind(&keys)
    .bind(&from)
    .bind(owner.map(UserId::get))
    .bind(REFUND_KIND.as_db())
    .fetch_all(conn)
    .await?;
    Ok(refunded.into_iter().map(note).collect())
}

fn note(bet: ChangedBet) -> BetNote {
    BetNote::changed(bet.user_id, bet.bet_id, bet.round_id, bet.version)
}

/// A PENDING bet of a round that is no longer open, as
/// [`Refunds::stranded`] reads it.
#[derive(sqlx::FromRow)]
struct Stranded {
    bet_id: Uuid,
    #[sqlx(rename = "status", try_from = "String")]
    round_status: RoundStatus,
}

/// The refunds that no request makes: what the reconciler finds due.
#[derive(Clone)]
pub struct Refunds {
    pool: PgPool,
}

impl Refunds {
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    /// PENDING bets older than `timeout`, refunded (MATCH_TIMEOUT). Bets a
    /// matcher holds right now are skipped: if it matches them, they are no
    /// longer PENDING; if not, the next pass takes them.
    pub async fn overdue(&self, timeout: Duration, limit: i64) -> Result<Vec<BetNote>, StoreError> {
        let mut tx = betting_db::begin(&self.pool).await?;
        let due: Vec<Uuid> = sqlx::query_scalar(
            "SELECT bet_id FROM bets \
             WHERE status = 'PENDING' AND created_at < now() - make_interval(secs => $1) \
             ORDER BY created_at LIMIT $2 FOR UPDATE SKIP LOCKED",
        )
        .bind(timeout.as_secs_f64())
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?;
        let bets: Vec<_> = due
            .into_iter()
            .map(|bet| (BetId::from(bet), RefundReason::MatchTimeout))
            .collect();
        let refunded = refund_bets(&mut tx, &bets, &[BetStatus::Pending], None).await?;
        tx.commit().await?;
        Ok(refunded)
    }

    /// PENDING bets of rounds that are no longer open — a bet that became
    /// PENDING just after its round closed — refunded as the close (or the
    /// void) would have.
    pub async fn stranded(&self, limit: i64) -> Result<Vec<BetNote>, StoreError> {
        let mut tx = betting_db::begin(&self.pool).await?;
        let due: Vec<Stranded> = sqlx::query_as(
            "SELECT b.bet_id, r.status FROM bets b JOIN rounds r USING (round_id) \
             WHERE b.status = 'PENDING' AND r.status <> 'OPEN' \
             LIMIT $1 FOR UPDATE OF b SKIP LOCKED",
        )
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?;
        let mut bets = Vec::with_capacity(due.len());
        for bet in due {
            let reason = match bet.round_status {
                RoundStatus::Voided => RefundReason::RoundVoided,
                _ => RefundReason::RoundClosed,
            };
            bets.push((BetId::from(bet.bet_id), reason));
        }
        let refunded = refund_bets(&mut tx, &bets, &[BetStatus::Pending], None).await?;
        tx.commit().await?;
        Ok(refunded)
    }

    /// Refunds, inside the caller's transaction (which holds the round
    /// lock), every bet of a round in one of `statuses`.
    pub async fn round(
        conn: &mut PgConnection,
        round: &str,
        statuses: &[BetStatus],
        reason: RefundReason,
    ) -> Result<Vec<BetNote>, StoreError> {
        let from: Vec<&str> = statuses.iter().map(|s| s.as_db()).collect();
        let due: Vec<Uuid> =
            sqlx::query_scalar("SELECT bet_id FROM bets WHERE round_id = $1 AND status = ANY($2)")
                .bind(round)
                .bind(&from)
                .fetch_all(&mut *conn)
                .await?;
        let bets: Vec<_> = due
            .into_iter()
            .map(|bet| (BetId::from(bet), reason))
            .collect();
        refund_bets(conn, &bets, statuses, None).await
    }
}
