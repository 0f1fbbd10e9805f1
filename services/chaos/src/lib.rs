//! `betting chaos`: the suite split into real processes, driven by clients
//! that keep their own books, while a seeded schedule kills, freezes and
//! restarts processes, restarts Redis empty and PostgreSQL abruptly, and
//! delays, holds and cuts the links to WalletService and Redis. Then it
//! heals everything, ends every round, waits for quiescence and checks that
//! not a cent was lost or invented — the standard of Jepsen's bank test.
//!
//! - [`cluster`]: the processes, the servers and the links;
//! - [`faults`]: the seeded schedule; [`inject`]: carrying out one fault;
//! - [`load`]: the clients and their books; [`check`]: the verdict.
//!
//! Loopback only; bounded in time; everything it starts is stopped when it
//! ends (or when it is dropped on an error).

#![forbid(unsafe_code)]

pub mod check;
pub mod cluster;
pub mod faults;
pub mod inject;
pub mod link;
pub mod load;
pub mod ports;
pub mod servers;
pub mod supervise;

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use anyhow::Context;
use serde::Serialize;

use crate::{
    cluster::Cluster,
    faults::{Planned, Topology},
    load::{Load, Targets},
    supervise::Kind,
};

/// `betting chaos`.
#[derive(Debug, Clone, clap::Args)]
pub struct ChaosArgs {
    /// Seconds of load and faults (the short run is 60-90 s; the long run
    /// at least 900).
    #[arg(long, default_value_t = 75)]
    pub seconds: u64,
    /// The schedule's seed; a random one (printed) when not given. A
    /// failing run prints its seed; the same seed and --seconds replay the
    /// same schedule.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Players.
    #[arg(long, default_value_t = 100)]
    pub users: usize,
    /// Concurrent clients.
    #[arg(long, default_value_t = 12)]
    pub clients: usize,
    /// How long the healed system may take to become quiet.
    #[arg(long, default_value_t = 120)]
    pub quiescence_secs: u64,
    /// Keep the run's directory (every process's log) even when it passes.
    #[arg(long)]
    pub keep: bool,
    /// Print exactly one JSON object on stdout (progress goes to stderr).
    #[arg(long)]
    pub json: bool,
}

/// One fault as it happened.
#[derive(Debug, Serialize)]
pub struct Injected {
    #[serde(flatten)]
    pub planned: Planned,
    /// From the fault's start to its end (restart, heal).
    pub lasted_ms: u64,
    /// From the fault's end until every betting instance acknowledged a
    /// PlaceBet again; null when that did not happen before the load ended.
    pub recovered_ms: Option<u64>,
    pub error: Option<String>,
}

#[derive(Debug, Serialize, Default)]
pub struct Summary {
    pub p50_ms: Option<u64>,
    pub max_ms: Option<u64>,
}

/// The run's report.
#[derive(Debug, Serialize)]
pub struct Report {
    pub seed: u64,
    pub seconds: u64,
    pub elapsed_s: f64,
    pub faults_by_kind: BTreeMap<&'static str, usize>,
    pub faults: Vec<Injected>,
    pub recovery: Summary,
    pub calls: u64,
    pub placed_acknowledged: u64,
    pub unknown_outcomes: u64,
    pub retries: u64,
    pub cancels: u64,
    pub rounds_settled: u64,
    pub rounds_voided: u64,
    pub quiescence_s: f64,
    /// Per betting instance, how long after healing its probe bet took to
    /// be acknowledged; null when it was not within the bound.
    pub probes_ms: Vec<Option<u64>>,
    /// Bets refunded MATCH_TIMEOUT: nothing matched them within the
    /// timeout (a matcher down or frozen long, or a pair left waiting).
    pub match_timeout_refunds: i64,
    /// The processes' exits: drained, SIGKILLed after the drain, by themselves.
    pub exits: cluster::Exits,
    #[serde(flatten)]
    pub tally: check::Tally,
    pub audit_clean: bool,
    pub violations: Vec<String>,
    /// The run's directory (logs), kept when the run failed or --keep.
    pub directory: Option<PathBuf>,
}

impl Report {
    pub fn passed(&self) -> bool {
        self.violations.is_empty()
    }
}

fn summary(mut values: Vec<u64>) -> Summary {
    values.sort_unstable();
    Summary {
        p50_ms: values.get(values.len() / 2).copied(),
        max_ms: values.last().copied(),
    }
}

/// A fresh directory for a run's servers and logs, `{tag}-{pid}` under the
/// temporary directory.
pub fn run_dir(tag: &str) -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    // PostgreSQL runs as its own OS user when we are root: it must enter.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
    Ok(dir)
}

/// How long after healing each betting instance gets to acknowledge a
/// probe bet.
const PROBE_WITHIN: Duration = Duration::from_secs(30);

/// Runs it: set up, load with faults, heal, quiesce, check.
pub async fn run(args: &ChaosArgs) -> anyhow::Result<Report> {
    let seed = args.seed.unwrap_or_else(rand::random);
    let say = |line: String| eprintln!("chaos: {line}");
    say(format!(
        "seed {seed}, {} s (replay: betting chaos --seed {seed} --seconds {})",
        args.seconds, args.seconds
    ));
    let dir = run_dir(&format!("betting-chaos-{seed}"))?;

    let started = Instant::now();
    let topology = Topology::standard();
    let cluster = Arc::new(
        Cluster::start(&dir, topology)
            .await
            .context("the suite did not start")?,
    );
    say(format!(
        "{} processes up; logs in {}",
        cluster.processes.len(),
        dir.display()
    ));
    let outcome = drive(&cluster, args, seed).await;
    cluster.stop().await;
    let mut report = match outcome {
        Ok(mut report) => {
            // Every exit, the final stop's drains included.
            let exits = cluster
                .exits
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            report.violations.extend(exits.violations());
            report.exits = exits;
            report
        }
        Err(error) => {
            say(format!(
                "the run failed: {error:#}; logs kept in {}",
                dir.display()
            ));
            return Err(error);
        }
    };
    report.elapsed_s = started.elapsed().as_secs_f64();
    drop(cluster);
    if report.passed() && !args.keep {
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        report.directory = Some(dir);
    }
    Ok(report)
}

async fn drive(cluster: &Arc<Cluster>, args: &ChaosArgs, seed: u64) -> anyhow::Result<Report> {
    let say = |line: String| eprintln!("chaos: {line}");
    let targets = Targets::new(
        &cluster.ports(Kind::Betting),
        cluster.ports(Kind::Settlement)[0],
        cluster.ports(Kind::Wallet)[0],
    )?;
    let load = Arc::new(Load::new(targets, &cluster.secret, args.users));
    load.fund().await;

    let duration = Duration::from_secs(args.seconds);
    let plan = faults::plan(seed, duration, Topology::standard());
    let bar = progress(args.json, plan.len() as u64);
    say(format!(
        "{} faults scheduled over {} s",
        plan.len(),
        args.seconds
    ));

    let load_task = {
        let load = load.clone();
        let clients = args.clients;
        tokio::spawn(async move { load::drive(load, seed, clients, duration).await })
    };
    let began = Instant::now();
    let mut running = tokio::task::JoinSet::new();
    for (i, planned) in plan.iter().copied().enumerate() {
        let due = began + Duration::from_millis(planned.at_ms);
        tokio::time::sleep_until(due.into()).await;
        bar.set_message(planned.fault.to_string());
        tracing::info!(at_ms = planned.at_ms, fault = %planned.fault, "injecting");
        if !args.json {
            // The fault log: printed whether or not stderr is a terminal.
            bar.suspend(|| {
                eprintln!(
                    "chaos: {:>6.1} s  {}",
                    planned.at_ms as f64 / 1000.0,
                    planned.fault
                );
            });
        }
        let cluster = cluster.clone();
        let load = load.clone();
        let bar = bar.clone();
        let load_ends = began + duration;
        running.spawn(async move {
            let start = Instant::now();
            let result = inject::inject(&cluster, planned.fault, seed ^ (i as u64 + 1)).await;
            let ended = Instant::now();
            // Recovered once every betting instance acknowledged a bet after the end.
            let recovered = loop {
                if load.last_placed_everywhere() > ended {
                    break Some(Instant::now().duration_since(ended));
                }
                if Instant::now() > load_ends {
                    break None;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            };
            bar.inc(1);
            Injected {
                planned,
                lasted_ms: ended.duration_since(start).as_millis() as u64,
                recovered_ms: recovered.map(|d| d.as_millis() as u64),
                error: result.err().map(|e| format!("{e:#}")),
            }
        });
    }
    let _ = load_task.await;
    let mut injected = Vec::new();
    // A fault whose task panicked never reported: a violation, not a gap.
    let mut lost_faults = Vec::new();
    while let Some(done) = running.join_next().await {
        match done {
            Ok(fault) => injected.push(fault),
            Err(error) => lost_faults.push(format!("a fault's task failed: {error}")),
        }
    }
    injected.sort_by_key(|f| f.planned.at_ms);
    bar.finish_and_clear();

    say("healing everything".into());
    cluster.heal().await?;
    let quiet_from = Instant::now();
    let mut violations: Vec<String> = injected
        .iter()
        .filter_map(|f| {
            f.error
                .as_ref()
                .map(|e| format!("fault {} failed: {e}", f.planned.fault))
        })
        .collect();
    violations.append(&mut lost_faults);
    if !load.resolve_unknowns(Duration::from_secs(60)).await {
        violations.push("requests stayed unresolved 60 s after healing".into());
    }
    // Serving health is not serving bets: every instance must take one.
    say("probing every betting instance".into());
    let probes = load.probe(PROBE_WITHIN).await;
    let probes_ms = probes
        .iter()
        .map(|p| p.as_ref().ok().map(|d| d.as_millis() as u64))
        .collect();
    violations.extend(probes.into_iter().filter_map(Result::err));
    // A probe attempt whose answer was lost is in the books' unresolved.
    if !load.resolve_unknowns(Duration::from_secs(30)).await {
        violations.push("probe bets stayed unresolved 30 s after probing".into());
    }
    let queues = check::queues(
        &format!("redis://127.0.0.1:{}", cluster.redis_link.port),
        &cluster.namespace,
    )?;
    say("looking for matchable pairs left waiting".into());
    violations
        .extend(check::matchable_pairs(&cluster.pool, &queues, Duration::from_secs(60)).await?);
    say("ending every round".into());
    let rounds = load
        .all_rounds
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed ^ 0xe0d);
    for round in &rounds {
        load.end_round(round, &mut rng).await;
    }
    say("waiting for quiescence".into());
    let deadline = quiet_from + Duration::from_secs(args.quiescence_secs);
    loop {
        let stuck = check::stuck(&cluster.pool, &queues).await;
        if stuck.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            say(format!(
                "not quiet after {} s: {}",
                args.quiescence_secs,
                stuck.join("; ")
            ));
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let quiescence_s = quiet_from.elapsed().as_secs_f64();
    say("checking".into());
    // The load's figures before the check's replays, which go through the
    // same calls and would count every stored bet a second time.
    let counters = &load.counters;
    let calls = counters.calls.load(Ordering::Relaxed);
    let placed = counters.placed.load(Ordering::Relaxed);
    let unknown = counters.unknown.load(Ordering::Relaxed);
    let retries = counters.retries.load(Ordering::Relaxed);
    let (found, tally) = check::check(&cluster.pool, &load, &queues).await?;
    let match_timeout_refunds = check::match_timeout_refunds(&cluster.pool).await?;
    let audit_clean = !found.iter().any(|v| v.starts_with("audit "));
    violations.extend(found);

    let mut faults_by_kind = BTreeMap::new();
    for f in &injected {
        *faults_by_kind.entry(f.planned.fault.kind()).or_default() += 1;
    }
    Ok(Report {
        seed,
        seconds: args.seconds,
        elapsed_s: 0.0,
        faults_by_kind,
        recovery: summary(injected.iter().filter_map(|f| f.recovered_ms).collect()),
        faults: injected,
        calls,
        placed_acknowledged: placed,
        unknown_outcomes: unknown,
        retries,
        cancels: counters.cancels.load(Ordering::Relaxed),
        rounds_settled: counters.rounds_settled.load(Ordering::Relaxed),
        rounds_voided: counters.rounds_voided.load(Ordering::Relaxed),
        quiescence_s,
        probes_ms,
        match_timeout_refunds,
        exits: cluster::Exits::default(),
        tally,
        audit_clean,
        violations,
        directory: None,
    })
}

fn progress(json: bool, faults: u64) -> indicatif::ProgressBar {
    let target = if json {
        indicatif::ProgressDrawTarget::hidden()
    } else {
        indicatif::ProgressDrawTarget::stderr()
    };
    let bar = indicatif::ProgressBar::with_draw_target(Some(faults), target);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "faults {bar:30} {pos}/{len} {elapsed_precise} {msg}",
    ) {
        bar.set_style(style);
    }
    bar
}

/// The human summary.
pub fn print(report: &Report) {
    println!();
    println!(
        "seed                {} ({} s of faults, {:.0} s in all)",
        report.seed, report.seconds, report.elapsed_s
    );
    let kinds: Vec<String> = report
        .faults_by_kind
        .iter()
        .map(|(k, n)| format!("{k} {n}"))
        .collect();
    println!("faults              {}", kinds.join(", "));
    println!(
        "recovery            p50 {} ms, max {} ms",
        report.recovery.p50_ms.map_or("-".into(), |v| v.to_string()),
        report.recovery.max_ms.map_or("-".into(), |v| v.to_string())
    );
    println!(
        "calls               {} ({} outcomes unknown, {} retries, {} cancels)",
        report.calls, report.unknown_outcomes, report.retries, report.cancels
    );
    println!(
        "bets                {} ({} settled, {} refunded, {} rejected); rounds {} settled, {} voided",
        report.tally.bets,
        report.tally.settled,
        report.tally.refunded,
        report.tally.rejected,
        report.rounds_settled,
        report.rounds_voided
    );
    println!(
        "money difference    {} (duplicate ledger keys {}, bets not terminal {}, acknowledged bets missing {})",
        report.tally.money_difference,
        report.tally.duplicate_ledger_keys,
        report.tally.not_terminal,
        report.tally.acknowledged_missing
    );
    println!("quiet after         {:.1} s", report.quiescence_s);
    let probes: Vec<String> = report
        .probes_ms
        .iter()
        .map(|p| p.map_or("none".into(), |ms| format!("{ms} ms")))
        .collect();
    println!("probe bets          {}", probes.join(", "));
    println!(
        "match timeouts      {} bets refunded MATCH_TIMEOUT",
        report.match_timeout_refunds
    );
    println!(
        "processes           {} drained on SIGTERM, {} SIGKILLed after the drain, {} exited by themselves",
        report.exits.drained,
        report.exits.drain_killed.len(),
        report.exits.unexpected.len()
    );
    println!(
        "audit               {}",
        if report.audit_clean {
            "clean"
        } else {
            "VIOLATIONS"
        }
    );
    if report.passed() {
        println!("verdict             PASS");
    } else {
        println!(
            "verdict             FAIL ({} violations)",
            report.violations.len()
        );
        for v in report.violations.iter().take(50) {
            println!("  - {v}");
        }
        println!(
            "replay              betting chaos --seed {} --seconds {}",
            report.seed, report.seconds
        );
    }
    if let Some(dir) = &report.directory {
        println!("logs                {}", dir.display());
    }
}
