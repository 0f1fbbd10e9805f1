//! `betting-sim`: runs seeds of the simulation against PostgreSQL
//! (`DATABASE_URL`, a database per seed) and a Redis of its own.
//!
//! ```text
//! betting-sim --seed 1234                 replay one seed
//! betting-sim --seeds 10000 --first 1     run many; print every failing seed
//! ```

use std::time::{Duration, Instant};

use betting_sim::SimSettings;
use clap::Parser;

#[derive(Parser)]
#[command(
    about = "Seeded simulation of the betting suite: random schedules of operations and faults, checked against the client's own books"
)]
struct Args {
    /// Replay exactly this seed.
    #[arg(long)]
    seed: Option<u64>,
    /// How many seeds to run, from --first on.
    #[arg(long, default_value_t = 100)]
    seeds: u64,
    #[arg(long, default_value_t = 1)]
    first: u64,
    /// Groups of concurrent steps per seed.
    #[arg(long, default_value_t = 60)]
    steps: usize,
    /// Stop after this many failing seeds.
    #[arg(long, default_value_t = 10)]
    max_failures: usize,
    /// Seeds run at once, each lane with a Redis of its own (runs mostly
    /// wait on timers, so lanes scale well past the core count).
    #[arg(long, default_value_t = 1)]
    jobs: usize,
    /// Seeds per child process in a long run: a killed worker process is a
    /// task of this process, and its connections, like a real crash's, are
    /// only closed when the process ends.
    #[arg(long, default_value_t = 500)]
    chunk: u64,
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: String,
}

/// Set in the child processes of a chunked run.
const CHILD: &str = "BETTING_SIM_CHILD";

/// A chunk's tally, printed last by a child as one line.
#[derive(Default)]
struct Tally {
    seeds: u64,
    failed: u64,
    bets: u64,
    lost: u64,
    millis: u64,
}

impl Tally {
    fn line(&self) -> String {
        format!(
            "TALLY seeds={} failed={} bets={} lost={} millis={}",
            self.seeds, self.failed, self.bets, self.lost, self.millis
        )
    }

    fn parse(line: &str) -> Option<Self> {
        let mut t = Tally::default();
        for field in line.strip_prefix("TALLY ")?.split(' ') {
            let (name, value) = field.split_once('=')?;
            let value: u64 = value.parse().ok()?;
            match name {
                "seeds" => t.seeds = value,
                "failed" => t.failed = value,
                "bets" => t.bets = value,
                "lost" => t.lost = value,
                "millis" => t.millis = value,
                _ => {}
            }
        }
        Some(t)
    }
}

/// Runs a long range as child processes of `chunk` seeds each, one after
/// the other, and adds up their tallies.
fn run_chunked(args: &Args) -> anyhow::Result<()> {
    use std::io::BufRead;
    let started = Instant::now();
    let mut total = Tally::default();
    let mut first = args.first;
    let end = args.first + args.seeds;
    while first < end && (total.failed as usize) < args.max_failures {
        let seeds = args.chunk.min(end - first);
        let mut child = std::process::Command::new(std::env::current_exe()?)
            .args(["--first", &first.to_string(), "--seeds", &seeds.to_string()])
            .args([
                "--jobs",
                &args.jobs.to_string(),
                "--steps",
                &args.steps.to_string(),
            ])
            .args([
                "--max-failures",
                &(args.max_failures - total.failed as usize).to_string(),
            ])
            .env(CHILD, "1")
            .stdout(std::process::Stdio::piped())
            .spawn()?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
        for line in std::io::BufReader::new(stdout).lines() {
            let line = line?;
            match Tally::parse(&line) {
                Some(t) => {
                    total.seeds += t.seeds;
                    total.failed += t.failed;
                    total.bets += t.bets;
                    total.lost += t.lost;
                    total.millis += t.millis;
                }
                None => println!("{line}"),
            }
        }
        child.wait()?;
        first += seeds;
    }
    println!(
        "{} seeds in {:.0?} (mean {:.2}s a seed): {} passed, {} failed; {} bets acknowledged, {} answers lost and resolved by retry",
        total.seeds,
        started.elapsed(),
        total.millis as f64 / 1000.0 / total.seeds.max(1) as f64,
        total.seeds - total.failed,
        total.failed,
        total.bets,
        total.lost,
    );
    if total.failed > 0 {
        std::process::exit(1);
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let child = std::env::var_os(CHILD).is_some();
    if args.seed.is_none() && args.seeds > args.chunk && !child {
        return run_chunked(&args);
    }
    // The services' own logs, when asked for (RUST_LOG=warn, say).
    let _telemetry = std::env::var_os("RUST_LOG")
        .is_some()
        .then(betting_telemetry::init_tracing);
    let settings = SimSettings {
        steps: args.steps,
        ..SimSettings::default()
    };
    let seeds: Vec<u64> = match args.seed {
        Some(seed) => vec![seed],
        None => (args.first..args.first + args.seeds).collect(),
    };
    let started = Instant::now();
    let (mut outcomes, mut lanes) =
        betting_sim::run_seeds(&args.database_url, seeds, args.jobs, settings).await?;
    let mut failed = Vec::new();
    let mut times = Vec::new();
    let (mut bets, mut unknown) = (0, 0);
    while let Some(outcome) = outcomes.recv().await {
        let seed = outcome.seed;
        times.push(outcome.elapsed);
        bets += outcome.bets;
        unknown += outcome.unknown_answers;
        if outcome.passed() {
            if args.seed.is_some() || times.len() % 100 == 0 {
                println!(
                    "seed {seed}: ok in {:.1?} ({} seeds done, {} failed, {:.0?} so far)",
                    outcome.elapsed,
                    times.len(),
                    failed.len(),
                    started.elapsed()
                );
            }
        } else {
            println!(
                "seed {seed}: FAILED in {:.1?}{}",
                outcome.elapsed,
                outcome
                    .database
                    .as_ref()
                    .map(|db| format!(" (database {db} kept)"))
                    .unwrap_or_default()
            );
            for violation in &outcome.violations {
                println!("  - {violation}");
            }
            println!("  replay: betting-sim --seed {seed}");
            failed.push(seed);
            if failed.len() >= args.max_failures {
                println!("stopping after {} failing seeds", failed.len());
                break;
            }
        }
    }
    // Lanes finish the seed they are on, then close their servers.
    drop(outcomes);
    while lanes.join_next().await.is_some() {}
    times.sort();
    let median = times
        .get(times.len() / 2)
        .copied()
        .unwrap_or(Duration::ZERO);
    println!(
        "{} seeds in {:.0?} (median {:.2?} a seed): {} passed, {} failed; {bets} bets acknowledged, {unknown} answers lost and resolved by retry",
        times.len(),
        started.elapsed(),
        median,
        times.len() - failed.len(),
        failed.len(),
    );
    if !failed.is_empty() {
        println!("failing seeds: {failed:?}");
    }
    if child {
        let tally = Tally {
            seeds: times.len() as u64,
            failed: failed.len() as u64,
            bets: bets as u64,
            lost: unknown as u64,
            millis: times.iter().map(|t| t.as_millis() as u64).sum(),
        };
        println!("{}", tally.line());
    }
    if !failed.is_empty() {
        std::process::exit(1);
    }
    Ok(())
}
