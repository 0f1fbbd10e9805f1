//! Waiting for something the background work will make true, with a deadline.
//!
//! The check is an async closure (`async || ...`, which may borrow the test's
//! locals) returning `Some(value)` once the condition holds. It runs at once,
//! then every [`INTERVAL`] until the deadline; a check that is running when
//! the deadline passes is let finish.

use std::time::Duration;

use tokio::time::Instant;

/// The pause between two checks.
pub const INTERVAL: Duration = Duration::from_millis(25);

/// Polls `check` until it returns `Some`, and returns that; panics with
/// `what` and the deadline if it still returns `None` after `deadline`.
///
/// ```ignore
/// let bet = eventually("the bet is matched", Duration::from_secs(10), async || {
///     let bet = app.bet(1, &id).await;
///     (bet.status == pb::BetStatus::Matched as i32).then_some(bet)
/// })
/// .await;
/// ```
#[track_caller]
pub fn eventually<T>(
    what: &str,
    deadline: Duration,
    check: impl AsyncFnMut() -> Option<T>,
) -> impl Future<Output = T> {
    // Taken here: `#[track_caller]` does not reach into the async body.
    let caller = std::panic::Location::caller();
    async move {
        match poll_until(deadline, check).await {
            Some(value) => value,
            None => panic!("timed out after {deadline:?} waiting until {what} (at {caller})"),
        }
    }
}

/// Polls `check` until it returns `Some`, for at most `deadline`; `None` if
/// it never did. For waits whose caller decides what a timeout means (a
/// message with the last state seen, or an assertion that follows anyway).
pub async fn poll_until<T>(
    deadline: Duration,
    mut check: impl AsyncFnMut() -> Option<T>,
) -> Option<T> {
    let end = Instant::now() + deadline;
    loop {
        if let Some(value) = check().await {
            return Some(value);
        }
        if Instant::now() >= end {
            return None;
        }
        tokio::time::sleep(INTERVAL.min(end.saturating_duration_since(Instant::now()))).await;
    }
}
