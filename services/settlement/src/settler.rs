//! The settler role's payout handler (its refund handler is
//! `betting_refunds::RefundHandler`).
//!
//! Idempotent end to end: WalletService answers a repeated payment from the
//! original movement (key `SETTLE:{match_id}`), and the bookkeeping
//! afterwards is conditional on the state it moves from. A job run twice, or
//! on two settlers at once, pays once.

use betting_domain::{Amount, BetId, MatchId, MatchStatus, RoundStatus, Side, Stake, UserId};
use betting_jobs::{JobKind, SettleJob, SettleRoundJob, store_failure};
use betting_queue::{Handler, Job, JobError};
use betting_wallet_client::{WalletCallError, WalletClient};
use uuid::Uuid;

use crate::{RoundStore, store::MatchView};

/// Pays one match: `settle:{match_id}`.
#[derive(Clone)]
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
    #[tracing::instrument(name = "settle.match", skip(self), fields(match_id = %match_id))]
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
        let (user, payout, matched, bets) = payout_of(&view, winner)?;
        match self.wallet.pay_winnings(user, payout, matched, bets).await {
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
        Ok(self.record_paid(&[match_id], winner).await? > 0)
    }

    /// Records paid matches (each still OPEN, in one transaction), counts
    /// them and announces their bets; returns how many this call recorded.
    async fn record_paid(&self, matches: &[Uuid], winner: Side) -> Result<usize, JobError> {
        let changed = self
            .rounds
            .mark_matches_settled(matches, winner)
            .await
            .map_err(store_failure)?;
        let recorded = changed.len() / 2;
        metrics::counter!("matches_settled_total").increment(recorded as u64);
        if let Some(publisher) = &self.publisher
            && !changed.is_empty()
        {
            publisher.bets(changed).await;
        }
        Ok(recorded)
    }
}

/// What paying a match of a round `winner` won takes: the winner, twice
/// the stake, the match and its two bets.
fn payout_of(view: &MatchView, winner: Side) -> Result<Payout, JobError> {
    let winner_user = match winner {
        Side::A => view.user_a,
        Side::B => view.user_b,
    };
    let payout = Amount::try_from_decimal(view.amount)
        .and_then(Stake::new)
        .map(|stake| stake.payout())
        .map_err(|e| JobError::Permanent(format!("stake of match {}: {e}", view.match_id)))?;
    let user = UserId::new(winner_user).map_err(|e| JobError::Permanent(e.to_string()))?;
    Ok((
        user,
        payout,
        MatchId::from(view.match_id),
        [BetId::from(view.bet_a_id), BetId::from(view.bet_b_id)],
    ))
}

type Payout = (UserId, Amount, MatchId, [BetId; 2]);

/// Of two failures of one round job's batches, the one that buries the
/// least: an outage defers the job (no attempt used), a retry uses an
/// attempt, a permanent failure kills it. Money owed is never buried
/// because one batch found something down.
fn least_final(first: Option<JobError>, next: JobError) -> JobError {
    fn rank(e: &JobError) -> u8 {
        match e {
            JobError::Unavailable(_) => 0,
            JobError::Retry(_) => 1,
            JobError::Permanent(_) => 2,
        }
    }
    match first {
        Some(first) if rank(&first) <= rank(&next) => first,
        _ => next,
    }
}

/// Matches one wallet call pays: the wallet's limit per call, so a page is
/// never refused as a whole for its size (a whole-call failure defers the
/// job as the wallet being away would).
const ROUND_BATCH: i64 = betting_domain::MAX_MOVEMENTS_PER_CALL as i64;

/// Batches of one round in flight at once: while the wallet pays one batch,
/// the next is read and sent and the one before is recorded, so the round's
/// pace is not one batch's commits in a row.
///
/// Interleavings considered (see also ARCHITECTURE.md, "Interleavings and
/// crash points"): the batches are keyset pages over `match_id` (each read
/// starts after the last match of the page before), so two batches of one
/// job never hold the same match, and a per-match job or another settler
/// racing a batch is answered by the wallet's key `SETTLE:{match_id}` and
/// the conditional bookkeeping as before. Two batches may pay the same
/// winner: the wallet takes key locks, bet locks and wallet rows each in
/// one sorted order, so they take that wallet in turn and cannot deadlock.
/// A failure stops the reading of pages; the batches still in flight are
/// waited for and recorded before the job fails (so a dead job's count is
/// only money still unpaid). A crash drops them instead: a batch paid and
/// not recorded is replayed by the job's retry (the keys answer from the
/// first movements), never paid twice.
pub const ROUND_BATCHES_IN_FLIGHT: usize = 3;

impl SettleHandler {
    /// Pays every unpaid match of a settled round, a batch at a time
    /// ([`ROUND_BATCHES_IN_FLIGHT`] at once): one PayWinningsBatch call and
    /// one bookkeeping transaction per batch. Returns how many matches this
    /// call recorded as paid.
    ///
    /// The same steps as [`Self::settle`] for each match, so the same
    /// safety: every payout is keyed `SETTLE:{match_id}` (a batch paid
    /// before a crash, or by a per-match job racing this one, is replayed,
    /// never paid twice), verified by the wallet against the books, and the
    /// bookkeeping is conditional on the state it moves from. A failed call
    /// (the wallet away) defers the job; the batches already recorded stay
    /// recorded. A payout the wallet refuses is left unpaid and the round
    /// goes on past it; once the rest is paid the job fails for good, as a
    /// lone refused payout's does: dead, its money (the matches still
    /// unpaid) counted, until an operator requeues it.
    #[tracing::instrument(name = "settle.round", skip(self), fields(round_id = %round))]
    pub async fn settle_round(&self, round: &str) -> Result<usize, JobError> {
        use tracing::Instrument;

        // Each batch is a task of its own (the runtime runs them on every
        // core); dropping the set aborts those still running, as a crash
        // would stop them.
        let mut in_flight = tokio::task::JoinSet::new();
        let mut after = None;
        let mut read_all = false;
        let mut recorded = 0;
        let mut refused: Vec<Uuid> = Vec::new();
        // A failure stops the reading, not the batches in flight: they are
        // waited for and recorded, so a failure that is not a crash never
        // leaves a paid batch unrecorded behind the job (a dead job's count
        // would take its payouts, made already, as money still owed).
        let mut failure: Option<JobError> = None;
        let mut panicked = None;
        loop {
            while failure.is_none()
                && panicked.is_none()
                && !read_all
                && in_flight.len() < ROUND_BATCHES_IN_FLIGHT
            {
                let views = match self
                    .rounds
                    .open_match_views(round, after, ROUND_BATCH)
                    .await
                {
                    Ok(views) => views,
                    Err(e) => {
                        failure = Some(store_failure(e));
                        break;
                    }
                };
                let Some(last) = views.last() else {
                    read_all = true;
                    break;
                };
                after = Some(last.match_id);
                let (this, round) = (self.clone(), round.to_owned());
                in_flight.spawn(
                    async move { this.pay_round_batch(&round, views).await }
                        .instrument(tracing::Span::current()),
                );
            }
            let Some(joined) = in_flight.join_next().await else {
                break;
            };
            match joined {
                Ok(Ok((paid, mut refusals))) => {
                    recorded += paid;
                    refused.append(&mut refusals);
                }
                Ok(Err(e)) => failure = Some(least_final(failure.take(), e)),
                Err(e) if e.is_panic() => panicked = panicked.or(Some(e.into_panic())),
                Err(e) => {
                    let e = JobError::Unavailable(format!("a payout batch stopped: {e}"));
                    failure = Some(least_final(failure.take(), e));
                }
            }
        }
        if let Some(panic) = panicked {
            std::panic::resume_unwind(panic);
        }
        if let Some(failure) = failure {
            return Err(failure);
        }
        if refused.is_empty() {
            Ok(recorded)
        } else {
            // As a lone payout's refusal does: the job is dead, its money
            // (the refused matches, still unpaid) counted.
            Err(JobError::Permanent(format!(
                "the wallet refused the payouts of {} matches of round {round}, first {}",
                refused.len(),
                refused[0]
            )))
        }
    }

    /// One batch of [`Self::settle_round`]: pays it in one wallet call and
    /// records what was paid in one transaction. Returns the matches this
    /// call recorded and those whose payout the wallet refused.
    async fn pay_round_batch(
        &self,
        round: &str,
        views: Vec<MatchView>,
    ) -> Result<(usize, Vec<Uuid>), JobError> {
        let first = &views[0];
        if first.round_status != RoundStatus::Settled {
            return Err(JobError::Permanent(format!(
                "round {round} is {}, not SETTLED",
                first.round_status.as_db()
            )));
        }
        let winner = first
            .winning_side
            .ok_or_else(|| JobError::Permanent("settled round without a winner".into()))?;
        let payouts = views
            .iter()
            .map(|view| payout_of(view, winner))
            .collect::<Result<Vec<_>, _>>()?;
        let outcomes = self
            .wallet
            .pay_winnings_batch(&payouts)
            .await
            .map_err(|e| JobError::Unavailable(format!("wallet unavailable: {e}")))?;
        let mut paid = Vec::with_capacity(views.len());
        let mut refused = Vec::new();
        for (view, outcome) in views.iter().zip(outcomes) {
            match outcome {
                Ok(_) => paid.push(view.match_id),
                // The wallet away for this payout alone (it never says so
                // today): the job is deferred and the round retried.
                Err(e @ (WalletCallError::Unavailable(_) | WalletCallError::Malformed(_))) => {
                    return Err(JobError::Unavailable(e.to_string()));
                }
                // Left unpaid; the round goes on past it, and its job ends
                // dead once the rest is paid.
                Err(WalletCallError::Refused { reason, .. }) => {
                    tracing::error!(match_id = %view.match_id, reason, "the wallet refused a payout");
                    refused.push(view.match_id);
                }
            }
        }
        Ok((self.record_paid(&paid, winner).await?, refused))
    }
}

impl Handler for SettleHandler {
    async fn handle(&self, job: &Job) -> Result<(), JobError> {
        if SettleRoundJob::is(job) {
            let job = SettleRoundJob::decode(job)?;
            return self.settle_round(&job.round_id).await.map(|_| ());
        }
        let job = SettleJob::decode(job)?;
        self.settle(job.match_id).await.map(|_| ())
    }
}
