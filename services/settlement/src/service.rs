//! The gRPC face of rounds.

use betting_api::{
    convert, pb,
    pb::settlement_service_server::{SettlementService as SettlementApi, SettlementServiceServer},
    to_status,
};
use betting_auth::{AuthInterceptor, Principal};
use betting_domain::{InvalidRequest, RoundId, RoundStatus, format_money};
use sqlx::PgPool;
use tonic::{Request, Response, Status, service::interceptor::InterceptedService};

use crate::{RoundRow, RoundStore, RoundTotals, SettlementError};

#[derive(Clone)]
pub struct SettlementService {
    rounds: RoundStore,
}

impl SettlementService {
    pub fn new(pool: PgPool) -> Self {
        Self {
            rounds: RoundStore::new(pool),
        }
    }

    pub fn into_server(
        self,
        auth: AuthInterceptor,
    ) -> InterceptedService<SettlementServiceServer<Self>, AuthInterceptor> {
        SettlementServiceServer::with_interceptor(self, auth)
    }

    pub async fn open(&self, round: &RoundId) -> Result<RoundRow, SettlementError> {
        if let Some(row) = self.rounds.insert(round).await? {
            return Ok(row);
        }
        let row = self.rounds.get(round).await?.ok_or_else(|| {
            SettlementError::Internal(anyhow::anyhow!("round {round} neither inserted nor found"))
        })?;
        match row.status()? {
            // Opening an open round again is a retry.
            RoundStatus::Open => Ok(row),
            status => Err(SettlementError::RoundExists(status.as_db())),
        }
    }

    pub async fn close(&self, round: &RoundId) -> Result<RoundRow, SettlementError> {
        if let Some(row) = self.rounds.close(round).await? {
            return Ok(row);
        }
        let row = self
            .rounds
            .get(round)
            .await?
            .ok_or(SettlementError::RoundNotFound)?;
        match row.status()? {
            RoundStatus::Closed => Ok(row),
            status => Err(SettlementError::WrongState(status.as_db())),
        }
    }

    async fn round_pb(&self, row: &RoundRow) -> Result<pb::Round, SettlementError> {
        let round = RoundId::parse(&row.round_id).map_err(|_| {
            SettlementError::Internal(anyhow::anyhow!("stored round id is invalid"))
        })?;
        let totals = self.rounds.totals(&round).await?;
        round_pb(row, &totals)
    }
}

fn round_pb(row: &RoundRow, totals: &RoundTotals) -> Result<pb::Round, SettlementError> {
    Ok(pb::Round {
        round_id: row.round_id.clone(),
        status: convert::round_status_to_pb(row.status()?) as i32,
        winning_side: row
            .winning_side()
            .map_or(pb::Side::Unspecified, convert::side_to_pb) as i32,
        stats: Some(pb::RoundStats {
            pending_bets: totals.pending,
            matched_bets: totals.matched,
            settled_bets: totals.settled,
            refunded_bets: totals.refunded,
            total_staked: format_money(totals.staked),
            total_paid_out: format_money(totals.paid_out),
            total_refunded: format_money(totals.refunded_amount),
        }),
        created_at: Some(convert::timestamp(row.created_at)),
        closed_at: row.closed_at.map(convert::timestamp),
        settled_at: row.settled_at.map(convert::timestamp),
    })
}

fn parse_round(text: &str) -> Result<RoundId, SettlementError> {
    RoundId::parse(text).map_err(|e| InvalidRequest::field("round_id", e.to_string()).into())
}

fn principal<T>(request: &Request<T>) -> Result<Principal, Status> {
    Principal::of(request)
        .cloned()
        .map_err(|e| to_status(&SettlementError::from(e)))
}

#[tonic::async_trait]
impl SettlementApi for SettlementService {
    #[tracing::instrument(skip_all, fields(round_id = %request.get_ref().round_id))]
    async fn open_round(
        &self,
        request: Request<pb::OpenRoundRequest>,
    ) -> Result<Response<pb::OpenRoundResponse>, Status> {
        let principal = principal(&request)?;
        let result = async {
            principal.require_backend()?;
            let round = parse_round(&request.get_ref().round_id)?;
            let row = self.open(&round).await?;
            self.round_pb(&row).await
        }
        .await;
        let round = result.map_err(|e| to_status(&e))?;
        Ok(Response::new(pb::OpenRoundResponse { round: Some(round) }))
    }

    #[tracing::instrument(skip_all, fields(round_id = %request.get_ref().round_id))]
    async fn close_round(
        &self,
        request: Request<pb::CloseRoundRequest>,
    ) -> Result<Response<pb::CloseRoundResponse>, Status> {
        let principal = principal(&request)?;
        let result = async {
            principal.require_backend()?;
            let round = parse_round(&request.get_ref().round_id)?;
            let row = self.close(&round).await?;
            self.round_pb(&row).await
        }
        .await;
        let round = result.map_err(|e| to_status(&e))?;
        Ok(Response::new(pb::CloseRoundResponse { round: Some(round) }))
    }

    #[tracing::instrument(skip_all, fields(round_id = %request.get_ref().round_id))]
    async fn get_round(
        &self,
        request: Request<pb::GetRoundRequest>,
    ) -> Result<Response<pb::GetRoundResponse>, Status> {
        let _caller = principal(&request)?;
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
        let round = result.map_err(|e| to_status(&e))?;
        Ok(Response::new(pb::GetRoundResponse { round: Some(round) }))
    }
}
