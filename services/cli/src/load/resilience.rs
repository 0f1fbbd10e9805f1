//! `betting bench scenario resilience`: the original design's third
//! scenario — matcher and settler workers killed and restarted while bets
//! arrive at 100 a second — measured with the figures every bench reports.
//!
//! Killing the workers needs their processes, so this scenario does not run
//! against `--target`: it starts a suite of its own, `betting chaos`'s
//! cluster (its own PostgreSQL and Redis; WalletService, two betting
//! instances, SettlementService, two matchers and two settlers, each a
//! process of this binary, the queue's visibility timeout 6 s), on
//! loopback, and stops it at the end.
//!
//! The schedule is fixed, so two runs' figures compare:
//!
//! - while placing, one worker fault every [`PERIOD`], in turn: SIGKILL
//!   matcher-0, settler-0, matcher-1, settler-1, both matchers at once, and
//!   a drained restart (SIGTERM) of matcher-0; a killed process stays down
//!   for [`DOWN`] and is then started again, as a supervisor would;
//! - before SettleRound both settlers are SIGKILLed, and started again
//!   [`DOWN`] later: the round's hand-off waits in the queue meanwhile;
//! - once the first payouts land, both settlers are SIGKILLed again and
//!   started at once: the job one of them held comes back only when its
//!   lease runs out, so the drain includes a lease.
//!
//! What the run says is the bench's report (placing, match latency, the
//! drain, the audit) with the faults as they happened and any exit of a
//! process the run did not cause.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context;
use betting_chaos::{
    cluster::{Cluster, Slot},
    faults::Topology,
    supervise::{Kind, wait_serving},
};
use serde::Serialize;

use super::{
    Common, Plan, Report, Targets, follow_matching, follow_settling, place_load, prepare, print,
};

/// Between two worker faults while placing.
const PERIOD: Duration = Duration::from_secs(3);
/// How long a killed worker stays down.
const DOWN: Duration = Duration::from_secs(1);
/// How long a restarted worker gets to serve again.
const RESTART_TIMEOUT: Duration = Duration::from_secs(60);
/// The scenario's users and rate: the design's.
const USERS: usize = 200;
const RATE: f64 = 100.0;

/// One worker fault as it happened.
#[derive(Debug, Serialize)]
pub struct WorkerFault {
    /// Seconds from the start of the load.
    pub at_s: f64,
    pub fault: String,
    /// From the first stop to the last restarted process serving again.
    pub down_ms: u64,
    /// What went wrong carrying it out, if anything (the run then fails).
    pub error: Option<String>,
}

impl WorkerFault {
    /// The fault `fault`, begun `at` into the load and stopped at `stopped`,
    /// now over with `result`.
    fn new(at: Duration, fault: String, stopped: Instant, result: anyhow::Result<()>) -> Self {
        Self {
            at_s: at.as_secs_f64(),
            fault,
            down_ms: stopped.elapsed().as_millis() as u64,
            error: result.err().map(|e| format!("{e:#}")),
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum How {
    Kill,
    Drain,
}

/// Processes of the cluster, by kind and index.
type Workers = &'static [(Kind, usize)];

/// The load-time faults, in turn.
const CYCLE: &[(&str, How, Workers)] = &[
    ("SIGKILL matcher-0", How::Kill, &[(Kind::Matcher, 0)]),
    ("SIGKILL settler-0", How::Kill, &[(Kind::Settler, 0)]),
    ("SIGKILL matcher-1", How::Kill, &[(Kind::Matcher, 1)]),
    ("SIGKILL settler-1", How::Kill, &[(Kind::Settler, 1)]),
    (
        "SIGKILL both matchers",
        How::Kill,
        &[(Kind::Matcher, 0), (Kind::Matcher, 1)],
    ),
    (
        "SIGTERM (drain) matcher-0",
        How::Drain,
        &[(Kind::Matcher, 0)],
    ),
];
const SETTLERS: Workers = &[(Kind::Settler, 0), (Kind::Settler, 1)];

/// `betting bench scenario resilience`.
pub(super) async fn run(seconds: u64, common: &Common) -> anyhow::Result<()> {
    anyhow::ensure!(seconds > 0, "--seconds must be at least 1");
    let dir = betting_chaos::run_dir("betting-resilience")?;
    eprintln!("starting a suite of its own in {}", dir.display());
    let cluster = Arc::new(
        Cluster::start(&dir, Topology::standard())
            .await
            .context("the suite did not start")?,
    );
    let outcome = drive(&cluster, seconds, common).await;
    cluster.stop().await;
    let exits = cluster
        .exits
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let mut report = match outcome {
        Ok(report) => report,
        Err(error) => {
            eprintln!("the run failed: {error:#}; logs kept in {}", dir.display());
            return Err(error);
        }
    };
    // An exit the run did not cause, or a drain that ended in SIGKILL.
    let unexpected = exits.violations();
    let failed = !unexpected.is_empty()
        || report
            .worker_faults
            .iter()
            .flatten()
            .any(|f| f.error.is_some());
    report.unexpected_exits = Some(unexpected);
    drop(cluster);
    if failed {
        eprintln!("logs kept in {}", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    print(&report, common.json)?;
    if !common.json {
        for f in report.worker_faults.iter().flatten() {
            println!(
                "fault {:>6.1} s      {} (down {} ms){}",
                f.at_s,
                f.fault,
                f.down_ms,
                f.error
                    .as_ref()
                    .map_or_else(String::new, |e| format!(": FAILED: {e}"))
            );
        }
        for exit in report.unexpected_exits.iter().flatten() {
            println!("unexpected exit     {exit}");
        }
    }
    anyhow::ensure!(!failed, "the scenario's suite misbehaved (above)");
    Ok(())
}

async fn drive(cluster: &Arc<Cluster>, seconds: u64, common: &Common) -> anyhow::Result<Report> {
    let url = |kind| format!("http://127.0.0.1:{}", cluster.ports(kind)[0]);
    let targets = Targets {
        betting: url(Kind::Betting),
        settlement: url(Kind::Settlement),
        wallet: url(Kind::Wallet),
        secret: cluster.secret.clone(),
    };
    let setup = prepare(common, &targets, USERS, "bench-resilience").await?;
    let plan = Plan {
        bench: "resilience",
        clients: USERS,
        seconds,
        rate: Some(RATE),
    };
    let began = Instant::now();
    let load_ends = began + Duration::from_secs(seconds);
    let schedule = {
        let cluster = cluster.clone();
        tokio::spawn(async move { load_faults(&cluster, began, load_ends).await })
    };
    let mut report = place_load(&plan, &setup, common).await;
    let mut faults = schedule.await.context("the fault schedule failed")?;

    follow_matching(&setup, &mut report, None).await?;

    // No settler is up when the round is settled: the hand-off must wait.
    let at = began.elapsed();
    let stopped = Instant::now();
    let error = stop(cluster, SETTLERS, How::Kill).await.err();
    let settle_faults = {
        let cluster = cluster.clone();
        let round = setup.round.clone();
        tokio::spawn(async move {
            tokio::time::sleep(DOWN).await;
            let restarted = start(&cluster, SETTLERS).await;
            // The kill's failure first, as the restart's is a consequence.
            let restarted = match error {
                Some(error) => Err(error),
                None => restarted,
            };
            let first = WorkerFault::new(
                at,
                "SIGKILL both settlers before SettleRound".into(),
                stopped,
                restarted,
            );
            let second = kill_mid_payout(&cluster, &round, began).await;
            [first, second]
        })
    };
    follow_settling(&setup, &mut report, common.json).await?;
    faults.extend(settle_faults.await.context("the settle faults failed")?);
    report.worker_faults = Some(faults);
    Ok(report)
}

/// The load-time cycle, one fault every [`PERIOD`] from 2 s in, while a
/// fault still ends before the load does.
async fn load_faults(cluster: &Cluster, began: Instant, ends: Instant) -> Vec<WorkerFault> {
    let mut done = Vec::new();
    for (i, (name, how, who)) in CYCLE.iter().cycle().enumerate() {
        let due = began + Duration::from_secs(2) + PERIOD * i as u32;
        if due + DOWN + Duration::from_secs(1) > ends {
            break;
        }
        tokio::time::sleep_until(due.into()).await;
        let at = began.elapsed();
        eprintln!("resilience: {:>5.1} s  {name}", at.as_secs_f64());
        let stopped = Instant::now();
        let result = async {
            stop(cluster, who, *how).await?;
            tokio::time::sleep(DOWN).await;
            start(cluster, who).await
        }
        .await;
        done.push(WorkerFault::new(at, (*name).to_owned(), stopped, result));
    }
    done
}

/// Once some but not all of the round's matches are paid, SIGKILLs both
/// settlers and starts them again at once. A round paid before the kill
/// could land is said so (the kill then hit idle settlers).
async fn kill_mid_payout(cluster: &Cluster, round: &str, began: Instant) -> WorkerFault {
    let watch_until = Instant::now() + Duration::from_secs(120);
    let mut fault = "SIGKILL both settlers mid-payout".to_owned();
    loop {
        let progress: Result<(i64, i64), sqlx::Error> = sqlx::query_as(
            "SELECT count(*) FILTER (WHERE status = 'SETTLED'), count(*) \
             FROM matches WHERE round_id = $1",
        )
        .bind(round)
        .fetch_one(&cluster.pool)
        .await;
        match progress {
            Ok((paid, all)) if paid > 0 && paid < all => {
                fault = format!("{fault} ({paid} of {all} matches paid)");
                break;
            }
            Ok((paid, all)) if all > 0 && paid == all => {
                fault = format!("{fault}: too late, all {all} matches were already paid");
                break;
            }
            _ if Instant::now() > watch_until => {
                fault = format!("{fault}: no payout seen within 120 s");
                break;
            }
            _ => tokio::time::sleep(Duration::from_millis(2)).await,
        }
    }
    let at = began.elapsed();
    eprintln!("resilience: {:>5.1} s  {fault}", at.as_secs_f64());
    let stopped = Instant::now();
    let result = async {
        stop(cluster, SETTLERS, How::Kill).await?;
        start(cluster, SETTLERS).await
    }
    .await;
    WorkerFault::new(at, fault, stopped, result)
}

fn slot(cluster: &Cluster, kind: Kind, index: usize) -> anyhow::Result<&Slot> {
    cluster
        .slot(kind, index)
        .with_context(|| format!("no {kind:?}-{index}"))
}

async fn stop(cluster: &Cluster, who: &[(Kind, usize)], how: How) -> anyhow::Result<()> {
    for &(kind, index) in who {
        let mut process = slot(cluster, kind, index)?.process.lock().await;
        match how {
            How::Kill => {
                cluster.reap_unexpected(&mut process);
                process.kill();
            }
            // Waits for the drain (up to `DRAIN_WAIT`); an exit before the
            // SIGTERM or a SIGKILL after the wait is recorded in the exits.
            How::Drain => cluster.terminate(&mut process).await,
        }
    }
    Ok(())
}

async fn start(cluster: &Cluster, who: &[(Kind, usize)]) -> anyhow::Result<()> {
    for &(kind, index) in who {
        slot(cluster, kind, index)?.process.lock().await.start()?;
    }
    for &(kind, index) in who {
        let slot = slot(cluster, kind, index)?;
        wait_serving(slot.port, RESTART_TIMEOUT)
            .await
            .with_context(|| format!("{} does not serve after its restart", slot.name))?;
    }
    Ok(())
}
