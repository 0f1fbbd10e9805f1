//! The gRPC face of the wallet: parse, authorise, post, convert.

use betting_api::{
    Replayable, convert, pb,
    pb::wallet_service_server::{WalletService as WalletApi, WalletServiceServer},
    respond, respond_replayable,
};
use betting_auth::{AuthInterceptor, Principal};
use betting_domain::{
    Amount, BetId, EntryKind, IdempotencyKey, MatchId, Reference, UserId, Violations, format_money,
};
use sqlx::PgPool;
use tonic::{Request, Response, Status, service::interceptor::InterceptedService};

use crate::{Entry, Guard, Ledger, Posted, Transfer, WalletError, WalletView};

/// Keys our own services use; clients may not take them.
const RESERVED_KEY_PREFIXES: &[&str] = &["BET:", "REFUND:", "SETTLE:"];

#[derive(Clone)]
pub struct WalletService {
    ledger: Ledger,
}

impl WalletService {
    pub fn new(pool: PgPool) -> Self {
        Self {
            ledger: Ledger::new(pool),
        }
    }

    /// The tonic service, behind the bearer-token check.
    pub fn into_server(
        self,
        auth: AuthInterceptor,
    ) -> InterceptedService<WalletServiceServer<Self>, AuthInterceptor> {
        WalletServiceServer::with_interceptor(self, auth)
    }

    /// Deposit and Withdraw share everything but the direction.
    async fn external(
        &self,
        principal: &Principal,
        kind: EntryKind,
        user_id: i64,
        amount: &str,
        key: &str,
        reference: &str,
    ) -> Result<Posted, WalletError> {
        principal.require_backend()?;
        let mut v = Violations::default();
        let user = v.check("user_id", UserId::new(user_id));
        let amount = v.check("amount", Amount::parse(amount));
        let key = v.check("idempotency_key", IdempotencyKey::parse(key));
        if let Some(k) = &key
            && RESERVED_KEY_PREFIXES
                .iter()
                .any(|p| k.as_str().starts_with(p))
        {
            v.add(
                "idempotency_key",
                "must not start with BET:, REFUND: or SETTLE:",
            );
        }
        let reference = v.check("reference", Reference::parse(reference));
        let (Some(user), Some(amount), Some(key), Some(reference), true) =
            (user, amount, key, reference, v.is_empty())
        else {
            return Err(v.into_error().into());
        };
        self.ledger
            .post(&Transfer {
                kind,
                user,
                amount,
                key,
                reference: reference.as_str().to_owned(),
                guard: Guard::None,
            })
            .await
    }

    /// HoldStake and RefundStake: our own services, keys of a fixed shape.
    async fn internal(
        &self,
        principal: &Principal,
        kind: EntryKind,
        user_id: i64,
        amount: &str,
        key: &str,
        bet_id: &str,
    ) -> Result<Posted, WalletError> {
        principal.require_backend()?;
        let mut v = Violations::default();
        let user = v.check("user_id", UserId::new(user_id));
        let amount = v.check("amount", Amount::parse(amount));
        let bet = v.check("bet_id", BetId::parse(bet_id));
        let key = v.check("idempotency_key", IdempotencyKey::parse(key));
        if let (Some(bet), Some(k)) = (bet, &key) {
            // One stake and at most one refund per bet, whatever the caller sends.
            let expected = match kind {
                EntryKind::Stake => IdempotencyKey::stake(bet),
                _ => IdempotencyKey::refund(bet),
            };
            if *k != expected {
                v.add("idempotency_key", format!("must be {expected}"));
            }
        }
        let (Some(user), Some(amount), Some(bet), Some(key), true) =
            (user, amount, bet, key, v.is_empty())
        else {
            return Err(v.into_error().into());
        };
        // A refund never returns more than was held, nor to anyone else, nor
        // for a bet that was paid out; checked under lock by the ledger.
        let guard = match kind {
            EntryKind::Refund => Guard::Refund { bet: bet.as_uuid() },
            _ => Guard::None,
        };
        self.ledger
            .post(&Transfer {
                kind,
                user,
                amount,
                key,
                reference: bet.to_string(),
                guard,
            })
            .await
    }

    /// PayWinnings: twice the stake, once per match, to the owner of one of its bets.
    async fn payout(
        &self,
        principal: &Principal,
        r: &pb::PayWinningsRequest,
    ) -> Result<Posted, WalletError> {
        principal.require_backend()?;
        let mut v = Violations::default();
        let user = v.check("user_id", UserId::new(r.user_id));
        let amount = v.check("amount", Amount::parse(&r.amount));
        let matched = v.check("match_id", MatchId::parse(&r.match_id));
        let key = v.check("idempotency_key", IdempotencyKey::parse(&r.idempotency_key));
        let bets: Option<Vec<BetId>> = if r.bet_ids.len() == 2 {
            let a = v.check("bet_ids", BetId::parse(&r.bet_ids[0]));
            let b = v.check("bet_ids", BetId::parse(&r.bet_ids[1]));
            match (a, b) {
                (Some(a), Some(b)) if a != b => Some(vec![a, b]),
                (Some(_), Some(_)) => {
                    v.add("bet_ids", "must name two different bets");
                    None
                }
                _ => None,
            }
        } else {
            v.add("bet_ids", "must name the two bets of the match");
            None
        };
        if let (Some(m), Some(k)) = (matched, &key)
            && *k != IdempotencyKey::settle(m)
        {
            v.add(
                "idempotency_key",
                format!("must be {}", IdempotencyKey::settle(m)),
            );
        }
        let (Some(user), Some(amount), Some(matched), Some(key), Some(bets), true) =
            (user, amount, matched, key, bets, v.is_empty())
        else {
            return Err(v.into_error().into());
        };
        // Each bet staked half of the payout.
        let stake = amount.as_decimal() / rust_decimal::Decimal::TWO;
        self.ledger
            .post(&Transfer {
                kind: EntryKind::Payout,
                user,
                amount,
                key,
                reference: matched.to_string(),
                guard: Guard::Payout {
                    bets: [bets[0].as_uuid(), bets[1].as_uuid()],
                    stake,
                },
            })
            .await
    }
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

#[tonic::async_trait]
impl WalletApi for WalletService {
    #[tracing::instrument(skip_all, fields(user_id = request.get_ref().user_id))]
    async fn get_wallet(
        &self,
        request: Request<pb::GetWalletRequest>,
    ) -> Result<Response<pb::GetWalletResponse>, Status> {
        let principal = Principal::caller(&request)?;
        let result = async {
            let user = principal.resolve_user(request.get_ref().user_id)?;
            self.ledger.wallet(user).await
        }
        .await;
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
            .external(
                &principal,
                EntryKind::Deposit,
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
            .external(
                &principal,
                EntryKind::Withdrawal,
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
        let result = async {
            let user = principal.resolve_user(r.user_id)?;
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
            let (Some(limit), Some(before), true) = (limit, before, v.is_empty()) else {
                return Err(WalletError::from(v.into_error()));
            };
            // One more than asked tells whether another page exists.
            let mut entries = self.ledger.entries(user, before, limit + 1).await?;
            let more = entries.len() as i64 > limit;
            entries.truncate(limit as usize);
            let next = match (more, entries.last()) {
                (true, Some(last)) => convert::encode_page_token(&last.entry_id.to_string()),
                _ => String::new(),
            };
            Ok((entries, next))
        }
        .await;
        respond(
            result.map(|(entries, next_page_token)| pb::ListLedgerEntriesResponse {
                entries: entries.iter().map(entry_pb).collect(),
                next_page_token,
            }),
        )
    }

    #[tracing::instrument(skip_all, fields(bet_id = %request.get_ref().bet_id))]
    async fn hold_stake(
        &self,
        request: Request<pb::HoldStakeRequest>,
    ) -> Result<Response<pb::HoldStakeResponse>, Status> {
        let principal = Principal::caller(&request)?;
        let r = request.get_ref();
        let posted = self
            .internal(
                &principal,
                EntryKind::Stake,
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

    #[tracing::instrument(skip_all, fields(bet_id = %request.get_ref().bet_id))]
    async fn refund_stake(
        &self,
        request: Request<pb::RefundStakeRequest>,
    ) -> Result<Response<pb::RefundStakeResponse>, Status> {
        let principal = Principal::caller(&request)?;
        let r = request.get_ref();
        let posted = self
            .internal(
                &principal,
                EntryKind::Refund,
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
        let posted = self.payout(&principal, request.get_ref()).await;
        respond_replayable(
            posted.map(|p| moved(p, |entry, wallet| pb::PayWinningsResponse { entry, wallet })),
        )
    }
}
