//! A bounded number of seeds in the test command (`deploy/local/test`); the
//! long runs are by hand (`deploy/local/sim`, see RELIABILITY.md).
//!
//! `BETTING_SIM_SEEDS` (default 24) and `BETTING_SIM_FIRST` (default: a
//! fixed set, so CI is repeatable) choose the seeds.

use betting_sim::{SimSettings, Simulator};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_schedules_lose_nothing() {
    let database_url = std::env::var("DATABASE_URL")
        .expect("DATABASE_URL is not set: run the tests through deploy/local/test");
    let count: u64 = std::env::var("BETTING_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(24);
    let first: u64 = std::env::var("BETTING_SIM_FIRST")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let simulator = Simulator::new(&database_url).await.expect("simulator");
    let settings = SimSettings::default();
    let mut failures = Vec::new();
    for seed in first..first + count {
        let outcome = simulator.run(seed, &settings).await;
        if !outcome.passed() {
            failures.push(format!(
                "seed {seed} (replay: betting-sim --seed {seed}):\n  {}",
                outcome.violations.join("\n  ")
            ));
        }
    }
    simulator.close().await;
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
