//! WatchRound: a round's status, totals and outcome, live.
//!
//! However many clients watch a round, this instance computes its state once
//! per change: one feed per watched round listens to the hub, waits a moment
//! for changes to settle (a settle changes many bets at once), reads the round
//! and publishes it on a `watch` channel. Watchers only ever hold the latest
//! value, so a slow client costs no memory: it just skips intermediate states.
//! The stream carries [`RoundUpdate`]s; the server's gRPC adapter turns them
//! into messages.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use betting_domain::RoundId;
use betting_streams::{EventStream, Note, StreamContext, StreamEnd, event_stream};
use chrono::{DateTime, Utc};
use tokio::sync::watch;

use crate::{SettlementService, service::RoundView};

/// What a WatchRound event says (the WatchBets event types it shares).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoundEventKind {
    /// The round as it was when the stream opened: the first event.
    Snapshot,
    /// The round's state after a change.
    Change,
    /// Nothing happened; the stream is alive.
    Heartbeat,
}

/// One event of a WatchRound stream: the round's latest state, or a
/// heartbeat (`round` is `None`), stamped when it was made.
#[derive(Debug, Clone)]
pub struct RoundUpdate {
    pub kind: RoundEventKind,
    pub round: Option<Arc<RoundView>>,
    pub sent_at: DateTime<Utc>,
}

/// Changes closer together than this are sent as one.
const DEBOUNCE: Duration = Duration::from_millis(50);

#[derive(Clone)]
pub struct RoundFeeds {
    context: StreamContext,
    feeds: Arc<Mutex<HashMap<String, watch::Receiver<Arc<RoundView>>>>>,
}

impl RoundFeeds {
    pub fn new(context: StreamContext) -> Self {
        Self {
            context,
            feeds: Arc::default(),
        }
    }

    /// A stream of the round, starting with `first`.
    pub fn watch(
        &self,
        service: SettlementService,
        round: RoundId,
        first: RoundView,
        expires_at: Option<u64>,
    ) -> EventStream<RoundUpdate> {
        let mut rx = self.feed(service, &round, first);
        let settings = self.context.settings.clone();
        let (sink, stream) = event_stream(settings.buffer, settings.send_timeout);
        let stop = self.context.stop.clone();
        let deadline = betting_streams::token_deadline(expires_at);
        tokio::spawn(async move {
            let mut heartbeat = tokio::time::interval(settings.heartbeat);
            heartbeat.reset();
            let event = |kind, round: Option<Arc<RoundView>>| RoundUpdate {
                kind,
                round,
                sent_at: Utc::now(),
            };
            let current = rx.borrow_and_update().clone();
            if sink
                .send(event(RoundEventKind::Snapshot, Some(current)))
                .await
                .is_err()
            {
                return;
            }
            loop {
                tokio::select! {
                    biased;
                    () = stop.signalled() => {
                        sink.end(&StreamEnd::ShuttingDown);
                        return;
                    }
                    _ = tokio::time::sleep_until(deadline) => {
                        sink.end(&StreamEnd::TokenExpired);
                        return;
                    }
                    () = sink.closed() => return,
                    changed = rx.changed() => {
                        if changed.is_err() {
                            sink.end(&StreamEnd::FeedEnded);
                            return;
                        }
                        let round = rx.borrow_and_update().clone();
                        if sink
                            .send(event(RoundEventKind::Change, Some(round)))
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                    _ = heartbeat.tick() => {
                        if sink.try_send(event(RoundEventKind::Heartbeat, None)).is_err() {
                            return;
                        }
                    }
                }
            }
        });
        stream
    }

    /// The round's feed, started if nobody here watches it yet.
    fn feed(
        &self,
        service: SettlementService,
        round: &RoundId,
        first: RoundView,
    ) -> watch::Receiver<Arc<RoundView>> {
        let mut feeds = match self.feeds.lock() {
            Ok(f) => f,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(rx) = feeds.get(round.as_str()) {
            return rx.clone();
        }
        let (tx, rx) = watch::channel(Arc::new(first));
        feeds.insert(round.to_string(), rx.clone());
        let sub = self.context.hub.watch_round(round.as_str());
        let this = self.clone();
        let round = round.clone();
        tokio::spawn(async move {
            this.run_feed(service, round, sub, tx).await;
        });
        rx
    }

    async fn run_feed(
        &self,
        service: SettlementService,
        round: RoundId,
        mut sub: betting_streams::Subscription,
        tx: watch::Sender<Arc<RoundView>>,
    ) {
        let stop = self.context.stop.clone();
        let mut idle_check = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                () = stop.signalled() => break,
                note = sub.recv() => {
                    match note {
                        Some(Note::Round | Note::Resync | Note::Bet { .. }) => {}
                        None => break,
                    }
                    tokio::time::sleep(DEBOUNCE).await;
                    while sub.try_recv().is_some() {}
                    sub.take_lagged();
                    self.refresh(&service, &round, &tx).await;
                }
                _ = idle_check.tick() => {
                    // Every watcher gone: stop, under the lock so no one joins meanwhile.
                    let mut feeds = match self.feeds.lock() {
                        Ok(f) => f,
                        Err(poisoned) => poisoned.into_inner(),
                    };
                    if tx.receiver_count() <= 1 {
                        feeds.remove(round.as_str());
                        break;
                    }
                }
            }
        }
    }

    async fn refresh(
        &self,
        service: &SettlementService,
        round: &RoundId,
        tx: &watch::Sender<Arc<RoundView>>,
    ) {
        let row = match service.rounds().get(round).await {
            Ok(Some(row)) => row,
            _ => return,
        };
        let Ok(fresh) = service.view(row).await else {
            return;
        };
        tx.send_if_modified(|current| {
            if **current == fresh {
                false
            } else {
                *current = Arc::new(fresh);
                true
            }
        });
    }
}
