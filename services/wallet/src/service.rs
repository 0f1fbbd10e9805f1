//! WalletService's operations: parse, authorise, post. They take the
//! caller's `Principal` and the request's plain values, and answer with
//! ledger rows or a [`WalletError`]; the server's gRPC adapter converts
//! to and from the wire.

use betting_auth::{Principal, Role};
use betting_db::actions::Actor;
use betting_domain::{
    Amount, BetId, EntryKind, IdempotencyKey, InvalidRequest, MatchId, Reference, RoundId, Side,
    Stake, UserId, Violations,
};
use sqlx::PgPool;

use crate::{BetPlacement, Entry, Guard, Ledger, Posted, Transfer, WalletError, WalletView};

/// A page of ledger entries, newest first.
#[derive(Debug)]
pub struct EntryPage {
    pub entries: Vec<Entry>,
    /// Whether older entries follow the last one.
    pub more: bool,
}

/// Who may read any user's wallet (players read their own).
const WALLET_READERS: &[Role] = &[Role::Service, Role::Cashier, Role::Admin];
/// Who may read any user's ledger (players read their own).
const LEDGER_READERS: &[Role] = &[Role::Cashier, Role::Admin];
/// Money from and to outside: the payments desk only. Not admin
/// (separation of duties: whoever audits the books moves no money).
const CASHIERS: &[Role] = &[Role::Cashier];
/// HoldStake, RefundStake, PayWinnings: our own processes only.
const SERVICES: &[Role] = &[Role::Service];

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

    /// GetWallet: the caller's wallet, or any user's for [`WALLET_READERS`].
    pub async fn wallet(
        &self,
        principal: &Principal,
        user_id: i64,
    ) -> Result<WalletView, WalletError> {
        let user = principal.resolve_user(user_id, WALLET_READERS)?;
        self.ledger.wallet(user).await
    }

    /// Deposit: money in from outside; cashiers only.
    pub async fn deposit(
        &self,
        principal: &Principal,
        user_id: i64,
        amount: &str,
        key: &str,
        reference: &str,
    ) -> Result<Posted, WalletError> {
        self.external(
            principal,
            EntryKind::Deposit,
            user_id,
            amount,
            key,
            reference,
        )
        .await
    }

    /// Withdraw: money out; cashiers only.
    pub async fn withdraw(
        &self,
        principal: &Principal,
        user_id: i64,
        amount: &str,
        key: &str,
        reference: &str,
    ) -> Result<Posted, WalletError> {
        self.external(
            principal,
            EntryKind::Withdrawal,
            user_id,
            amount,
            key,
            reference,
        )
        .await
    }

    /// ListLedgerEntries: one page of a user's entries, newest first. `page`
    /// is the parsed page size and cursor (an entry id), or what was wrong
    /// with them; it is looked at only once the caller may see the user.
    pub async fn entries(
        &self,
        principal: &Principal,
        user_id: i64,
        page: Result<(i64, Option<i64>), InvalidRequest>,
    ) -> Result<EntryPage, WalletError> {
        let user = principal.resolve_user(user_id, LEDGER_READERS)?;
        let (limit, before) = page?;
        // One more than asked tells whether another page exists.
        let mut entries = self.ledger.entries(user, before, limit + 1).await?;
        let more = entries.len() as i64 > limit;
        entries.truncate(limit as usize);
        Ok(EntryPage { entries, more })
    }

    /// HoldStake: a bet's stake into escrow, keyed `BET:{bet_id}`; services only.
    pub async fn hold_stake(
        &self,
        principal: &Principal,
        user_id: i64,
        amount: &str,
        key: &str,
        bet_id: &str,
    ) -> Result<Posted, WalletError> {
        self.internal(principal, EntryKind::Stake, user_id, amount, key, bet_id)
            .await
    }

    /// RefundStake: a bet's stake back, keyed `REFUND:{bet_id}`; services only,
    /// and only for a bet the betting side refunded (`due.rs`).
    pub async fn refund_stake(
        &self,
        principal: &Principal,
        user_id: i64,
        amount: &str,
        key: &str,
        bet_id: &str,
    ) -> Result<Posted, WalletError> {
        self.internal(principal, EntryKind::Refund, user_id, amount, key, bet_id)
            .await
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
        principal.require(CASHIERS)?;
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
                actor: Some(Actor::new(&principal.subject, principal.role.as_str())),
                bet: None,
            })
            .await
    }

    /// HoldStakes: many HoldStakes in one transaction; services only. Each
    /// hold is parsed and answered on its own (a malformed hold is refused
    /// alone, as HoldStake would refuse it); an `Err` of the whole call
    /// decided nothing.
    pub async fn hold_stakes(
        &self,
        principal: &Principal,
        holds: &[StakeHold<'_>],
    ) -> Result<Vec<Result<Posted, WalletError>>, WalletError> {
        principal.require(SERVICES)?;
        let parsed = parse_batch("holds", holds, |h| {
            internal_transfer(EntryKind::Stake, h.user_id, h.amount, h.key, h.bet_id)
        })?;
        let posted =
            betting_db::timed("hold_stakes", self.ledger.hold_stakes(&valid(&parsed))).await?;
        Ok(reassemble(parsed, posted))
    }

    /// PlaceStakes: new bets, each with its stake, in one transaction
    /// (`placement.rs`); services only. Each placement is parsed and
    /// answered on its own; an `Err` of the whole call decided nothing.
    /// With `wait`, the call carries exactly one placement.
    pub async fn place_stakes(
        &self,
        principal: &Principal,
        placements: &[StakePlacementAsk<'_>],
        wait: bool,
    ) -> Result<Vec<Result<Posted, WalletError>>, WalletError> {
        principal.require(SERVICES)?;
        if wait && placements.len() != 1 {
            return Err(InvalidRequest::field(
                "placements",
                "must carry exactly one placement with wait",
            )
            .into());
        }
        let parsed = parse_batch("placements", placements, placement_transfer)?;
        let posted = betting_db::timed(
            "place_stakes",
            self.ledger.place_stakes(&valid(&parsed), wait),
        )
        .await?;
        Ok(reassemble(parsed, posted))
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
        principal.require(SERVICES)?;
        let transfer = internal_transfer(kind, user_id, amount, key, bet_id)?;
        self.ledger.post(&transfer).await
    }

    /// PayWinnings: twice the stake, once per match, to the owner of its
    /// winning bet, once its round is settled (`due.rs`). Services only.
    pub async fn pay_winnings(
        &self,
        principal: &Principal,
        user_id: i64,
        amount: &str,
        match_id: &str,
        key: &str,
        bet_ids: &[String],
    ) -> Result<Posted, WalletError> {
        principal.require(SERVICES)?;
        let transfer = payout_transfer(&PayoutAsk {
            user_id,
            amount,
            match_id,
            key,
            bet_ids,
        })?;
        self.ledger.post(&transfer).await
    }

    /// PayWinningsBatch: many PayWinnings in one transaction; services
    /// only. Each payout is parsed, verified and answered on its own; an
    /// `Err` of the whole call decided nothing.
    pub async fn pay_winnings_batch(
        &self,
        principal: &Principal,
        payouts: &[PayoutAsk<'_>],
    ) -> Result<Vec<Result<Posted, WalletError>>, WalletError> {
        principal.require(SERVICES)?;
        let parsed = parse_batch("payouts", payouts, payout_transfer)?;
        let posted = betting_db::timed(
            "pay_winnings_batch",
            self.ledger.pay_winnings_batch(&valid(&parsed)),
        )
        .await?;
        Ok(reassemble(parsed, posted))
    }
}

/// One payout of a PayWinnings or PayWinningsBatch call, as the wire gave it.
#[derive(Debug, Clone, Copy)]
pub struct PayoutAsk<'a> {
    pub user_id: i64,
    pub amount: &'a str,
    pub match_id: &'a str,
    pub key: &'a str,
    pub bet_ids: &'a [String],
}

/// A PayWinnings movement, parsed: the key `SETTLE:{match_id}`, the match's
/// two bets, each of which staked half of the amount.
fn payout_transfer(ask: &PayoutAsk<'_>) -> Result<Transfer, WalletError> {
    let mut v = Violations::default();
    let user = v.check("user_id", UserId::new(ask.user_id));
    let amount = v.check("amount", Amount::parse(ask.amount));
    let matched = v.check("match_id", MatchId::parse(ask.match_id));
    let key = v.check("idempotency_key", IdempotencyKey::parse(ask.key));
    let bet_ids = ask.bet_ids;
    let bets: Option<Vec<BetId>> = if bet_ids.len() == 2 {
        let a = v.check("bet_ids", BetId::parse(&bet_ids[0]));
        let b = v.check("bet_ids", BetId::parse(&bet_ids[1]));
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
    Ok(Transfer {
        kind: EntryKind::Payout,
        user,
        amount,
        key,
        reference: matched.to_string(),
        guard: Guard::Payout {
            match_id: matched.as_uuid(),
            bets: [bets[0].as_uuid(), bets[1].as_uuid()],
            stake,
        },
        actor: None,
        bet: None,
    })
}

/// A batch call's movements, each parsed on its own (a malformed one is
/// refused alone); the call itself is refused when it carries none or more
/// than [`MAX_HOLDS_PER_CALL`].
fn parse_batch<T>(
    field: &'static str,
    asks: &[T],
    parse: impl Fn(&T) -> Result<Transfer, WalletError>,
) -> Result<Vec<Result<Transfer, WalletError>>, WalletError> {
    if asks.is_empty() || asks.len() > MAX_HOLDS_PER_CALL {
        return Err(InvalidRequest::field(
            field,
            format!("must carry between 1 and {MAX_HOLDS_PER_CALL} movements"),
        )
        .into());
    }
    Ok(asks.iter().map(parse).collect())
}

/// The movements of a batch that parsed, for the ledger.
fn valid(parsed: &[Result<Transfer, WalletError>]) -> Vec<Transfer> {
    parsed
        .iter()
        .filter_map(|p| p.as_ref().ok())
        .cloned()
        .collect()
}

/// Every movement's answer in request order: the ledger's for those that
/// parsed (in the order they were given to it), the parse's refusal for
/// the others.
fn reassemble(
    parsed: Vec<Result<Transfer, WalletError>>,
    posted: Vec<Result<Posted, WalletError>>,
) -> Vec<Result<Posted, WalletError>> {
    let mut posted = posted.into_iter();
    parsed
        .into_iter()
        .map(|p| match p {
            Ok(_) => posted
                .next()
                .unwrap_or(Err(WalletError::IdempotencyConflict)),
            Err(e) => Err(e),
        })
        .collect()
}

/// The most movements one HoldStakes or PayWinningsBatch call may carry.
pub const MAX_HOLDS_PER_CALL: usize = betting_domain::MAX_MOVEMENTS_PER_CALL;

/// One hold of a HoldStakes call, as the wire gave it.
#[derive(Debug, Clone, Copy)]
pub struct StakeHold<'a> {
    pub user_id: i64,
    pub amount: &'a str,
    pub key: &'a str,
    pub bet_id: &'a str,
}

/// One placement of a PlaceStakes call, as the wire gave it.
#[derive(Debug, Clone, Copy)]
pub struct StakePlacementAsk<'a> {
    pub hold: StakeHold<'a>,
    pub round_id: &'a str,
    /// The wire's side, parsed (or what is wrong with it).
    pub side: Result<Side, &'static str>,
    pub bet_key: &'a str,
}

/// A placement, parsed: its stake as HoldStake's, with the bet it is for.
fn placement_transfer(ask: &StakePlacementAsk<'_>) -> Result<Transfer, WalletError> {
    let h = ask.hold;
    let mut v = Violations::default();
    let round = v.check("round_id", RoundId::parse(ask.round_id));
    let side = v.check("side", ask.side);
    let key = v.check("bet_key", IdempotencyKey::parse(ask.bet_key));
    // A bet's stake, bounded as PlaceBet bounds it: a bet the settler could
    // not pay (twice the stake) is never written.
    if Amount::parse(h.amount).is_ok() {
        v.check("amount", Stake::parse(h.amount));
    }
    let transfer = internal_transfer(EntryKind::Stake, h.user_id, h.amount, h.key, h.bet_id);
    let (Some(round), Some(side), Some(key), true) = (round, side, key, v.is_empty()) else {
        // The stake's own violations, if any, and the bet's together.
        let mut violations = match transfer {
            Err(WalletError::Invalid(e)) => e.0,
            _ => Vec::new(),
        };
        violations.extend(v.into_error().0);
        return Err(InvalidRequest(violations).into());
    };
    let mut transfer = transfer?;
    transfer.bet = Some(BetPlacement { round, side, key });
    Ok(transfer)
}

/// A HoldStake's or RefundStake's movement, parsed: keys of a fixed shape
/// (`BET:{bet_id}`, `REFUND:{bet_id}`), whatever the caller sends.
fn internal_transfer(
    kind: EntryKind,
    user_id: i64,
    amount: &str,
    key: &str,
    bet_id: &str,
) -> Result<Transfer, WalletError> {
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
    Ok(Transfer {
        kind,
        user,
        amount,
        key,
        reference: bet.to_string(),
        guard,
        actor: None,
        bet: None,
    })
}
