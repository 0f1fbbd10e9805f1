//! `betting chaos`, the short run: the suite as nine real processes with its
//! own PostgreSQL and Redis, a few of every fault, then the books. The long
//! run is by hand (RELIABILITY.md).

use std::process::{Command, Stdio};

/// The short run's seed is random unless BETTING_CHAOS_SEED names one; a
/// failure prints it, and `betting chaos --seed N --seconds S` replays it.
#[test]
fn a_short_chaos_run_loses_nothing() {
    let seconds = std::env::var("BETTING_CHAOS_SECONDS").unwrap_or_else(|_| "60".into());
    let mut command = Command::new(env!("CARGO_BIN_EXE_betting"));
    command
        .args(["chaos", "--json", "--seconds", &seconds])
        // The run starts its own servers; none of the test command's.
        .env_remove("DATABASE_URL")
        .env_remove("REDIS_URL")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if let Ok(seed) = std::env::var("BETTING_CHAOS_SEED") {
        command.args(["--seed", &seed]);
    }
    let output = command.output().expect("run betting chaos");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let report: serde_json::Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("no JSON report ({e}); stdout: {stdout}"));
    let seed = &report["seed"];
    assert!(
        output.status.success(),
        "chaos seed {seed} failed: {:#}",
        report["violations"]
    );
    assert_eq!(report["violations"], serde_json::json!([]), "seed {seed}");
    assert_eq!(report["money_difference"], "0", "seed {seed}");
    assert_eq!(report["duplicate_ledger_keys"], 0, "seed {seed}");
    assert_eq!(report["not_terminal"], 0, "seed {seed}");
    assert_eq!(report["acknowledged_missing"], 0, "seed {seed}");
    assert_eq!(report["audit_clean"], true, "seed {seed}");
    // A few of each fault really happened, and the load really ran.
    for kind in [
        "api kill",
        "worker kill",
        "zombie worker",
        "graceful restart",
        "redis restart",
        "postgres restart",
        "link cut",
        "link hold",
        "link delay",
    ] {
        assert!(
            report["faults_by_kind"][kind].as_u64().unwrap_or(0) >= 1,
            "seed {seed}: no {kind} in {:#}",
            report["faults_by_kind"]
        );
    }
    assert!(
        report["placed_acknowledged"].as_u64().unwrap_or(0) >= 200,
        "seed {seed}: too little load: {report:#}"
    );
    assert!(
        report["settled"].as_u64().unwrap_or(0) > 0,
        "seed {seed}: nothing settled"
    );
}
