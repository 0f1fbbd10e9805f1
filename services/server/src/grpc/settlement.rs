//! SettlementService over gRPC: the adapter of
//! [`betting_settlement::SettlementService`], WatchRound included (the
//! service's stream of [`RoundUpdate`]s, each mapped to a message).

use betting_api::{
    convert, pb,
    pb::settlement_service_server::{SettlementService as SettlementApi, SettlementServiceServer},
    respond,
};
use betting_auth::{AuthInterceptor, Principal};
use betting_domain::format_money;
use betting_settlement::{RoundEventKind, RoundUpdate, RoundView, SettlementService};
use betting_streams::EventStream;

use crate::limits::{Limiter, Permitted};
use futures::StreamExt;
use tonic::{Request, Response, Status, service::interceptor::InterceptedService};

/// The generated trait's implementation for [`SettlementService`], with the
/// per-user limits WatchRound's streams count against.
#[derive(Clone)]
pub(crate) struct SettlementGrpc(SettlementService, Limiter);

/// The tonic service, behind the bearer-token check.
pub(crate) fn server(
    service: SettlementService,
    limiter: Limiter,
    auth: AuthInterceptor,
) -> InterceptedService<SettlementServiceServer<SettlementGrpc>, AuthInterceptor> {
    let server = super::compressed!(SettlementServiceServer::new(SettlementGrpc(
        service, limiter
    )))
    .max_decoding_message_size(super::MAX_REQUEST_BYTES);
    InterceptedService::new(server, auth)
}

fn round_pb(view: &RoundView) -> pb::Round {
    let (row, totals) = (&view.row, &view.totals);
    pb::Round {
        round_id: row.round_id.clone(),
        status: convert::round_status_to_pb(row.status) as i32,
        winning_side: row.winning_side.map(|s| convert::side_to_pb(s) as i32),
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

/// One WatchRound event as a message; a stream's end passes through.
fn update_pb(event: Result<RoundUpdate, Status>) -> Result<pb::WatchRoundResponse, Status> {
    event.map(|update| {
        let kind = match update.kind {
            RoundEventKind::Snapshot => pb::WatchEventType::Snapshot,
            RoundEventKind::Change => pb::WatchEventType::Change,
            RoundEventKind::Heartbeat => pb::WatchEventType::Heartbeat,
        };
        // `heartbeat` is deprecated for `type`, and still set for old clients.
        #[allow(deprecated)]
        pb::WatchRoundResponse {
            heartbeat: update.kind == RoundEventKind::Heartbeat,
            round: update.round.as_deref().map(round_pb),
            sent_at: Some(convert::timestamp(update.sent_at)),
            r#type: kind as i32,
        }
    })
}

type UpdateToPb = fn(Result<RoundUpdate, Status>) -> Result<pb::WatchRoundResponse, Status>;

#[tonic::async_trait]
impl SettlementApi for SettlementGrpc {
    #[tracing::instrument(skip_all, fields(round_id = %request.get_ref().round_id))]
    async fn open_round(
        &self,
        request: Request<pb::OpenRoundRequest>,
    ) -> Result<Response<pb::OpenRoundResponse>, Status> {
        let principal = Principal::caller(&request)?;
        let result = self
            .0
            .open_round(&principal, &request.get_ref().round_id)
            .await;
        respond(result.map(|view| pb::OpenRoundResponse {
            round: Some(round_pb(&view)),
        }))
    }

    #[tracing::instrument(skip_all, fields(round_id = %request.get_ref().round_id))]
    async fn close_round(
        &self,
        request: Request<pb::CloseRoundRequest>,
    ) -> Result<Response<pb::CloseRoundResponse>, Status> {
        let principal = Principal::caller(&request)?;
        let result = self
            .0
            .close_round(&principal, &request.get_ref().round_id)
            .await;
        respond(result.map(|view| pb::CloseRoundResponse {
            round: Some(round_pb(&view)),
        }))
    }

    #[tracing::instrument(skip_all, fields(round_id = %request.get_ref().round_id))]
    async fn get_round(
        &self,
        request: Request<pb::GetRoundRequest>,
    ) -> Result<Response<pb::GetRoundResponse>, Status> {
        let caller = Principal::caller(&request)?;
        crate::limits::charge_read(&self.1, &caller)?;
        let result = self.0.get_round(&request.get_ref().round_id).await;
        respond(result.map(|view| pb::GetRoundResponse {
            round: Some(round_pb(&view)),
        }))
    }

    #[tracing::instrument(skip_all, fields(round_id = %request.get_ref().round_id))]
    async fn settle_round(
        &self,
        request: Request<pb::SettleRoundRequest>,
    ) -> Result<Response<pb::SettleRoundResponse>, Status> {
        let principal = Principal::caller(&request)?;
        let r = request.get_ref();
        let result = self
            .0
            .settle_round(
                &principal,
                &r.round_id,
                convert::side_from_pb(r.winning_side),
            )
            .await;
        respond(result.map(|view| pb::SettleRoundResponse {
            round: Some(round_pb(&view)),
        }))
    }

    #[tracing::instrument(skip_all, fields(round_id = %request.get_ref().round_id))]
    async fn void_round(
        &self,
        request: Request<pb::VoidRoundRequest>,
    ) -> Result<Response<pb::VoidRoundResponse>, Status> {
        let principal = Principal::caller(&request)?;
        let r = request.get_ref();
        let result = self.0.void_round(&principal, &r.round_id, &r.reason).await;
        respond(result.map(|view| pb::VoidRoundResponse {
            round: Some(round_pb(&view)),
        }))
    }

    type WatchRoundStream = Permitted<futures::stream::Map<EventStream<RoundUpdate>, UpdateToPb>>;

    #[tracing::instrument(skip_all, fields(round_id = %request.get_ref().round_id))]
    async fn watch_round(
        &self,
        request: Request<pb::WatchRoundRequest>,
    ) -> Result<Response<Self::WatchRoundStream>, Status> {
        let principal = Principal::caller(&request)?;
        let permit = crate::limits::open_stream(&self.1, &principal, request.remote_addr())?;
        let result = self
            .0
            .watch_round(&principal, &request.get_ref().round_id)
            .await;
        respond(result.map(|stream| Permitted::new(stream.map(update_pb as UpdateToPb), permit)))
    }
}
