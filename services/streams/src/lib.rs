//! Change notes for live streams.
//!
//! Whatever changes a bet or a round — PlaceBet, CancelBet, the matcher, the
//! settler, round transitions, the reconciler — [`Publisher::publish`]es a
//! small note after its transaction commits, on one Redis pub/sub channel.
//! Every betting instance runs a [`Hub`]: it subscribes to that channel and
//! routes each note to the streams of its own clients that care (by user, by
//! round). Streams then read the current state from PostgreSQL, so a note
//! carries no data a client could see.
//!
//! Pub/sub is fire-and-forget, so the hub does not rely on it alone: every
//! second it sweeps a [`ChangeFeed`] (what the services' stores say changed
//! lately; this crate knows no tables), re-subscribes after a Redis restart
//! and then tells every stream to resynchronise. A lost note delays an event;
//! it never loses a final state.

#![forbid(unsafe_code)]

mod hub;
mod stream;

use std::{
    sync::{Arc, OnceLock},
    time::Duration,
};

use chrono::{DateTime, Utc};
use fred::prelude::{Client, PubsubInterface};
use futures::future::BoxFuture;
use uuid::Uuid;

pub use hub::{Hub, Note, Subscription};
pub use stream::{EventSink, EventStream, SinkClosed, StreamEnd, cursor, event_stream};

/// A change of one bet.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BetNote {
    #[serde(rename = "u")]
    pub user_id: i64,
    #[serde(rename = "b")]
    pub bet_id: Uuid,
    #[serde(rename = "r")]
    pub round_id: String,
    /// The bet's version after the change, when the publisher knows it; lets
    /// streams skip what they already sent without reading PostgreSQL.
    #[serde(rename = "v", default, skip_serializing_if = "Option::is_none")]
    pub version: Option<i64>,
}

impl BetNote {
    /// A bet that changed to `version`.
    pub fn changed(user_id: i64, bet_id: Uuid, round_id: String, version: i64) -> Self {
        Self {
            user_id,
            bet_id,
            round_id,
            version: Some(version),
        }
    }
}

/// Where a hub's sweep reads what changed lately: implemented over the
/// services' stores by whoever builds the hub.
pub trait ChangeFeed: Send + Sync + 'static {
    /// Bets and rounds changed at or after `from`: a sweep only needs what a
    /// lost note would have said. Bounded: past its bound the answer says it
    /// is not complete, and the hub resynchronises every stream instead.
    fn changed_since(
        &self,
        from: DateTime<Utc>,
    ) -> BoxFuture<'_, Result<Swept, Box<dyn std::error::Error + Send + Sync>>>;
}

/// What a [`ChangeFeed`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Swept {
    pub changes: Changes,
    /// Every change since `from` is in `changes`; `false`: more changed
    /// than the feed reads in one sweep.
    pub complete: bool,
}

/// One message on the channel: what changed in one transaction.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Changes {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bets: Vec<BetNote>,
    /// Rounds whose status changed (bet changes imply their round's, too).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rounds: Vec<String>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.bets.is_empty() && self.rounds.is_empty()
    }
}

/// How streams behave.
#[derive(Debug, Clone)]
pub struct StreamSettings {
    /// Time between heartbeat events on an idle stream.
    pub heartbeat: Duration,
    /// How long a stream waits for a client to make room before cutting it off.
    pub send_timeout: Duration,
    /// Events buffered per stream beyond what HTTP/2 flow control holds.
    pub buffer: usize,
}

impl Default for StreamSettings {
    fn default() -> Self {
        Self {
            heartbeat: Duration::from_secs(15),
            send_timeout: Duration::from_secs(10),
            buffer: 32,
        }
    }
}

/// What a service needs to serve streams.
#[derive(Clone)]
pub struct StreamContext {
    pub hub: Hub,
    pub settings: StreamSettings,
    /// Signalled on shutdown: streams end with UNAVAILABLE so clients reconnect elsewhere.
    pub stop: betting_shutdown::Shutdown,
}

/// When a token runs out, as an instant (far away for tokens without expiry).
pub fn token_deadline(expires_at: Option<u64>) -> tokio::time::Instant {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let left = match expires_at {
        Some(exp) => Duration::from_secs(exp.saturating_sub(now)),
        None => Duration::from_secs(365 * 24 * 3600),
    };
    tokio::time::Instant::now() + left
}

/// The channel of a deployment.
pub fn channel(namespace: &str) -> String {
    format!("{namespace}:changes")
}

/// Publishes change notes after commit. Best effort by design: the hubs'
/// sweeps deliver whatever a lost note would have.
///
/// When this process runs a hub, the notes are also routed to its caches at
/// once, before the call returns: this instance's GetRound totals see a
/// change before its request answers, so a client reads its own writes here
/// whatever Redis does. (Streams hear of it through the channel, as from any
/// other process; the note coming back only makes a cache recompute once
/// more.)
#[derive(Clone)]
pub struct Publisher {
    client: Client,
    channel: String,
    local: Arc<OnceLock<Hub>>,
}

impl Publisher {
    pub fn new(client: Client, namespace: &str) -> Self {
        Self {
            client,
            channel: channel(namespace),
            local: Arc::default(),
        }
    }

    /// Routes every later note (of this publisher and its clones) to `hub`'s
    /// caches too, synchronously. Set once; later calls are ignored.
    pub fn route_locally(&self, hub: Hub) {
        let _ = self.local.set(hub);
    }

    fn route_local(&self, changes: &Changes) {
        if let Some(hub) = self.local.get() {
            hub.route_to_caches(changes);
        }
    }

    /// Publishes in the background: callers never wait on Redis (the local
    /// hub hears of it before this returns).
    pub fn spawn_publish(&self, changes: Changes) {
        if changes.is_empty() {
            return;
        }
        self.route_local(&changes);
        let publisher = self.clone();
        tokio::spawn(async move { publisher.publish_remote(changes).await });
    }

    pub async fn publish(&self, changes: Changes) {
        if changes.is_empty() {
            return;
        }
        self.route_local(&changes);
        self.publish_remote(changes).await;
    }

    async fn publish_remote(&self, changes: Changes) {
        let Ok(message) = serde_json::to_string(&changes) else {
            return;
        };
        let sent = tokio::time::timeout(
            Duration::from_secs(1),
            self.client.publish::<i64, _, _>(&self.channel, message),
        )
        .await;
        match sent {
            Ok(Ok(_)) => metrics::counter!("change_notes_published_total").increment(1),
            Ok(Err(error)) => tracing::debug!(%error, "change note not published; hubs will sweep"),
            Err(_) => tracing::debug!("change note timed out; hubs will sweep"),
        }
    }

    pub async fn bets(&self, bets: Vec<BetNote>) {
        self.publish(Changes {
            bets,
            rounds: Vec::new(),
        })
        .await;
    }

    pub async fn round(&self, round_id: &str) {
        self.publish(Changes {
            bets: Vec::new(),
            rounds: vec![round_id.to_owned()],
        })
        .await;
    }
}
