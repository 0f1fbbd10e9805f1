//! Fault injection for crash tests.
//!
//! Tests switch a fault on through the running application to simulate a
//! process dying between two steps of the placing saga. Compiled only with the
//! `fault-injection` feature, which only the tests' dev-dependencies enable:
//! a release build has no such switch, and no configuration or API reaches it.

use std::sync::atomic::{AtomicBool, Ordering};

#[derive(Debug, Default)]
pub struct Faults {
    fail_after_stake: AtomicBool,
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
}
