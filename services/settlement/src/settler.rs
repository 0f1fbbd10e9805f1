//! The settler role's job handlers: pay matches, carry out refunds.
//!
//! Both are idempotent end to end: WalletService answers a repeated payment or
//! refund from the original movement (keys `SETTLE:{match_id}` and
//! `REFUND:{bet_id}`), and the bookkeeping afterwards is conditional on the
//! state it moves from. A job run twice, or on two settlers at once, pays once.

use betting_bets::{BettingError, CommandRunner, WalletCallError, WalletClient};
use betting_domain::{Amount, BetId, MatchId, Side, Stake, UserId};
use betting_queue::{Handler, Job, JobError};
use uuid::Uuid;

use crate::{RoundStore, SettlementError};

/// Pays one match: `settle:{match_id}`.
pub struct SettleHandler {
    rounds: RoundStore,
    wallet: WalletClient,
    publisher: Option<betting_streams::Publisher>,
}

impl SettleHandler {
    pub fn new(rounds: RoundStore, wallet: WalletClient) -> Self {
        Self {
            rounds,
            wallet,
            publisher: None,
        }
    }

    /// Announces settled bets to live streams.
    pub fn with_publisher(mut self, publisher: betting_streams::Publisher) -> Self {
        self.publisher = Some(publisher);
        self
    }

    /// Pays the match if it is due; returns whether this call recorded it.
    pub async fn settle(&self, match_id: Uuid) -> Result<bool, JobError> {
        let view = self
            .rounds
            .match_view(match_id)
            .await
            .map_err(retry)?
            .ok_or_else(|| JobError::Permanent(format!("match {match_id} does not exist")))?;
        if view.status != "OPEN" {
            // Paid (or voided) already.
            return Ok(false);
        }
        if view.round_status != "SETTLED" {
            return Err(JobError::Permanent(format!(
                "match {match_id} is in a round that is {}, not SETTLED",
                view.round_status
            )));
        }
        let winner = view
            .winning_side
            .as_deref()
            .and_then(Side::from_db)
            .ok_or_else(|| JobError::Permanent("settled round without a winner".into()))?;
        let winner_user = match winner {
            Side::A => view.user_a,
            Side::B => view.user_b,
        };
        let payout = Amount::try_from_decimal(view.amount)
            .and_then(Stake::new)
            .map(|stake| stake.payout())
            .map_err(|e| JobError::Permanent(format!("stake of match {match_id}: {e}")))?;
        let user = UserId::new(winner_user).map_err(|e| JobError::Permanent(e.to_string()))?;
        match self
            .wallet
            .pay_winnings(
                user,
                payout,
                MatchId::from(match_id),
                [BetId::from(view.bet_a_id), BetId::from(view.bet_b_id)],
            )
            .await
        {
            Ok(_) => {}
            Err(WalletCallError::Unavailable(status)) => {
                return Err(JobError::Unavailable(format!(
                    "wallet unavailable: {}",
                    status.message()
                )));
            }
            Err(WalletCallError::Refused { reason, status }) => {
                return Err(JobError::Permanent(format!(
                    "wallet refused payout of match {match_id}: {reason}: {}",
                    status.message()
                )));
            }
        }
        let changed = self
            .rounds
            .mark_match_settled(match_id, winner)
            .await
            .map_err(retry)?;
        if changed.is_empty() {
            return Ok(false);
        }
        metrics::counter!("matches_settled_total").increment(1);
        if let Some(publisher) = &self.publisher {
            publisher.bets(changed).await;
        }
        Ok(true)
    }
}

impl Handler for SettleHandler {
    async fn handle(&self, job: &Job) -> Result<(), JobError> {
        let match_id = job
            .payload
            .get("match_id")
            .and_then(|v| v.as_str())
            .and_then(|s| Uuid::try_parse(s).ok())
            .ok_or_else(|| JobError::Permanent("payload has no match_id".into()))?;
        self.settle(match_id).await.map(|_| ())
    }
}

/// Carries out one owed refund: `refund:REFUND:{bet_id}`.
pub struct RefundHandler {
    runner: CommandRunner,
}

impl RefundHandler {
    pub fn new(runner: CommandRunner) -> Self {
        Self { runner }
    }
}

impl Handler for RefundHandler {
    async fn handle(&self, job: &Job) -> Result<(), JobError> {
        let key = job
            .payload
            .get("key")
            .and_then(|v| v.as_str())
            .ok_or_else(|| JobError::Permanent("payload has no key".into()))?;
        match self.runner.execute_key(key).await {
            Ok(_) => Ok(()),
            // An outage uses up no attempt: the refund is owed until done.
            Err(e @ (BettingError::WalletUnavailable(_) | BettingError::Unavailable(_))) => {
                Err(JobError::Unavailable(e.to_string()))
            }
            Err(e) => Err(JobError::Retry(format!(
                "{e}: {:?}",
                std::error::Error::source(&e).map(ToString::to_string)
            ))),
        }
    }
}

fn retry(e: SettlementError) -> JobError {
    match e {
        SettlementError::Unavailable(_) => JobError::Unavailable(e.to_string()),
        e => JobError::Retry(e.to_string()),
    }
}
