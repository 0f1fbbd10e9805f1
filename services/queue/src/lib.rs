//! A reliable job queue over Redis lists.
//!
//! What a BullMQ or Sidekiq Pro user expects, built on plain lists, a hash and
//! two sorted sets:
//!
//! - **Reliable hand-off**: a consumer moves a job id atomically from the wait
//!   list into its own active list (`BLMOVE`) and acknowledges it only after its
//!   work committed. Consumers hold a lease they renew by heartbeat; a reaper
//!   returns the jobs of a consumer whose lease expired (it died, even by
//!   SIGKILL) to the wait list.
//! - **Orphan sweep**: a BLMOVE still blocked in Redis when its consumer left
//!   (or was reaped) can move a job into an active list nobody holds a lease
//!   for, where the reaper never looks. Workers sweep such lists (SCAN over the
//!   queue's active prefix, a bounded slice per visibility timeout) and return
//!   their jobs, without counting an attempt. A consumer takes its lease before
//!   its first fetch, so the sweep never touches a live consumer's list.
//! - **Retries** with exponential backoff and jitter through a delayed sorted
//!   set, up to a per-queue attempt limit; then a **dead-letter** hash that keeps
//!   the job with its last error and attempt count until someone requeues it.
//! - **Dedupe by id** while a job is waiting, delayed or in flight; once it is
//!   acknowledged its id is free again (BullMQ's trap avoided).
//! - **Dead stays dead**: `enqueue` refuses an id that is in the dead-letter
//!   hash. Producers re-derive their work from PostgreSQL on every pass, and
//!   would otherwise put a poison job back every pass; only an operator's
//!   [`Queue::retry_dead`] or [`Queue::retry_all_dead`] (`betting queue retry`)
//!   requeues it.
//! - **Cluster-ready**: every key of a queue shares the hash tag `{name}`.
//!
//! Redis is never the source of truth: producers re-derive lost work from
//! PostgreSQL, so a Redis restarted empty delays work but loses none.

#![forbid(unsafe_code)]

mod scripts;
mod tls;
mod worker;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fred::{
    interfaces::{HashesInterface, ListInterface, SortedSetsInterface},
    prelude::{Builder, Client, ClientLike, Config, ReconnectPolicy},
    types::{CustomCommand, config::Options, lists::LMoveDirection, scripts::Script},
};

pub use worker::{
    DEFAULT_POLL, Handler, JobError, MIN_POLL, Worker, WorkerSettings, WorkerSettingsError,
    housekeeping_interval, min_visibility_timeout,
};

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("redis unavailable")]
    Redis(#[from] fred::error::Error),
    #[error("job could not be encoded or decoded")]
    Codec(#[from] serde_json::Error),
    #[error("invalid Redis TLS setting: {0}")]
    Tls(String),
}

/// Builds a Redis client that keeps reconnecting forever and fails commands
/// after a bounded wait instead of hanging while Redis is down. The connection
/// is started in the background: the process starts even while Redis is away.
/// A `rediss://` URL connects over TLS, checked against the system's roots.
pub fn connect(url: &str) -> Result<Client, QueueError> {
    connect_with(url, None)
}

/// [`connect`], with `ca_pem` (PEM certificates) as the only roots a
/// `rediss://` server's certificate is checked against.
pub fn connect_with(url: &str, ca_pem: Option<&[u8]>) -> Result<Client, QueueError> {
    let mut config = config(url, ca_pem)?;
    // Retry the first connection too (fred's default gives up on it at
    // once): a process started while Redis is down must recover when it
    // comes up, not stay NOT_SERVING for good.
    config.fail_fast = false;
    let client = Builder::from_config(config)
        .with_connection_config(|c| {
            c.connection_timeout = Duration::from_secs(2);
            c.internal_command_timeout = Duration::from_secs(2);
            c.max_command_attempts = 2;
        })
        .with_performance_config(|p| {
            p.default_command_timeout = Duration::from_secs(3);
        })
        // Unlimited attempts, 100 ms doubling to 2 s.
        .set_policy(ReconnectPolicy::new_exponential(0, 100, 2_000, 2))
        .build()?;
    // The returned task handle runs until the client quits; nothing awaits it.
    drop(client.connect());
    Ok(client)
}

/// The client configuration of `url`. With fred's `enable-rustls-ring`,
/// `rediss://` is TLS with the host name checked (verify-full); without the
/// feature fred would dial it in plaintext, which is why it is on. `ca_pem`
/// replaces the system's roots with a private CA; it is refused for a
/// plaintext URL rather than ignored.
pub fn config(url: &str, ca_pem: Option<&[u8]>) -> Result<Config, QueueError> {
    let mut config = Config::from_url(url)?;
    if let Some(ca_pem) = ca_pem {
        if config.tls.is_none() {
            return Err(QueueError::Tls(
                "a Redis CA was given for a URL without TLS".into(),
            ));
        }
        config.tls = Some(tls::with_roots(ca_pem)?.into());
    }
    Ok(config)
}

/// Whether Redis answers right now.
pub async fn ping(client: &Client) -> bool {
    client.ping::<String>(None).await.is_ok()
}

/// A job as stored in Redis.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Job {
    pub id: String,
    pub payload: serde_json::Value,
    /// Milliseconds since the epoch when first enqueued.
    pub enqueued_at_ms: u64,
    /// Failed attempts so far.
    #[serde(default)]
    pub attempts: u32,
    /// Times a dependency was unavailable (not counted as attempts).
    #[serde(default)]
    pub outages: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_at_ms: Option<u64>,
    /// The producer's trace context (W3C `traceparent`, `tracestate`), so the
    /// worker's span joins the trace of the request that enqueued the job.
    /// Absent when tracing is off or the job was re-derived by a reconciler.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<betting_telemetry::trace::Carrier>,
}

/// SCAN pages one orphan sweep reads, and keys it asks for per page: a sweep
/// looks at no more than 10,000 keys, and the next one carries on from there.
const SWEEP_PAGES: usize = 10;
const SWEEP_PAGE_SIZE: u32 = 1_000;

/// Ids one sweep moves out of one active list; the rest wait for the next.
const SWEEP_LIST_LIMIT: u32 = 1_000;

/// Consumers one reap looks at.
const REAP_LIMIT: i64 = 100;

/// How long after its own timeout a BLMOVE's reply may take to arrive.
const FETCH_REPLY_MARGIN: Duration = Duration::from_secs(1);

/// Most dead jobs one [`Queue::retry_all_dead`] requeues.
pub const RETRY_ALL_LIMIT: i64 = 10_000;

/// Per-queue behaviour.
#[derive(Debug, Clone)]
pub struct QueueSettings {
    /// Attempts before a job goes to the dead-letter list.
    pub max_attempts: u32,
    /// First retry delay; doubles each attempt, with full jitter.
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// How long a consumer's lease lasts without a heartbeat. A worker
    /// refuses one too short for its poll ([`WorkerSettings::check`]).
    pub visibility_timeout: Duration,
}

impl Default for QueueSettings {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            backoff_base: Duration::from_millis(500),
            backoff_max: Duration::from_secs(60),
            visibility_timeout: Duration::from_secs(30),
        }
    }
}

/// Counts of one queue.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct QueueStats {
    pub queue: String,
    pub waiting: u64,
    pub delayed: u64,
    pub in_flight: u64,
    pub dead: u64,
    pub consumers: u64,
    pub processed: u64,
    pub failed: u64,
}

/// What `enqueue` did with a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnqueueOutcome {
    /// It is on the wait list.
    Enqueued,
    /// A job with this id is already waiting, delayed or in flight.
    Duplicate,
    /// A job with this id is in the dead-letter list; only an operator's retry
    /// puts it back.
    Dead,
}

/// What happened to a failed job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailOutcome {
    /// It will run again after this delay.
    Retrying {
        attempt: u32,
        delay: Duration,
    },
    Dead,
    /// The job was not known (already acknowledged, or Redis lost it).
    Unknown,
}

#[derive(Debug, Clone)]
struct Keys {
    /// Hash: id -> job JSON, for every job waiting, delayed or in flight.
    jobs: String,
    /// List of ids ready to run; producers push left, consumers take right.
    wait: String,
    /// Sorted set: id -> due time (ms), for retries waiting out their backoff.
    delayed: String,
    /// Hash: id -> job JSON with its last error, for jobs out of attempts.
    dead: String,
    /// List of dead ids, newest first.
    dead_order: String,
    /// Sorted set: consumer -> lease deadline (ms).
    consumers: String,
    /// Hash of counters.
    stats: String,
    /// Prefix of each consumer's active list.
    active_prefix: String,
}

struct Scripts {
    enqueue: Script,
    ack: Script,
    fail: Script,
    release: Script,
    promote: Script,
    reap: Script,
    sweep: Script,
    retry_dead: Script,
}

/// Where an orphan sweep of a queue stopped: a SCAN cursor, carried from one
/// [`Queue::sweep_orphans`] call to the next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SweepCursor(String);

impl Default for SweepCursor {
    fn default() -> Self {
        Self("0".to_owned())
    }
}

impl SweepCursor {
    /// Whether the next sweep starts a new pass over the keyspace.
    pub fn at_start(&self) -> bool {
        self.0 == "0"
    }
}

/// One named queue.
#[derive(Clone)]
pub struct Queue {
    client: Client,
    name: String,
    keys: std::sync::Arc<Keys>,
    scripts: std::sync::Arc<Scripts>,
    settings: QueueSettings,
}

impl Queue {
    /// `namespace` separates deployments (and tests) sharing one Redis.
    pub fn new(client: Client, namespace: &str, name: &str, settings: QueueSettings) -> Self {
        let prefix = format!("{namespace}:{{{name}}}");
        Self {
            client,
            name: name.to_owned(),
            keys: std::sync::Arc::new(Keys {
                jobs: format!("{prefix}:jobs"),
                wait: format!("{prefix}:wait"),
                delayed: format!("{prefix}:delayed"),
                dead: format!("{prefix}:dead"),
                dead_order: format!("{prefix}:dead-order"),
                consumers: format!("{prefix}:consumers"),
                stats: format!("{prefix}:stats"),
                active_prefix: format!("{prefix}:active:"),
            }),
            scripts: std::sync::Arc::new(Scripts {
                enqueue: Script::from_lua(scripts::ENQUEUE),
                ack: Script::from_lua(scripts::ACK),
                fail: Script::from_lua(scripts::FAIL),
                release: Script::from_lua(scripts::RELEASE),
                promote: Script::from_lua(scripts::PROMOTE),
                reap: Script::from_lua(scripts::REAP),
                sweep: Script::from_lua(scripts::SWEEP),
                retry_dead: Script::from_lua(scripts::RETRY_DEAD),
            }),
            settings,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn settings(&self) -> &QueueSettings {
        &self.settings
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    fn active(&self, consumer: &str) -> String {
        format!("{}{consumer}", self.keys.active_prefix)
    }

    /// Enqueues a job unless a job with this id is live (waiting, delayed or
    /// in flight) or dead.
    pub async fn enqueue(
        &self,
        id: &str,
        payload: serde_json::Value,
    ) -> Result<EnqueueOutcome, QueueError> {
        let job = Job {
            id: id.to_owned(),
            payload,
            enqueued_at_ms: now_ms(),
            attempts: 0,
            outages: 0,
            last_error: None,
            failed_at_ms: None,
            trace: betting_telemetry::trace::current(),
        };
        let encoded = serde_json::to_string(&job)?;
        let result: i64 = self
            .scripts
            .enqueue
            .evalsha_with_reload(
                &self.client,
                vec![
                    self.keys.jobs.clone(),
                    self.keys.wait.clone(),
                    self.keys.dead.clone(),
                ],
                vec![id.to_owned(), encoded],
            )
            .await?;
        Ok(match result {
            1 => {
                metrics::counter!("queue_jobs_enqueued_total", "queue" => self.name.clone())
                    .increment(1);
                EnqueueOutcome::Enqueued
            }
            2 => {
                metrics::counter!("queue_enqueue_refused_dead_total", "queue" => self.name.clone())
                    .increment(1);
                EnqueueOutcome::Dead
            }
            _ => EnqueueOutcome::Duplicate,
        })
    }

    /// Waits up to `timeout` for a job and moves it into `consumer`'s active
    /// list. `blocking` must be a client of its own: BLMOVE blocks its connection.
    ///
    /// Dropping the returned future does not cancel the BLMOVE: it stays
    /// blocked on the server and may still move a job into the active list.
    /// Await it to the end instead (it is bounded by `timeout`).
    pub async fn fetch(
        &self,
        blocking: &Client,
        consumer: &str,
        timeout: Duration,
    ) -> Result<Option<Job>, QueueError> {
        // The client gives up only a margin after Redis's own timeout, so
        // Redis answers first even for a poll longer than the client's
        // default command timeout; a client giving up first would leave the
        // BLMOVE blocked behind its back.
        let options = Options {
            timeout: Some(timeout.saturating_add(FETCH_REPLY_MARGIN)),
            ..Options::default()
        };
        let moved = blocking
            .with_options(&options)
            .blmove(
                &self.keys.wait,
                self.active(consumer),
                LMoveDirection::Right,
                LMoveDirection::Left,
                timeout.as_secs_f64(),
            )
            .await;
        let id: Option<String> = match moved {
            Ok(id) => id,
            // The client's own timer can fire just as Redis's BLMOVE timeout
            // does; either way nothing was waiting.
            Err(e) if *e.kind() == fred::error::ErrorKind::Timeout => None,
            Err(e) => return Err(e.into()),
        };
        let Some(id) = id else {
            return Ok(None);
        };
        let raw: Option<String> = self.client.hget(&self.keys.jobs, &id).await?;
        match raw {
            Some(raw) => Ok(Some(serde_json::from_str(&raw)?)),
            None => {
                // An id without a job (its hash entry was lost): nothing to run.
                let _: i64 = self.client.lrem(self.active(consumer), 1, &id).await?;
                Ok(None)
            }
        }
    }

    /// The job's work committed.
    pub async fn ack(&self, consumer: &str, id: &str) -> Result<(), QueueError> {
        let _: i64 = self
            .scripts
            .ack
            .evalsha_with_reload(
                &self.client,
                vec![
                    self.active(consumer),
                    self.keys.jobs.clone(),
                    self.keys.stats.clone(),
                ],
                vec![id.to_owned()],
            )
            .await?;
        Ok(())
    }

    /// The job failed: retry it after a backoff, or bury it once out of
    /// attempts (at once when `permanent`).
    pub async fn fail(
        &self,
        consumer: &str,
        job: &Job,
        error: &str,
        permanent: bool,
    ) -> Result<FailOutcome, QueueError> {
        let mode = if permanent { "1" } else { "0" };
        self.fail_as(consumer, job, error, mode, job.attempts + 1)
            .await
    }

    /// A dependency the job needs (the wallet, PostgreSQL) was unavailable:
    /// retry after a backoff (capped, growing with the outage) without using
    /// up an attempt. Money owed is never buried because something was down.
    pub async fn defer(
        &self,
        consumer: &str,
        job: &Job,
        error: &str,
    ) -> Result<FailOutcome, QueueError> {
        self.fail_as(consumer, job, error, "2", job.outages + 1)
            .await
    }

    async fn fail_as(
        &self,
        consumer: &str,
        job: &Job,
        error: &str,
        mode: &str,
        backoff_step: u32,
    ) -> Result<FailOutcome, QueueError> {
        let delay = self.backoff(backoff_step);
        let now = now_ms();
        let due = now + u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        let result: i64 = self
            .scripts
            .fail
            .evalsha_with_reload(
                &self.client,
                vec![
                    self.active(consumer),
                    self.keys.jobs.clone(),
                    self.keys.delayed.clone(),
                    self.keys.dead.clone(),
                    self.keys.dead_order.clone(),
                    self.keys.stats.clone(),
                ],
                vec![
                    job.id.clone(),
                    error.to_owned(),
                    now.to_string(),
                    self.settings.max_attempts.to_string(),
                    due.to_string(),
                    mode.to_owned(),
                ],
            )
            .await?;
        Ok(match result {
            0 => FailOutcome::Dead,
            -2 => FailOutcome::Retrying {
                attempt: job.attempts,
                delay,
            },
            n if n > 0 => FailOutcome::Retrying {
                attempt: u32::try_from(n).unwrap_or(u32::MAX),
                delay,
            },
            _ => FailOutcome::Unknown,
        })
    }

    /// Exponential backoff with full jitter: a random delay in
    /// [base·2^(attempt-1) / 2, base·2^(attempt-1)], capped.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let exp = self
            .settings
            .backoff_base
            .saturating_mul(
                1_u32
                    .checked_shl(attempt.saturating_sub(1).min(20))
                    .unwrap_or(u32::MAX),
            )
            .min(self.settings.backoff_max);
        let half = exp / 2;
        half + exp.saturating_sub(half).mul_f64(rand::random::<f64>())
    }

    /// Hands an unfinished job back to the front of the queue.
    pub async fn release(&self, consumer: &str, id: &str) -> Result<(), QueueError> {
        let _: i64 = self
            .scripts
            .release
            .evalsha_with_reload(
                &self.client,
                vec![self.active(consumer), self.keys.wait.clone()],
                vec![id.to_owned()],
            )
            .await?;
        Ok(())
    }

    /// Renews `consumer`'s lease.
    pub async fn heartbeat(&self, consumer: &str) -> Result<(), QueueError> {
        let deadline = now_ms()
            + u64::try_from(self.settings.visibility_timeout.as_millis()).unwrap_or(u64::MAX);
        let _: i64 = self
            .client
            .zadd(
                &self.keys.consumers,
                None,
                None,
                false,
                false,
                (deadline as f64, consumer),
            )
            .await?;
        Ok(())
    }

    /// Forgets a consumer that stopped cleanly (after handing its jobs back).
    pub async fn leave(&self, consumer: &str) -> Result<(), QueueError> {
        let _: i64 = self.client.zrem(&self.keys.consumers, consumer).await?;
        Ok(())
    }

    /// Moves due retries onto the wait list.
    pub async fn promote_due(&self) -> Result<u64, QueueError> {
        let moved: i64 = self
            .scripts
            .promote
            .evalsha_with_reload(
                &self.client,
                vec![self.keys.delayed.clone(), self.keys.wait.clone()],
                vec![now_ms().to_string(), "1000".to_owned()],
            )
            .await?;
        Ok(u64::try_from(moved).unwrap_or(0))
    }

    /// Returns the jobs of consumers whose lease expired: of at most 100 of
    /// them per call (the longest expired first), the rest next call.
    pub async fn reap_expired(&self) -> Result<u64, QueueError> {
        let now = now_ms();
        let expired: Vec<String> = self
            .client
            .zrangebyscore(
                &self.keys.consumers,
                "-inf",
                now as f64,
                false,
                Some((0, REAP_LIMIT)),
            )
            .await?;
        let mut moved = 0;
        // Bounded: at most REAP_LIMIT consumers.
        for consumer in expired {
            let n: i64 = self
                .scripts
                .reap
                .evalsha_with_reload(
                    &self.client,
                    vec![
                        self.keys.consumers.clone(),
                        self.active(&consumer),
                        self.keys.wait.clone(),
                        self.keys.jobs.clone(),
                        self.keys.dead.clone(),
                        self.keys.dead_order.clone(),
                        self.keys.stats.clone(),
                    ],
                    vec![
                        consumer.clone(),
                        now.to_string(),
                        self.settings.max_attempts.to_string(),
                    ],
                )
                .await?;
            if n > 0 {
                tracing::warn!(queue = %self.name, %consumer, jobs = n, "reaped the jobs of a consumer whose lease expired");
                moved += u64::try_from(n).unwrap_or(0);
            }
        }
        Ok(moved)
    }

    /// Returns the jobs stranded in the active lists of consumers that hold no
    /// lease at all; returns how many.
    ///
    /// A consumer that left (or was reaped) while a BLMOVE of its was still
    /// blocked in Redis can find a job in its active list after its jobs were
    /// handed back; the reaper only knows consumers in the lease set, and the
    /// job's dedupe entry refuses every re-enqueue, so without this sweep the
    /// job never runs. The SWEEP script re-checks, atomically, that the
    /// consumer holds no lease, so it never takes a live consumer's jobs (a
    /// consumer takes its lease before its first fetch); an expired lease is
    /// left to [`Queue::reap_expired`], which counts an attempt.
    ///
    /// Bounded: one call reads at most 10 SCAN pages from `cursor` (all keys
    /// of a queue share its hash tag, so on a cluster this scans the one node
    /// that holds them) and moves at most 1,000 ids per list; the cursor lets
    /// the next call carry on where this one stopped.
    pub async fn sweep_orphans(&self, cursor: &mut SweepCursor) -> Result<u64, QueueError> {
        let prefix = &self.keys.active_prefix;
        let pattern = format!("{}*", glob_escape(prefix));
        // The slot of the queue's hash tag, so a cluster client asks its node.
        let slot = fred::util::redis_keyslot(prefix.as_bytes());
        let mut moved = 0;
        for _ in 0..SWEEP_PAGES {
            let (next, keys): (String, Vec<String>) = self
                .client
                .custom(
                    CustomCommand::new_static("SCAN", slot, false),
                    vec![
                        cursor.0.clone(),
                        "MATCH".to_owned(),
                        pattern.clone(),
                        "COUNT".to_owned(),
                        SWEEP_PAGE_SIZE.to_string(),
                    ],
                )
                .await?;
            // At most SWEEP_PAGE_SIZE keys, give or take what SCAN adds.
            for key in keys {
                let Some(consumer) = key.strip_prefix(prefix.as_str()) else {
                    continue;
                };
                let n: i64 = self
                    .scripts
                    .sweep
                    .evalsha_with_reload(
                        &self.client,
                        vec![
                            self.keys.consumers.clone(),
                            key.clone(),
                            self.keys.wait.clone(),
                            self.keys.jobs.clone(),
                        ],
                        vec![consumer.to_owned(), SWEEP_LIST_LIMIT.to_string()],
                    )
                    .await?;
                if n > 0 {
                    tracing::warn!(queue = %self.name, %consumer, jobs = n, "returned the jobs of a consumer that holds no lease");
                    metrics::counter!("queue_orphans_recovered_total", "queue" => self.name.clone())
                        .increment(u64::try_from(n).unwrap_or(0));
                    moved += u64::try_from(n).unwrap_or(0);
                }
            }
            cursor.0 = next;
            if cursor.at_start() {
                // A whole pass is done; the next call starts another.
                break;
            }
        }
        Ok(moved)
    }

    pub async fn stats(&self) -> Result<QueueStats, QueueError> {
        let waiting: u64 = self.client.llen(&self.keys.wait).await?;
        let delayed: u64 = self.client.zcard(&self.keys.delayed).await?;
        let dead: u64 = self.client.hlen(&self.keys.dead).await?;
        let jobs: u64 = self.client.hlen(&self.keys.jobs).await?;
        let consumers: u64 = self.client.zcard(&self.keys.consumers).await?;
        let counters: std::collections::HashMap<String, u64> =
            self.client.hgetall(&self.keys.stats).await?;
        Ok(QueueStats {
            queue: self.name.clone(),
            waiting,
            delayed,
            // Every known job is waiting, delayed or in flight.
            in_flight: jobs.saturating_sub(waiting + delayed),
            dead,
            consumers,
            processed: counters.get("processed").copied().unwrap_or(0),
            failed: counters.get("failed").copied().unwrap_or(0),
        })
    }

    /// Jobs waiting for a consumer.
    pub async fn depth(&self) -> Result<u64, QueueError> {
        Ok(self.client.llen(&self.keys.wait).await?)
    }

    /// A live job's stored form, if the queue knows it.
    pub async fn job(&self, id: &str) -> Result<Option<Job>, QueueError> {
        let raw: Option<String> = self.client.hget(&self.keys.jobs, id).await?;
        raw.map(|raw| serde_json::from_str(&raw))
            .transpose()
            .map_err(Into::into)
    }

    /// Dead jobs, newest first: at most `limit` of them.
    pub async fn dead(&self, limit: i64) -> Result<Vec<Job>, QueueError> {
        // LRANGE 0 -1 would read the whole list.
        if limit <= 0 {
            return Ok(Vec::new());
        }
        let ids: Vec<String> = self
            .client
            .lrange(&self.keys.dead_order, 0, limit - 1)
            .await?;
        let mut jobs = Vec::with_capacity(ids.len());
        // Bounded: at most `limit` ids.
        for id in ids {
            let raw: Option<String> = self.client.hget(&self.keys.dead, &id).await?;
            if let Some(raw) = raw {
                jobs.push(serde_json::from_str(&raw)?);
            }
        }
        Ok(jobs)
    }

    /// Requeues one dead job; `false` if there was none with this id.
    pub async fn retry_dead(&self, id: &str) -> Result<bool, QueueError> {
        let n: i64 = self
            .scripts
            .retry_dead
            .evalsha_with_reload(
                &self.client,
                vec![
                    self.keys.jobs.clone(),
                    self.keys.wait.clone(),
                    self.keys.dead.clone(),
                    self.keys.dead_order.clone(),
                ],
                vec![id.to_owned()],
            )
            .await?;
        Ok(n == 1)
    }

    /// Requeues every dead job once; returns how many.
    ///
    /// It works from one snapshot of the newest [`RETRY_ALL_LIMIT`] dead ids:
    /// re-reading the dead list until it is empty never ends while jobs die
    /// again as fast as they are retried. A job that dies again meanwhile
    /// stays dead; older ones beyond the limit wait for the next call.
    pub async fn retry_all_dead(&self) -> Result<u64, QueueError> {
        let ids: Vec<String> = self
            .client
            .lrange(&self.keys.dead_order, 0, RETRY_ALL_LIMIT - 1)
            .await?;
        let mut total = 0;
        // Bounded by the snapshot: at most RETRY_ALL_LIMIT ids.
        for id in ids {
            if self.retry_dead(&id).await? {
                total += 1;
            }
        }
        Ok(total)
    }
}

/// `text` as a literal in a Redis glob pattern.
fn glob_escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    escaped
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
