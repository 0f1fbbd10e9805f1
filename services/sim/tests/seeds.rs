//! A bounded number of seeds in the test command (`deploy/local/test`); the
//! long runs are by hand (`deploy/local/sim`, see RELIABILITY.md).
//!
//! `BETTING_SIM_SEEDS` (default 40) and `BETTING_SIM_FIRST` (default: a
//! fixed set, so CI is repeatable) choose the seeds.

use betting_sim::SimSettings;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn random_schedules_lose_nothing() {
    let database_url = std::env::var("DATABASE_URL")
        .expect("DATABASE_URL is not set: run the tests through deploy/local/test");
    let count: u64 = std::env::var("BETTING_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(40);
    let first: u64 = std::env::var("BETTING_SIM_FIRST")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let seeds: Vec<u64> = (first..first + count).collect();
    let (mut outcomes, mut lanes) =
        betting_sim::run_seeds(&database_url, seeds, 4, SimSettings::default())
            .await
            .expect("simulator");
    let mut failures = Vec::new();
    let mut ran = 0;
    while let Some(outcome) = outcomes.recv().await {
        ran += 1;
        if !outcome.passed() {
            failures.push(format!(
                "seed {} (replay: deploy/local/sim --seed {}):\n  {}",
                outcome.seed,
                outcome.seed,
                outcome.violations.join("\n  ")
            ));
        }
    }
    while lanes.join_next().await.is_some() {}
    assert_eq!(ran, count, "every seed ran");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
