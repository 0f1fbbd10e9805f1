//! BettingService over gRPC: the adapter of [`betting_bets::BettingService`],
//! WatchBets included (the service's stream of [`BetEvent`]s, each mapped to
//! a message).

use betting_api::{
    Replayable, convert, pb,
    pb::betting_service_server::{BettingService as BettingApi, BettingServiceServer},
    respond, respond_replayable,
};
use betting_auth::{AuthInterceptor, Principal};
use betting_bets::{BetEvent, BetEventKind, BetRow, BettingService};
use betting_domain::format_money;
use betting_streams::EventStream;

use crate::limits::{Limiter, Permitted};
use futures::StreamExt;
use tonic::{Request, Response, Status, service::interceptor::InterceptedService};

/// The generated trait's implementation for [`BettingService`], with the
/// per-user limits it enforces before calling it.
#[derive(Clone)]
pub(crate) struct BettingGrpc(BettingService, Limiter);

/// The tonic service, behind the bearer-token check.
pub(crate) fn server(
    service: BettingService,
    limiter: Limiter,
    auth: AuthInterceptor,
) -> InterceptedService<BettingServiceServer<BettingGrpc>, AuthInterceptor> {
    let server = super::compressed!(BettingServiceServer::new(BettingGrpc(service, limiter)))
        .max_decoding_message_size(super::MAX_REQUEST_BYTES);
    InterceptedService::new(server, auth)
}

fn bet_pb(row: &BetRow) -> pb::Bet {
    pb::Bet {
        bet_id: row.bet_id.to_string(),
        user_id: row.user_id.get(),
        round_id: row.round_id.clone(),
        side: convert::side_to_pb(row.side) as i32,
        amount: format_money(row.amount.as_decimal()),
        status: convert::bet_status_to_pb(row.status) as i32,
        match_id: row.match_id.map(|m| m.to_string()).unwrap_or_default(),
        result: row.result.map(|r| convert::bet_result_to_pb(r) as i32),
        payout: row.payout.map(format_money),
        version: row.version,
        created_at: Some(convert::timestamp(row.created_at)),
        updated_at: Some(convert::timestamp(row.updated_at)),
        idempotency_key: row.idempotency_key.clone(),
        refund_reason: row
            .refund_reason
            .map(|r| convert::refund_reason_to_pb(r) as i32),
    }
}

fn event_kind_pb(kind: BetEventKind) -> pb::WatchEventType {
    match kind {
        BetEventKind::Snapshot => pb::WatchEventType::Snapshot,
        BetEventKind::SnapshotEnd => pb::WatchEventType::SnapshotEnd,
        BetEventKind::Change => pb::WatchEventType::Change,
        BetEventKind::Heartbeat => pb::WatchEventType::Heartbeat,
        BetEventKind::Resync => pb::WatchEventType::Resync,
    }
}

/// One WatchBets event as a message; a stream's end passes through.
fn event_pb(event: Result<BetEvent, Status>) -> Result<pb::WatchBetsResponse, Status> {
    event.map(|event| pb::WatchBetsResponse {
        r#type: event_kind_pb(event.kind) as i32,
        bet: event.bet.as_deref().map(bet_pb),
        cursor: event.cursor,
        sent_at: Some(convert::timestamp(event.sent_at)),
    })
}

type EventToPb = fn(Result<BetEvent, Status>) -> Result<pb::WatchBetsResponse, Status>;

#[tonic::async_trait]
impl BettingApi for BettingGrpc {
    #[tracing::instrument(skip_all, fields(round_id = %request.get_ref().round_id))]
    async fn place_bet(
        &self,
        request: Request<pb::PlaceBetRequest>,
    ) -> Result<Response<pb::PlaceBetResponse>, Status> {
        let principal = Principal::caller(&request)?;
        crate::limits::charge_bet(&self.1, &principal)?;
        let r = request.into_inner();
        let result = self
            .0
            .place_bet(
                &principal,
                &r.round_id,
                convert::side_from_pb(r.side),
                &r.amount,
                &r.idempotency_key,
            )
            .await;
        respond_replayable(result.map(|placed| Replayable {
            message: pb::PlaceBetResponse {
                bet: Some(bet_pb(&placed.bet)),
                balance: format_money(placed.balance),
            },
            replayed: placed.replayed,
        }))
    }

    #[tracing::instrument(skip_all, fields(bet_id = %request.get_ref().bet_id))]
    async fn get_bet(
        &self,
        request: Request<pb::GetBetRequest>,
    ) -> Result<Response<pb::GetBetResponse>, Status> {
        let principal = Principal::caller(&request)?;
        crate::limits::charge_read(&self.1, &principal)?;
        let result = self.0.get_bet(&principal, &request.get_ref().bet_id).await;
        respond(result.map(|row| pb::GetBetResponse {
            bet: Some(bet_pb(&row)),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn list_bets(
        &self,
        request: Request<pb::ListBetsRequest>,
    ) -> Result<Response<pb::ListBetsResponse>, Status> {
        let principal = Principal::caller(&request)?;
        crate::limits::charge_read(&self.1, &principal)?;
        let r = request.into_inner();
        let result = self
            .0
            .list_bets(
                &principal,
                r.user_id,
                &r.round_id,
                convert::bet_status_filter_from_pb(r.status),
                convert::page_size(r.page_size),
                convert::decode_page_token(&r.page_token),
            )
            .await;
        respond(result.map(|page| {
            let next_page_token = match (page.more, page.bets.last()) {
                (true, Some(last)) => convert::encode_page_token(&last.bet_id.to_string()),
                _ => String::new(),
            };
            pb::ListBetsResponse {
                bets: page.bets.iter().map(bet_pb).collect(),
                next_page_token,
            }
        }))
    }

    #[tracing::instrument(skip_all, fields(bet_id = %request.get_ref().bet_id))]
    async fn cancel_bet(
        &self,
        request: Request<pb::CancelBetRequest>,
    ) -> Result<Response<pb::CancelBetResponse>, Status> {
        let principal = Principal::caller(&request)?;
        crate::limits::charge_bet(&self.1, &principal)?;
        let result = self
            .0
            .cancel_bet(&principal, &request.get_ref().bet_id)
            .await;
        respond(result.map(|(row, balance)| pb::CancelBetResponse {
            bet: Some(bet_pb(&row)),
            balance: format_money(balance),
        }))
    }

    type WatchBetsStream = Permitted<futures::stream::Map<EventStream<BetEvent>, EventToPb>>;

    #[tracing::instrument(skip_all)]
    async fn watch_bets(
        &self,
        request: Request<pb::WatchBetsRequest>,
    ) -> Result<Response<Self::WatchBetsStream>, Status> {
        let principal = Principal::caller(&request)?;
        let permit = crate::limits::open_stream(&self.1, &principal, request.remote_addr())?;
        let r = request.into_inner();
        let result = self.0.watch_bets(&principal, &r.bet_ids, &r.cursor).await;
        respond(result.map(|stream| Permitted::new(stream.map(event_pb as EventToPb), permit)))
    }
}
