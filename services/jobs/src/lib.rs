//! The suite's queues and their jobs, in one place.
//!
//! Three queues carry work between the roles: `match` (a PENDING bet for the
//! matcher), `settle` (a match of a settled round to pay) and `refund` (an
//! owed refund to carry out). Each job kind here names its queue, builds its
//! job id (one job per bet, per match, per refund: the queue drops a
//! duplicate while the first is queued or running) and is its own typed
//! payload, so producers and consumers cannot disagree on a field name.
//!
//! The payloads' JSON is the wire format in Redis: renaming a field strands
//! the jobs already queued by the previous version (a rolling deploy), so
//! fields are only ever added, with defaults.

#![forbid(unsafe_code)]

use betting_db::StoreError;
use betting_domain::{BetId, IdempotencyKey, MatchId};
use betting_queue::{Job, JobError, Queue};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use uuid::Uuid;

/// One of the suite's queues.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueSpec {
    pub name: &'static str,
    /// Failed attempts before a job goes to the dead-letter list. Money jobs
    /// keep trying longer before they need a human.
    pub max_attempts: u32,
}

/// The matcher's queue.
pub const MATCH: QueueSpec = QueueSpec {
    name: "match",
    max_attempts: 5,
};
/// The settlers' queue of matches to pay.
pub const SETTLE: QueueSpec = QueueSpec {
    name: "settle",
    max_attempts: 10,
};
/// The settlers' queue of owed refunds.
pub const REFUND: QueueSpec = QueueSpec {
    name: "refund",
    max_attempts: 10,
};
/// Every queue, in the order operators see them.
pub const QUEUES: [QueueSpec; 3] = [MATCH, SETTLE, REFUND];

/// A kind of job: its queue, its id, and its payload (the value itself).
pub trait JobKind: Serialize + DeserializeOwned {
    const QUEUE: QueueSpec;

    /// The job's id: the same work always gets the same id.
    fn id(&self) -> String;

    /// The payload as stored in Redis.
    fn payload(&self) -> serde_json::Value {
        // Plain structs of strings and UUIDs always serialise.
        serde_json::to_value(self).unwrap_or_default()
    }

    /// Reads a job taken from this kind's queue. A payload that does not
    /// decode will never decode: the job goes straight to the dead letters.
    fn decode(job: &Job) -> Result<Self, JobError> {
        serde_json::from_value(job.payload.clone()).map_err(|e| {
            JobError::Permanent(format!(
                "{} job {} has a malformed payload: {e}",
                Self::QUEUE.name,
                job.id
            ))
        })
    }
}

/// Match a PENDING bet's (round, stake) group: `match:{bet_id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MatchJob {
    pub bet_id: Uuid,
    pub round_id: String,
}

impl MatchJob {
    pub fn new(bet: BetId, round_id: &str) -> Self {
        Self {
            bet_id: bet.as_uuid(),
            round_id: round_id.to_owned(),
        }
    }
}

impl JobKind for MatchJob {
    const QUEUE: QueueSpec = MATCH;

    fn id(&self) -> String {
        format!("match:{}", self.bet_id)
    }
}

/// Pay a match of a settled round: `settle:{match_id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SettleJob {
    pub match_id: Uuid,
}

impl SettleJob {
    pub fn new(matched: MatchId) -> Self {
        Self {
            match_id: matched.as_uuid(),
        }
    }
}

impl JobKind for SettleJob {
    const QUEUE: QueueSpec = SETTLE;

    fn id(&self) -> String {
        format!("settle:{}", self.match_id)
    }
}

/// Pay every unpaid match of a settled round, in batches (one wallet call
/// and one bookkeeping statement per batch): `settle-round:{round_id}`, on
/// the settle queue beside the per-match [`SettleJob`]s (which the
/// reconciler still derives for a match left unpaid). A settler tells the
/// two apart by the id's prefix ([`SettleRoundJob::is`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SettleRoundJob {
    pub round_id: String,
}

impl SettleRoundJob {
    const PREFIX: &str = "settle-round:";

    pub fn new(round_id: &str) -> Self {
        Self {
            round_id: round_id.to_owned(),
        }
    }

    /// Whether a settle-queue job is a round's (else a match's).
    pub fn is(job: &Job) -> bool {
        job.id.starts_with(Self::PREFIX)
    }
}

impl JobKind for SettleRoundJob {
    const QUEUE: QueueSpec = SETTLE;

    fn id(&self) -> String {
        format!("{}{}", Self::PREFIX, self.round_id)
    }
}

/// Carry out an owed refund, named by its wallet key: `refund:REFUND:{bet_id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefundJob {
    /// The refund's idempotency key in the outbox and the wallet.
    pub key: String,
}

impl RefundJob {
    /// The refund of a bet's stake.
    pub fn for_bet(bet: BetId) -> Self {
        Self::for_key(&IdempotencyKey::refund(bet))
    }

    pub fn for_key(key: &IdempotencyKey) -> Self {
        Self {
            key: key.as_str().to_owned(),
        }
    }
}

impl JobKind for RefundJob {
    const QUEUE: QueueSpec = REFUND;

    fn id(&self) -> String {
        format!("refund:{}", self.key)
    }
}

/// How a handler's storage failure counts: an outage defers the job and
/// uses up no attempt (owed money is never buried by one); anything else is
/// the job's own failure, retried with an attempt counted.
pub fn store_failure(e: StoreError) -> JobError {
    if e.is_unavailable() {
        JobError::Unavailable(e.to_string())
    } else {
        JobError::Retry(e.to_string())
    }
}

/// Enqueues one job. Best effort by design: every producer's work is
/// re-derived from PostgreSQL by the reconciler, so a failure only delays it.
pub async fn enqueue<J: JobKind>(queue: &Queue, job: &J) {
    enqueue_all(queue, std::slice::from_ref(job)).await;
}

/// Enqueues jobs in order, best effort: at the first failure (Redis is
/// away) the rest are left to the reconciler too.
pub async fn enqueue_all<J: JobKind>(queue: &Queue, jobs: &[J]) {
    debug_assert_eq!(queue.name(), J::QUEUE.name);
    for job in jobs {
        let id = job.id();
        if let Err(error) = queue.enqueue(&id, job.payload()).await {
            tracing::warn!(queue = queue.name(), job = %id, %error, "job not enqueued; the reconciler will");
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The payloads are the wire format of jobs already in Redis: these are
    /// the shapes the previous releases wrote.
    #[test]
    fn payloads_keep_their_wire_format() {
        let bet = Uuid::from_u128(7);
        let job = MatchJob {
            bet_id: bet,
            round_id: "r1".into(),
        };
        assert_eq!(job.id(), format!("match:{bet}"));
        assert_eq!(
            job.payload(),
            serde_json::json!({ "bet_id": bet.to_string(), "round_id": "r1" })
        );
        let settle = SettleJob { match_id: bet };
        assert_eq!(settle.id(), format!("settle:{bet}"));
        assert_eq!(
            settle.payload(),
            serde_json::json!({ "match_id": bet.to_string() })
        );
        let refund = RefundJob::for_bet(BetId::from(bet));
        assert_eq!(refund.id(), format!("refund:REFUND:{bet}"));
        assert_eq!(
            refund.payload(),
            serde_json::json!({ "key": format!("REFUND:{bet}") })
        );
    }

    #[test]
    fn a_malformed_payload_is_permanent() {
        let job = Job {
            id: "match:x".into(),
            payload: serde_json::json!({ "bet": 1 }),
            enqueued_at_ms: 0,
            attempts: 0,
            outages: 0,
            last_error: None,
            failed_at_ms: None,
            trace: None,
        };
        assert!(matches!(
            MatchJob::decode(&job),
            Err(JobError::Permanent(_))
        ));
    }
}
