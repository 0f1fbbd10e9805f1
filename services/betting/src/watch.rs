//! WatchBets: a player's bets, live.
//!
//! The streams of one user share one feed ([`UserFeeds`]): one hub
//! registration and one task that, per batch of change notes, reads the
//! changed bets once (only that user's bets are ever read) and broadcasts
//! the rows to every stream of the user. So 500 streams of one player cost
//! one read per change, not 500. Each stream joins its user's feed *before*
//! reading its snapshot, so no change falls between the two, and sends a
//! row only if its version is newer than what this stream sent. The feed
//! leaves the registry (and the hub) within a second of its last stream.
//!
//! Bounded everywhere: notes beyond the hub's buffer make the feed tell its
//! streams to resynchronise, a stream that falls more than the broadcast's
//! buffer behind resynchronises on its own, and a client that does not read
//! for the send timeout is cut off with RESOURCE_EXHAUSTED.
//!
//! The stream carries [`BetEvent`]s; the server's gRPC adapter turns them
//! into messages.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use betting_auth::Principal;
use betting_domain::{BetId, BetStatus, UserId};
use betting_streams::{
    EventSink, EventStream, Note, SinkClosed, StreamContext, StreamEnd, Subscription, cursor,
    event_stream,
};
use chrono::{DateTime, Utc};
use tokio::sync::{Semaphore, broadcast};

use uuid::Uuid;

use crate::{BetRow, BetStore, BettingError, BettingService};

/// What a WatchBets event says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BetEventKind {
    /// A bet as it is now, part of a snapshot.
    Snapshot,
    /// The snapshot is complete; live changes follow.
    SnapshotEnd,
    /// A bet changed.
    Change,
    /// Nothing happened; the stream is alive.
    Heartbeat,
    /// Changes may have been missed: a fresh snapshot follows.
    Resync,
}

/// One event of a WatchBets stream, stamped when it was made.
#[derive(Debug, Clone)]
pub struct BetEvent {
    pub kind: BetEventKind,
    /// The bet, for a snapshot's or a change's event; boxed, so the events a
    /// stream's channel holds (its slots are allocated 32 at a time) cost a
    /// pointer each rather than a whole row.
    pub bet: Option<Box<BetRow>>,
    /// The resume cursor (empty before anything was sent).
    pub cursor: String,
    pub sent_at: DateTime<Utc>,
}

/// What a stream sent of one bet.
#[derive(Debug, Clone, Copy)]
struct Sent {
    version: i64,
    in_play: bool,
}

/// At most this many bets named in one request.
const MAX_NAMED: usize = 100;
/// A resume re-reads this much before the cursor: longer than any bet
/// transaction takes between its `now()` (the row's `updated_at`) and its
/// commit. For the same reason a stream sends a bet it never sent as a
/// change only if it changed after its snapshot's time minus this.
const RESUME_MARGIN: chrono::TimeDelta = chrono::TimeDelta::seconds(5);
/// Whether `at` can be a cursor this service issued: a bet's `updated_at`
/// comes after the epoch (PostgreSQL holds nothing before 4713 BC), and the
/// resume margin can be taken from it (`DateTime - TimeDelta` panics on
/// overflow).
fn issuable(at: DateTime<Utc>) -> bool {
    at >= DateTime::<Utc>::UNIX_EPOCH && at.checked_sub_signed(RESUME_MARGIN).is_some()
}

/// A resume replays at most this many changed bets; further behind, the
/// stream resynchronises instead (RESYNC and a fresh snapshot).
const REPLAY_LIMIT: usize = 2000;

/// Change batches a user's feed holds for a stream that has not taken them
/// yet; a stream further behind resynchronises. The channel's slots are
/// allocated up front, 40 bytes each, per user with a stream here: 16 (it
/// was 256, then 64) costs 640 bytes a user, and a stream 16 batches behind
/// its own user's changes — each batch every change note that arrived
/// while the feed read the last one — is better served by a snapshot.
const FEED_BUFFER: usize = 16;
/// Bet versions a feed remembers having read, to skip notes it already
/// served (a note can come twice: pub/sub and the sweep).
const FEED_VERSIONS: usize = 4096;

/// Reads of PostgreSQL for streams (snapshots and feeds' changed bets) in
/// flight at once, per instance. A read waiting for a connection already
/// holds sqlx's buffers (some 15 KiB): without this, 10,000 streams opening
/// together (a reconnect storm after a restart) held 10,000 of them at once,
/// and the allocator kept that peak for the process's life (it was half of
/// the memory per open stream). It also keeps a storm from taking every
/// connection PlaceBet needs.
const STREAM_READS: usize = 8;

/// What a user's feed tells the user's streams.
#[derive(Debug, Clone)]
enum FeedEvent {
    /// Bets of the user as they are now, read once for every stream.
    Rows(Arc<Vec<BetRow>>),
    /// Changes may have been missed: every stream sends a fresh snapshot.
    Resync,
}

/// This instance's per-user feeds: one per user with a live WatchBets
/// stream here. Cheap to clone.
#[derive(Clone)]
pub(crate) struct UserFeeds {
    context: StreamContext,
    feeds: Arc<Mutex<HashMap<i64, broadcast::Sender<FeedEvent>>>>,
    /// Reads of changed bets, over every feed: what the sharing saves.
    reads: Arc<AtomicU64>,
    /// [`STREAM_READS`] permits, taken around every stream's read.
    read_slots: Arc<Semaphore>,
}

impl UserFeeds {
    pub(crate) fn new(context: StreamContext) -> Self {
        Self {
            context,
            feeds: Arc::default(),
            reads: Arc::default(),
            read_slots: Arc::new(Semaphore::new(STREAM_READS)),
        }
    }

    /// Runs `read` (not started until then) in one of the instance's
    /// [`STREAM_READS`] read slots.
    async fn read<T>(&self, read: impl Future<Output = T>) -> T {
        let _slot = self
            .read_slots
            .acquire()
            .await
            .expect("the stream read semaphore is never closed");
        read.await
    }

    pub(crate) fn context(&self) -> &StreamContext {
        &self.context
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<i64, broadcast::Sender<FeedEvent>>> {
        self.feeds
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Joins the user's feed, starting it if no stream of the user is here.
    fn join(&self, store: &BetStore, user: UserId) -> broadcast::Receiver<FeedEvent> {
        let mut feeds = self.lock();
        if let Some(tx) = feeds.get(&user.get()) {
            return tx.subscribe();
        }
        let (tx, rx) = broadcast::channel(FEED_BUFFER);
        feeds.insert(user.get(), tx.clone());
        // Registered before the caller reads its snapshot.
        let sub = self.context.hub.watch_user(user.get());
        let feed = Feed {
            feeds: self.clone(),
            store: store.clone(),
            user,
            sub,
            tx,
            versions: HashMap::new(),
        };
        tokio::spawn(feed.run());
        rx
    }

    /// Users with a feed here right now.
    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }

    /// Changed-bet reads made so far.
    pub(crate) fn reads(&self) -> u64 {
        self.reads.load(Ordering::Relaxed)
    }
}

/// One user's feed: the only reader of that user's changes on this instance.
struct Feed {
    feeds: UserFeeds,
    store: BetStore,
    user: UserId,
    sub: Subscription,
    tx: broadcast::Sender<FeedEvent>,
    /// The latest version of each bet read and broadcast.
    versions: HashMap<Uuid, i64>,
}

impl Feed {
    async fn run(mut self) {
        let stop = self.feeds.context.stop.clone();
        let mut idle_check = tokio::time::interval(Duration::from_secs(1));
        idle_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if self.sub.take_lagged() {
                // Notes were dropped: nobody knows what changed.
                self.versions.clear();
                let _ = self.tx.send(FeedEvent::Resync);
            }
            tokio::select! {
                () = stop.signalled() => break,
                note = self.sub.recv() => {
                    let Some(note) = note else { break };
                    // Boxed, like the stream's reads (`Watch::run`).
                    Box::pin(self.on_notes(note)).await;
                }
                _ = idle_check.tick() => {
                    // Every stream gone: leave, under the lock so that no
                    // stream joins this feed meanwhile.
                    let mut feeds = self.feeds.lock();
                    if self.tx.receiver_count() == 0 {
                        feeds.remove(&self.user.get());
                        break;
                    }
                }
            }
        }
        // Dropping the hub registration and the sender ends the streams' feed.
        let mut feeds = self.feeds.lock();
        if feeds
            .get(&self.user.get())
            .is_some_and(|tx| tx.same_channel(&self.tx))
        {
            feeds.remove(&self.user.get());
        }
    }

    /// Handles a note and whatever else is already waiting, in one read.
    async fn on_notes(&mut self, first: Note) {
        let mut wanted: Vec<Uuid> = Vec::new();
        let mut resync = false;
        let mut note = Some(first);
        while let Some(n) = note {
            match n {
                Note::Resync => resync = true,
                Note::Round => {}
                Note::Bet { bet_id, version } => {
                    let known = version
                        .is_some_and(|v| self.versions.get(&bet_id).is_some_and(|s| *s >= v));
                    if !known && !wanted.contains(&bet_id) {
                        wanted.push(bet_id);
                    }
                }
            }
            if wanted.len() >= 256 {
                break;
            }
            note = self.sub.try_recv();
        }
        if resync {
            self.versions.clear();
            let _ = self.tx.send(FeedEvent::Resync);
            return;
        }
        if wanted.is_empty() {
            return;
        }
        self.feeds.reads.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("stream_change_reads_total").increment(1);
        let read = self.store.user_bets(self.user, &wanted);
        let mut rows = match self.feeds.read(read).await {
            Ok(rows) => rows,
            Err(error) => {
                // The sweep will bring these notes back.
                tracing::debug!(%error, "could not read changed bets");
                return;
            }
        };
        // Oldest change first: a stream's cursor is the latest `updated_at`
        // it sent, so a batch sent newest first (the notes of several
        // seconds, piled up while the last read waited for a slot) would
        // hand out a cursor past a change not yet sent, and a client cut off
        // between the two would resume past it.
        rows.sort_by_key(|row| row.updated_at);
        if self.versions.len() + rows.len() > FEED_VERSIONS {
            self.versions.clear();
        }
        for row in &rows {
            self.versions.insert(row.bet_id, row.version);
        }
        if !rows.is_empty() {
            let _ = self.tx.send(FeedEvent::Rows(Arc::new(rows)));
        }
    }
}

struct Watch {
    store: BetStore,
    /// This instance's feeds: their read slots.
    feeds: UserFeeds,
    user: UserId,
    named: Vec<Uuid>,
    feed: broadcast::Receiver<FeedEvent>,
    sink: EventSink<BetEvent>,
    /// The version of each bet this stream has sent, and whether it was in
    /// play (PENDING or MATCHED) as sent: what the client holds.
    sent: HashMap<Uuid, Sent>,
    /// The latest change time sent: the cursor.
    high_water: DateTime<Utc>,
    /// Bets this stream has not sent that changed before this predate its
    /// snapshot (or its cursor): their changes are not news to the client
    /// (`offer`).
    floor: DateTime<Utc>,
}

impl BettingService {
    /// WatchBets: the caller's bets (all, or the ones named), from a
    /// snapshot (or the cursor) on, until the token expires.
    pub async fn watch_bets(
        &self,
        principal: &Principal,
        bet_ids: &[String],
        cursor: &str,
    ) -> Result<EventStream<BetEvent>, BettingError> {
        let user = principal.own_player()?;
        let mut named = Vec::new();
        if bet_ids.len() > MAX_NAMED {
            return Err(betting_domain::InvalidRequest::field(
                "bet_ids",
                "must name at most 100 bets",
            )
            .into());
        }
        for id in bet_ids {
            let bet = BetId::parse(id)
                .map_err(|e| betting_domain::InvalidRequest::field("bet_ids", e.to_string()))?;
            named.push(bet.as_uuid());
        }
        let resume_from = if cursor.is_empty() {
            None
        } else {
            Some(
                cursor::decode(cursor)
                    .filter(|at| issuable(*at))
                    .ok_or_else(|| {
                        betting_domain::InvalidRequest::field(
                            "cursor",
                            "is not a cursor this service issued",
                        )
                    })?,
            )
        };
        let feeds = self
            .user_feeds()
            .ok_or_else(|| BettingError::Internal(anyhow::anyhow!("streams are not set up")))?;
        let settings = &feeds.context().settings;
        let (sink, stream) = event_stream(settings.buffer, settings.send_timeout);
        // Join first: a change from now on reaches us even while the snapshot is read.
        let feed = feeds.join(self.store(), user);
        let watch = Watch {
            store: self.store().clone(),
            feeds: feeds.clone(),
            user,
            named,
            feed,
            sink,
            sent: HashMap::new(),
            high_water: resume_from.unwrap_or(DateTime::<Utc>::MIN_UTC),
            floor: DateTime::<Utc>::MIN_UTC,
        };
        let deadline = betting_streams::token_deadline(principal.expires_at);
        tokio::spawn(watch.run(resume_from, deadline));
        Ok(stream)
    }
}

impl Watch {
    /// The stream's task, for the stream's life. A task costs the size of
    /// its largest state, so the reads and sends it awaits now and then
    /// (sqlx's futures are kilobytes) are boxed: allocated only while they
    /// run, not held by every idle stream (`stream_tasks_stay_small`).
    async fn run(mut self, resume_from: Option<DateTime<Utc>>, deadline: tokio::time::Instant) {
        let stop = self.feeds.context().stop.clone();
        let heartbeat_every = self.feeds.context().settings.heartbeat;
        if stop.is_signalled() {
            self.sink.end(&StreamEnd::ShuttingDown);
            return;
        }
        let started = match resume_from {
            None => Box::pin(self.snapshot(false)).await,
            Some(cursor) => Box::pin(self.catch_up(cursor - RESUME_MARGIN)).await,
        };
        if started.is_err() {
            return;
        }
        let mut heartbeat = tokio::time::interval(heartbeat_every);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        heartbeat.reset();
        loop {
            tokio::select! {
                biased;
                () = stop.signalled() => {
                    self.sink.end(&StreamEnd::ShuttingDown);
                    return;
                }
                _ = tokio::time::sleep_until(deadline) => {
                    self.sink.end(&StreamEnd::TokenExpired);
                    return;
                }
                () = self.sink.closed() => return,
                event = self.feed.recv() => {
                    let handled = match event {
                        Ok(FeedEvent::Rows(rows)) => Box::pin(self.on_rows(&rows)).await,
                        // Resync, or we fell behind the feed: start over.
                        Ok(FeedEvent::Resync) | Err(broadcast::error::RecvError::Lagged(_)) => {
                            Box::pin(self.snapshot(true)).await
                        }
                        Err(broadcast::error::RecvError::Closed) => {
                            self.sink.end(&StreamEnd::FeedEnded);
                            return;
                        }
                    };
                    if handled.is_err() {
                        return;
                    }
                }
                _ = heartbeat.tick() => {
                    if self.sink.try_send(self.event(BetEventKind::Heartbeat, None)).is_err() {
                        return;
                    }
                }
            }
        }
    }

    fn event(&self, kind: BetEventKind, bet: Option<&BetRow>) -> BetEvent {
        BetEvent {
            kind,
            bet: bet.cloned().map(Box::new),
            cursor: if self.high_water == DateTime::<Utc>::MIN_UTC {
                String::new()
            } else {
                cursor::encode(self.high_water)
            },
            sent_at: Utc::now(),
        }
    }

    /// Sends a bet if it is newer than what this stream sent — and, for a
    /// change of a bet it never sent, if it changed after the floor: the
    /// hub's sweep re-announces the last seconds' changes, so a fresh stream
    /// would otherwise hear of bets that ended before it opened (a bet
    /// changed before the floor and still in play was in the snapshot).
    /// `live`: a change just heard of, whose delivery lag is measured (not
    /// a resume's replay of older ones).
    async fn offer(
        &mut self,
        kind: BetEventKind,
        row: &BetRow,
        live: bool,
    ) -> Result<(), SinkClosed> {
        match self.sent.get(&row.bet_id) {
            Some(sent) if sent.version >= row.version => return Ok(()),
            None if kind == BetEventKind::Change && row.updated_at < self.floor => {
                return Ok(());
            }
            _ => {}
        }
        let in_play = matches!(row.status, BetStatus::Pending | BetStatus::Matched);
        self.sent.insert(
            row.bet_id,
            Sent {
                version: row.version,
                in_play,
            },
        );
        if row.updated_at > self.high_water {
            self.high_water = row.updated_at;
        }
        let event = self.event(kind, Some(row));
        self.sink.send(event).await?;
        if live {
            // From the change's transaction (its `updated_at`) to its event
            // handed to the client's stream.
            let lag = (Utc::now() - row.updated_at).to_std().unwrap_or_default();
            metrics::histogram!("stream_lag_seconds").record(lag.as_secs_f64());
        }
        Ok(())
    }

    /// A fresh snapshot (after RESYNC if `resync`), then SNAPSHOT_END.
    async fn snapshot(&mut self, resync: bool) -> Result<(), SinkClosed> {
        // The bets the client holds in play: after a RESYNC the snapshot
        // lists them whatever their state, so one that ended while the
        // stream lagged (its change older than the new floor, and no longer
        // in play) still reaches the client, which would otherwise hold it
        // in play for ever.
        let mut held = Vec::new();
        if resync {
            held = self
                .sent
                .iter()
                .filter(|(_, sent)| sent.in_play)
                .map(|(id, _)| *id)
                .take(REPLAY_LIMIT)
                .collect();
            // Anything may have been missed: forget what was sent, send it all again.
            self.sent.clear();
            let event = self.event(BetEventKind::Resync, None);
            self.sink.send(event).await?;
        }
        let read = self.store.watch_snapshot(self.user, &self.named, &held);
        let (rows, read_at) = match self.feeds.read(read).await {
            Ok(read) => read,
            Err(error) => {
                // Logged by the mapping, with its cause.
                self.sink.end(&error);
                return Err(SinkClosed::Gone);
            }
        };
        self.floor = read_at - RESUME_MARGIN;
        for row in &rows {
            self.offer(BetEventKind::Snapshot, row, false).await?;
        }
        let end = self.event(BetEventKind::SnapshotEnd, None);
        self.sink.send(end).await
    }

    /// A resume: no snapshot, only what changed since `since` (the cursor
    /// less the margin) as changes, then SNAPSHOT_END — or, further behind
    /// than [`REPLAY_LIMIT`] changes, RESYNC and a fresh snapshot.
    async fn catch_up(&mut self, since: DateTime<Utc>) -> Result<(), SinkClosed> {
        let limit = i64::try_from(REPLAY_LIMIT + 1).unwrap_or(i64::MAX);
        let read = self
            .store
            .watch_changes_since(self.user, &self.named, since, limit);
        let (rows, read_at) = match self.feeds.read(read).await {
            Ok(read) => read,
            Err(error) => {
                self.sink.end(&error);
                return Err(SinkClosed::Gone);
            }
        };
        if since > read_at {
            // The cursor is ahead of the database's clock by more than the
            // margin (forged, or the clock stepped back): a floor there would
            // skip every change until the clock passes it, and its cursor
            // would replay nothing on the next resume. Start over, from the
            // database's time.
            self.high_water = DateTime::<Utc>::MIN_UTC;
            return self.snapshot(true).await;
        }
        if rows.len() > REPLAY_LIMIT {
            return self.snapshot(true).await;
        }
        // What the client had when it sent the cursor changed before it.
        self.floor = since;
        for row in &rows {
            self.offer(BetEventKind::Change, row, false).await?;
        }
        let end = self.event(BetEventKind::SnapshotEnd, None);
        self.sink.send(end).await
    }

    /// Sends the feed's rows this stream watches and has not sent.
    async fn on_rows(&mut self, rows: &[BetRow]) -> Result<(), SinkClosed> {
        for row in rows {
            if self.named.is_empty() || self.named.contains(&row.bet_id) {
                self.offer(BetEventKind::Change, row, true).await?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    /// The size of what `f` returns, without calling it.
    fn returned<F, A, B, C, R>(_: F) -> usize
    where
        F: FnOnce(A, B, C) -> R,
    {
        std::mem::size_of::<R>()
    }

    fn returned1<F, A, R>(_: F) -> usize
    where
        F: FnOnce(A) -> R,
    {
        std::mem::size_of::<R>()
    }

    /// Every open stream holds its task (and its user's feed task) for its
    /// whole life: their state must not carry the reads' futures (2,872 and
    /// 800 bytes before the reads were boxed; BENCHMARKS "Memory per
    /// stream").
    #[test]
    fn stream_tasks_stay_small() {
        let watch = returned(super::Watch::run);
        let feed = returned1(super::Feed::run);
        // 1,104 and 632 bytes now: the select's timers and wakers, the
        // stream's own state, pointers to the boxed reads.
        assert!(watch <= 1280, "a stream's task is {watch} bytes");
        assert!(feed <= 1024, "a feed's task is {feed} bytes");
    }
}
