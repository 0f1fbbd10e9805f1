//! Consumers: fetch, run, acknowledge; heartbeat; reap; sweep orphans; drain
//! on shutdown.

use std::{future::Future, sync::Arc, time::Duration};

use betting_shutdown::Shutdown;
use fred::prelude::Client;
use tokio::{sync::Semaphore, task::JoinSet};

use crate::{FailOutcome, Job, Queue, QueueError, QueueSettings, SweepCursor};

/// Why a job did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// Worth another attempt after a backoff (a store was unavailable, a race lost).
    #[error("{0}")]
    Retry(String),
    /// Will never succeed (a malformed payload): straight to the dead-letter list.
    #[error("{0}")]
    Permanent(String),
    /// A dependency (the wallet, PostgreSQL) could not be reached: retried
    /// with a capped backoff for as long as it takes, using up no attempt.
    #[error("{0}")]
    Unavailable(String),
}

/// Runs one kind of job. It must be idempotent: a job may run more than once
/// (a consumer may die after its work committed but before the acknowledgement).
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, job: &Job) -> impl Future<Output = Result<(), JobError>> + Send;
}

/// How long one BLMOVE waits by default.
pub const DEFAULT_POLL: Duration = Duration::from_secs(1);

/// The shortest poll: Redis reads a blocking timeout in whole milliseconds,
/// and a timeout of 0 blocks for ever.
pub const MIN_POLL: Duration = Duration::from_millis(10);

/// How long a worker waits before fetching again after a fetch failed.
const FETCH_ERROR_BACKOFF: Duration = Duration::from_millis(500);

/// Bounds of the housekeeping interval.
const HOUSEKEEPING_MIN: Duration = Duration::from_millis(100);
const HOUSEKEEPING_MAX: Duration = Duration::from_secs(5);

/// How often a worker heartbeats, promotes due retries and reaps: a third of
/// the lease, within [100 ms, 5 s].
pub fn housekeeping_interval(visibility_timeout: Duration) -> Duration {
    (visibility_timeout / 3).clamp(HOUSEKEEPING_MIN, HOUSEKEEPING_MAX)
}

/// The shortest visibility timeout a worker polling every `poll` accepts:
/// the smallest `v` with `v >= 2 × (housekeeping_interval(v) + poll)` (see
/// [`WorkerSettings::check`]). `v - 2 × housekeeping_interval(v)` grows with
/// `v`, so each piece of the clamp is solved on its own.
pub fn min_visibility_timeout(poll: Duration) -> Duration {
    let six_polls = poll.saturating_mul(6);
    if six_polls < HOUSEKEEPING_MIN * 3 {
        // Below 300 ms the interval is pinned at 100 ms.
        (HOUSEKEEPING_MIN.saturating_add(poll)).saturating_mul(2)
    } else if six_polls <= HOUSEKEEPING_MAX * 3 {
        // The interval is a third of the lease: v ≥ 2 × (v/3 + poll).
        six_polls
    } else {
        // Above 15 s the interval is pinned at 5 s.
        (HOUSEKEEPING_MAX.saturating_add(poll)).saturating_mul(2)
    }
}

#[derive(Debug, Clone)]
pub struct WorkerSettings {
    /// Jobs run at once by this consumer.
    pub concurrency: usize,
    /// How long on shutdown in-flight jobs get to finish before they are handed back.
    pub shutdown_grace: Duration,
    /// How long one BLMOVE waits; bounds how quickly shutdown is noticed, and
    /// how late a heartbeat can be (see [`WorkerSettings::check`]).
    pub poll: Duration,
}

impl Default for WorkerSettings {
    fn default() -> Self {
        Self {
            concurrency: 8,
            shutdown_grace: Duration::from_secs(10),
            poll: DEFAULT_POLL,
        }
    }
}

/// Settings a worker refuses to start with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WorkerSettingsError {
    #[error(
        "a queue worker's poll must be at least {MIN_POLL:?} (Redis reads a blocking timeout in milliseconds, and 0 blocks for ever), not {0:?}"
    )]
    PollTooShort(Duration),
    #[error(
        "queue {queue}: a visibility timeout of {visibility:?} is too short for a {poll:?} poll: a heartbeat can come one housekeeping interval ({housekeeping:?}) plus one poll late, and the lease must last twice that; use at least {minimum:?}, or a shorter poll"
    )]
    VisibilityTooShort {
        queue: String,
        visibility: Duration,
        poll: Duration,
        housekeeping: Duration,
        minimum: Duration,
    },
}

impl WorkerSettings {
    /// Refuses settings under which a live consumer could lose its lease.
    ///
    /// A worker renews its lease from the same loop that fetches: the
    /// housekeeping tick comes every [`housekeeping_interval`], and a tick that
    /// falls due while a fetch blocks in BLMOVE is served when the fetch
    /// returns, up to one `poll` later (nothing else in the loop waits: a
    /// failed fetch backs off without blocking the loop). So two heartbeats
    /// are at most `interval + poll` apart, and the lease must last twice that:
    /// a heartbeat delayed by a whole poll still lands with half the lease to
    /// spare for Redis latency and for clock skew between the worker that sets
    /// the deadline and the reaper that reads it. With the lease's third as
    /// interval this means a lease of at least six polls.
    pub fn check(&self, queue: &str, settings: &QueueSettings) -> Result<(), WorkerSettingsError> {
        if self.poll < MIN_POLL {
            return Err(WorkerSettingsError::PollTooShort(self.poll));
        }
        let visibility = settings.visibility_timeout;
        let housekeeping = housekeeping_interval(visibility);
        if visibility < housekeeping.saturating_add(self.poll).saturating_mul(2) {
            return Err(WorkerSettingsError::VisibilityTooShort {
                queue: queue.to_owned(),
                visibility,
                poll: self.poll,
                housekeeping,
                minimum: min_visibility_timeout(self.poll),
            });
        }
        Ok(())
    }
}

/// One consumer of one queue.
pub struct Worker {
    queue: Queue,
    /// A connection of its own for BLMOVE.
    blocking: Client,
    consumer: String,
    settings: WorkerSettings,
}

impl Worker {
    /// Refuses settings under which a live consumer could lose its lease (see
    /// [`WorkerSettings::check`]).
    pub fn new(
        queue: Queue,
        blocking: Client,
        settings: WorkerSettings,
    ) -> Result<Self, WorkerSettingsError> {
        settings.check(queue.name(), queue.settings())?;
        let consumer = format!("{}-{}", queue.name(), uuid::Uuid::new_v4().simple());
        Ok(Self {
            queue,
            blocking,
            consumer,
            settings,
        })
    }

    pub fn consumer(&self) -> &str {
        &self.consumer
    }

    /// Runs until `shutdown` is signalled: then lets a fetch under way finish
    /// (at most one poll), stops fetching, gives in-flight jobs the grace
    /// period, and hands back whatever is still running or was just fetched.
    pub async fn run<H: Handler>(self, handler: Arc<H>, shutdown: Shutdown) {
        let Worker {
            queue,
            blocking,
            consumer,
            settings,
        } = self;
        tracing::info!(queue = %queue.name(), %consumer, concurrency = settings.concurrency, "worker started");
        let permits = Arc::new(Semaphore::new(settings.concurrency.max(1)));
        // Ids this consumer is running right now, to spot strays in its active list.
        let live: Arc<std::sync::Mutex<std::collections::HashSet<String>>> = Arc::default();
        let mut strays: std::collections::HashSet<String> = std::collections::HashSet::new();
        let mut running: JoinSet<String> = JoinSet::new();
        let mut housekeeping =
            tokio::time::interval(housekeeping_interval(queue.settings().visibility_timeout));
        housekeeping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // After a failed fetch, no fetch before this. The back-off is a branch
        // of the loop, not a sleep inside the fetch branch, so it never delays
        // a heartbeat (WorkerSettings::check relies on it).
        let mut fetch_after: Option<tokio::time::Instant> = None;
        let visibility = queue.settings().visibility_timeout;
        // Until when our lease runs, by our own clock, from the start of the
        // last heartbeat that succeeded (Redis's deadline is no earlier).
        let mut leased_until: Option<tokio::time::Instant> = None;
        // The orphan sweep runs at the first tick, then once per lease.
        let mut next_sweep = tokio::time::Instant::now();
        let mut sweep_cursor = SweepCursor::default();

        // Ends when shutdown is asked for (or can no longer be: the trigger
        // is gone, which signals too). Each turn waits in one branch of the
        // select, so it never spins: a tick, a back-off, a free permit and at
        // most one poll.
        loop {
            // Reap finished tasks so the set does not grow; bounded by the
            // tasks started, at most `concurrency`.
            while running.try_join_next().is_some() {}
            let backing_off = fetch_after.is_some();
            // A consumer fetches only while it holds a lease: the first tick
            // fires at once, and until a heartbeat succeeded (or after our
            // lease ran out unrenewed) the fetch branch stays off. So a job
            // never sits in the active list of a live consumer without a
            // lease, which is what lets the orphan sweep take the jobs of any
            // consumer without one: keep it so.
            let may_fetch =
                !backing_off && leased_until.is_some_and(|t| tokio::time::Instant::now() < t);
            tokio::select! {
                biased;
                // Once signalled this branch stays ready on every turn, so
                // leave at once rather than go round again.
                () = shutdown.signalled() => break,
                _ = housekeeping.tick() => {
                    // Every consumer helps: renew its own lease, promote due
                    // retries, return the jobs of dead consumers and of
                    // consumers without a lease. All idempotent.
                    let renewing = tokio::time::Instant::now();
                    match queue.heartbeat(&consumer).await {
                        Ok(()) => leased_until = Some(renewing + visibility),
                        Err(error) => tracing::warn!(queue = %queue.name(), %error, "could not renew the consumer's lease"),
                    }
                    if let Err(error) = housekeep(&queue).await {
                        tracing::warn!(queue = %queue.name(), %error, "queue housekeeping failed");
                    }
                    // Orphans are rare (a BLMOVE outliving its consumer) and
                    // a sweep SCANs: once per lease is soon enough.
                    if renewing >= next_sweep {
                        next_sweep = renewing + visibility;
                        if let Err(error) = queue.sweep_orphans(&mut sweep_cursor).await {
                            tracing::warn!(queue = %queue.name(), %error, "orphan sweep failed");
                        }
                    }
                    // A BLMOVE whose reply was lost (client timeout racing the
                    // server) leaves an id in our active list that we never
                    // ran. Hand back any id seen there, not running, twice in a row.
                    match release_strays(&queue, &consumer, &live, &mut strays).await {
                        Ok(0) => {}
                        Ok(n) => tracing::warn!(queue = %queue.name(), released = n, "handed back stray jobs"),
                        Err(error) => tracing::warn!(queue = %queue.name(), %error, "stray check failed"),
                    }
                    continue;
                }
                _ = tokio::time::sleep_until(fetch_after.unwrap_or_else(tokio::time::Instant::now)), if backing_off => {
                    fetch_after = None;
                    continue;
                }
                permit = permits.clone().acquire_owned(), if may_fetch => {
                    let Ok(permit) = permit else { break };
                    // Not raced against shutdown: dropping the fetch would not
                    // cancel its BLMOVE, which would stay blocked on the server
                    // and could move a job into our active list after
                    // hand_back emptied it and we left the lease set, where no
                    // reaper looks. The fetch is bounded by the poll.
                    let fetched = queue.fetch(&blocking, &consumer, settings.poll).await;
                    if shutdown.is_signalled() {
                        // Stopping: start nothing more. A job the fetch
                        // returned is in our active list, and hand_back
                        // returns it to the front of the queue below.
                        drop(permit);
                        break;
                    }
                    match fetched {
                        Ok(Some(job)) => {
                            let queue = queue.clone();
                            let consumer = consumer.clone();
                            let handler = handler.clone();
                            let live = live.clone();
                            if let Ok(mut set) = live.lock() {
                                set.insert(job.id.clone());
                            }
                            running.spawn(async move {
                                let id = job.id.clone();
                                run_one(&queue, &consumer, handler.as_ref(), job).await;
                                if let Ok(mut set) = live.lock() {
                                    set.remove(&id);
                                }
                                drop(permit);
                                id
                            });
                        }
                        Ok(None) => {}
                        Err(error) => {
                            tracing::warn!(queue = %queue.name(), %error, "fetch failed; backing off");
                            fetch_after = Some(tokio::time::Instant::now() + FETCH_ERROR_BACKOFF);
                        }
                    }
                }
            }
        }

        // Drain: in-flight jobs get the grace period, then are handed back.
        tracing::info!(queue = %queue.name(), %consumer, in_flight = running.len(), "worker stopping");
        // Both waits end: the first by the grace period, the second because an
        // aborted task ends at its next await (handlers are async), and the
        // set holds at most `concurrency` tasks.
        let drained = tokio::time::timeout(settings.shutdown_grace, async {
            while running.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            running.abort_all();
            while running.join_next().await.is_some() {}
        }
        // Whatever is still in our active list did not finish, or was fetched
        // as we stopped: hand it back. No BLMOVE of ours is pending any more,
        // so nothing lands there after this.
        if let Err(error) = hand_back(&queue, &consumer).await {
            tracing::warn!(queue = %queue.name(), %error, "could not hand jobs back; the reaper will");
        }
        // The blocking connection is this worker's own: close it.
        let _ = fred::prelude::ClientLike::quit(&blocking).await;
        tracing::info!(queue = %queue.name(), %consumer, "worker stopped");
    }
}

/// A panic's message, as far as it has one.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned())
}

async fn housekeep(queue: &Queue) -> Result<(), QueueError> {
    queue.promote_due().await?;
    queue.reap_expired().await?;
    Ok(())
}

async fn release_strays(
    queue: &Queue,
    consumer: &str,
    live: &std::sync::Mutex<std::collections::HashSet<String>>,
    seen_before: &mut std::collections::HashSet<String>,
) -> Result<usize, QueueError> {
    use fred::interfaces::ListInterface;
    let ids: Vec<String> = queue.client().lrange(queue.active(consumer), 0, -1).await?;
    let running = live.lock().map(|set| set.clone()).unwrap_or_default();
    let candidates: std::collections::HashSet<String> =
        ids.into_iter().filter(|id| !running.contains(id)).collect();
    let mut released = 0;
    // Bounded by our own active list: the jobs we run (at most `concurrency`)
    // and the rare stray.
    for id in candidates.intersection(seen_before) {
        queue.release(consumer, id).await?;
        released += 1;
    }
    *seen_before = candidates;
    Ok(released)
}

async fn hand_back(queue: &Queue, consumer: &str) -> Result<(), QueueError> {
    use fred::interfaces::ListInterface;
    let ids: Vec<String> = queue.client().lrange(queue.active(consumer), 0, -1).await?;
    // Bounded by our own active list, as in release_strays.
    for id in ids {
        queue.release(consumer, &id).await?;
    }
    queue.leave(consumer).await
}

async fn run_one<H: Handler>(queue: &Queue, consumer: &str, handler: &H, job: Job) {
    let name = queue.name().to_owned();
    let started = std::time::Instant::now();
    let waited = crate::now_ms().saturating_sub(job.enqueued_at_ms);
    metrics::histogram!("queue_job_wait_seconds", "queue" => name.clone())
        .record(waited as f64 / 1000.0);
    // The job's span, a child of the producer's (PlaceBet, SettleRound) when
    // the job carries its context; handlers add the ids they work on.
    let span = tracing::info_span!(
        "job",
        otel.name = %format_args!("queue.{name}"),
        otel.kind = "consumer",
        messaging.system = "redis",
        messaging.destination.name = %name,
        job.id = %job.id,
        job.attempts = job.attempts,
        trace_id = tracing::field::Empty,
    );
    let carried = job.trace.as_ref();
    betting_telemetry::trace::adopt(&span, |key| {
        carried.and_then(|c| c.get(key)).map(String::as_str)
    });
    // A handler that panics has failed, an attempt counted: left
    // unrecorded, its job would stay in our active list, its id among the
    // running ones, where neither the stray check nor the reaper (our lease
    // is renewed) hands it back while we live.
    let result = match tracing::Instrument::instrument(
        futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(handler.handle(&job))),
        span,
    )
    .await
    {
        Ok(result) => result,
        Err(panic) => {
            let panic = panic_message(&*panic);
            tracing::error!(queue = %name, job = %job.id, panic, "the job's handler panicked");
            Err(JobError::Retry(format!("the handler panicked: {panic}")))
        }
    };
    metrics::histogram!("queue_job_duration_seconds", "queue" => name.clone())
        .record(started.elapsed().as_secs_f64());
    let outcome = match result {
        Ok(()) => queue.ack(consumer, &job.id).await.map(|()| None),
        Err(error) => {
            let text = error.to_string();
            let recorded = match &error {
                JobError::Unavailable(_) => queue.defer(consumer, &job, &text).await,
                JobError::Permanent(_) => queue.fail(consumer, &job, &text, true).await,
                JobError::Retry(_) => queue.fail(consumer, &job, &text, false).await,
            };
            recorded.map(|outcome| Some((outcome, error)))
        }
    };
    match outcome {
        Ok(None) => {
            metrics::counter!("queue_jobs_processed_total", "queue" => name).increment(1);
        }
        Ok(Some((outcome, error))) => {
            metrics::counter!("queue_jobs_failed_total", "queue" => name.clone()).increment(1);
            match outcome {
                FailOutcome::Retrying { attempt, delay } => tracing::warn!(
                    queue = %name, job = %job.id, attempt, ?delay, %error, "job failed; will retry"
                ),
                FailOutcome::Dead => {
                    metrics::counter!("queue_jobs_dead_total", "queue" => name.clone())
                        .increment(1);
                    tracing::error!(queue = %name, job = %job.id, %error, "job failed for good; moved to the dead-letter list")
                }
                FailOutcome::Unknown => {}
            }
        }
        // The job stays in our active list; the reaper returns it if we die,
        // and a later run repeats the (idempotent) work.
        Err(error) => {
            tracing::warn!(queue = %name, job = %job.id, %error, "could not record the job's outcome")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue_settings(visibility: Duration) -> QueueSettings {
        QueueSettings {
            visibility_timeout: visibility,
            ..QueueSettings::default()
        }
    }

    fn worker(poll: Duration) -> WorkerSettings {
        WorkerSettings {
            poll,
            ..WorkerSettings::default()
        }
    }

    #[test]
    fn the_minimum_visibility_is_the_smallest_the_check_accepts() {
        for poll_ms in [
            10, 30, 50, 51, 100, 333, 1000, 2000, 2500, 2501, 4000, 60_000,
        ] {
            let poll = Duration::from_millis(poll_ms);
            let minimum = min_visibility_timeout(poll);
            assert_eq!(
                worker(poll).check("q", &queue_settings(minimum)),
                Ok(()),
                "poll {poll:?}"
            );
            assert!(
                worker(poll)
                    .check("q", &queue_settings(minimum - Duration::from_millis(1)))
                    .is_err(),
                "poll {poll:?}"
            );
        }
    }

    #[test]
    fn defaults_are_valid_and_a_short_lease_for_the_default_poll_is_not() {
        assert_eq!(min_visibility_timeout(DEFAULT_POLL), Duration::from_secs(6));
        let defaults = WorkerSettings::default();
        assert_eq!(defaults.check("q", &QueueSettings::default()), Ok(()));
        let refused = defaults
            .check("q", &queue_settings(Duration::from_secs(1)))
            .expect_err("a 1 s lease with a 1 s poll");
        assert!(refused.to_string().contains("at least 6s"), "{refused}");
        assert_eq!(
            worker(Duration::ZERO).check("q", &QueueSettings::default()),
            Err(WorkerSettingsError::PollTooShort(Duration::ZERO))
        );
    }
}
