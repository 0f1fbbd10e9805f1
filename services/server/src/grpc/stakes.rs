//! StakeService (`betting.internal.v1`) over gRPC: the internal RPCs of
//! [`betting_wallet::WalletService`] that only our own processes call (the
//! `service` role; the service checks it). Served by the wallet role beside
//! WalletService, on the same port.

use betting_api::{
    pb_internal as pbi,
    pb_internal::stake_service_server::{StakeService as StakeApi, StakeServiceServer},
    respond, respond_replayable,
};
use betting_auth::{AuthInterceptor, Principal};
use betting_wallet::{PayoutAsk, Posted, StakeHold, StakePlacementAsk, WalletError, WalletService};
use tonic::{Request, Response, Status, service::interceptor::InterceptedService};

use super::wallet::{entry_pb, moved, wallet_pb};

/// The generated trait's implementation for [`WalletService`]'s internal RPCs.
#[derive(Clone)]
pub(crate) struct StakeGrpc(WalletService);

/// The tonic service, behind the bearer-token check.
pub(crate) fn server(
    service: WalletService,
    auth: AuthInterceptor,
) -> InterceptedService<StakeServiceServer<StakeGrpc>, AuthInterceptor> {
    // Compressed requests accepted, as WalletService (their old home) and
    // every other generated server accept them.
    let server = super::compressed!(StakeServiceServer::new(StakeGrpc(service)))
        .max_decoding_message_size(super::MAX_WALLET_REQUEST_BYTES);
    InterceptedService::new(server, auth)
}

/// A refused movement of a batch, as the lone call would have refused it
/// (through the one status mapping, so a refusal reads the same in both).
fn refusal_pb(e: &WalletError) -> pbi::MovementRefusal {
    let status = betting_api::to_status(e);
    pbi::MovementRefusal {
        code: status.code() as i32,
        reason: betting_api::reason_of(&status).unwrap_or_default(),
        message: status.message().to_owned(),
    }
}

/// One hold's answer in a HoldStakes response: what HoldStake would have
/// answered.
fn hold_outcome(answer: Result<Posted, WalletError>) -> pbi::HoldStakeOutcome {
    use pbi::hold_stake_outcome::Outcome;
    match answer {
        Ok(posted) => pbi::HoldStakeOutcome {
            replayed: posted.replayed,
            outcome: Some(Outcome::Held(pbi::HoldStakeResponse {
                entry: Some(entry_pb(&posted.entry)),
                wallet: Some(wallet_pb(&posted.wallet)),
            })),
            bet_written_at: posted.bet_written_at.map(betting_api::convert::timestamp),
        },
        Err(e) => pbi::HoldStakeOutcome {
            replayed: false,
            outcome: Some(Outcome::Refused(refusal_pb(&e))),
            bet_written_at: None,
        },
    }
}

/// One payout's answer in a PayWinningsBatch response: what PayWinnings
/// would have answered.
fn payout_outcome(answer: Result<Posted, WalletError>) -> pbi::PayoutOutcome {
    use pbi::payout_outcome::Outcome;
    match answer {
        Ok(posted) => pbi::PayoutOutcome {
            replayed: posted.replayed,
            outcome: Some(Outcome::Paid(pbi::PayWinningsResponse {
                entry: Some(entry_pb(&posted.entry)),
                wallet: Some(wallet_pb(&posted.wallet)),
            })),
        },
        Err(e) => pbi::PayoutOutcome {
            replayed: false,
            outcome: Some(Outcome::Refused(refusal_pb(&e))),
        },
    }
}

#[tonic::async_trait]
impl StakeApi for StakeGrpc {
    #[tracing::instrument(skip_all, fields(bet_id = %request.get_ref().bet_id))]
    async fn hold_stake(
        &self,
        request: Request<pbi::HoldStakeRequest>,
    ) -> Result<Response<pbi::HoldStakeResponse>, Status> {
        let principal = Principal::caller(&request)?;
        let r = request.get_ref();
        let posted = self
            .0
            .hold_stake(
                &principal,
                r.user_id,
                &r.amount,
                &r.idempotency_key,
                &r.bet_id,
            )
            .await;
        respond_replayable(
            posted.map(|p| moved(p, |entry, wallet| pbi::HoldStakeResponse { entry, wallet })),
        )
    }

    #[tracing::instrument(skip_all, fields(holds = request.get_ref().holds.len()))]
    async fn hold_stakes(
        &self,
        request: Request<pbi::HoldStakesRequest>,
    ) -> Result<Response<pbi::HoldStakesResponse>, Status> {
        let principal = Principal::caller(&request)?;
        let holds: Vec<StakeHold<'_>> = request
            .get_ref()
            .holds
            .iter()
            .map(|h| StakeHold {
                user_id: h.user_id,
                amount: &h.amount,
                key: &h.idempotency_key,
                bet_id: &h.bet_id,
            })
            .collect();
        let outcomes =
            self.0
                .hold_stakes(&principal, &holds)
                .await
                .map(|answers| pbi::HoldStakesResponse {
                    outcomes: answers.into_iter().map(hold_outcome).collect(),
                });
        respond(outcomes)
    }

    #[tracing::instrument(skip_all, fields(placements = request.get_ref().placements.len()))]
    async fn place_stakes(
        &self,
        request: Request<pbi::PlaceStakesRequest>,
    ) -> Result<Response<pbi::PlaceStakesResponse>, Status> {
        let principal = Principal::caller(&request)?;
        let r = request.get_ref();
        // A placement without its hold is parsed as a hold of nothing (each
        // field refused as missing), so it is refused alone.
        let empty = pbi::HoldStakeRequest::default();
        let placements: Vec<StakePlacementAsk<'_>> = r
            .placements
            .iter()
            .map(|p| {
                let h = p.hold.as_ref().unwrap_or(&empty);
                StakePlacementAsk {
                    hold: StakeHold {
                        user_id: h.user_id,
                        amount: &h.amount,
                        key: &h.idempotency_key,
                        bet_id: &h.bet_id,
                    },
                    round_id: &p.round_id,
                    side: betting_api::convert::side_from_pb(p.side),
                    bet_key: &p.bet_key,
                }
            })
            .collect();
        let outcomes = self
            .0
            .place_stakes(&principal, &placements, r.wait)
            .await
            .map(|answers| pbi::PlaceStakesResponse {
                outcomes: answers.into_iter().map(hold_outcome).collect(),
            });
        respond(outcomes)
    }

    #[tracing::instrument(skip_all, fields(payouts = request.get_ref().payouts.len()))]
    async fn pay_winnings_batch(
        &self,
        request: Request<pbi::PayWinningsBatchRequest>,
    ) -> Result<Response<pbi::PayWinningsBatchResponse>, Status> {
        let principal = Principal::caller(&request)?;
        let asks: Vec<PayoutAsk<'_>> = request
            .get_ref()
            .payouts
            .iter()
            .map(|p| PayoutAsk {
                user_id: p.user_id,
                amount: &p.amount,
                match_id: &p.match_id,
                key: &p.idempotency_key,
                bet_ids: &p.bet_ids,
            })
            .collect();
        let outcomes = self
            .0
            .pay_winnings_batch(&principal, &asks)
            .await
            .map(|answers| pbi::PayWinningsBatchResponse {
                outcomes: answers.into_iter().map(payout_outcome).collect(),
            });
        respond(outcomes)
    }

    #[tracing::instrument(skip_all, fields(bet_id = %request.get_ref().bet_id))]
    async fn refund_stake(
        &self,
        request: Request<pbi::RefundStakeRequest>,
    ) -> Result<Response<pbi::RefundStakeResponse>, Status> {
        let principal = Principal::caller(&request)?;
        let r = request.get_ref();
        let posted = self
            .0
            .refund_stake(
                &principal,
                r.user_id,
                &r.amount,
                &r.idempotency_key,
                &r.bet_id,
            )
            .await;
        respond_replayable(posted.map(|p| {
            moved(p, |entry, wallet| pbi::RefundStakeResponse {
                entry,
                wallet,
            })
        }))
    }

    #[tracing::instrument(skip_all, fields(match_id = %request.get_ref().match_id))]
    async fn pay_winnings(
        &self,
        request: Request<pbi::PayWinningsRequest>,
    ) -> Result<Response<pbi::PayWinningsResponse>, Status> {
        let principal = Principal::caller(&request)?;
        let r = request.get_ref();
        let posted = self
            .0
            .pay_winnings(
                &principal,
                r.user_id,
                &r.amount,
                &r.match_id,
                &r.idempotency_key,
                &r.bet_ids,
            )
            .await;
        respond_replayable(posted.map(|p| {
            moved(p, |entry, wallet| pbi::PayWinningsResponse {
                entry,
                wallet,
            })
        }))
    }
}
