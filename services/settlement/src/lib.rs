//! SettlementService: rounds.
//!
//! A round is OPEN (taking bets), then CLOSED (no new bets), then SETTLED or
//! VOIDED. Opening and closing are idempotent. Settling and voiding, and the
//! settler workers that pay matches, build on this.

#![forbid(unsafe_code)]

mod error;
mod service;
mod store;

pub use error::SettlementError;
pub use service::SettlementService;
pub use store::{RoundRow, RoundStore, RoundTotals};
