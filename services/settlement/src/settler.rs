//! The settler role's payout handler (its refund handler is
//! `betting_refunds::RefundHandler`).
//!
//! Idempotent end to end: WalletService answers a repeated payment from the
//! original movement (key `SETTLE:{match_id}`), and the bookkeeping
//! afterwards is conditional on the state it moves from. A job run twice, or
//! on two settlers at once, pays once.

use betting_domain::{Amount, BetId, MatchId, MatchStatus, RoundStatus, Side, Stake, UserId};
use betting_jobs::{JobKind, SettleJob, store_failure};
use betting_queue::{Handler, Job, JobError};
use betting_wallet_client::{WalletCallError, WalletClient};
use uuid::Uuid;

use crate::RoundStore;

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
            .map_err(store_failure)?
            .ok_or_else(|| JobError::Permanent(format!("match {match_id} does not exist")))?;
        if view.status != MatchStatus::Open {
            // Paid (or voided) already.
            return Ok(false);
        }
        if view.round_status != RoundStatus::Settled {
            return Err(JobError::Permanent(format!(
                "match {match_id} is in a round that is {}, not SETTLED",
                view.round_status.as_db()
            )));
        }
        let winner = view
            .winning_side
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
            Err(e @ WalletCallError::Malformed(_)) => {
                return Err(JobError::Unavailable(e.to_string()));
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
            .map_err(store_failure)?;
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
        let job = SettleJob::decode(job)?;
        self.settle(job.match_id).await.map(|_| ())
    }
}
