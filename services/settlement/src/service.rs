//! SettlementService's operations on rounds. The request operations take the
//! caller's `Principal` and the request's plain values, parse and authorise
//! them, and answer with a [`RoundView`] (the round and its progress) or a
//! [`SettlementError`]; the server's gRPC adapter converts to and from the
//! wire.

use betting_auth::{Principal, Role};
use betting_db::actions::Actor;
use betting_domain::{BetId, InvalidRequest, RoundId, RoundStatus, Side, Violations};
use betting_queue::Queue;
use betting_streams::{Changes, EventStream, Publisher, StreamContext};
use sqlx::PgPool;

use betting_jobs::{RefundJob, SettleRoundJob, enqueue_all};

use crate::{
    RoundRow, RoundStore, RoundTotals, SettlementError, Transition,
    stats::StatsCache,
    watch::{RoundFeeds, RoundUpdate},
};

/// Who runs rounds: game servers. Not admin (a round's outcome moves money;
/// whoever audits the books moves none), not our own services.
const GAME: &[Role] = &[Role::Game];

/// The trail's actor for a principal.
fn actor(principal: &Principal) -> Actor {
    Actor::new(&principal.subject, principal.role.as_str())
}

/// A round as the API shows it: its row and its progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoundView {
    pub row: RoundRow,
    pub totals: RoundTotals,
}

#[derive(Clone)]
pub struct SettlementService {
    rounds: RoundStore,
    settle_queue: Queue,
    refund_queue: Queue,
    publisher: Publisher,
    feeds: Option<RoundFeeds>,
    stats: StatsCache,
}

impl SettlementService {
    pub fn new(
        pool: PgPool,
        settle_queue: Queue,
        refund_queue: Queue,
        publisher: Publisher,
    ) -> Self {
        Self {
            rounds: RoundStore::new(pool),
            settle_queue,
            refund_queue,
            publisher,
            feeds: None,
            stats: StatsCache::new(None),
        }
    }

    /// Serves WatchRound from this instance's hub.
    pub fn with_streams(mut self, streams: StreamContext) -> Self {
        // The hub's notes also tell the totals cache when a round changed.
        self.stats = StatsCache::new(Some(streams.hub.clone()));
        self.feeds = Some(RoundFeeds::new(streams));
        self
    }

    /// Times a round's totals were computed rather than served from the
    /// cache (`stats.rs`).
    pub fn stats_computations(&self) -> u64 {
        self.stats.computations()
    }

    pub fn rounds(&self) -> &RoundStore {
        &self.rounds
    }

    pub async fn open(&self, round: &RoundId, by: &Actor) -> Result<RoundRow, SettlementError> {
        if let Some(row) = self.rounds.insert(round, by).await? {
            self.publisher.spawn_publish(Changes {
                bets: Vec::new(),
                rounds: vec![round.to_string()],
            });
            return Ok(row);
        }
        let row = self.rounds.get(round).await?.ok_or_else(|| {
            SettlementError::Internal(anyhow::anyhow!("round {round} neither inserted nor found"))
        })?;
        match row.status {
            // Opening an open round again is a retry.
            RoundStatus::Open => Ok(row),
            status => Err(SettlementError::RoundExists(status.as_db())),
        }
    }

    /// Hands what a committed transition made owed to the workers. Only
    /// committed work is enqueued; the reconciler re-derives anything lost.
    async fn dispatch(
        &self,
        round: &RoundId,
        transition: &Transition,
    ) -> Result<(), SettlementError> {
        if transition.changed {
            self.publisher.spawn_publish(Changes {
                bets: transition.refunds.clone(),
                rounds: vec![round.to_string()],
            });
        }
        let refunds: Vec<_> = transition
            .refunds
            .iter()
            .map(|b| RefundJob::for_bet(BetId::from(b.bet_id)))
            .collect();
        enqueue_all(&self.refund_queue, &refunds).await;
        if transition.round.status == RoundStatus::Settled {
            // One job for the whole round, whatever its size: a settler pays
            // its matches in batches (`settler.rs`). The SETTLED round is
            // the durable hand-off: if this job is lost, the reconciler
            // derives a job for every match left unpaid.
            enqueue_all(&self.settle_queue, &[SettleRoundJob::new(round.as_str())]).await;
        }
        Ok(())
    }

    pub async fn close(&self, round: &RoundId, by: &Actor) -> Result<RoundRow, SettlementError> {
        let transition = self.rounds.close(round, by).await?;
        self.dispatch(round, &transition).await?;
        Ok(transition.round)
    }

    pub async fn settle(
        &self,
        round: &RoundId,
        winner: Side,
        by: &Actor,
    ) -> Result<RoundRow, SettlementError> {
        let transition = self.rounds.settle(round, winner, by).await?;
        // Dispatch on a retry too: it is idempotent, and it heals lost jobs.
        self.dispatch(round, &transition).await?;
        if transition.changed {
            tracing::info!(%round, winner = winner.as_db(), refunds = transition.refunds.len(), "round settled");
        }
        Ok(transition.round)
    }

    pub async fn void(
        &self,
        round: &RoundId,
        reason: &str,
        by: &Actor,
    ) -> Result<RoundRow, SettlementError> {
        let transition = self.rounds.void(round, reason, by).await?;
        self.dispatch(round, &transition).await?;
        if transition.changed {
            tracing::info!(%round, refunds = transition.refunds.len(), "round voided");
        }
        Ok(transition.round)
    }

    /// A round row with its progress.
    pub(crate) async fn view(&self, row: RoundRow) -> Result<RoundView, SettlementError> {
        let round = RoundId::parse(&row.round_id).map_err(|_| {
            SettlementError::Internal(anyhow::anyhow!("stored round id is invalid"))
        })?;
        let totals = self
            .stats
            .totals(&round, row.status, || self.rounds.totals(&round))
            .await?;
        Ok(RoundView { row, totals })
    }

    /// OpenRound: game servers only.
    pub async fn open_round(
        &self,
        principal: &Principal,
        round_id: &str,
    ) -> Result<RoundView, SettlementError> {
        principal.require(GAME)?;
        let round = parse_round(round_id)?;
        let row = self.open(&round, &actor(principal)).await?;
        self.view(row).await
    }

    /// CloseRound: game servers only.
    pub async fn close_round(
        &self,
        principal: &Principal,
        round_id: &str,
    ) -> Result<RoundView, SettlementError> {
        principal.require(GAME)?;
        let round = parse_round(round_id)?;
        let row = self.close(&round, &actor(principal)).await?;
        self.view(row).await
    }

    /// GetRound: any caller.
    pub async fn get_round(&self, round_id: &str) -> Result<RoundView, SettlementError> {
        let round = parse_round(round_id)?;
        let row = self
            .rounds
            .get(&round)
            .await?
            .ok_or(SettlementError::RoundNotFound)?;
        self.view(row).await
    }

    /// SettleRound: game servers only. `winning_side` is the wire's side, parsed
    /// (or what is wrong with it).
    pub async fn settle_round(
        &self,
        principal: &Principal,
        round_id: &str,
        winning_side: Result<Side, &'static str>,
    ) -> Result<RoundView, SettlementError> {
        principal.require(GAME)?;
        let mut v = Violations::default();
        let round = v.check("round_id", RoundId::parse(round_id));
        let side = v.check("winning_side", winning_side);
        let (Some(round), Some(side), true) = (round, side, v.is_empty()) else {
            return Err(SettlementError::from(v.into_error()));
        };
        let row = self.settle(&round, side, &actor(principal)).await?;
        self.view(row).await
    }

    /// VoidRound: game servers only.
    pub async fn void_round(
        &self,
        principal: &Principal,
        round_id: &str,
        reason: &str,
    ) -> Result<RoundView, SettlementError> {
        principal.require(GAME)?;
        let mut v = Violations::default();
        let round = v.check("round_id", RoundId::parse(round_id));
        if reason.chars().count() > 256 || reason.chars().any(char::is_control) {
            v.add("reason", "must be at most 256 printable characters");
        }
        let (Some(round), true) = (round, v.is_empty()) else {
            return Err(SettlementError::from(v.into_error()));
        };
        let row = self.void(&round, reason, &actor(principal)).await?;
        self.view(row).await
    }

    /// WatchRound: any caller, until its token expires.
    pub async fn watch_round(
        &self,
        principal: &Principal,
        round_id: &str,
    ) -> Result<EventStream<RoundUpdate>, SettlementError> {
        let round = parse_round(round_id)?;
        let row = self
            .rounds
            .get(&round)
            .await?
            .ok_or(SettlementError::RoundNotFound)?;
        let feeds = self
            .feeds
            .as_ref()
            .ok_or_else(|| SettlementError::Internal(anyhow::anyhow!("streams are not set up")))?;
        let first = self.view(row).await?;
        Ok(feeds.watch(self.clone(), round, first, principal.expires_at))
    }
}

fn parse_round(text: &str) -> Result<RoundId, SettlementError> {
    RoundId::parse(text).map_err(|e| InvalidRequest::field("round_id", e.to_string()).into())
}
