//! The reconciler: re-derives from PostgreSQL the work Redis should be holding.
//!
//! Redis may restart empty; PostgreSQL is the source of truth. Each pass finds
//! work that exists in the tables but may have no job, and enqueues it (the
//! queue drops duplicates), and refunds bets whose time is up:
//!
//! - PENDING bets of open rounds → match jobs;
//! - PENDING bets past the match timeout → refunded (MATCH_TIMEOUT);
//! - PENDING bets of rounds no longer open → refunded (a bet that raced a close);
//! - unpaid matches of settled rounds → settle jobs;
//! - refunds owed but not carried out → refund jobs.
//!
//! Passes are safe to run anywhere and at once; a PostgreSQL advisory lock
//! keeps it to one pass at a time across processes, to save work. Every
//! process of a worker role (matcher, settler) runs one.
//!
//! It is a crate of its own because it is the one piece that reads every
//! other piece's tables and feeds every queue; [`stuck`] (money held up by
//! dead jobs) is here for the same reason.

#![forbid(unsafe_code)]

pub mod stuck;

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use betting_bets::BetStore;
use betting_db::StoreError;
use betting_domain::BetId;
use betting_jobs::{MatchJob, RefundJob, SettleRoundJob, enqueue_all};
use betting_queue::{Queue, QueueError};
use betting_refunds::{Outbox, Refunds};
use betting_settlement::RoundStore;
use betting_shutdown::Shutdown;
use sqlx::PgPool;

/// What can stop a pass (or a count of dead money).
#[derive(Debug, thiserror::Error)]
pub enum ReconcilerError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Queue(#[from] QueueError),
}

impl From<sqlx::Error> for ReconcilerError {
    fn from(err: sqlx::Error) -> Self {
        ReconcilerError::Store(err.into())
    }
}

#[derive(Debug, Clone)]
pub struct ReconcilerSettings {
    pub interval: Duration,
    /// A PENDING bet older than this is re-enqueued for matching.
    pub sweep_after: Duration,
    /// A PENDING bet older than this is refunded.
    pub match_timeout: Duration,
    /// Settled matches and owed refunds older than this are re-enqueued.
    pub retry_after: Duration,
    pub batch: i64,
}

impl Default for ReconcilerSettings {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(5),
            sweep_after: Duration::from_secs(5),
            match_timeout: Duration::from_secs(300),
            retry_after: Duration::from_secs(5),
            batch: 1000,
        }
    }
}

/// What one pass found and did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReconcileReport {
    /// False when another process held the pass lock.
    pub ran: bool,
    pub match_jobs: usize,
    pub timed_out: usize,
    pub stranded: usize,
    pub settle_jobs: usize,
    pub refund_jobs: usize,
}

#[derive(Clone)]
pub struct Reconciler {
    pool: PgPool,
    bets: BetStore,
    rounds: RoundStore,
    refunds: Refunds,
    outbox: Outbox,
    match_queue: Queue,
    settle_queue: Queue,
    refund_queue: Queue,
    settings: ReconcilerSettings,
    publisher: Option<betting_streams::Publisher>,
    cursors: Arc<Mutex<Cursors>>,
}

/// Where the next pass goes on in each list it pages through.
#[derive(Debug, Default)]
struct Cursors {
    pending: Option<uuid::Uuid>,
    matches: Option<uuid::Uuid>,
    commands: Option<String>,
    /// When the open bets were last counted for the gauges.
    books_counted: Option<std::time::Instant>,
}

/// How often a reconciler counts the open bets for the gauges: a scan of
/// the bets being matched and settled, not worth doing every pass.
const BOOK_GAUGES_EVERY: Duration = Duration::from_secs(30);

/// The advisory lock key of a pass.
const PASS_LOCK: i64 = 0x6265_7474_696e_6701;

impl Reconciler {
    /// Over the stores in `pool`, feeding the match, settle and refund queues.
    pub fn new(pool: PgPool, queues: [Queue; 3], settings: ReconcilerSettings) -> Self {
        let [match_queue, settle_queue, refund_queue] = queues;
        Self {
            bets: BetStore::new(pool.clone()),
            rounds: RoundStore::new(pool.clone()),
            refunds: Refunds::new(pool.clone()),
            outbox: Outbox::new(pool.clone()),
            pool,
            match_queue,
            settle_queue,
            refund_queue,
            settings,
            publisher: None,
            cursors: Arc::default(),
        }
    }

    /// Announces the refunds it makes to live streams.
    pub fn with_publisher(mut self, publisher: betting_streams::Publisher) -> Self {
        self.publisher = Some(publisher);
        self
    }

    pub fn settings(&self) -> &ReconcilerSettings {
        &self.settings
    }

    /// One pass, if no other process is running one.
    pub async fn pass(&self) -> Result<ReconcileReport, ReconcilerError> {
        let mut conn = self.pool.acquire().await?;
        let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(PASS_LOCK)
            .fetch_one(&mut *conn)
            .await?;
        if !locked {
            return Ok(ReconcileReport::default());
        }
        let result = self.work().await;
        // Dropping the connection would also release it; say so explicitly.
        let _ = sqlx::query("SELECT pg_advisory_unlock($1)")
            .bind(PASS_LOCK)
            .execute(&mut *conn)
            .await;
        result
    }

    async fn work(&self) -> Result<ReconcileReport, ReconcilerError> {
        let s = &self.settings;
        let mut report = ReconcileReport {
            ran: true,
            ..ReconcileReport::default()
        };

        // Refunds change the bets they touch, so each statement takes the
        // next ones on its own; both are announced like every bet change.
        let stranded = self.refunds.stranded(s.batch).await?;
        report.stranded = stranded.len();
        let timed_out = self.refunds.overdue(s.match_timeout, s.batch).await?;
        report.timed_out = timed_out.len();
        if let Some(publisher) = &self.publisher {
            let refunded: Vec<_> = stranded.into_iter().chain(timed_out).collect();
            if !refunded.is_empty() {
                publisher.bets(refunded).await;
            }
        }

        // The rest only reads, so each pass takes the next page after the
        // previous pass's cursor and wraps around at the end: work that never
        // completes (a dead job, say) cannot starve the work behind it.
        let after = self.cursor(|c| c.pending);
        let pending = self
            .bets
            .pending_older_than(s.sweep_after, after, s.batch)
            .await?;
        self.advance(
            |c| &mut c.pending,
            pending.last().map(|p| p.bet_id),
            pending.len(),
            s.batch,
        );
        report.match_jobs = pending.len();
        let jobs: Vec<_> = pending
            .iter()
            .map(|p| MatchJob::new(BetId::from(p.bet_id), &p.round_id))
            .collect();
        enqueue_all(&self.match_queue, &jobs).await;

        let after = self.cursor(|c| c.matches);
        let unpaid = self
            .rounds
            .unpaid_matches(s.retry_after, after, s.batch)
            .await?;
        self.advance(
            |c| &mut c.matches,
            unpaid.last().map(|(m, _)| *m),
            unpaid.len(),
            s.batch,
        );
        // One job per round with unpaid matches: a settler pays a round's
        // matches in batches. A round whose job is dead stays dead (the
        // queue refuses its id) until an operator requeues it.
        let mut rounds: Vec<String> = unpaid.into_iter().map(|(_, round)| round).collect();
        rounds.sort();
        rounds.dedup();
        report.settle_jobs = rounds.len();
        let jobs: Vec<_> = rounds.iter().map(|r| SettleRoundJob::new(r)).collect();
        enqueue_all(&self.settle_queue, &jobs).await;

        // Fresh refunds (just made above) are owed too: no age for them.
        let after = self.cursor(|c| c.commands.clone());
        let owed = self
            .outbox
            .due(Duration::ZERO, after.as_deref(), s.batch)
            .await?;
        self.advance(|c| &mut c.commands, owed.last_key, owed.rows, s.batch);
        report.refund_jobs = owed.refunds.len();
        let jobs: Vec<_> = owed
            .refunds
            .iter()
            .map(|c| RefundJob::for_key(&c.key))
            .collect();
        enqueue_all(&self.refund_queue, &jobs).await;

        if report.timed_out + report.stranded > 0 {
            tracing::info!(?report, "reconciler refunded bets");
        }
        metrics::counter!("reconciler_repairs_total", "kind" => "timed_out")
            .increment(report.timed_out as u64);
        metrics::counter!("reconciler_repairs_total", "kind" => "stranded")
            .increment(report.stranded as u64);
        self.record_queue_gauges().await;
        self.record_book_gauges().await;
        Ok(report)
    }

    fn cursor<T>(&self, read: impl FnOnce(&Cursors) -> T) -> T {
        read(&self.cursors.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// The next page starts after `last`; a short page was the end, so the
    /// next pass starts from the beginning again.
    fn advance<T>(
        &self,
        field: impl FnOnce(&mut Cursors) -> &mut Option<T>,
        last: Option<T>,
        got: usize,
        batch: i64,
    ) {
        let mut cursors = self.cursors.lock().unwrap_or_else(|e| e.into_inner());
        *field(&mut cursors) = if (got as i64) < batch { None } else { last };
    }

    /// Publishes each queue's counts as gauges (one process does it per pass).
    async fn record_queue_gauges(&self) {
        for queue in [&self.match_queue, &self.settle_queue, &self.refund_queue] {
            let Ok(stats) = queue.stats().await else {
                continue;
            };
            let name = queue.name().to_owned();
            metrics::gauge!("queue_waiting", "queue" => name.clone()).set(stats.waiting as f64);
            metrics::gauge!("queue_delayed", "queue" => name.clone()).set(stats.delayed as f64);
            metrics::gauge!("queue_in_flight", "queue" => name.clone()).set(stats.in_flight as f64);
            metrics::gauge!("queue_dead", "queue" => name.clone()).set(stats.dead as f64);
            metrics::gauge!("queue_consumers", "queue" => name.clone()).set(stats.consumers as f64);
            // Money a human must release (`betting queue retry`): alert on it.
            if let Ok(money) = stuck::dead_money(&self.pool, queue).await {
                metrics::gauge!("queue_dead_money", "queue" => name)
                    .set(rust_decimal::prelude::ToPrimitive::to_f64(&money).unwrap_or(f64::MAX));
            }
        }
    }

    /// Publishes the open bets by status (`bets{status}`) and the stakes they
    /// hold (`escrow_money`: PENDING and MATCHED stakes; a PLACING bet's stake
    /// may not be held yet), at most every [`BOOK_GAUGES_EVERY`].
    async fn record_book_gauges(&self) {
        let due = self.cursor(|c| {
            c.books_counted
                .is_none_or(|at| at.elapsed() >= BOOK_GAUGES_EVERY)
        });
        if !due {
            return;
        }
        let counted: Result<Vec<(String, i64, rust_decimal::Decimal)>, _> = sqlx::query_as(
            "SELECT status, count(*), COALESCE(sum(amount), 0) FROM bets \
             WHERE status IN ('PLACING', 'PENDING', 'MATCHED') GROUP BY status",
        )
        .fetch_all(&self.pool)
        .await;
        let Ok(counted) = counted else {
            return;
        };
        self.cursors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .books_counted = Some(std::time::Instant::now());
        let mut escrow = rust_decimal::Decimal::ZERO;
        for status in ["PLACING", "PENDING", "MATCHED"] {
            let (count, sum) = counted
                .iter()
                .find(|(s, _, _)| s == status)
                .map(|(_, count, sum)| (*count, *sum))
                .unwrap_or_default();
            metrics::gauge!("bets", "status" => status).set(count as f64);
            if status != "PLACING" {
                escrow += sum;
            }
        }
        metrics::gauge!("escrow_money")
            .set(rust_decimal::prelude::ToPrimitive::to_f64(&escrow).unwrap_or(f64::MAX));
    }

    /// Runs passes until `shutdown` is signalled.
    pub async fn run(self, shutdown: Shutdown) {
        let mut ticker = tokio::time::interval(self.settings.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {
                    if let Err(error) = self.pass().await {
                        tracing::warn!(%error, "reconciler pass failed");
                    }
                }
                () = shutdown.signalled() => break,
            }
            if shutdown.is_signalled() {
                break;
            }
        }
    }
}
