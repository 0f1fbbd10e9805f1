//! Shutdown: the one signal that reaches every long-lived loop of a process.
//!
//! [`channel`] makes a [`Trigger`], kept by whoever decides when to stop (the
//! application, a test), and a [`Shutdown`], cloned into every loop: queue
//! workers, the reconciler, the recovery pass, the stream hub and each stream,
//! the health watch, the metrics listener. A loop selects on
//! [`Shutdown::signalled`] next to its own work, so it stops at its next await
//! point once the trigger fired; [`Shutdown::is_signalled`] asks the same
//! without waiting, for a loop that checks between steps.
//!
//! The signal is one-way and sticky: once given it stays given, and a
//! `Shutdown` cloned later sees it at once. Dropping the trigger gives it
//! too: a loop whose trigger is gone could never be stopped, so it stops now
//! rather than run, or spin, for ever.
//!
//! A newtype over [`tokio_util::sync::CancellationToken`], in a crate of its
//! own so that every crate with a loop can depend on it without depending on
//! anything else of ours.

#![forbid(unsafe_code)]

use std::future::Future;

use tokio_util::sync::CancellationToken;

/// A connected pair: the trigger, and the first [`Shutdown`] it signals
/// (clone it for every loop).
pub fn channel() -> (Trigger, Shutdown) {
    let token = CancellationToken::new();
    (
        Trigger {
            token: token.clone(),
        },
        Shutdown { token },
    )
}

/// The side that asks for shutdown: [`Trigger::signal`], or dropping it.
#[derive(Debug)]
#[must_use = "dropping the trigger signals shutdown at once"]
pub struct Trigger {
    token: CancellationToken,
}

impl Trigger {
    /// Asks every loop to stop. Idempotent.
    pub fn signal(&self) {
        self.token.cancel();
    }
}

impl Drop for Trigger {
    fn drop(&mut self) {
        self.token.cancel();
    }
}

/// The side a loop listens on. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Shutdown {
    token: CancellationToken,
}

impl Shutdown {
    /// Whether shutdown was asked for (or its trigger is gone).
    pub fn is_signalled(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Completes once shutdown is asked for (or its trigger is gone); at once
    /// if it already was. Cancel-safe: made for `tokio::select!`.
    pub fn signalled(&self) -> impl Future<Output = ()> + Send + '_ {
        self.token.cancelled()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    async fn stops(shutdown: &Shutdown) -> bool {
        tokio::time::timeout(Duration::from_secs(1), shutdown.signalled())
            .await
            .is_ok()
    }

    #[tokio::test]
    async fn signal_reaches_every_clone_and_stays() {
        let (trigger, shutdown) = channel();
        let other = shutdown.clone();
        assert!(!shutdown.is_signalled());
        assert!(
            tokio::time::timeout(Duration::from_millis(20), shutdown.signalled())
                .await
                .is_err(),
            "nothing signalled yet"
        );
        trigger.signal();
        assert!(shutdown.is_signalled() && other.is_signalled());
        assert!(stops(&shutdown).await && stops(&other).await);
        // Sticky: a later clone sees it, and waiting again returns at once.
        assert!(stops(&shutdown.clone()).await);
        assert!(stops(&shutdown).await);
        drop(trigger);
    }

    #[tokio::test]
    async fn a_dropped_trigger_signals() {
        let (trigger, shutdown) = channel();
        let waiting = tokio::spawn({
            let shutdown = shutdown.clone();
            async move { shutdown.signalled().await }
        });
        drop(trigger);
        assert!(shutdown.is_signalled());
        tokio::time::timeout(Duration::from_secs(1), waiting)
            .await
            .expect("a waiting loop wakes")
            .expect("task");
    }
}
