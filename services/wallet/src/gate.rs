//! One user's money movements, a few at a time.
//!
//! Every movement of a user updates that user's wallet row, so movements of
//! one user run one after another in PostgreSQL anyway: a second one waits on
//! the row lock, holding a pooled connection while it waits. When the row is
//! held for long (a slow transaction, an operator's session), every waiting
//! movement held a connection: 50 PlaceBets of one player took all 32, and
//! every other user got UNAVAILABLE. The gate makes them wait here instead,
//! without a connection: at most [`PER_USER`] movements of a user hold a
//! connection at once, at most [`WAITING`] more wait for their turn (until
//! their request's deadline), and the rest are refused at once
//! (RESOURCE_EXHAUSTED, reason USER_BUSY: nothing was done, retry).
//!
//! Per process: several wallet instances each admit `PER_USER`; the row lock
//! still orders them. The map holds only users with a movement in flight.
//!
//! Crash and cancel: a pass is a permit, released on drop whatever happens to
//! the call (finished, failed, cancelled at its deadline). A refusal happens
//! before the transaction begins, so it decides nothing about the key: a
//! retry with the same key is a first attempt.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use betting_domain::UserId;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Movements of one user that may hold a connection at once.
const PER_USER: usize = 2;
/// Movements of one user that may wait for their turn. Waiting costs a
/// little memory, not a connection, so a player's burst (50 bets at once)
/// waits rather than fails; the per-user rate limit bounds it upstream.
const WAITING: usize = 128;
/// How long a movement outside a request (a worker's payout) waits its turn.
const WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("too many movements of this wallet at once; retry shortly")]
pub struct UserBusy;

#[derive(Default)]
pub(crate) struct UserGate {
    users: Arc<Mutex<HashMap<UserId, Arc<Slot>>>>,
}

struct Slot {
    turns: Arc<Semaphore>,
    /// Movements holding or waiting for a turn.
    present: AtomicUsize,
}

/// A movement's turn; dropping it lets the next one in.
pub(crate) struct Pass {
    _turn: OwnedSemaphorePermit,
    _presence: Presence,
}

/// Counts a movement in its user's slot, and removes the slot when the last
/// one leaves.
struct Presence {
    users: Arc<Mutex<HashMap<UserId, Arc<Slot>>>>,
    user: UserId,
    slot: Arc<Slot>,
}

impl Drop for Presence {
    fn drop(&mut self) {
        self.slot.present.fetch_sub(1, Ordering::AcqRel);
        let mut users = self.users.lock().unwrap_or_else(PoisonError::into_inner);
        // Only the map and this presence hold the slot: nobody else can
        // reach it without the map's lock, which we hold.
        if Arc::strong_count(&self.slot) == 2 {
            users.remove(&self.user);
        }
    }
}

impl UserGate {
    /// Waits for `user`'s turn: until the request's deadline, or [`WAIT`]
    /// outside a request.
    pub(crate) async fn enter(&self, user: UserId) -> Result<Pass, UserBusy> {
        let slot = {
            let mut users = self.users.lock().unwrap_or_else(PoisonError::into_inner);
            users
                .entry(user)
                .or_insert_with(|| {
                    Arc::new(Slot {
                        turns: Arc::new(Semaphore::new(PER_USER)),
                        present: AtomicUsize::new(0),
                    })
                })
                .clone()
        };
        let before = slot.present.fetch_add(1, Ordering::AcqRel);
        let presence = Presence {
            users: self.users.clone(),
            user,
            slot,
        };
        if before >= PER_USER + WAITING {
            return Err(UserBusy);
        }
        let wait = betting_deadline::bounded(WAIT);
        match tokio::time::timeout(wait, presence.slot.turns.clone().acquire_owned()).await {
            Ok(Ok(turn)) => Ok(Pass {
                _turn: turn,
                _presence: presence,
            }),
            _ => Err(UserBusy),
        }
    }

    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.users
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(id: i64) -> UserId {
        UserId::new(id).expect("user id")
    }

    #[tokio::test]
    async fn a_user_gets_a_few_turns_a_queue_and_then_refusals() {
        let gate = Arc::new(UserGate::default());
        let first = gate.enter(user(1)).await.expect("turn");
        let second = gate.enter(user(1)).await.expect("turn");
        // Two turns taken: the next ones queue (until the deadline).
        let deadline = tokio::time::Instant::now() + Duration::from_millis(300);
        let mut waiting = Vec::new();
        for _ in 0..WAITING {
            let gate = gate.clone();
            waiting.push(tokio::spawn(betting_deadline::scope(
                deadline,
                async move { gate.enter(user(1)).await.map(drop) },
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        // The queue is full: refused at once, without waiting.
        let started = std::time::Instant::now();
        assert_eq!(gate.enter(user(1)).await.err(), Some(UserBusy));
        assert!(started.elapsed() < Duration::from_millis(100));
        // Another user is not affected.
        drop(gate.enter(user(2)).await.expect("another user's turn"));
        // A turn freed lets one waiter in; the others time out at their deadline.
        drop(first);
        let mut admitted = 0;
        for w in waiting {
            if w.await.expect("joins").is_ok() {
                admitted += 1;
            }
        }
        assert!(admitted >= 1, "a freed turn admits a waiter");
        drop(second);
        assert_eq!(gate.tracked(), 0, "idle users are forgotten");
    }

    #[tokio::test]
    async fn a_refused_or_finished_movement_leaves_nothing_behind() {
        let gate = UserGate::default();
        for id in 1..=1000 {
            drop(gate.enter(user(id)).await.expect("turn"));
        }
        assert_eq!(gate.tracked(), 0);
    }
}
