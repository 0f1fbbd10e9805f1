//! The suite's view of the wallet's internal StakeService
//! (`betting.internal.v1`): a gRPC client that authenticates as a service
//! and sorts the wallet's answers into "refused" and "try again".
//!
//! Betting holds stakes through it, the refund runner returns them and the
//! settler pays winners. Every call carries the movement's idempotency key
//! built by the domain (`BET:`, `REFUND:`, `SETTLE:`), so a call repeated
//! after a lost reply is answered from the original movement.

#![forbid(unsafe_code)]

use std::time::Duration;

use betting_api::{
    pb, pb_internal as pbi, pb_internal::stake_service_client::StakeServiceClient, reason_of,
};
use betting_auth::ServiceCredentials;
use betting_domain::{Amount, BetId, IdempotencyKey, MatchId, RoundId, Side, UserId};
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use tonic::{
    Code, Status,
    service::interceptor::InterceptedService,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};

/// Why a client could not be made.
#[derive(Debug, thiserror::Error)]
pub enum WalletClientError {
    #[error("invalid wallet endpoint")]
    Endpoint(#[source] tonic::transport::Error),
    /// An https:// endpoint needs a CA: it is never dialled in plaintext or
    /// unverified.
    #[error("an https:// wallet endpoint needs a CA to trust (BETTING_TLS_CA)")]
    HttpsWithoutCa,
    #[error("invalid wallet TLS settings")]
    Tls(#[source] tonic::transport::Error),
}

/// What an https:// wallet endpoint is dialled with, PEM.
#[derive(Clone, Copy)]
pub struct WalletTls<'a> {
    /// The CA certificates the wallet's certificate must chain to; the
    /// endpoint's host must be one of its names.
    pub ca: &'a [u8],
    /// Certificate and key presented to a wallet that requires mutual TLS.
    pub identity: Option<(&'a [u8], &'a [u8])>,
}

#[derive(Debug, thiserror::Error)]
pub enum WalletCallError {
    /// The wallet considered the call and said no (insufficient funds, ...);
    /// `reason` is its `ErrorInfo.reason`.
    #[error("wallet refused: {reason}")]
    Refused { reason: String, status: Status },
    /// The wallet could not be reached, failed, or did not consider the call
    /// at all: the same call may be retried, and an earlier attempt may have
    /// taken effect.
    #[error("wallet unavailable")]
    Unavailable(#[source] Status),
    /// The wallet answered OK without what every answer carries (a version
    /// skew, a bug): treated like an outage — retried, never taken as a
    /// refusal, since the movement may have happened.
    #[error("wallet answered without {0}")]
    Malformed(&'static str),
}

impl WalletCallError {
    fn from_status(status: Status) -> Self {
        match status.code() {
            // Our credentials were not accepted (a rotated secret, clock
            // skew): the wallet never looked at the request, so this says
            // nothing about the money. Retry once the credentials are right.
            Code::Unauthenticated | Code::PermissionDenied => WalletCallError::Unavailable(status),
            Code::FailedPrecondition
            | Code::AlreadyExists
            | Code::InvalidArgument
            | Code::NotFound => WalletCallError::Refused {
                reason: reason_of(&status).unwrap_or_else(|| status.code().to_string()),
                status,
            },
            _ => WalletCallError::Unavailable(status),
        }
    }

    pub fn is_insufficient_funds(&self) -> bool {
        matches!(self, WalletCallError::Refused { reason, .. } if reason == "INSUFFICIENT_FUNDS")
    }

    /// The wallet does not serve the call at all (UNIMPLEMENTED): a wallet of
    /// an older release, which predates PlaceStakes. Nothing was moved.
    pub fn is_unimplemented(&self) -> bool {
        matches!(self, WalletCallError::Unavailable(status) if status.code() == Code::Unimplemented)
    }

    /// A placement the wallet refused without writing anything: its round is
    /// not open, or its bet key names another bet
    /// ([`WalletClient::place_stakes`]).
    pub fn is_not_placed(&self) -> bool {
        matches!(self, WalletCallError::Refused { reason, .. }
            if reason == "ROUND_NOT_OPEN" || reason == "IDEMPOTENCY_KEY_REUSED")
    }
}

/// A new bet to place with its stake ([`WalletClient::place_stakes`]).
#[derive(Debug, Clone, Copy)]
pub struct Placement<'a> {
    pub bet: BetId,
    pub user: UserId,
    pub amount: Amount,
    pub round: &'a RoundId,
    pub side: Side,
    /// The PlaceBet's idempotency key.
    pub key: &'a IdempotencyKey,
}

/// One hold's answer in a [`WalletClient::hold_stakes`] batch.
#[derive(Debug)]
pub enum Hold {
    /// Held; the balance right after, and for a placement whose bet row
    /// this call wrote, when (the row is then PENDING at version 1, as
    /// asked: `HoldStakeOutcome.bet_written_at`).
    Held {
        balance: Decimal,
        bet_written_at: Option<DateTime<Utc>>,
    },
    /// The user's wallet row was held by another movement, so the batch
    /// left this hold undecided (nothing recorded): hold it alone.
    Busy,
    /// What [`WalletClient::hold_stake`] would have answered instead.
    Failed(WalletCallError),
}

#[derive(Clone)]
pub struct WalletClient {
    inner: StakeServiceClient<InterceptedService<Channel, ServiceCredentials>>,
}

impl WalletClient {
    /// A lazily connecting client over plaintext: nothing is dialled until
    /// the first call. An https:// endpoint is refused (see [`Self::with_tls`]).
    pub fn new(endpoint: &str, credentials: ServiceCredentials) -> Result<Self, WalletClientError> {
        Self::with_tls(endpoint, credentials, None)
    }

    /// A lazily connecting client; an https:// endpoint is dialled over TLS
    /// with `tls`, and refused without it. An http:// endpoint is plaintext.
    pub fn with_tls(
        endpoint: &str,
        credentials: ServiceCredentials,
        tls: Option<WalletTls<'_>>,
    ) -> Result<Self, WalletClientError> {
        let mut channel =
            Endpoint::from_shared(endpoint.to_owned()).map_err(WalletClientError::Endpoint)?;
        if channel.uri().scheme_str() == Some("https") {
            let tls = tls.ok_or(WalletClientError::HttpsWithoutCa)?;
            let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(tls.ca));
            if let Some((cert, key)) = tls.identity {
                config = config.identity(Identity::from_pem(cert, key));
            }
            channel = channel.tls_config(config).map_err(WalletClientError::Tls)?;
        }
        let channel = channel
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(10))
            .tcp_nodelay(true)
            .connect_lazy();
        Ok(Self {
            inner: StakeServiceClient::with_interceptor(channel, credentials),
        })
    }

    /// Holds a bet's stake; returns the balance right after.
    pub async fn hold_stake(
        &self,
        user: UserId,
        amount: Amount,
        bet: BetId,
    ) -> Result<Decimal, WalletCallError> {
        let response = self
            .inner
            .clone()
            .hold_stake(within_deadline(hold_request(user, amount, bet)))
            .await
            .map_err(WalletCallError::from_status)?;
        balance_of(response.into_inner().wallet)
    }

    /// Holds many bets' stakes in one call and one transaction: for each
    /// `(user, stake, bet)`, in order, what [`Self::hold_stake`] would have
    /// answered. An `Err` of the whole call decided nothing we may rely on
    /// (the wallet may still have committed it: its holds are retried by key).
    pub async fn hold_stakes(
        &self,
        holds: &[(UserId, Amount, BetId)],
    ) -> Result<Vec<Hold>, WalletCallError> {
        let response = self
            .inner
            .clone()
            .hold_stakes(within_deadline(pbi::HoldStakesRequest {
                holds: holds
                    .iter()
                    .map(|&(user, amount, bet)| hold_request(user, amount, bet))
                    .collect(),
            }))
            .await
            .map_err(WalletCallError::from_status)?;
        let outcomes = response.into_inner().outcomes;
        if outcomes.len() != holds.len() {
            return Err(WalletCallError::Malformed("one outcome per hold"));
        }
        Ok(outcomes.into_iter().map(hold_outcome).collect())
    }

    /// Places new bets in one call and one wallet transaction: each bet's
    /// stake held and its row written together (PENDING, or REJECTED for
    /// want of funds), in order. `Held` is a placed bet; a refusal for which
    /// [`WalletCallError::is_not_placed`] holds wrote nothing. With `wait`
    /// (one placement), a busy wallet row is waited for rather than answered
    /// `Busy`. An `Err` of the whole call decided nothing we may rely on:
    /// the bets may be placed, and are found by their keys.
    pub async fn place_stakes(
        &self,
        placements: &[Placement<'_>],
        wait: bool,
    ) -> Result<Vec<Hold>, WalletCallError> {
        let response = self
            .inner
            .clone()
            .place_stakes(within_deadline(pbi::PlaceStakesRequest {
                placements: placements
                    .iter()
                    .map(|p| pbi::StakePlacement {
                        hold: Some(hold_request(p.user, p.amount, p.bet)),
                        round_id: p.round.as_str().to_owned(),
                        side: betting_api::convert::side_to_pb(p.side) as i32,
                        bet_key: p.key.as_str().to_owned(),
                    })
                    .collect(),
                wait,
            }))
            .await
            .map_err(WalletCallError::from_status)?;
        let outcomes = response.into_inner().outcomes;
        if outcomes.len() != placements.len() {
            return Err(WalletCallError::Malformed("one outcome per placement"));
        }
        Ok(outcomes.into_iter().map(hold_outcome).collect())
    }

    /// Returns a bet's stake; returns the balance right after.
    pub async fn refund_stake(
        &self,
        user: UserId,
        amount: Amount,
        bet: BetId,
    ) -> Result<Decimal, WalletCallError> {
        let response = self
            .inner
            .clone()
            .refund_stake(within_deadline(pbi::RefundStakeRequest {
                user_id: user.get(),
                amount: amount.to_string(),
                idempotency_key: IdempotencyKey::refund(bet).to_string(),
                bet_id: bet.to_string(),
            }))
            .await
            .map_err(WalletCallError::from_status)?;
        balance_of(response.into_inner().wallet)
    }
}

impl WalletClient {
    /// Pays a match's winner twice the stake; returns the winner's balance right after.
    pub async fn pay_winnings(
        &self,
        winner: UserId,
        payout: Amount,
        matched: MatchId,
        bets: [BetId; 2],
    ) -> Result<Decimal, WalletCallError> {
        let response = self
            .inner
            .clone()
            .pay_winnings(within_deadline(pbi::PayWinningsRequest {
                user_id: winner.get(),
                amount: payout.to_string(),
                idempotency_key: IdempotencyKey::settle(matched).to_string(),
                match_id: matched.to_string(),
                bet_ids: bets.iter().map(ToString::to_string).collect(),
            }))
            .await
            .map_err(WalletCallError::from_status)?;
        balance_of(response.into_inner().wallet)
    }
}

impl WalletClient {
    /// Pays many matches in one call and one transaction: for each
    /// `(winner, payout, match, bets)`, in order, what [`Self::pay_winnings`]
    /// would have answered. An `Err` of the whole call decided nothing we
    /// may rely on (it is retried, by key).
    pub async fn pay_winnings_batch(
        &self,
        payouts: &[(UserId, Amount, MatchId, [BetId; 2])],
    ) -> Result<Vec<Result<Decimal, WalletCallError>>, WalletCallError> {
        let response = self
            .inner
            .clone()
            .pay_winnings_batch(within_deadline(pbi::PayWinningsBatchRequest {
                payouts: payouts
                    .iter()
                    .map(|&(winner, payout, matched, bets)| pbi::PayWinningsRequest {
                        user_id: winner.get(),
                        amount: payout.to_string(),
                        idempotency_key: IdempotencyKey::settle(matched).to_string(),
                        match_id: matched.to_string(),
                        bet_ids: bets.iter().map(ToString::to_string).collect(),
                    })
                    .collect(),
            }))
            .await
            .map_err(WalletCallError::from_status)?;
        let outcomes = response.into_inner().outcomes;
        if outcomes.len() != payouts.len() {
            return Err(WalletCallError::Malformed("one outcome per payout"));
        }
        Ok(outcomes
            .into_iter()
            .map(|outcome| {
                use pbi::payout_outcome::Outcome;
                match outcome.outcome {
                    Some(Outcome::Paid(paid)) => balance_of(paid.wallet),
                    Some(Outcome::Refused(r)) => Err(WalletCallError::from_status(
                        betting_api::refusal_status(r.code, &r.reason, r.message),
                    )),
                    None => Err(WalletCallError::Malformed("an outcome")),
                }
            })
            .collect())
    }
}

/// A request that carries the current request's remaining time
/// ([`betting_deadline`]) as its `grpc-timeout`: WalletService stops working
/// on it, and releases its locks, when the caller's own client gives up.
/// Outside a request the channel's timeout applies. It also carries the
/// current span's trace context (W3C `traceparent`), so WalletService's span
/// of the call joins the caller's trace.
fn within_deadline<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(left) = betting_deadline::remaining() {
        request.set_timeout(left);
    }
    for (key, value) in betting_telemetry::trace::current().into_iter().flatten() {
        if let (Ok(key), Ok(value)) = (
            tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
            value.parse(),
        ) {
            request.metadata_mut().insert(key, value);
        }
    }
    request
}

/// A bet's stake to hold, under its key `BET:{bet_id}`.
fn hold_request(user: UserId, amount: Amount, bet: BetId) -> pbi::HoldStakeRequest {
    pbi::HoldStakeRequest {
        user_id: user.get(),
        amount: amount.to_string(),
        idempotency_key: IdempotencyKey::stake(bet).to_string(),
        bet_id: bet.to_string(),
    }
}

/// One hold's outcome, sorted like a HoldStake's answer: a refusal keeps
/// its code and reason, so `is_insufficient_funds` reads it the same.
fn hold_outcome(outcome: pbi::HoldStakeOutcome) -> Hold {
    use pbi::hold_stake_outcome::Outcome;
    match outcome.outcome {
        Some(Outcome::Held(held)) => match balance_of(held.wallet) {
            Ok(balance) => Hold::Held {
                balance,
                // Only a row this call wrote is vouched for: a replay's row
                // may have moved on since (MATCHED, SETTLED), so it is read.
                bet_written_at: match outcome.bet_written_at.map(betting_api::convert::datetime) {
                    _ if outcome.replayed => None,
                    Some(None) => return Hold::Failed(WalletCallError::Malformed("a bet's time")),
                    Some(Some(at)) => Some(at),
                    None => None,
                },
            },
            Err(e) => Hold::Failed(e),
        },
        Some(Outcome::Refused(refused)) if refused.reason == "USER_BUSY" => Hold::Busy,
        Some(Outcome::Refused(refused)) => Hold::Failed(WalletCallError::from_status(
            betting_api::refusal_status(refused.code, &refused.reason, refused.message),
        )),
        None => Hold::Failed(WalletCallError::Malformed("an outcome")),
    }
}

fn balance_of(wallet: Option<pb::Wallet>) -> Result<Decimal, WalletCallError> {
    wallet
        .and_then(|w| w.balance.parse::<Decimal>().ok())
        .ok_or(WalletCallError::Malformed("a balance"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(replayed: bool) -> pbi::HoldStakeOutcome {
        pbi::HoldStakeOutcome {
            outcome: Some(pbi::hold_stake_outcome::Outcome::Held(
                pbi::HoldStakeResponse {
                    entry: None,
                    wallet: Some(pb::Wallet {
                        balance: "7".into(),
                        ..Default::default()
                    }),
                },
            )),
            replayed,
            bet_written_at: Some(prost_types::Timestamp {
                seconds: 1_800_000_000,
                nanos: 123_456_000,
            }),
        }
    }

    /// Found by the attack review: a replayed outcome that carried a
    /// write time (a wallet bug, a proxy) had its bet answered PENDING at
    /// version 1, though the row may have been MATCHED or SETTLED since.
    /// Only a row the call wrote is vouched for.
    #[test]
    fn a_replayed_outcome_never_vouches_for_the_row() {
        let Hold::Held { bet_written_at, .. } = hold_outcome(held(true)) else {
            panic!("held");
        };
        assert_eq!(bet_written_at, None);
        let Hold::Held {
            balance,
            bet_written_at,
        } = hold_outcome(held(false))
        else {
            panic!("held");
        };
        assert_eq!(balance, Decimal::from(7));
        assert_eq!(
            bet_written_at,
            DateTime::from_timestamp(1_800_000_000, 123_456_000)
        );
    }

    /// Found by the simulation (seeds 3 and 6 of its first runs): a wallet
    /// call refused for our credentials was taken as a refusal of the money,
    /// so a settle job died at once and a cancel answered INTERNAL. The wallet
    /// never looked at such a call: it is retried.
    #[test]
    fn a_refused_credential_is_not_a_refusal_of_the_money() {
        for code in [Code::Unauthenticated, Code::PermissionDenied] {
            assert!(matches!(
                WalletCallError::from_status(Status::new(code, "no")),
                WalletCallError::Unavailable(_)
            ));
        }
        assert!(matches!(
            WalletCallError::from_status(Status::new(Code::FailedPrecondition, "no")),
            WalletCallError::Refused { .. }
        ));
    }
}
