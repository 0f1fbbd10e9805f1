//! WatchBets: a player's bets, live.
//!
//! Each stream registers with the instance's hub *before* reading its
//! snapshot, so no change falls between the two. Change notes carry no data:
//! the stream reads the bet's current row (only the caller's bets are ever
//! read) and sends it if its version is newer than what this stream sent.
//! Bounded everywhere: notes beyond the hub's buffer mark the stream lagged
//! (it then resynchronises), and a client that does not read for the send
//! timeout is cut off with RESOURCE_EXHAUSTED.
//!
//! The stream carries [`BetEvent`]s; the server's gRPC adapter turns them
//! into messages.

use std::collections::HashMap;

use betting_auth::Principal;
use betting_domain::{BetId, UserId};
use betting_streams::{
    EventSink, EventStream, Note, SinkClosed, StreamEnd, Subscription, cursor, event_stream,
};
use chrono::{DateTime, Utc};

use uuid::Uuid;

use crate::{BetRow, BettingError, BettingService};

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
    /// The bet, for a snapshot's or a change's event.
    pub bet: Option<BetRow>,
    /// The resume cursor (empty before anything was sent).
    pub cursor: String,
    pub sent_at: DateTime<Utc>,
}

/// At most this many bets named in one request.
const MAX_NAMED: usize = 100;
/// A resume re-reads this much before the cursor: longer than any bet
/// transaction takes between its `now()` and its commit.
const RESUME_MARGIN: chrono::TimeDelta = chrono::TimeDelta::seconds(5);

struct Watch {
    service: BettingService,
    user: UserId,
    named: Vec<Uuid>,
    sub: Subscription,
    sink: EventSink<BetEvent>,
    /// The version of each bet this stream has sent.
    sent: HashMap<Uuid, i64>,
    /// The latest change time sent: the cursor.
    high_water: DateTime<Utc>,
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
            Some(cursor::decode(cursor).ok_or_else(|| {
                betting_domain::InvalidRequest::field(
                    "cursor",
                    "is not a cursor this service issued",
                )
            })?)
        };
        let context = self
            .stream_context()
            .ok_or_else(|| BettingError::Internal(anyhow::anyhow!("streams are not set up")))?
            .clone();
        let (sink, stream) = event_stream(context.settings.buffer, context.settings.send_timeout);
        // Register first: a change from now on is noted even while the snapshot is read.
        let sub = context.hub.watch_user(user.get());
        let watch = Watch {
            service: self.clone(),
            user,
            named,
            sub,
            sink,
            sent: HashMap::new(),
            high_water: resume_from.unwrap_or(DateTime::<Utc>::MIN_UTC),
        };
        let deadline = betting_streams::token_deadline(principal.expires_at);
        tokio::spawn(watch.run(resume_from, context, deadline));
        Ok(stream)
    }
}

impl Watch {
    async fn run(
        mut self,
        resume_from: Option<DateTime<Utc>>,
        context: betting_streams::StreamContext,
        deadline: tokio::time::Instant,
    ) {
        let stop = context.stop.clone();
        if stop.is_signalled() {
            self.sink.end(&StreamEnd::ShuttingDown);
            return;
        }
        if self
            .snapshot(resume_from.map(|t| t - RESUME_MARGIN), false)
            .await
            .is_err()
        {
            return;
        }
        let mut heartbeat = tokio::time::interval(context.settings.heartbeat);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        heartbeat.reset();
        loop {
            if self.sub.take_lagged() && self.snapshot(None, true).await.is_err() {
                return;
            }
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
                note = self.sub.recv() => {
                    let Some(note) = note else { return };
                    if self.on_notes(note).await.is_err() {
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
            bet: bet.cloned(),
            cursor: if self.high_water == DateTime::<Utc>::MIN_UTC {
                String::new()
            } else {
                cursor::encode(self.high_water)
            },
            sent_at: Utc::now(),
        }
    }

    /// Sends a bet if it is newer than what this stream sent.
    async fn offer(&mut self, kind: BetEventKind, row: &BetRow) -> Result<(), SinkClosed> {
        if self
            .sent
            .get(&row.bet_id)
            .is_some_and(|v| *v >= row.version)
        {
            return Ok(());
        }
        self.sent.insert(row.bet_id, row.version);
        if row.updated_at > self.high_water {
            self.high_water = row.updated_at;
        }
        let event = self.event(kind, Some(row));
        self.sink.send(event).await
    }

    async fn snapshot(
        &mut self,
        since: Option<DateTime<Utc>>,
        resync: bool,
    ) -> Result<(), SinkClosed> {
        if resync {
            // Anything may have been missed: forget what was sent, send it all again.
            self.sent.clear();
            let event = self.event(BetEventKind::Resync, None);
            self.sink.send(event).await?;
        }
        let rows = match self
            .service
            .store()
            .watch_snapshot(self.user, &self.named, since)
            .await
        {
            Ok(rows) => rows,
            Err(error) => {
                // Logged by the mapping, with its cause.
                self.sink.end(&error);
                return Err(SinkClosed::Gone);
            }
        };
        for row in &rows {
            self.offer(BetEventKind::Snapshot, row).await?;
        }
        let end = self.event(BetEventKind::SnapshotEnd, None);
        self.sink.send(end).await
    }

    /// Handles a note and whatever else is already waiting, in one read.
    async fn on_notes(&mut self, first: Note) -> Result<(), SinkClosed> {
        let mut wanted: Vec<Uuid> = Vec::new();
        let mut resync = false;
        let mut note = Some(first);
        while let Some(n) = note {
            match n {
                Note::Resync => resync = true,
                Note::Round => {}
                Note::Bet { bet_id, version } => {
                    let named = self.named.is_empty() || self.named.contains(&bet_id);
                    let known =
                        version.is_some_and(|v| self.sent.get(&bet_id).is_some_and(|s| *s >= v));
                    if named && !known && !wanted.contains(&bet_id) {
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
            return self.snapshot(None, true).await;
        }
        if wanted.is_empty() {
            return Ok(());
        }
        let rows = match self.service.store().user_bets(self.user, &wanted).await {
            Ok(rows) => rows,
            Err(error) => {
                // The sweep will bring these notes back.
                tracing::debug!(%error, "could not read changed bets");
                return Ok(());
            }
        };
        for row in &rows {
            self.offer(BetEventKind::Change, row).await?;
        }
        Ok(())
    }
}
