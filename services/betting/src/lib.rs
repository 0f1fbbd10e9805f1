//! BettingService: places, reads and cancels bets.
//!
//! Placing a bet is a small saga over two services, each step idempotent:
//!
//! 1. the bet row is written as `PLACING` under the client's key (scoped to
//!    the user) — a retry finds it;
//! 2. WalletService holds the stake with the key `BET:{bet_id}` — a retry
//!    never debits twice;
//! 3. the bet becomes `PENDING` and is handed to the matcher queue.
//!
//! A crash anywhere leaves either nothing debited or a `PLACING` row whose
//! stake may or may not be held. The [`recovery`] pass (and any client retry)
//! drives such a row forward through the same idempotent steps, so it ends
//! `PENDING` with its stake held, or `REJECTED` with nothing debited.

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
