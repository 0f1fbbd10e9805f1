//! The deadline of the request a task is serving.
//!
//! The server's deadline layer (`betting-server`) runs each call inside
//! [`scope`]; whatever the call does on its way — a PostgreSQL transaction
//! (`betting_db::begin`), a call to WalletService (`betting-wallet-client`) —
//! asks [`remaining`] and spends no more than that. So a request never holds a
//! connection or waits on a lock past the moment its client gave up.
//!
//! Work that is not a request (workers, the reconciler, recovery) runs outside
//! any scope: [`remaining`] is `None` and the stores' own defaults apply.
//! A task spawned from a request does not inherit the scope, on purpose: work
//! handed off is meant to outlive the request.

#![forbid(unsafe_code)]

use std::{future::Future, time::Duration};

use tokio::time::Instant;

tokio::task_local! {
    static DEADLINE: Instant;
}

/// Runs `future` with `deadline` as the current request's deadline.
pub async fn scope<F: Future>(deadline: Instant, future: F) -> F::Output {
    DEADLINE.scope(deadline, future).await
}

/// The deadline of the request this task serves, if it serves one.
pub fn current() -> Option<Instant> {
    DEADLINE.try_with(|d| *d).ok()
}

/// The time left before the current request's deadline: `None` outside a
/// request, zero once it has passed.
pub fn remaining() -> Option<Duration> {
    current().map(|d| d.saturating_duration_since(Instant::now()))
}

/// `fallback`, shortened to the current request's remaining time.
pub fn bounded(fallback: Duration) -> Duration {
    remaining().map_or(fallback, |left| left.min(fallback))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_scope_sets_the_deadline_and_nothing_leaks_out_of_it() {
        assert_eq!(remaining(), None);
        assert_eq!(bounded(Duration::from_secs(3)), Duration::from_secs(3));
        let deadline = Instant::now() + Duration::from_millis(500);
        scope(deadline, async {
            assert_eq!(current(), Some(deadline));
            let left = remaining().expect("inside a scope");
            assert!(left <= Duration::from_millis(500));
            assert!(bounded(Duration::from_secs(3)) <= Duration::from_millis(500));
            assert_eq!(bounded(Duration::from_millis(1)), Duration::from_millis(1));
            // A spawned task is not part of the request.
            let spawned = tokio::spawn(async { current() }).await.expect("joins");
            assert_eq!(spawned, None);
        })
        .await;
        assert_eq!(current(), None);
    }

    #[tokio::test]
    async fn a_passed_deadline_leaves_zero() {
        let deadline = Instant::now() - Duration::from_millis(5);
        scope(deadline, async {
            assert_eq!(remaining(), Some(Duration::ZERO));
        })
        .await;
    }
}
