//! The jobs of the settle and refund queues: their ids and payloads, in one place.

use uuid::Uuid;

/// The queue settlers consume to pay matches.
pub const SETTLE_QUEUE: &str = "settle";
/// The queue settlers consume to carry out owed refunds.
pub const REFUND_QUEUE: &str = "refund";

/// One job per match.
pub fn settle_job(match_id: Uuid) -> (String, serde_json::Value) {
    (
        format!("settle:{match_id}"),
        serde_json::json!({ "match_id": match_id.to_string() }),
    )
}

/// One job per owed refund, named by its wallet key (`REFUND:{bet_id}`).
pub fn refund_job(key: &str) -> (String, serde_json::Value) {
    (format!("refund:{key}"), serde_json::json!({ "key": key }))
}

/// Enqueues, best effort: the reconciler re-derives whatever fails here.
pub async fn enqueue_all(
    queue: &betting_queue::Queue,
    jobs: impl IntoIterator<Item = (String, serde_json::Value)>,
) {
    for (id, payload) in jobs {
        if let Err(error) = queue.enqueue(&id, payload).await {
            tracing::warn!(queue = queue.name(), job = %id, %error, "job not enqueued; the reconciler will");
            return;
        }
    }
}
