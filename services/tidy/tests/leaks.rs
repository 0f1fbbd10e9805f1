//! The error-message scan over a whole test run (see `betting_tidy::leaks`).
//!
//! `deploy/local/test` runs the suite with `BETTING_TEST_STATUS_LOG=<file>`,
//! then this test alone with `BETTING_STATUS_SCAN=<file>` (and fails itself
//! if a whole run left the file empty: the recording is broken). Run any
//! other way (no file to scan) this test says so and passes.

use betting_tidy::leaks::leaks;

#[test]
fn every_error_message_sent_is_clean() {
    let Some(path) = std::env::var_os("BETTING_STATUS_SCAN") else {
        eprintln!(
            "BETTING_STATUS_SCAN is not set: no status log to scan (deploy/local/test sets it)"
        );
        return;
    };
    let log = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("read the status log {path:?}: {e}"));
    let mut offenders = Vec::new();
    let mut lines = 0;
    for line in log.lines() {
        lines += 1;
        // path, code, message, details: the path is ours, not the message.
        let sent = line.split_once('\t').map_or(line, |(_, sent)| sent);
        let found = leaks(sent);
        if !found.is_empty() {
            offenders.push(format!("{found:?}: {line}"));
        }
    }
    offenders.sort();
    offenders.dedup();
    assert!(
        offenders.is_empty(),
        "{} of {lines} error statuses sent leak internals:\n{}",
        offenders.len(),
        offenders.join("\n")
    );
    eprintln!("{lines} error statuses scanned, none leaks internals");
}
