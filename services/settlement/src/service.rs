//! The gRPC face of rounds.

use betting_api::{
    convert, pb,
    pb::settlement_service_server::{SettlementService as SettlementApi, SettlementServiceServer},
    respond,
};
use betting_auth::{AuthInterceptor, Principal};
use betting_domain::{BetId, InvalidRequest, RoundId, RoundStatus, Side, Violations, format_money};
use betting_queue::Queue;
use betting_streams::{Changes, Publisher, StreamContext};
use sqlx::PgPool;
use tonic::{Request, Response, Status, service::interceptor::InterceptedService};

use betting_domain::MatchId;
use betting_jobs::{RefundJob, SettleJob, enqueue_all};

use crate::{RoundRow, RoundStore, RoundTotals, SettlementError, Transition, watch::RoundFeeds};

#[derive(Clone)]
pub struct SettlementService {
    rounds: RoundStore,
    settle_queue: Queue,
    refund_queue: Queue,
    publisher: Publisher,
    feeds: Option<RoundFeeds>,
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
        }
    }

    /// Serves WatchRound from this instance's hub.
    pub fn with_streams(mut self, streams: StreamContext) -> Self {
        self.feeds = Some(RoundFeeds::new(streams));
        self
    }

    pub fn rounds(&self) -> &RoundStore {
        &self.rounds
    }

    pub fn into_server(
        self,
        auth: AuthInterceptor,
    ) -> InterceptedService<SettlementServiceServer<Self>, AuthInterceptor> {
        SettlementServiceServer::with_interceptor(self, auth)
    }

    pub async fn open(&self, round: &RoundId) -> Result<RoundRow, SettlementError> {
        if let Some(row) = self.rounds.insert(round).await? {
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
            let matches = self.rounds.open_matches(round).await?;
            let jobs: Vec<_> = matches
                .into_iter()
                .map(|m| SettleJob::new(MatchId::from(m)))
                .collect();
            enqueue_all(&self.settle_queue, &jobs).await;
        }
        Ok(())
    }

    pub async fn close(&self, round: &RoundId) -> Result<RoundRow, SettlementError> {
        let transition = self.rounds.close(round).await?;
        self.dispatch(round, &transition).await?;
        Ok(transition.round)
    }

    pub async fn settle(&self, round: &RoundId, winner: Side) -> Result<RoundRow, SettlementError> {
        let transition = self.rounds.settle(round, winner).await?;
        // Dispatch on a retry too: it is idempotent, and it heals lost jobs.
        self.dispatch(round, &transition).await?;
        if transition.changed {
            tracing::info!(%round, winner = winner.as_db(), refunds = transition.refunds.len(), "round settled");
        }
        Ok(transition.round)
    }

    pub async fn void(&self, round: &RoundId, reason: &str) -> Result<RoundRow, SettlementError> {
        let transition = self.rounds.void(round, reason).await?;
        self.dispatch(round, &transition).await?;
        if transition.changed {
            tracing::info!(%round, refunds = transition.refunds.len(), "round voided");
        }
        Ok(transition.round)
    }

    pub(crate) async fn round_pb(&self, row: &RoundRow) -> Result<pb::Round, SettlementError> {
        let round = RoundId::parse(&row.round_id).map_err(|_| {
            SettlementError::Internal(anyhow::anyhow!("stored round id is invalid"))
        })?;
        let totals = self.rounds.totals(&round).await?;
        Ok(round_pb(row, &totals))
    }
}

fn round_pb(row: &RoundRow, totals: &RoundTotals) -> pb::Round {
    pb::Round {
        round_id: row.round_id.clone(),
        status: convert::round_status_to_pb(row.status) as i32,
        winning_side: row
            .winning_side
            .map_or(pb::Side::Unspecified, convert::side_to_pb) as i32,
        stats: Some(pb::RoundStats {
            pending_bets: totals.pending,
            matched_bets: totals.matched,
            settled_bets: totals.settled,
            refunded_bets: totals.refunded,
            total_staked: format_money(totals.staked),
            total_paid_out: format_money(totals.paid_out),
            total_refunded: format_money(totals.refunded_amount),
            matches: totals.matches,
            settled_matches: totals.settled_matches,
            outstanding_jobs: totals.outstanding_jobs,
        }),
        created_at: Some(convert::timestamp(row.created_at)),
        closed_at: row.closed_at.map(convert::timestamp),
        settled_at: row.settled_at.map(convert::timestamp),
        void_reason: row.void_reason.clone().unwrap_or_default(),
    }
}

fn parse_round(text: &str) -> Result<RoundId, SettlementError> {
    RoundId::parse(text).map_err(|e| InvalidRequest::field("round_id", e.to_string()).into())
}

#[tonic::async_trait]
impl SettlementApi for SettlementService {
    #[tracing::instrument(skip_all, fields(round_id = %request.get_ref().round_id))]
    async fn open_round(
        &self,
        request: Request<pb::OpenRoundRequest>,
    ) -> Result<Response<pb::OpenRoundResponse>, Status> {
        let principal = Principal::caller(&request)?;
        let result = async {
            principal.require_backend()?;
            let round = parse_round(&request.get_ref().round_id)?;
            let row = self.open(&round).await?;
            self.round_pb(&row).await
        }
        .await;
        respond(result.map(|round| pb::OpenRoundResponse { round: Some(round) }))
    }

    #[tracing::instrument(skip_all, fields(round_id = %request.get_ref().round_id))]
    async fn close_round(
        &self,
        request: Request<pb::CloseRoundRequest>,
    ) -> Result<Response<pb::CloseRoundResponse>, Status> {
        let principal = Principal::caller(&request)?;
        let result = async {
            principal.require_backend()?;
            let round = parse_round(&request.get_ref().round_id)?;
            let row = self.close(&round).await?;
            self.round_pb(&row).await
        }
        .await;
        respond(result.map(|round| pb::CloseRoundResponse { round: Some(round) }))
    }

    #[tracing::instrument(skip_all, fields(round_id = %request.get_ref().round_id))]
    async fn get_round(
        &self,
        request: Request<pb::GetRoundRequest>,
    ) -> Result<Response<pb::GetRoundResponse>, Status> {
        let _caller = Principal::caller(&request)?;
        let result = async {
            let round = parse_round(&request.get_ref().round_id)?;
            let row = self
                .rounds
                .get(&round)
                .await?
                .ok_or(SettlementError::RoundNotFound)?;
            self.round_pb(&row).await
        }
        .await;
        respond(result.map(|round| pb::GetRoundResponse { round: Some(round) }))
    }

    #[tracing::instrument(skip_all, fields(round_id = %request.get_ref().round_id))]
    async fn settle_round(
        &self,
        request: Request<pb::SettleRoundRequest>,
    ) -> Result<Response<pb::SettleRoundResponse>, Status> {
        let principal = Principal::caller(&request)?;
        let result = async {
            principal.require_backend()?;
            let r = request.get_ref();
            let mut v = Violations::default();
            let round = v.check("round_id", RoundId::parse(&r.round_id));
            let side = v.check("winning_side", convert::side_from_pb(r.winning_side));
            let (Some(round), Some(side), true) = (round, side, v.is_empty()) else {
                return Err(SettlementError::from(v.into_error()));
            };
            let row = self.settle(&round, side).await?;
            self.round_pb(&row).await
        }
        .await;
        respond(result.map(|round| pb::SettleRoundResponse { round: Some(round) }))
    }

    #[tracing::instrument(skip_all, fields(round_id = %request.get_ref().round_id))]
    async fn void_round(
        &self,
        request: Request<pb::VoidRoundRequest>,
    ) -> Result<Response<pb::VoidRoundResponse>, Status> {
        let principal = Principal::caller(&request)?;
        let result = async {
            principal.require_backend()?;
            let r = request.get_ref();
            let mut v = Violations::default();
            let round = v.check("round_id", RoundId::parse(&r.round_id));
            if r.reason.chars().count() > 256 || r.reason.chars().any(char::is_control) {
                v.add("reason", "must be at most 256 printable characters");
            }
            let (Some(round), true) = (round, v.is_empty()) else {
                return Err(SettlementError::from(v.into_error()));
            };
            let row = self.void(&round, &r.reason).await?;
            self.round_pb(&row).await
        }
        .await;
        respond(result.map(|round| pb::VoidRoundResponse { round: Some(round) }))
    }

    type WatchRoundStream = betting_streams::EventStream<pb::WatchRoundResponse>;

    #[tracing::instrument(skip_all, fields(round_id = %request.get_ref().round_id))]
    async fn watch_round(
        &self,
        request: Request<pb::WatchRoundRequest>,
    ) -> Result<Response<Self::WatchRoundStream>, Status> {
        let principal = Principal::caller(&request)?;
        let result = async {
            let round = parse_round(&request.get_ref().round_id)?;
            let row = self
                .rounds
                .get(&round)
                .await?
                .ok_or(SettlementError::RoundNotFound)?;
            let feeds = self.feeds.as_ref().ok_or_else(|| {
                SettlementError::Internal(anyhow::anyhow!("streams are not set up"))
            })?;
            let first = self.round_pb(&row).await?;
            Ok::<_, SettlementError>(feeds.watch(self.clone(), round, first, principal.expires_at))
        }
        .await;
        respond(result)
    }
}
