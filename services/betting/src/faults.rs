//! Fault injection for crash tests.
//!
//! Tests switch a fault on through the running application to simulate a
//! process dying between two steps of the placing saga. Compiled only with the
//! `fault-injection` feature, which only the tests' dev-dependencies enable:
//! a release build has no such switch, and no configuration or API reaches it.

use std::{
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::Duration,
};

#[derive(Debug, Default)]
pub struct Faults {
    fail_after_stake: AtomicBool,
    match_jobs_delay_ms: AtomicU64,
}

impl Faults {
    /// Makes PlaceBet fail right after the wallet placed the bet (its stake
    /// and its PENDING row committed together), before the client is
    /// answered, the match job queued or the change announced — as if the
    /// process died there.
    pub fn set_fail_after_stake(&self, on: bool) {
        self.fail_after_stake.store(on, Ordering::SeqCst);
    }

    pub(crate) fn fail_after_stake(&self) -> bool {
        self.fail_after_stake.load(Ordering::SeqCst)
    }

    /// Makes each placing batch wait this long between answering its
    /// callers and sending its match jobs (zero: not at all), as a slow
    /// Redis would.
    pub fn set_match_jobs_delay(&self, delay: Duration) {
        let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        self.match_jobs_delay_ms.store(ms, Ordering::SeqCst);
    }

    pub(crate) fn match_jobs_delay(&self) -> Option<Duration> {
        match self.match_jobs_delay_ms.load(Ordering::SeqCst) {
            0 => None,
            ms => Some(Duration::from_millis(ms)),
        }
    }
}
