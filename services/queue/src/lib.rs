//! A job queue over Redis lists.
//!
//! Producers [`Queue::enqueue`] a job under an id; while a job with that id is
//! known to the queue, enqueueing it again is a no-op, so a sweeper may re-derive
//! work from PostgreSQL as often as it likes. Every key of one queue shares a
//! hash tag (`{match}`), so a queue lives in one Redis Cluster slot and its Lua
//! scripts stay atomic there.
//!
//! Redis is never the source of truth: anything here may vanish on a restart,
//! and the producers' sweepers put it back from table state.

#![forbid(unsafe_code)]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fred::{
    prelude::{Builder, Client, ClientLike, Config, ReconnectPolicy},
    types::scripts::Script,
};

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("redis unavailable")]
    Redis(#[from] fred::error::Error),
    #[error("job payload could not be encoded")]
    Encode(#[from] serde_json::Error),
}

/// Builds a Redis client that keeps reconnecting forever and fails commands
/// after a bounded wait instead of hanging while Redis is down. The connection
/// is started in the background: the process starts even while Redis is away.
pub fn connect(url: &str) -> Result<Client, QueueError> {
    let config = Config::from_url(url)?;
    let client = Builder::from_config(config)
        .with_connection_config(|c| {
            c.connection_timeout = Duration::from_secs(2);
            c.internal_command_timeout = Duration::from_secs(2);
            c.max_command_attempts = 2;
        })
        .with_performance_config(|p| {
            p.default_command_timeout = Duration::from_secs(2);
        })
        // Unlimited attempts, 100 ms doubling to 2 s.
        .set_policy(ReconnectPolicy::new_exponential(0, 100, 2_000, 2))
        .build()?;
    // The returned task handle runs until the client quits; nothing awaits it.
    drop(client.connect());
    Ok(client)
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
    pub attempts: u32,
}

/// Keys of one queue.
#[derive(Debug, Clone)]
struct Keys {
    /// Hash: job id -> job JSON, for every job queued or in flight.
    jobs: String,
    /// List of job ids waiting for a consumer.
    wait: String,
}

/// Adds a job unless one with its id is already queued or in flight.
const ENQUEUE: &str = r#"
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 1 then
  redis.call('LPUSH', KEYS[2], ARGV[1])
  return 1
end
return 0
"#;

/// One named queue.
#[derive(Clone)]
pub struct Queue {
    client: Client,
    name: String,
    keys: Keys,
    enqueue: Script,
}

impl Queue {
    /// `namespace` separates deployments (and tests) sharing one Redis.
    pub fn new(client: Client, namespace: &str, name: &str) -> Self {
        let prefix = format!("{namespace}:{{{name}}}");
        Self {
            client,
            name: name.to_owned(),
            keys: Keys {
                jobs: format!("{prefix}:jobs"),
                wait: format!("{prefix}:wait"),
            },
            enqueue: Script::from_lua(ENQUEUE),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Enqueues a job; `false` when a job with this id was already there.
    pub async fn enqueue(&self, id: &str, payload: serde_json::Value) -> Result<bool, QueueError> {
        let job = Job {
            id: id.to_owned(),
            payload,
            enqueued_at_ms: now_ms(),
            attempts: 0,
        };
        let encoded = serde_json::to_string(&job)?;
        let added: i64 = self
            .enqueue
            .evalsha_with_reload(
                &self.client,
                vec![self.keys.jobs.clone(), self.keys.wait.clone()],
                vec![id.to_owned(), encoded],
            )
            .await?;
        Ok(added == 1)
    }

    /// Jobs waiting for a consumer.
    pub async fn depth(&self) -> Result<u64, QueueError> {
        use fred::interfaces::ListInterface;
        Ok(self.client.llen(&self.keys.wait).await?)
    }

    /// A job's stored form, if the queue knows it.
    pub async fn job(&self, id: &str) -> Result<Option<Job>, QueueError> {
        use fred::interfaces::HashesInterface;
        let raw: Option<String> = self.client.hget(&self.keys.jobs, id).await?;
        Ok(match raw {
            Some(raw) => Some(serde_json::from_str(&raw)?),
            None => None,
        })
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
