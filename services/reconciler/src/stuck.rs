//! Money held up by dead jobs.
//!
//! The reconciler never resurrects a dead job (the queue refuses its id until
//! an operator requeues it), so a payout or refund whose job died waits for a
//! human. This says how much money waits, per queue, for `betting queue
//! stats` and the `queue_dead_money` gauge.

use betting_jobs::{JobKind, REFUND, RefundJob, SETTLE, SettleJob, SettleRoundJob};
use betting_queue::{Job, Queue};
use rust_decimal::Decimal;
use sqlx::PgPool;
use uuid::Uuid;

use crate::ReconcilerError;

/// Dead jobs looked at per queue: enough for any alert, bounded per call.
const DEAD_SCAN: i64 = 10_000;

/// The money the dead jobs of `queue` were to pay: for settle jobs the
/// payouts (twice the stake) of matches still unpaid, for refund jobs the
/// refunds still owed. Zero for the match queue (it moves no money).
pub async fn dead_money(pool: &PgPool, queue: &Queue) -> Result<Decimal, ReconcilerError> {
    if queue.name() != SETTLE.name && queue.name() != REFUND.name {
        return Ok(Decimal::ZERO);
    }
    let dead = queue.dead(DEAD_SCAN).await?;
    // A malformed dead job holds no money we could name.
    let total: Option<Decimal> = if queue.name() == SETTLE.name {
        let (rounds, matches): (Vec<&Job>, Vec<&Job>) =
            dead.iter().partition(|job| SettleRoundJob::is(job));
        let matches: Vec<Uuid> = matches
            .into_iter()
            .filter_map(|job| SettleJob::decode(job).ok())
            .map(|job| job.match_id)
            .collect();
        // A dead round's job holds up every match of it still unpaid.
        let rounds: Vec<String> = rounds
            .into_iter()
            .filter_map(|job| SettleRoundJob::decode(job).ok())
            .map(|job| job.round_id)
            .collect();
        sqlx::query_scalar(
            "SELECT sum(amount * 2) FROM matches \
             WHERE (match_id = ANY($1) OR round_id = ANY($2)) AND status = 'OPEN'",
        )
        .bind(&matches)
        .bind(&rounds)
        .fetch_one(pool)
        .await?
    } else {
        sqlx::query_scalar(
            "SELECT sum(amount) FROM wallet_commands \
             WHERE idempotency_key = ANY($1) AND done_at IS NULL",
        )
        .bind(
            dead.iter()
                .filter_map(|job| RefundJob::decode(job).ok())
                .map(|job| job.key)
                .collect::<Vec<_>>(),
        )
        .fetch_one(pool)
        .await?
    };
    Ok(total.unwrap_or_default())
}
