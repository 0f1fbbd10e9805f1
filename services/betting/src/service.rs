//! The gRPC face of betting, and the placing saga.

#[cfg(feature = "fault-injection")]
use std::sync::Arc;

use betting_api::{
    Replayable, convert, pb,
    pb::betting_service_server::{BettingService as BettingApi, BettingServiceServer},
    respond, respond_replayable,
};
use betting_auth::{AuthInterceptor, Principal};
use betting_domain::{
    BetId, BetStatus, IdempotencyKey, RefundReason, RoundId, RoundStatus, Stake, UserId,
    Violations, format_money,
};
use betting_queue::Queue;
use betting_streams::{Changes, Publisher, StreamContext};
use rust_decimal::Decimal;
use tonic::{Request, Response, Status, service::interceptor::InterceptedService};
use uuid::Uuid;

use betting_jobs::MatchJob;
use betting_refunds::{Outbox, Refunder};
use betting_wallet_client::{WalletCallError, WalletClient};

#[cfg(feature = "fault-injection")]
use crate::Faults;
use crate::{BetRow, BetStore, BettingError};

#[derive(Clone)]
pub struct BettingService {
    store: BetStore,
    wallet: WalletClient,
    refunder: Refunder,
    match_queue: Queue,
    #[cfg(feature = "fault-injection")]
    faults: Arc<Faults>,
    publisher: Publisher,
    streams: Option<StreamContext>,
}

/// A placed bet and the owner's balance right after its stake was taken.
#[derive(Debug)]
pub struct Placed {
    pub bet: BetRow,
    pub balance: Decimal,
    /// The key had been seen before: this answers a retry.
    pub replayed: bool,
}

impl BettingService {
    pub fn new(
        store: BetStore,
        wallet: WalletClient,
        match_queue: Queue,
        publisher: Publisher,
    ) -> Self {
        Self {
            refunder: Refunder::new(Outbox::new(store.pool().clone()), wallet.clone()),
            store,
            wallet,
            match_queue,
            #[cfg(feature = "fault-injection")]
            faults: Arc::default(),
            publisher,
            streams: None,
        }
    }

    /// Serves WatchBets from this instance's hub.
    pub fn with_streams(mut self, streams: StreamContext) -> Self {
        self.streams = Some(streams);
        self
    }

    pub(crate) fn stream_context(&self) -> Option<&StreamContext> {
        self.streams.as_ref()
    }

    pub fn store(&self) -> &BetStore {
        &self.store
    }

    /// The crash tests' switches (only in builds with `fault-injection`).
    #[cfg(feature = "fault-injection")]
    pub fn faults(&self) -> &Faults {
        &self.faults
    }

    pub fn match_queue(&self) -> &Queue {
        &self.match_queue
    }

    pub fn into_server(
        self,
        auth: AuthInterceptor,
    ) -> InterceptedService<BettingServiceServer<Self>, AuthInterceptor> {
        BettingServiceServer::with_interceptor(self, auth)
    }

    /// PlaceBet, after parsing.
    pub async fn place(
        &self,
        user: UserId,
        round: RoundId,
        side: betting_domain::Side,
        amount: Stake,
        key: IdempotencyKey,
    ) -> Result<Placed, BettingError> {
        let existing = match self.store.find_by_key(user, &key).await? {
            Some(existing) => Some(existing),
            None => {
                let bet = BetId::generate();
                match self
                    .store
                    .insert_placing(bet, user, &key, &round, side, amount)
                    .await?
                {
                    Some(row) => return self.complete(row, false).await,
                    // Either the round is not open, or the same key won a race.
                    None => self.store.find_by_key(user, &key).await?,
                }
            }
        };
        match existing {
            Some(row) if row.same_request(&round, side, amount.amount()) => {
                self.complete(row, true).await
            }
            Some(_) => Err(BettingError::IdempotencyConflict),
            None => match self.store.round_status(&round).await? {
                // Open now, but not when our insert looked (rounds never
                // reopen, and bets are never deleted): the round was opened
                // in between. Answer as of the insert; a retry places the bet.
                None | Some(RoundStatus::Open) => Err(BettingError::RoundNotFound),
                Some(_) => Err(BettingError::RoundNotOpen),
            },
        }
    }

    /// Drives a bet through the rest of the saga from wherever it is. Every
    /// step is idempotent, so a client retry, the recovery pass and the
    /// original request may all run this for the same bet at once.
    pub async fn complete(&self, bet: BetRow, replayed: bool) -> Result<Placed, BettingError> {
        match bet.status {
            BetStatus::Placing => {}
            BetStatus::Rejected => return Err(BettingError::InsufficientFunds),
            _ => {
                let balance = bet.balance_after.unwrap_or_default();
                return Ok(Placed {
                    bet,
                    balance,
                    replayed,
                });
            }
        }
        let id = bet.id();
        let balance = match self.wallet.hold_stake(bet.user_id, bet.amount, id).await {
            Ok(balance) => balance,
            // The rejection rule: a bet becomes REJECTED only on the wallet's
            // INSUFFICIENT_FUNDS, which the wallet records under the stake's
            // key (`BET:{bet_id}`) and answers to every later HoldStake of
            // that key. It is final: no late or stale hold can take the
            // stake afterwards, so REJECTED and "stake held" never meet.
            Err(e) if e.is_insufficient_funds() => {
                self.store.mark_rejected(id, "INSUFFICIENT_FUNDS").await?;
                return Err(BettingError::InsufficientFunds);
            }
            // Any other refusal (a rotated credential, a malformed call) says
            // nothing about an earlier attempt whose reply was lost: it may
            // hold the stake. The bet stays PLACING; a retry or the recovery
            // pass finishes it once the wallet answers again.
            Err(e @ WalletCallError::Refused { .. }) => {
                tracing::error!(bet_id = %id, error = %e, "the wallet refused a stake; the bet stays PLACING");
                return Err(BettingError::WalletUnavailable(e));
            }
            Err(e @ (WalletCallError::Unavailable(_) | WalletCallError::Malformed(_))) => {
                return Err(BettingError::WalletUnavailable(e));
            }
        };
        #[cfg(feature = "fault-injection")]
        if self.faults.fail_after_stake() {
            return Err(BettingError::Internal(anyhow::anyhow!(
                "injected fault: crashed after holding the stake of bet {id}"
            )));
        }
        let row = match self.store.mark_pending(id, balance).await? {
            Some(row) => {
                self.publisher.spawn_publish(Changes {
                    bets: vec![row.note()],
                    rounds: Vec::new(),
                });
                self.enqueue_match(&row).await;
                row
            }
            // Someone else completed it; answer with what they stored.
            None => self.store.get(id).await?.ok_or(BettingError::BetNotFound)?,
        };
        Ok(Placed {
            balance: row.balance_after.unwrap_or(balance),
            bet: row,
            replayed,
        })
    }

    /// Hands a PENDING bet to the matcher. Best effort: the reconciler
    /// re-derives every PENDING bet from PostgreSQL, so a failure here only
    /// delays it.
    pub async fn enqueue_match(&self, bet: &BetRow) {
        betting_jobs::enqueue(&self.match_queue, &MatchJob::new(bet.id(), &bet.round_id)).await;
    }

    /// CancelBet, after parsing.
    pub async fn cancel(
        &self,
        principal: &Principal,
        bet: BetId,
    ) -> Result<(BetRow, Decimal), BettingError> {
        // Players cancel their own bets; backends and admins any bet.
        let owner = if principal.is_privileged() {
            None
        } else {
            Some(principal.own_user()?)
        };
        let row = match self
            .store
            .refund_pending(bet, owner, RefundReason::Cancelled)
            .await?
        {
            Some(row) => {
                self.publisher.spawn_publish(Changes {
                    bets: vec![row.note()],
                    rounds: Vec::new(),
                });
                row
            }
            None => {
                let row = self
                    .store
                    .get(bet)
                    .await?
                    .filter(|row| visible_to(row, principal))
                    .ok_or(BettingError::BetNotFound)?;
                match row.status {
                    // Cancelled before: answer the retry (and finish its refund).
                    BetStatus::Refunded if row.refund_reason == Some(RefundReason::Cancelled) => {}
                    status => return Err(BettingError::NotCancellable(status.as_db())),
                }
                row
            }
        };
        let balance = match self
            .refunder
            .outbox()
            .get(IdempotencyKey::refund(bet).as_str())
            .await?
        {
            Some(owed) => self.refunder.execute(&owed).await?,
            None => {
                return Err(BettingError::Internal(anyhow::anyhow!(
                    "cancelled bet {bet} has no refund command"
                )));
            }
        };
        Ok((row, balance))
    }
}

fn visible_to(row: &BetRow, principal: &Principal) -> bool {
    row.status.is_visible() && principal.can_see(row.user_id)
}

pub(crate) fn bet_pb(row: &BetRow) -> pb::Bet {
    pb::Bet {
        bet_id: row.bet_id.to_string(),
        user_id: row.user_id.get(),
        round_id: row.round_id.clone(),
        side: convert::side_to_pb(row.side) as i32,
        amount: format_money(row.amount.as_decimal()),
        status: convert::bet_status_to_pb(row.status) as i32,
        match_id: row.match_id.map(|m| m.to_string()).unwrap_or_default(),
        result: convert::bet_result_to_pb(row.result) as i32,
        payout: row.payout.map(format_money).unwrap_or_default(),
        version: row.version,
        created_at: Some(convert::timestamp(row.created_at)),
        updated_at: Some(convert::timestamp(row.updated_at)),
        idempotency_key: row.idempotency_key.clone(),
        refund_reason: convert::refund_reason_to_pb(row.refund_reason) as i32,
    }
}

#[tonic::async_trait]
impl BettingApi for BettingService {
    #[tracing::instrument(skip_all, fields(round_id = %request.get_ref().round_id))]
    async fn place_bet(
        &self,
        request: Request<pb::PlaceBetRequest>,
    ) -> Result<Response<pb::PlaceBetResponse>, Status> {
        let principal = Principal::caller(&request)?;
        let r = request.into_inner();
        let result = async {
            let user = principal.own_user()?;
            let mut v = Violations::default();
            let round = v.check("round_id", RoundId::parse(&r.round_id));
            let side = v.check("side", convert::side_from_pb(r.side));
            let amount = v.check("amount", Stake::parse(&r.amount));
            let key = v.check("idempotency_key", IdempotencyKey::parse(&r.idempotency_key));
            let (Some(round), Some(side), Some(amount), Some(key), true) =
                (round, side, amount, key, v.is_empty())
            else {
                return Err(BettingError::from(v.into_error()));
            };
            self.place(user, round, side, amount, key).await
        }
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
        let result = async {
            let bet = BetId::parse(&request.get_ref().bet_id)
                .map_err(|e| betting_domain::InvalidRequest::field("bet_id", e.to_string()))?;
            // Another player's bet is indistinguishable from a missing one.
            self.store
                .get(bet)
                .await?
                .filter(|row| visible_to(row, &principal))
                .ok_or(BettingError::BetNotFound)
        }
        .await;
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
        let r = request.into_inner();
        let result = async {
            let user = principal.resolve_user(r.user_id)?;
            let mut v = Violations::default();
            let round = if r.round_id.is_empty() {
                Some(None)
            } else {
                v.check("round_id", RoundId::parse(&r.round_id)).map(Some)
            };
            let status = v.check("status", convert::bet_status_filter_from_pb(r.status));
            let limit = v.check("page_size", convert::page_size(r.page_size));
            let before = match convert::decode_page_token(&r.page_token) {
                Ok(None) => Some(None),
                Ok(Some(cursor)) => v.check(
                    "page_token",
                    Uuid::try_parse(&cursor)
                        .map(Some)
                        .map_err(|_| "is not a page token this service issued"),
                ),
                Err(e) => {
                    v.add("page_token", e);
                    None
                }
            };
            let (Some(round), Some(status), Some(limit), Some(before), true) =
                (round, status, limit, before, v.is_empty())
            else {
                return Err(BettingError::from(v.into_error()));
            };
            let mut rows = self
                .store
                .list(user, round.as_ref(), status, before, limit + 1)
                .await?;
            let more = rows.len() as i64 > limit;
            rows.truncate(limit as usize);
            let next = match (more, rows.last()) {
                (true, Some(last)) => convert::encode_page_token(&last.bet_id.to_string()),
                _ => String::new(),
            };
            Ok((rows, next))
        }
        .await;
        respond(result.map(|(rows, next_page_token)| pb::ListBetsResponse {
            bets: rows.iter().map(bet_pb).collect(),
            next_page_token,
        }))
    }

    #[tracing::instrument(skip_all, fields(bet_id = %request.get_ref().bet_id))]
    async fn cancel_bet(
        &self,
        request: Request<pb::CancelBetRequest>,
    ) -> Result<Response<pb::CancelBetResponse>, Status> {
        let principal = Principal::caller(&request)?;
        let result = async {
            let bet = BetId::parse(&request.get_ref().bet_id)
                .map_err(|e| betting_domain::InvalidRequest::field("bet_id", e.to_string()))?;
            self.cancel(&principal, bet).await
        }
        .await;
        respond(result.map(|(row, balance)| pb::CancelBetResponse {
            bet: Some(bet_pb(&row)),
            balance: format_money(balance),
        }))
    }

    type WatchBetsStream = betting_streams::EventStream<pb::WatchBetsResponse>;

    #[tracing::instrument(skip_all)]
    async fn watch_bets(
        &self,
        request: Request<pb::WatchBetsRequest>,
    ) -> Result<Response<Self::WatchBetsStream>, Status> {
        let principal = Principal::caller(&request)?;
        respond(self.watch(principal, request.into_inner()).await)
    }
}
