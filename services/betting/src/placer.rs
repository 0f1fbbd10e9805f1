//! Group commit for new bets: concurrent PlaceBets of new keys are placed
//! together, one wallet transaction and one commit per batch.
//!
//! A new bet is one fact: its stake held and its row written, together.
//! The wallet writes both in its hold's transaction (PlaceStakes,
//! `services/wallet/src/placement.rs`, which has the protocol and its
//! interleavings), so a batch is:
//!
//! 1. one `PlaceStakes` call: every bet's stake held and its row written
//!    `PENDING` (or `REJECTED` for want of funds), each with its own outcome
//!    (one user's insufficient funds never fails the batch; a bet whose
//!    round is not open or whose key is taken writes nothing, and its caller
//!    finds out why as a lone PlaceBet does; a bet whose wallet row another
//!    movement holds is left to the lone path, so one held row never stalls
//!    the batch);
//! 2. the placed rows (as the wallet wrote them, or read back); their
//!    change notes go out in one
//!    message, the callers are answered, and then one match job goes out per
//!    (round, stake) group of the batch (the matcher matches a job's whole
//!    group; [`MatchJobs`]).
//!
//! Batching changes no outcome and no crash point, only how many bets share
//! a commit:
//!
//! - a crash, a failed call or a lost reply leaves each bet of the batch
//!   placed or not, never half-placed; each client's retry finds its bet by
//!   key (placed: answered from the row; not: placed now). A placed bet's
//!   match job and note are re-derived by the reconciler and the streams'
//!   sweep;
//! - a client retry racing its original, in the same batch or two: the
//!   wallet writes one row per key, and the other placement writes nothing
//!   and is answered from that row by the lone path (`find_by_key`);
//! - a caller that gives up (its deadline, a cancel) does not stop its
//!   batch, which other callers share: its bet is placed as if it had
//!   waited, and its retry finds it by key — except a bet whose wallet row
//!   was busy, which the batch hands back to its caller to place alone:
//!   with the caller gone it is not placed and nothing is taken
//!   (`attack11_a_gone_callers_busy_bet_is_not_placed`). The batch runs
//!   within the latest deadline of its callers, so none of them is cut
//!   short by another's.
//!
//! Batches form by themselves: a request that finds the batch slot free goes
//! at once (a lone bet waits for nobody); while the slot is busy
//! ([`SLOTS`]), requests queue and the next batch takes all of them (up to
//! [`MAX_BATCH`]).

use std::{collections::HashMap, sync::Arc};

use betting_domain::BetId;
use betting_queue::Queue;
use betting_streams::{Changes, Publisher};
use betting_wallet_client::{Hold, Placement, WalletCallError, WalletClient};
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tracing::Instrument;
use uuid::Uuid;

use betting_jobs::MatchJob;

#[cfg(feature = "fault-injection")]
use crate::Faults;
use crate::{BetRow, BetStore, BettingError, Placed, store::NewBet};

/// The most bets one batch carries (and one HoldStakes call: the wallet's
/// `MAX_HOLDS_PER_CALL`).
pub const MAX_BATCH: usize = betting_domain::MAX_MOVEMENTS_PER_CALL;

/// Batches in flight at once: while one runs, the next one gathers.
///
/// One, measured (BENCHMARKS.md, 2026-12-08: four pairs of alternating
/// builds, each a closed loop of 64 clients then an open loop at 1,000
/// bets/s). The machine is bound by CPU, and a free slot starts a batch at
/// once, so the placer runs as many transactions as its slots allow
/// whatever the load: at 1,000 bets/s two slots ran about 400 batches a
/// second of 2.4 bets each, each paying its five statements and its commit.
/// One slot runs about half as many, twice as large: PostgreSQL used 7.2–7.4
/// CPU-seconds where two slots used 8.8–9.0 (the server 4.8–5.1 against
/// 5.6–5.9), and with the machine less busy each statement waits less for a
/// CPU. The open loop's p99 was lower in all four pairs (12.2–15.7 ms
/// against 13.7–19.7), and the closed loop placed more in three of four
/// (4,164–5,017 bets/s against 3,878–4,878). Earlier measurements (session
/// 13: two slots against four and eight) went the same way, fewer and
/// larger batches, when each batch took three commits.
///
/// What the one slot waits for: the batch's PlaceStakes call (the wallet's
/// pool and its statements, bounded by the callers' latest deadline and the
/// client's timeout), within it a stake key's lock (a PlaceStakes replay of
/// the same bet id) or a bet key's unique index (the same key written by
/// another transaction: a player without a wallet row, whose REJECTED row
/// takes no row lock, or an older release's PLACING insert), then the
/// batch's match jobs. Never a wallet row another movement holds (that bet
/// is answered busy and placed alone, outside the slot), and nothing that
/// needs a batch slot itself (lone placements, the legacy path, payouts and
/// other instances' batches all run outside it): one slot can stall behind
/// a slow call, never deadlock (reviewed, 2026-12-08).
pub const SLOTS: usize = 1;

/// Requests waiting for a batch; past it, PlaceBet waits to queue (the
/// edge's in-flight cap bounds the callers long before).
const QUEUE: usize = 4096;

/// What a batch answers one PlaceBet.
pub(crate) enum Batched {
    Placed(Box<Placed>),
    /// Not written (its round is not open, or its key was taken): the lone
    /// path finds out why.
    NotWritten,
    /// Not placed: its wallet row was held by another movement, so the lone
    /// path places it (behind the wallet's per-user gate) rather than the
    /// batch waiting for the row.
    Alone,
    /// Not placed: the wallet is of an older release, without PlaceStakes;
    /// the lone path places it as that release did (PLACING, HoldStake,
    /// PENDING).
    Legacy,
}

type Answer = Result<Batched, BettingError>;

struct Request {
    bet: NewBet,
    deadline: Option<tokio::time::Instant>,
    /// The caller's span (its PlaceBet): the batch span is a child of the
    /// first caller's and linked to the others', and each bet's match job
    /// carries its own caller's trace.
    span: tracing::Span,
    reply: oneshot::Sender<Answer>,
    /// When it was queued: its wait for a batch is a metric
    /// (`place_batch_wait_seconds`).
    queued: std::time::Instant,
}

/// The handle PlaceBet submits new bets through.
#[derive(Clone)]
pub(crate) struct Placer {
    requests: mpsc::Sender<Request>,
    /// The batch slots: all free when no batch is running (or sending its
    /// match jobs).
    slots: Arc<Semaphore>,
}

/// What a batch needs of the service.
#[derive(Clone)]
pub(crate) struct Parts {
    pub store: BetStore,
    pub wallet: WalletClient,
    pub match_queue: Queue,
    pub publisher: Publisher,
    #[cfg(feature = "fault-injection")]
    pub faults: Arc<Faults>,
}

impl Placer {
    /// Starts the batching task; it ends when the last handle is dropped.
    pub(crate) fn start(parts: Parts) -> Self {
        let (requests, queue) = mpsc::channel(QUEUE);
        let slots = Arc::new(Semaphore::new(SLOTS));
        tokio::spawn(gather(queue, Arc::new(parts), slots.clone()));
        Self { requests, slots }
    }

    /// Waits until no batch is running: for a graceful stop, once no
    /// request is left to answer, so that the last batches' match jobs,
    /// sent after their answers, are out before the stores close.
    pub(crate) async fn drained(&self) {
        let _ = self.slots.acquire_many(SLOTS as u32).await;
    }

    /// Places a new bet with the next batch.
    pub(crate) async fn place(&self, bet: NewBet) -> Answer {
        let (reply, answer) = oneshot::channel();
        let request = Request {
            bet,
            deadline: betting_deadline::current(),
            span: tracing::Span::current(),
            reply,
            queued: std::time::Instant::now(),
        };
        if self.requests.send(request).await.is_err() {
            return Err(BettingError::Internal(anyhow::anyhow!(
                "the placing batcher has stopped"
            )));
        }
        answer.await.unwrap_or_else(|_| {
            Err(BettingError::Internal(anyhow::anyhow!(
                "a placing batch ended without an answer"
            )))
        })
    }
}

/// Forms batches: waits for a request, then for a free slot, then takes
/// every request queued meanwhile.
async fn gather(mut queue: mpsc::Receiver<Request>, parts: Arc<Parts>, slots: Arc<Semaphore>) {
    while let Some(first) = queue.recv().await {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(request) => batch.push(request),
                Err(_) => break,
            }
        }
        metrics::histogram!("place_batch_size").record(batch.len() as f64);
        let wait = metrics::histogram!("place_batch_wait_seconds");
        for request in &batch {
            wait.record(request.queued.elapsed().as_secs_f64());
        }
        let parts = parts.clone();
        tokio::spawn(async move {
            run(&parts, batch).await;
            drop(slot);
        });
    }
}

/// Runs one batch within the latest deadline of its callers.
async fn run(parts: &Parts, batch: Vec<Request>) {
    let deadline = batch.iter().map(|r| r.deadline).max().flatten();
    let span = batch_span(&batch);
    let mut bets = Vec::with_capacity(batch.len());
    let mut spans = Vec::with_capacity(batch.len());
    let mut replies = Vec::with_capacity(batch.len());
    for request in batch {
        bets.push(request.bet);
        spans.push(request.span);
        replies.push(request.reply);
    }
    let placed = place_all(parts, &bets, &spans, false).instrument(span.clone());
    let (answers, jobs) = match deadline {
        Some(deadline) => betting_deadline::scope(deadline, placed).await,
        None => placed.await,
    };
    for (reply, answer) in replies.into_iter().zip(answers) {
        // A caller that gave up is gone; its bet is finished all the same.
        let _ = reply.send(answer);
    }
    // After the answers, within the batch's slot (so a slow queue slows the
    // batches, never piles up jobs, and a graceful stop waits for them:
    // `Placer::drained`).
    #[cfg(feature = "fault-injection")]
    if let Some(delay) = parts.faults.match_jobs_delay() {
        tokio::time::sleep(delay).await;
    }
    jobs.send(&parts.match_queue).instrument(span).await;
}

/// The match jobs of a batch's placed bets: one per (round, stake) group of
/// the batch, each carrying the PlaceBet trace of the bet it is named
/// after. Sent after the batch's callers are answered (the answer waits for
/// the commit, never for the queue). Best effort, pipelined: the reconciler
/// re-derives every PENDING bet's job, so a crash or a queue outage between
/// the answer and the send delays a match, never loses one.
#[must_use = "the match jobs are sent by `send`"]
pub(crate) struct MatchJobs(Vec<(MatchJob, tracing::Span)>);

impl MatchJobs {
    pub(crate) async fn send(self, queue: &Queue) {
        futures::future::join_all(self.0.into_iter().map(|(job, span)| {
            async move { betting_jobs::enqueue(queue, &job).await }.instrument(span)
        }))
        .await;
    }
}

/// The batch's span: a child of its first caller's PlaceBet, linked to the
/// others' (one batch serves many traces).
fn batch_span(batch: &[Request]) -> tracing::Span {
    let parent = batch.first().map(|r| r.span.id());
    let span = tracing::info_span!(
        parent: parent.flatten(),
        "place.batch",
        bets = batch.len(),
        trace_id = tracing::field::Empty,
    );
    for request in batch.iter().skip(1) {
        betting_telemetry::trace::link(&span, &request.span);
    }
    betting_telemetry::trace::record_trace_id(&span);
    span
}

/// A batch's placement: one PlaceStakes call, in which the wallet holds
/// every stake and writes every bet's row in one transaction; then the
/// change notes. One answer per bet, in order (`spans`: each bet's
/// caller's), and the placed bets' match jobs, for the caller to send once
/// it has answered. With `wait` (the lone path: one bet), the wallet waits
/// for a busy wallet row instead of answering `Alone`.
pub(crate) async fn place_all(
    parts: &Parts,
    bets: &[NewBet],
    spans: &[tracing::Span],
    wait: bool,
) -> (Vec<Answer>, MatchJobs) {
    let mut jobs = MatchJobs(Vec::new());
    let answers = place_batch(parts, bets, spans, wait, &mut jobs).await;
    (answers, jobs)
}

async fn place_batch(
    parts: &Parts,
    bets: &[NewBet],
    spans: &[tracing::Span],
    wait: bool,
    jobs: &mut MatchJobs,
) -> Vec<Answer> {
    let placements: Vec<Placement<'_>> = bets.iter().map(NewBet::placement).collect();
    let held = match parts.wallet.place_stakes(&placements, wait).await {
        Ok(held) => held,
        // A wallet of an older release (a rolling deploy, the wallet not yet
        // rolled out): nothing moved, and each bet is placed the older way.
        Err(e) if e.is_unimplemented() => {
            tracing::warn!(
                bets = bets.len(),
                "the wallet does not serve PlaceStakes; placing in three steps"
            );
            return bets.iter().map(|_| Ok(Batched::Legacy)).collect();
        }
        Err(e) => {
            // Nothing the wallet decided is known: each bet is placed or
            // not, and its retry finds out by key.
            log_refused(&e, bets.len());
            let e = Arc::new(BettingError::WalletUnavailable(e));
            return bets
                .iter()
                .map(|_| Err(BettingError::Shared(e.clone())))
                .collect();
        }
    };
    let mut answers: Vec<Answer> = bets.iter().map(|_| Ok(Batched::NotWritten)).collect();
    let mut placed: Vec<(usize, Decimal, Option<DateTime<Utc>>)> = Vec::new();
    for (i, outcome) in held.into_iter().enumerate() {
        answers[i] = match outcome {
            Hold::Held {
                balance,
                bet_written_at,
            } => {
                placed.push((i, balance, bet_written_at));
                continue;
            }
            Hold::Busy => Ok(Batched::Alone),
            Hold::Failed(e) => refused(e),
        };
    }
    #[cfg(feature = "fault-injection")]
    if parts.faults.fail_after_stake() {
        for &(i, ..) in &placed {
            answers[i] = Err(BettingError::Internal(anyhow::anyhow!(
                "injected fault: crashed after placing bet {}",
                bets[i].bet
            )));
        }
        return answers;
    }
    if placed.is_empty() {
        return answers;
    }
    // A row the wallet wrote by this call is known whole (`written_row`);
    // any other (a replay, a wallet of an earlier release) is read back.
    let unknown: Vec<BetId> = placed
        .iter()
        .filter(|(_, _, at)| at.is_none())
        .map(|&(i, ..)| bets[i].bet)
        .collect();
    let read = match unknown.is_empty() {
        true => Ok(Vec::new()),
        false => betting_db::timed("placed_rows", parts.store.get_many(&unknown)).await,
    };
    let mut rows: HashMap<Uuid, BetRow> = match read {
        Ok(rows) => rows.into_iter().map(|row| (row.bet_id, row)).collect(),
        Err(e) => {
            // Placed all the same: each retry is answered from its row. The
            // rows known whole are answered still (attack review).
            let e = Arc::new(BettingError::from(e));
            placed.retain(|&(i, _, at)| {
                if at.is_none() {
                    answers[i] = Err(BettingError::Shared(e.clone()));
                }
                at.is_some()
            });
            HashMap::new()
        }
    };
    for &(i, balance, at) in &placed {
        if let Some(at) = at {
            rows.insert(bets[i].bet.as_uuid(), bets[i].written_row(balance, at));
        }
    }
    if placed.is_empty() {
        return answers;
    }
    let placed: Vec<(usize, &BetRow, Decimal)> = placed
        .into_iter()
        .filter_map(|(i, balance, _)| match rows.get(&bets[i].bet.as_uuid()) {
            Some(row) => Some((i, row, balance)),
            None => {
                // Committed with its stake, so this is a bug: say so.
                answers[i] = Err(BettingError::Internal(anyhow::anyhow!(
                    "placed bet {} has no row",
                    bets[i].bet
                )));
                None
            }
        })
        .collect();
    parts.publisher.spawn_publish(Changes {
        bets: placed.iter().map(|(_, row, _)| row.note()).collect(),
        rounds: Vec::new(),
    });
    // One match job per (round, stake) group of the batch, named after its
    // first bet: the matcher matches a job's whole group, and the bets of
    // one transaction became PENDING together (`Matcher::match_bet`).
    let mut leaders: Vec<&BetRow> = Vec::new();
    for &(i, row, _) in &placed {
        if !leaders
            .iter()
            .any(|l| l.round_id == row.round_id && l.amount == row.amount)
        {
            leaders.push(row);
            // The job carries its leader's own PlaceBet trace.
            let span = spans.get(i).cloned().unwrap_or_else(tracing::Span::current);
            jobs.0.push((MatchJob::new(row.id(), &row.round_id), span));
        }
    }
    for (i, row, balance) in placed {
        answers[i] = Ok(Batched::Placed(Box::new(Placed {
            bet: row.clone(),
            balance: row.balance_after.unwrap_or(balance),
            replayed: false,
        })));
    }
    answers
}

/// The answer to a placement the wallet refused. The rejection rule: only
/// the wallet's INSUFFICIENT_FUNDS, recorded under the stake's key with the
/// bet's REJECTED row, rejects a bet; a refusal that wrote nothing (the
/// round is not open, the key names another bet) is for the lone path to
/// explain; any other says nothing we can answer but "try again".
fn refused(e: WalletCallError) -> Answer {
    if e.is_insufficient_funds() {
        Err(BettingError::InsufficientFunds)
    } else if e.is_not_placed() {
        Ok(Batched::NotWritten)
    } else {
        log_refused(&e, 1);
        Err(BettingError::WalletUnavailable(e))
    }
}

fn log_refused(e: &WalletCallError, bets: usize) {
    if let WalletCallError::Refused { .. } = e {
        tracing::error!(error = %e, bets, "the wallet refused placements; nothing was placed");
    }
}
