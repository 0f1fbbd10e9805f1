//! `betting bench scenario resilience`, short: matchers and settlers killed
//! and restarted under 100 bets/s, in a suite of the scenario's own (nine
//! processes, its own PostgreSQL and Redis). A benchmark's run, so its
//! figures are not asserted; what it must show is that nothing was lost,
//! stranded or left unpaid, and that every fault really happened.

use std::process::{Command, Stdio};

#[test]
fn workers_killed_under_load_lose_strand_and_leave_unpaid_nothing() {
    let output = Command::new(env!("CARGO_BIN_EXE_betting"))
        // 18 s: the load-time cycle reaches both matchers killed at once.
        .args([
            "bench",
            "scenario",
            "resilience",
            "--seconds",
            "18",
            "--json",
        ])
        // The run starts its own servers; none of the test command's.
        .env_remove("DATABASE_URL")
        .env_remove("REDIS_URL")
        .env_remove("BETTING_JWT_SECRET")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .output()
        .expect("run betting bench scenario resilience");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let report: serde_json::Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("no JSON report ({e}); stdout: {stdout}"));
    assert!(output.status.success(), "the run failed: {report:#}");

    // Only workers were killed: every bet was taken, none refused.
    assert_eq!(report["scheduled"], 1800, "{report:#}");
    assert_eq!(report["placed"], 1800, "{report:#}");
    assert_eq!(report["errors"], 0, "{report:#}");
    // Every bet found its partner (the two sides are equal, the stakes one
    // size), and every match was paid, with the job a killed settler held.
    assert_eq!(report["matches"], 900, "{report:#}");
    assert_eq!(report["pending_after_matching"], 0, "{report:#}");
    assert_eq!(report["settled_matches"], 900, "{report:#}");
    assert_eq!(report["settle_complete"], true, "{report:#}");
    assert_eq!(report["audit_clean"], true, "{report:#}");
    assert_eq!(
        report["unexpected_exits"],
        serde_json::json!([]),
        "{report:#}"
    );

    let faults = report["worker_faults"].as_array().expect("worker_faults");
    for fault in faults {
        assert!(fault["error"].is_null(), "a fault failed: {fault:#}");
    }
    let names: Vec<&str> = faults.iter().filter_map(|f| f["fault"].as_str()).collect();
    for want in [
        "SIGKILL matcher-0",
        "SIGKILL settler-0",
        "SIGKILL matcher-1",
        "SIGKILL settler-1",
        "SIGKILL both matchers",
        "SIGKILL both settlers before SettleRound",
    ] {
        assert!(names.contains(&want), "no {want:?} in {names:?}");
    }
    assert!(
        names
            .iter()
            .any(|n| n.starts_with("SIGKILL both settlers mid-payout (")),
        "the mid-payout kill did not land while payouts were outstanding: {names:?}"
    );
}
