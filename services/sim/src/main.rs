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
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // The services' own logs, when asked for (RUST_LOG=warn, say).
    if std::env::var_os("RUST_LOG").is_some() {
        betting_telemetry::init_tracing();
    }
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
        std::process::exit(1);
    }
    Ok(())
}
