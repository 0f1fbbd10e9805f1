//! BettingService: places, reads and cancels bets.
//!
//! A new bet is one fact, its stake held and its row written, and it is
//! made in one transaction: the wallet's PlaceStakes holds the stake (key
//! `BET:{bet_id}`) and writes the row `PENDING` (or `REJECTED` for want of
//! funds) together, for a whole batch of new bets at once (`placer.rs`'s
//! group commit; `services/wallet/src/placement.rs` has the protocol and
//! its interleavings). Then the bet is handed to the matcher queue and
//! announced. A crash anywhere leaves each bet placed whole or not at all,
//! and a client retry finds it by its key (scoped to the user).
//!
//! Releases before this one placed a bet as a saga of three commits: the
//! row `PLACING`, the stake, the row `PENDING`. A `PLACING` row such a
//! release left behind may or may not have its stake held; the [`recovery`]
//! pass (and any client retry) drives it forward through the same
//! idempotent steps ([`BettingService::complete`]), so it ends `PENDING`
//! with its stake held, or `REJECTED` with nothing debited.

#![forbid(unsafe_code)]

mod error;
#[cfg(feature = "fault-injection")]
mod faults;
pub mod matcher;
mod placer;
pub mod recovery;
mod service;
mod store;
mod watch;

pub use error::BettingError;
#[cfg(feature = "fault-injection")]
pub use faults::Faults;
/// Placing batches in flight at once (tests that hold every slot busy).
pub use placer::SLOTS as PLACE_BATCH_SLOTS;
pub use service::{BetLimits, BetPage, BettingService, Placed};
pub use store::{BetRow, BetStore, ChangePage, PendingBet};
pub use watch::{BetEvent, BetEventKind};
