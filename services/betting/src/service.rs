//! BettingService's operations, and the placing saga. The request
//! operations take the caller's `Principal` and the request's plain values
//! (or, for what only the wire can parse, the parse's result), parse and
//! authorise them, and answer with bet rows or a [`BettingError`]; the
//! server's gRPC adapter converts to and from the wire.

use std::sync::{Arc, OnceLock};

use betting_auth::{Principal, Role};
use betting_domain::{
    BetId, BetStatus, IdempotencyKey, RefundReason, RoundId, RoundStatus, Side, Stake, UserId,
    Violations,
};
use betting_queue::Queue;
use betting_streams::{Changes, Publisher, StreamContext};
use rust_decimal::Decimal;
use uuid::Uuid;

use betting_jobs::MatchJob;
use betting_refunds::{Outbox, Refunder};
use betting_wallet_client::{WalletCallError, WalletClient};

#[cfg(feature = "fault-injection")]
use crate::Faults;
use crate::{
    BetRow, BetStore, BettingError,
    placer::{Batched, Parts, Placer},
    store::NewBet,
    watch::UserFeeds,
};

#[derive(Clone)]
pub struct BettingService {
    store: BetStore,
    wallet: WalletClient,
    refunder: Refunder,
    match_queue: Queue,
    #[cfg(feature = "fault-injection")]
    faults: Arc<Faults>,
    publisher: Publisher,
    feeds: Option<UserFeeds>,
    limits: BetLimits,
    /// New bets' group commit (`placer.rs`), started on first use; `None`
    /// inside: each new bet is placed on its own.
    placer: Arc<OnceLock<Option<Placer>>>,
    group_commit: bool,
}

/// The per-user limits PlaceBet applies itself, because they need the
/// request's meaning (the rate and stream limits are the gRPC edge's).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BetLimits {
    /// The smallest stake accepted; zero: any positive stake.
    pub min_stake: Decimal,
    /// Open (PLACING or PENDING: not yet matched, still the player's to
    /// cancel) bets a user may hold; 0: unlimited. MATCHED bets do not count:
    /// they wait on the round, not on the player, and the match timeout
    /// bounds how long a PENDING bet stays open anyway.
    pub max_open_bets: u32,
}

/// A page of bets, newest first.
#[derive(Debug)]
pub struct BetPage {
    pub bets: Vec<BetRow>,
    /// Whether older bets follow the last one.
    pub more: bool,
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
            feeds: None,
            limits: BetLimits::default(),
            placer: Arc::default(),
            group_commit: true,
        }
    }

    /// Whether concurrent new bets share their commits (on by default;
    /// off, for comparison, each is placed alone). The outcome of every
    /// bet is the same either way.
    pub fn with_group_commit(mut self, on: bool) -> Self {
        self.group_commit = on;
        self.placer = Arc::default();
        self
    }

    /// Waits until no placing batch is running (a graceful stop, once
    /// every request is answered: the batches' match jobs go out after
    /// their answers). At once if none ever ran.
    pub async fn drained(&self) {
        if let Some(Some(placer)) = self.placer.get() {
            placer.drained().await;
        }
    }

    fn placer(&self) -> Option<&Placer> {
        self.placer
            .get_or_init(|| self.group_commit.then(|| Placer::start(self.parts())))
            .as_ref()
    }

    /// What placing needs of the service (`placer.rs`).
    fn parts(&self) -> Parts {
        Parts {
            store: self.store.clone(),
            wallet: self.wallet.clone(),
            match_queue: self.match_queue.clone(),
            publisher: self.publisher.clone(),
            #[cfg(feature = "fault-injection")]
            faults: self.faults.clone(),
        }
    }

    /// Applies the per-user limits PlaceBet checks (none by default).
    pub fn with_limits(mut self, limits: BetLimits) -> Self {
        self.limits = limits;
        self
    }

    /// Serves WatchBets from this instance's hub.
    pub fn with_streams(mut self, streams: StreamContext) -> Self {
        self.feeds = Some(UserFeeds::new(streams));
        self
    }

    pub(crate) fn user_feeds(&self) -> Option<&UserFeeds> {
        self.feeds.as_ref()
    }

    /// Users with a WatchBets feed on this instance (one however many
    /// streams the user has); a feed leaves within a second of its last stream.
    pub fn watched_users(&self) -> usize {
        self.feeds.as_ref().map_or(0, UserFeeds::len)
    }

    /// Reads of changed bets the WatchBets feeds made so far: one per batch
    /// of changes of a user, however many streams the user has.
    pub fn stream_change_reads(&self) -> u64 {
        self.feeds.as_ref().map_or(0, UserFeeds::reads)
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

    /// PlaceBet: the caller's own bet. `side` is the wire's side, parsed (or
    /// what is wrong with it).
    pub async fn place_bet(
        &self,
        principal: &Principal,
        round_id: &str,
        side: Result<Side, &'static str>,
        amount: &str,
        key: &str,
    ) -> Result<Placed, BettingError> {
        let user = principal.own_player()?;
        let mut v = Violations::default();
        let round = v.check("round_id", RoundId::parse(round_id));
        let side = v.check("side", side);
        let amount = v.check("amount", Stake::parse(amount));
        let key = v.check("idempotency_key", IdempotencyKey::parse(key));
        let (Some(round), Some(side), Some(amount), Some(key), true) =
            (round, side, amount, key, v.is_empty())
        else {
            return Err(BettingError::from(v.into_error()));
        };
        self.place(user, round, side, amount, key).await
    }

    /// GetBet: a bet the caller may see.
    pub async fn get_bet(
        &self,
        principal: &Principal,
        bet_id: &str,
    ) -> Result<BetRow, BettingError> {
        principal.require(BET_VIEWERS)?;
        let bet = BetId::parse(bet_id)
            .map_err(|e| betting_domain::InvalidRequest::field("bet_id", e.to_string()))?;
        // Another player's bet is indistinguishable from a missing one.
        self.store
            .get(bet)
            .await?
            .filter(|row| visible_to(row, principal))
            .ok_or(BettingError::BetNotFound)
    }

    /// ListBets: one page of a user's bets, newest first. `status`,
    /// `page_size` and `page_token` are the wire's values, parsed (the token
    /// into its cursor text, a bet id) or what is wrong with them.
    pub async fn list_bets(
        &self,
        principal: &Principal,
        user_id: i64,
        round_id: &str,
        status: Result<Option<BetStatus>, &'static str>,
        page_size: Result<i64, &'static str>,
        page_token: Result<Option<String>, &'static str>,
    ) -> Result<BetPage, BettingError> {
        let user = principal.resolve_user(user_id, BET_READERS)?;
        let mut v = Violations::default();
        let round = if round_id.is_empty() {
            Some(None)
        } else {
            v.check("round_id", RoundId::parse(round_id)).map(Some)
        };
        let status = v.check("status", status);
        let limit = v.check("page_size", page_size);
        let before = match page_token {
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
        let mut bets = self
            .store
            .list(user, round.as_ref(), status, before, limit + 1)
            .await?;
        let more = bets.len() as i64 > limit;
        bets.truncate(limit as usize);
        Ok(BetPage { bets, more })
    }

    /// CancelBet: the bet, refunded, and the owner's balance after.
    pub async fn cancel_bet(
        &self,
        principal: &Principal,
        bet_id: &str,
    ) -> Result<(BetRow, Decimal), BettingError> {
        let bet = BetId::parse(bet_id)
            .map_err(|e| betting_domain::InvalidRequest::field("bet_id", e.to_string()))?;
        self.cancel(principal, bet).await
    }

    /// PlaceBet, after parsing.
    pub async fn place(
        &self,
        user: UserId,
        round: RoundId,
        side: Side,
        amount: Stake,
        key: IdempotencyKey,
    ) -> Result<Placed, BettingError> {
        // A new key is the common case: it goes straight to the insert,
        // which writes nothing for a known key (its retry is then answered
        // from the bet the key names, below). The limits judge new keys only:
        // a refusal looks the key up first.
        let existing = match self.check_new_bet(user, amount).await {
            Ok(()) => match self.place_new(user, &round, side, amount, &key).await? {
                Some(placed) => return Ok(placed),
                // Either the round is not open, or the key is known (a
                // retry, or the same key won a race).
                None => self.store.find_by_key(user, &key).await?,
            },
            // The limits judge new bets only. A request with the same key
            // may have placed the bet before, or since we counted (and is
            // what this one's open-bets count saw): answer with that bet,
            // never refuse a placed bet's retry.
            Err(refusal) => match self.store.find_by_key(user, &key).await? {
                Some(existing) => Some(existing),
                None => return Err(refusal),
            },
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

    /// Places a new bet (with the next batch, or alone); `None` when nothing
    /// was written: the round is not open, or the key is known.
    async fn place_new(
        &self,
        user: UserId,
        round: &RoundId,
        side: Side,
        amount: Stake,
        key: &IdempotencyKey,
    ) -> Result<Option<Placed>, BettingError> {
        let new = NewBet {
            bet: BetId::generate(),
            user,
            key: key.clone(),
            round: round.clone(),
            side,
            amount,
        };
        let batched = match self.placer() {
            Some(placer) => placer.place(new.clone()).await?,
            None => Batched::Alone,
        };
        match batched {
            Batched::Placed(placed) => Ok(Some(*placed)),
            Batched::NotWritten => Ok(None),
            Batched::Alone => self.place_alone(&new).await,
            Batched::Legacy => self.place_legacy(&new).await,
        }
    }

    /// Places a new bet as releases before PlaceStakes did, for a wallet of
    /// such a release (a rolling deploy): the row PLACING, then `complete`
    /// (HoldStake, the row PENDING). A crash between the steps leaves a
    /// PLACING row, which the recovery pass and the retry finish as they
    /// finish an older release's. `None` when nothing was written.
    async fn place_legacy(&self, new: &NewBet) -> Result<Option<Placed>, BettingError> {
        match self
            .store
            .insert_placing(
                new.bet, new.user, &new.key, &new.round, new.side, new.amount,
            )
            .await?
        {
            Some(row) => Ok(Some(self.complete(row, false).await?)),
            None => Ok(None),
        }
    }

    /// Places one new bet in its own wallet transaction, waiting for the
    /// user's wallet row if another movement holds it: the batch's steps
    /// (`placer::place_all`) for this bet alone.
    async fn place_alone(&self, new: &NewBet) -> Result<Option<Placed>, BettingError> {
        let (mut answers, jobs) = crate::placer::place_all(
            &self.parts(),
            std::slice::from_ref(new),
            &[tracing::Span::current()],
            true,
        )
        .await;
        jobs.send(&self.match_queue).await;
        let answer = answers.pop();
        match answer {
            Some(Ok(Batched::Placed(placed))) => Ok(Some(*placed)),
            Some(Ok(Batched::NotWritten)) => Ok(None),
            Some(Ok(Batched::Legacy)) => self.place_legacy(new).await,
            Some(Err(e)) => Err(e),
            // A waiting placement is never left to another path.
            Some(Ok(Batched::Alone)) | None => Err(BettingError::WalletUnavailable(
                WalletCallError::Malformed("a waiting placement's outcome"),
            )),
        }
    }

    /// The limits on a new bet (a new key): the minimum stake, then the
    /// open-bets cap. Never applied to a key already placed, whose retry
    /// gets its bet whatever the limits say now (they may have been raised
    /// since, on this instance or another, in a rolling change).
    async fn check_new_bet(&self, user: UserId, amount: Stake) -> Result<(), BettingError> {
        if amount.amount().as_decimal() < self.limits.min_stake {
            return Err(betting_domain::InvalidRequest::field(
                "amount",
                format!(
                    "must be at least {}",
                    betting_domain::format_money(self.limits.min_stake)
                ),
            )
            .into());
        }
        self.check_open_bets(user).await
    }

    /// Refuses a new bet of a user who holds the most open bets allowed.
    /// Checked only for a new key (a retry of a placed bet is answered as
    /// before) and before anything is written, so a refusal touches no money.
    ///
    /// Two PlaceBets of one user racing at the limit may both count
    /// `limit - 1` and both insert: the limit is soft by the user's
    /// concurrent PlaceBets (which the per-user rate bounds), never by more.
    /// An exact cap would need a per-user counter row that serialises every
    /// PlaceBet of the user; the soft one costs one index-only count.
    async fn check_open_bets(&self, user: UserId) -> Result<(), BettingError> {
        let limit = self.limits.max_open_bets;
        if limit == 0 {
            return Ok(());
        }
        if self.store.open_bets(user, limit).await? >= i64::from(limit) {
            return Err(betting_domain::LimitError::TooManyOpenBets { limit }.into());
        }
        Ok(())
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
        // Players cancel their own bets, and only they: a cancel moves money
        // (the refund), which no other role does on a player's behalf.
        let owner = Some(principal.own_player()?);
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

/// Who may read any user's bets (players read their own): operators.
const BET_READERS: &[Role] = &[Role::Admin];
/// Who may call GetBet at all: players (for their own bets) and [`BET_READERS`].
const BET_VIEWERS: &[Role] = &[Role::Player, Role::Admin];

fn visible_to(row: &BetRow, principal: &Principal) -> bool {
    row.status.is_visible() && principal.can_see(row.user_id, BET_READERS)
}
