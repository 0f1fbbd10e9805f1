//! WalletService over gRPC: the adapter of [`betting_wallet::WalletService`]
//! for the public RPCs (the internal ones are [`super::stakes`]').

use betting_api::{
    Replayable, convert, pb,
    pb::wallet_service_server::{WalletService as WalletApi, WalletServiceServer},
    respond, respond_replayable,
};
use betting_auth::{AuthInterceptor, Principal};
use betting_domain::{InvalidRequest, Violations, format_money};
use betting_wallet::{Entry, Posted, WalletService, WalletView};
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

pub(super) fn wallet_pb(w: &WalletView) -> pb::Wallet {
    pb::Wallet {
        user_id: w.user_id,
        balance: format_money(w.balance),
        updated_at: w.updated_at.map(convert::timestamp),
    }
}

pub(super) fn entry_pb(e: &Entry) -> pb::LedgerEntry {
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
pub(super) fn moved<T>(
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
}
