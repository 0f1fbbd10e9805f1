//! WalletService over gRPC: the adapter of [`betting_wallet::WalletService`].

use betting_api::{
    Replayable, convert, pb,
    pb::wallet_service_server::{WalletService as WalletApi, WalletServiceServer},
    respond, respond_replayable,
};
use betting_auth::{AuthInterceptor, Principal};
use betting_domain::{InvalidRequest, Violations, format_money};
use betting_wallet::{Entry, PayoutAsk, Posted, StakeHold, WalletError, WalletService, WalletView};
use tonic::{Request, Response, Status, service::interceptor::InterceptedService};

/// The generated trait's implementation for [`WalletService`].
#[derive(Clone)]
pub(crate) struct WalletGrpc(WalletService);

/// The tonic service, behind the bearer-token check.
pub(crate) fn server(
    service: WalletService,
    auth: AuthInterceptor,
) -> InterceptedService<WalletServiceServer<WalletGrpc>, AuthInterceptor> {
    let server = super::compressed!(WalletServiceServer::new(WalletGrpc(service)))
        .max_decoding_message_size(super::MAX_WALLET_REQUEST_BYTES);
    InterceptedService::new(server, auth)
}

fn wallet_pb(w: &WalletView) -> pb::Wallet {
    pb::Wallet {
        user_id: w.user_id,
        balance: format_money(w.balance),
        updated_at: w.updated_at.map(convert::timestamp),
    }
}

fn entry_pb(e: &Entry) -> pb::LedgerEntry {
    pb::LedgerEntry {
        entry_id: e.entry_id,
        transfer_id: e.transfer_id.to_string(),
        user_id: e.user_id,
        kind: convert::entry_kind_to_pb(e.kind) as i32,
        amount: format_money(e.amount),
        balance_after: format_money(e.balance_after),
        counterparty: convert::account_to_pb(e.counterparty) as i32,
        idempotency_key: e.idempotency_key.clone(),
        reference: e.reference.clone(),
        created_at: Some(convert::timestamp(e.created_at)),
    }
}

/// A posted movement as an answer: the entry and the wallet right after,
/// marked as a replay when the key had been seen (the body of a replay is
/// exactly the original's).
fn moved<T>(
    posted: Posted,
    body: impl FnOnce(Option<pb::LedgerEntry>, Option<pb::Wallet>) -> T,
) -> Replayable<T> {
    Replayable {
        message: body(
            Some(entry_pb(&posted.entry)),
            Some(wallet_pb(&posted.wallet)),
        ),
        replayed: posted.replayed,
    }
}

/// A refused movement of a batch, as the lone call would have refused it
/// (through the one status mapping, so a refusal reads the same in both).
fn refusal_pb(e: &WalletError) -> pb::MovementRefusal {
    let status = betting_api::to_status(e);
    pb::MovementRefusal {
        code: status.code() as i32,
        reason: betting_api::reason_of(&status).unwrap_or_default(),
        message: status.message().to_owned(),
    }
}

/// One hold's answer in a HoldStakes response: what HoldStake would have
/// answered.
fn hold_outcome(answer: Result<Posted, WalletError>) -> pb::HoldStakeOutcome {
    use pb::hold_stake_outcome::Outcome;
    match answer {
        Ok(posted) => pb::HoldStakeOutcome {
            replayed: posted.replayed,
            outcome: Some(Outcome::Held(pb::HoldStakeResponse {
                entry: Some(entry_pb(&posted.entry)),
                wallet: Some(wallet_pb(&posted.wallet)),
            })),
        },
        Err(e) => pb::HoldStakeOutcome {
            replayed: false,
            outcome: Some(Outcome::Refused(refusal_pb(&e))),
        },
    }
}

/// One payout's answer in a PayWinningsBatch response: what PayWinnings
/// would have answered.
fn payout_outcome(answer: Result<Posted, WalletError>) -> pb::PayoutOutcome {
    use pb::payout_outcome::Outcome;
    match answer {
        Ok(posted) => pb::PayoutOutcome {
            replayed: posted.replayed,
            outcome: Some(Outcome::Paid(pb::PayWinningsResponse {
                entry: Some(entry_pb(&posted.entry)),
                wallet: Some(wallet_pb(&posted.wallet)),
            })),
        },
        Err(e) => pb::PayoutOutcome {
            replayed: false,
            outcome: Some(Outcome::Refused(refusal_pb(&e))),
        },
    }
}

/// A ListLedgerEntries page request: the page size and the cursor (an entry id).
fn entry_page(r: &pb::ListLedgerEntriesRequest) -> Result<(i64, Option<i64>), InvalidRequest> {
    let mut v = Violations::default();
    let limit = v.check("page_size", convert::page_size(r.page_size));
    let before = v
        .check("page_token", convert::decode_page_token(&r.page_token))
        .map(|cursor| cursor.map(|c| c.parse::<i64>()));
    let before = match before {
        Some(Some(Ok(id))) => Some(Some(id)),
        Some(Some(Err(_))) => {
            v.add("page_token", "is not a page token this service issued");
            None
        }
        Some(None) => Some(None),
        None => None,
    };
    match (limit, before, v.is_empty()) {
        (Some(limit), Some(before), true) => Ok((limit, before)),
        _ => Err(v.into_error()),
    }
}

#[tonic::async_trait]
impl WalletApi for WalletGrpc {
    #[tracing::instrument(skip_all, fields(user_id = request.get_ref().user_id))]
    async fn get_wallet(
        &self,
        request: Request<pb::GetWalletRequest>,
    ) -> Result<Response<pb::GetWalletResponse>, Status> {
        let principal = Principal::caller(&request)?;
        let result = self.0.wallet(&principal, request.get_ref().user_id).await;
        respond(result.map(|wallet| pb::GetWalletResponse {
            wallet: Some(wallet_pb(&wallet)),
        }))
    }

    #[tracing::instrument(skip_all, fields(user_id = request.get_ref().user_id))]
    async fn deposit(
        &self,
        request: Request<pb::DepositRequest>,
    ) -> Result<Response<pb::DepositResponse>, Status> {
        let principal = Principal::caller(&request)?;
        let r = request.get_ref();
        let posted = self
            .0
            .deposit(
                &principal,
                r.user_id,
                &r.amount,
                &r.idempotency_key,
                &r.reference,
            )
            .await;
        respond_replayable(
            posted.map(|p| moved(p, |entry, wallet| pb::DepositResponse { entry, wallet })),
        )
    }

    #[tracing::instrument(skip_all, fields(user_id = request.get_ref().user_id))]
    async fn withdraw(
        &self,
        request: Request<pb::WithdrawRequest>,
    ) -> Result<Response<pb::WithdrawResponse>, Status> {
        let principal = Principal::caller(&request)?;
        let r = request.get_ref();
        let posted = self
            .0
            .withdraw(
                &principal,
                r.user_id,
                &r.amount,
                &r.idempotency_key,
                &r.reference,
            )
            .await;
        respond_replayable(
            posted.map(|p| moved(p, |entry, wallet| pb::WithdrawResponse { entry, wallet })),
        )
    }

    #[tracing::instrument(skip_all, fields(user_id = request.get_ref().user_id))]
    async fn list_ledger_entries(
        &self,
        request: Request<pb::ListLedgerEntriesRequest>,
    ) -> Result<Response<pb::ListLedgerEntriesResponse>, Status> {
        let principal = Principal::caller(&request)?;
        let r = request.get_ref();
        let result = self.0.entries(&principal, r.user_id, entry_page(r)).await;
        respond(result.map(|page| {
            let next_page_token = match (page.more, page.entries.last()) {
                (true, Some(last)) => convert::encode_page_token(&last.entry_id.to_string()),
                _ => String::new(),
            };
            pb::ListLedgerEntriesResponse {
                entries: page.entries.iter().map(entry_pb).collect(),
                next_page_token,
            }
        }))
    }

    #[tracing::instrument(skip_all, fields(bet_id = %request.get_ref().bet_id))]
    async fn hold_stake(
        &self,
        request: Request<pb::HoldStakeRequest>,
    ) -> Result<Response<pb::HoldStakeResponse>, Status> {
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
            posted.map(|p| moved(p, |entry, wallet| pb::HoldStakeResponse { entry, wallet })),
        )
    }

    #[tracing::instrument(skip_all, fields(holds = request.get_ref().holds.len()))]
    async fn hold_stakes(
        &self,
        request: Request<pb::HoldStakesRequest>,
    ) -> Result<Response<pb::HoldStakesResponse>, Status> {
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
                .map(|answers| pb::HoldStakesResponse {
                    outcomes: answers.into_iter().map(hold_outcome).collect(),
                });
        respond(outcomes)
    }

    #[tracing::instrument(skip_all, fields(payouts = request.get_ref().payouts.len()))]
    async fn pay_winnings_batch(
        &self,
        request: Request<pb::PayWinningsBatchRequest>,
    ) -> Result<Response<pb::PayWinningsBatchResponse>, Status> {
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
            .map(|answers| pb::PayWinningsBatchResponse {
                outcomes: answers.into_iter().map(payout_outcome).collect(),
            });
        respond(outcomes)
    }

    #[tracing::instrument(skip_all, fields(bet_id = %request.get_ref().bet_id))]
    async fn refund_stake(
        &self,
        request: Request<pb::RefundStakeRequest>,
    ) -> Result<Response<pb::RefundStakeResponse>, Status> {
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
        respond_replayable(
            posted.map(|p| moved(p, |entry, wallet| pb::RefundStakeResponse { entry, wallet })),
        )
    }

    #[tracing::instrument(skip_all, fields(match_id = %request.get_ref().match_id))]
    async fn pay_winnings(
        &self,
        request: Request<pb::PayWinningsRequest>,
    ) -> Result<Response<pb::PayWinningsResponse>, Status> {
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
        respond_replayable(
            posted.map(|p| moved(p, |entry, wallet| pb::PayWinningsResponse { entry, wallet })),
        )
    }
}
