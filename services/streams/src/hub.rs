//! Each instance's fan-out: one Redis subscription, many local streams.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use betting_shutdown::Shutdown;
use chrono::{DateTime, Utc};
use fred::prelude::{ClientLike, Config, EventInterface, PubsubInterface, ReconnectPolicy};
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::{ChangeFeed, Changes};

/// What a stream is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Note {
    /// This bet (of the stream's user) changed, to this version if known.
    Bet { bet_id: Uuid, version: Option<i64> },
    /// The stream's round changed.
    Round,
    /// Notes may have been lost: send a fresh snapshot.
    Resync,
}

/// Notes waiting per stream; past this the stream is marked lagged and will
/// resynchronise instead of buffering without bound.
const NOTE_BUFFER: usize = 256;
/// How far back a sweep looks, beyond the previous sweep: longer than any
/// bet-changing transaction takes to commit.
const SWEEP_MARGIN: Duration = Duration::from_secs(3);

struct Entry {
    id: u64,
    tx: mpsc::Sender<Note>,
    lagged: Arc<AtomicBool>,
    /// A client's stream (or a feed serving streams), as opposed to a cache
    /// that only wants to know when something changed: only streams count
    /// in [`Hub::stream_count`] and the `stream_subscriptions_open` gauge
    /// (streams of one user share a feed: `streams_open` counts the
    /// client's streams themselves, [`crate::EventStream`]).
    stream: bool,
}

#[derive(Default)]
struct Registry {
    next_id: u64,
    users: HashMap<i64, Vec<Entry>>,
    rounds: HashMap<String, Vec<Entry>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    User(i64),
    Round(String),
}

struct Inner {
    registry: Mutex<Registry>,
    feed: Arc<dyn ChangeFeed>,
    /// The Redis client configuration (TLS included) the subscriber connects with.
    redis: Config,
    channel: String,
}

/// The instance's hub. Cheap to clone.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<Inner>,
}

/// A stream's registration; dropping it unregisters.
pub struct Subscription {
    rx: mpsc::Receiver<Note>,
    lagged: Arc<AtomicBool>,
    _guard: Guard,
}

impl Subscription {
    pub async fn recv(&mut self) -> Option<Note> {
        self.rx.recv().await
    }

    pub fn try_recv(&mut self) -> Option<Note> {
        self.rx.try_recv().ok()
    }

    /// Whether notes were dropped since the last call (the stream fell behind).
    pub fn take_lagged(&self) -> bool {
        self.lagged.swap(false, Ordering::AcqRel)
    }
}

struct Guard {
    hub: Weak<Inner>,
    key: Key,
    id: u64,
    stream: bool,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if self.stream {
            metrics::gauge!("stream_subscriptions_open").decrement(1.0);
        }
        let Some(inner) = self.hub.upgrade() else {
            return;
        };
        let Ok(mut registry) = inner.registry.lock() else {
            return;
        };
        match &self.key {
            Key::User(user) => remove(&mut registry.users, user, self.id),
            Key::Round(round) => remove(&mut registry.rounds, round, self.id),
        }
    }
}

fn remove<K: std::hash::Hash + Eq + Clone>(map: &mut HashMap<K, Vec<Entry>>, key: &K, id: u64) {
    if let Some(entries) = map.get_mut(key) {
        entries.retain(|e| e.id != id);
        if entries.is_empty() {
            map.remove(key);
        }
    }
}

impl Hub {
    /// A hub that subscribes to the deployment's channel on the Redis of
    /// `redis` and sweeps `feed` under it.
    pub fn new(feed: Arc<dyn ChangeFeed>, redis: Config, namespace: &str) -> Self {
        Self {
            inner: Arc::new(Inner {
                registry: Mutex::new(Registry::default()),
                feed,
                redis,
                channel: crate::channel(namespace),
            }),
        }
    }

    pub fn watch_user(&self, user: i64) -> Subscription {
        self.register(Key::User(user), true)
    }

    pub fn watch_round(&self, round: &str) -> Subscription {
        self.register(Key::Round(round.to_owned()), true)
    }

    /// Notes of a round for a cache rather than a stream: the same notes,
    /// not counted as a stream.
    pub fn watch_round_changes(&self, round: &str) -> Subscription {
        self.register(Key::Round(round.to_owned()), false)
    }

    fn register(&self, key: Key, stream: bool) -> Subscription {
        let (tx, rx) = mpsc::channel(NOTE_BUFFER);
        let lagged = Arc::new(AtomicBool::new(false));
        let id = {
            let mut registry = match self.inner.registry.lock() {
                Ok(r) => r,
                Err(poisoned) => poisoned.into_inner(),
            };
            registry.next_id += 1;
            let id = registry.next_id;
            let entry = Entry {
                id,
                tx,
                lagged: lagged.clone(),
                stream,
            };
            match &key {
                Key::User(user) => registry.users.entry(*user).or_default().push(entry),
                Key::Round(round) => registry
                    .rounds
                    .entry(round.clone())
                    .or_default()
                    .push(entry),
            }
            id
        };
        if stream {
            metrics::gauge!("stream_subscriptions_open").increment(1.0);
        }
        Subscription {
            rx,
            lagged,
            _guard: Guard {
                hub: Arc::downgrade(&self.inner),
                key,
                id,
                stream,
            },
        }
    }

    /// Streams registered here right now (a user's WatchBets streams share
    /// one registration; caches' registrations do not count).
    pub fn stream_count(&self) -> usize {
        self.inner.registry.lock().map_or(0, |r| {
            r.users
                .values()
                .chain(r.rounds.values())
                .flatten()
                .filter(|e| e.stream)
                .count()
        })
    }

    /// Everything registered here, streams and caches: whether the sweep
    /// has anyone to serve.
    fn registrations(&self) -> usize {
        self.inner.registry.lock().map_or(0, |r| {
            r.users.values().map(Vec::len).sum::<usize>()
                + r.rounds.values().map(Vec::len).sum::<usize>()
        })
    }

    /// Hands notes to the local streams (and caches) they concern.
    pub fn route(&self, changes: &Changes) {
        self.deliver(changes, true);
    }

    /// Hands notes to the local caches only: this process's own changes, at
    /// once. Streams keep hearing of them through the channel and the sweep
    /// alone, as from any other process, so their order and timing do not
    /// depend on where a change was made.
    pub fn route_to_caches(&self, changes: &Changes) {
        self.deliver(changes, false);
    }

    fn deliver(&self, changes: &Changes, streams: bool) {
        let Ok(registry) = self.inner.registry.lock() else {
            return;
        };
        let deliver = |entries: &Vec<Entry>, note: Note| {
            for entry in entries.iter().filter(|e| streams || !e.stream) {
                if let Err(mpsc::error::TrySendError::Full(_)) = entry.tx.try_send(note.clone()) {
                    entry.lagged.store(true, Ordering::Release);
                }
            }
        };
        for bet in &changes.bets {
            if let Some(entries) = registry.users.get(&bet.user_id) {
                deliver(
                    entries,
                    Note::Bet {
                        bet_id: bet.bet_id,
                        version: bet.version,
                    },
                );
            }
            if let Some(entries) = registry.rounds.get(&bet.round_id) {
                deliver(entries, Note::Round);
            }
        }
        for round in &changes.rounds {
            if let Some(entries) = registry.rounds.get(round) {
                deliver(entries, Note::Round);
            }
        }
    }

    /// Tells every local stream to send a fresh snapshot.
    pub fn resync_all(&self) {
        let Ok(registry) = self.inner.registry.lock() else {
            return;
        };
        for entry in registry
            .users
            .values()
            .chain(registry.rounds.values())
            .flatten()
        {
            if entry.tx.try_send(Note::Resync).is_err() {
                entry.lagged.store(true, Ordering::Release);
            }
        }
    }

    /// Runs the subscription and the sweep until `stop` is signalled.
    pub async fn run(self, stop: Shutdown) {
        tokio::join!(self.clone().subscribe(stop.clone()), self.sweep(stop));
    }

    async fn subscribe(self, stop: Shutdown) {
        let mut config = self.inner.redis.clone();
        // Keep trying the first connection too, like every other client.
        config.fail_fast = false;
        let client = match fred::prelude::Builder::from_config(config)
            .set_policy(ReconnectPolicy::new_exponential(0, 100, 2_000, 2))
            .build_subscriber_client()
        {
            Ok(client) => client,
            Err(error) => {
                tracing::error!(%error, "cannot build the change subscriber; streams rely on sweeps");
                return;
            }
        };
        let mut messages = client.message_rx();
        drop(client.connect());
        // Re-subscribes after every reconnect.
        let _resubscriber = client.manage_subscriptions();
        loop {
            if client.subscribe(self.inner.channel.clone()).await.is_ok() {
                break;
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                () = stop.signalled() => return,
            }
        }
        tracing::info!(channel = %self.inner.channel, "subscribed to change notes");
        // From now on every connection event is a *re*connection.
        let mut reconnects = client.reconnect_rx();
        loop {
            tokio::select! {
                message = messages.recv() => match message {
                    Ok(message) => {
                        let text: Option<String> = message.value.convert().ok();
                        match text.as_deref().map(serde_json::from_str::<Changes>) {
                            Some(Ok(changes)) => self.route(&changes),
                            _ => tracing::debug!("ignored a malformed change note"),
                        }
                    }
                    // We fell behind the channel: anything may be missing.
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => self.resync_all(),
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                },
                reconnect = reconnects.recv() => {
                    if reconnect.is_ok() {
                        // Notes published while we were away are lost: resynchronise.
                        tracing::info!("change subscriber reconnected; resynchronising streams");
                        self.resync_all();
                    }
                }
                () = stop.signalled() => {
                    let _ = client.quit().await;
                    return;
                }
            }
        }
    }

    /// Every second, routes whatever changed in PostgreSQL lately: the safety
    /// net under pub/sub.
    async fn sweep(self, stop: Shutdown) {
        let mut ticker = tokio::time::interval(Duration::from_secs(1));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut since: Option<DateTime<Utc>> = None;
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                () = stop.signalled() => return,
            }
            if self.registrations() == 0 {
                since = None;
                continue;
            }
            let started = Utc::now();
            let from = since.unwrap_or(started) - SWEEP_MARGIN;
            match self.inner.feed.changed_since(from).await {
                Ok(swept) if swept.complete => {
                    self.route(&swept.changes);
                    since = Some(started);
                }
                Ok(swept) => {
                    // A change past the feed's bound may be one whose note
                    // was lost: every stream reads its state again, which
                    // covers what the sweep did read too. One transaction
                    // that changed that many bets stays in the window for
                    // the margin, so this repeats for a few sweeps.
                    tracing::warn!(
                        bets = swept.changes.bets.len(),
                        "more changed than a sweep reads; resynchronising streams"
                    );
                    self.resync_all();
                    since = Some(started);
                }
                Err(error) => tracing::debug!(%error, "sweep failed"),
            }
        }
    }
}
