//! Group commit for new bets: concurrent PlaceBets of new keys are carried
//! out together, three commits per batch instead of three per bet.
//!
//! A new bet goes through exactly the saga a lone bet does (the crate doc),
//! each step for the whole batch at once:
//!
//! 1. one statement writes every bet of the batch `PLACING`
//!    ([`BetStore::insert_placing_many`]; a bet whose round is not open or
//!    whose key was taken is not written, and its caller finds out why as a
//!    lone PlaceBet does);
//! 2. one `HoldStakes` call holds every written bet's stake in one wallet
//!    transaction, each with its own outcome (one user's insufficient funds
//!    never fails the batch; a user whose wallet row another movement holds
//!    is skipped, and that bet's stake held by the lone path, so one held
//!    row never stalls the batch);
//! 3. one statement makes the held ones `PENDING` and the refused ones
//!    `REJECTED` ([`BetStore::finish_placing_many`]); then their change
//!    notes go out in one message, and one match job per (round, stake)
//!    group of the batch (the matcher matches a job's whole group).
//!
//! Batching changes no outcome and no crash point, only how many bets share
//! a commit:
//!
//! - a crash (or a failed wallet call) after step 1 leaves PLACING bets whose
//!   stakes may or may not be held, exactly like a lone bet's crash; the
//!   recovery pass and each client's retry drive every one of them forward
//!   through the lone saga, by key;
//! - a lost reply of `HoldStakes` is the lone lost reply, times the batch:
//!   the bets stay PLACING and are answered UNAVAILABLE, and the retry (or
//!   recovery) replays each stake by key (the wallet decides each key once,
//!   batch or not);
//! - a client retry racing its original in the same batch: one INSERT, so
//!   one of the two bets is written; the other is answered from it by the
//!   lone path (`find_by_key`, then `complete`, whose HoldStake waits on the
//!   key's lock and replays);
//! - a caller that gives up (its deadline, a cancel) does not stop its
//!   batch, which other callers share: its bet is finished as if it had
//!   waited, and its retry finds it by key — except a bet whose wallet row
//!   was busy, which the batch hands back to its caller to hold alone: with
//!   the caller gone it stays PLACING with nothing taken until its retry or
//!   the recovery pass completes it (as a lone PlaceBet cut off before its
//!   HoldStake would; `attack11_a_gone_callers_busy_bet_stays_placing_until_recovery`).
//!   The batch runs within the latest deadline of its callers, so none of
//!   them is cut short by another's.
//!
//! Batches form by themselves: a request that finds a batch slot free goes
//! at once (a lone bet waits for nobody); while every slot is busy, requests
//! queue and the next batch takes all of them (up to [`MAX_BATCH`]).

use std::{collections::HashMap, sync::Arc};

use betting_domain::{BetId, BetStatus};
use betting_queue::Queue;
use betting_streams::{Changes, Publisher};
use betting_wallet_client::{Hold, WalletCallError, WalletClient};
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

/// Batches in flight at once: while they run, the next one gathers.
///
/// Two, measured (BENCHMARKS.md, 2026-12-05): at 64 closed-loop clients
/// two slots placed 2,565 and 2,556 bets/s (p99 43 ms, about 17 bets a
/// batch) where four placed 1,966 and 2,246 (p99 79 and 49 ms, about 10 a
/// batch), and eight did worse still. More slots split the same load into
/// more, smaller batches, each paying its own commits and wallet locks.
pub const SLOTS: usize = 2;

/// Requests waiting for a batch; past it, PlaceBet waits to queue (the
/// edge's in-flight cap bounds the callers long before).
const QUEUE: usize = 4096;

/// What a batch answers one PlaceBet.
pub(crate) enum Batched {
    Placed(Placed),
    /// Not written (its round is not open, or its key was taken): the lone
    /// path finds out why.
    NotWritten,
    /// Written PLACING, but its wallet row was held by another movement:
    /// the lone path holds its stake (behind the wallet's per-user gate)
    /// rather than the batch waiting for the row.
    Alone(BetRow),
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
}

/// The handle PlaceBet submits new bets through.
#[derive(Clone)]
pub(crate) struct Placer {
    requests: mpsc::Sender<Request>,
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
        tokio::spawn(gather(queue, Arc::new(parts)));
        Self { requests }
    }

    /// Places a new bet with the next batch.
    pub(crate) async fn place(&self, bet: NewBet) -> Answer {
        let (reply, answer) = oneshot::channel();
        let request = Request {
            bet,
            deadline: betting_deadline::current(),
            span: tracing::Span::current(),
            reply,
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
async fn gather(mut queue: mpsc::Receiver<Request>, parts: Arc<Parts>) {
    let slots = Arc::new(Semaphore::new(SLOTS));
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
    let placed = place_all(parts, &bets, &spans).instrument(span);
    let answers = match deadline {
        Some(deadline) => betting_deadline::scope(deadline, placed).await,
        None => placed.await,
    };
    for (reply, answer) in replies.into_iter().zip(answers) {
        // A caller that gave up is gone; its bet is finished all the same.
        let _ = reply.send(answer);
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

/// The saga's three steps for a batch; one answer per bet, in order
/// (`spans`: each bet's caller's).
async fn place_all(parts: &Parts, bets: &[NewBet], spans: &[tracing::Span]) -> Vec<Answer> {
    let shared = |e: BettingError| {
        let e = Arc::new(e);
        bets.iter()
            .map(|_| Err(BettingError::Shared(e.clone())))
            .collect::<Vec<Answer>>()
    };
    // 1. PLACING, in one statement.
    let written =
        match betting_db::timed("insert_placing", parts.store.insert_placing_many(bets)).await {
            Ok(rows) => rows,
            Err(e) => return shared(e.into()),
        };
    let mut answers: Vec<Answer> = bets.iter().map(|_| Ok(Batched::NotWritten)).collect();
    // Each bet's place in the batch, by id (the first, were an id twice:
    // built backwards, the first place is the last one written).
    let index: HashMap<Uuid, usize> = bets
        .iter()
        .enumerate()
        .rev()
        .map(|(i, b)| (b.bet.as_uuid(), i))
        .collect();
    // The rows in the batch's order; a bet not written keeps `NotWritten`.
    let mut rows: Vec<(usize, BetRow)> = written
        .into_iter()
        .filter_map(|row| Some((*index.get(&row.bet_id)?, row)))
        .collect();
    rows.sort_by_key(|(i, _)| *i);
    if rows.is_empty() {
        return answers;
    }

    // 2. The stakes, in one wallet call.
    let holds: Vec<_> = rows
        .iter()
        .map(|(_, row)| (row.user_id, row.amount, row.id()))
        .collect();
    let held = match parts.wallet.hold_stakes(&holds).await {
        Ok(held) => held,
        Err(e) => {
            // Nothing the wallet decided is known: every bet stays PLACING
            // for its retry or the recovery pass, as a lone bet would.
            log_refused(&e, rows.len());
            let e = Arc::new(BettingError::WalletUnavailable(e));
            for (i, _) in &rows {
                answers[*i] = Err(BettingError::Shared(e.clone()));
            }
            return answers;
        }
    };
    #[cfg(feature = "fault-injection")]
    if parts.faults.fail_after_stake() {
        for (i, row) in &rows {
            answers[*i] = Err(BettingError::Internal(anyhow::anyhow!(
                "injected fault: crashed after holding the stake of bet {}",
                row.bet_id
            )));
        }
        return answers;
    }
    let mut pending: Vec<(BetId, Decimal)> = Vec::new();
    let mut rejected: Vec<BetId> = Vec::new();
    let mut balances: Vec<(usize, Decimal)> = Vec::new();
    for ((i, row), outcome) in rows.iter().zip(held) {
        match outcome {
            Hold::Held(balance) => {
                pending.push((row.id(), balance));
                balances.push((*i, balance));
            }
            Hold::Busy => answers[*i] = Ok(Batched::Alone(row.clone())),
            // The rejection rule (`BettingService::complete`): only the
            // wallet's INSUFFICIENT_FUNDS, recorded under the stake's key,
            // rejects a bet.
            Hold::Failed(e) if e.is_insufficient_funds() => {
                rejected.push(row.id());
                answers[*i] = Err(BettingError::InsufficientFunds);
            }
            // Any other refusal says nothing about an earlier attempt: the
            // bet stays PLACING.
            Hold::Failed(e) => {
                log_refused(&e, 1);
                answers[*i] = Err(BettingError::WalletUnavailable(e));
            }
        }
    }

    // 3. PENDING and REJECTED, in one statement.
    let finished = match betting_db::timed(
        "finish_placing",
        parts.store.finish_placing_many(&pending, &rejected),
    )
    .await
    {
        Ok(finished) => finished,
        Err(e) => {
            // The stakes are held and the bets PLACING: the recovery pass
            // (or the retry) makes them PENDING.
            let e = Arc::new(BettingError::from(e));
            for (i, _) in balances.iter() {
                answers[*i] = Err(BettingError::Shared(e.clone()));
            }
            return answers;
        }
    };
    parts.publisher.spawn_publish(Changes {
        bets: finished.iter().map(BetRow::note).collect(),
        rounds: Vec::new(),
    });
    // One match job per (round, stake) group of the batch, named after its
    // first bet: the matcher matches a job's whole group, and the bets of
    // one statement became PENDING together (`Matcher::match_bet`). Best
    // effort, pipelined: the reconciler re-derives every PENDING bet's job.
    let mut leaders: Vec<&BetRow> = Vec::new();
    for row in &finished {
        if !leaders
            .iter()
            .any(|l| l.round_id == row.round_id && l.amount == row.amount)
        {
            leaders.push(row);
        }
    }
    futures::future::join_all(leaders.iter().map(|row| {
        let job = MatchJob::new(row.id(), &row.round_id);
        let queue = &parts.match_queue;
        // The job carries its leader's own PlaceBet trace.
        let span = index
            .get(&row.bet_id)
            .and_then(|&i| spans.get(i).cloned())
            .unwrap_or_else(tracing::Span::current);
        async move { betting_jobs::enqueue(queue, &job).await }.instrument(span)
    }))
    .await;

    let finished: HashMap<Uuid, &BetRow> = finished.iter().map(|row| (row.bet_id, row)).collect();
    for (i, balance) in balances {
        let answer = match finished.get(&bets[i].bet.as_uuid()) {
            Some(&row) => Ok(Batched::Placed(Placed {
                bet: row.clone(),
                balance: row.balance_after.unwrap_or(balance),
                replayed: false,
            })),
            // Someone else finished it (a retry, the recovery pass): answer
            // with what they stored.
            None => match parts.store.get(bets[i].bet).await {
                Ok(Some(row)) if row.status == BetStatus::Rejected => {
                    Err(BettingError::InsufficientFunds)
                }
                Ok(Some(row)) => Ok(Batched::Placed(Placed {
                    balance: row.balance_after.unwrap_or(balance),
                    bet: row,
                    replayed: false,
                })),
                Ok(None) => Err(BettingError::BetNotFound),
                Err(e) => Err(e.into()),
            },
        };
        answers[i] = answer;
    }
    answers
}

fn log_refused(e: &WalletCallError, bets: usize) {
    if let WalletCallError::Refused { .. } = e {
        tracing::error!(error = %e, bets, "the wallet refused stakes; the bets stay PLACING");
    }
}
