//! SettlementService: rounds.
//!
//! A round is OPEN (taking bets), then CLOSED (no new bets), then SETTLED or
//! VOIDED; every transition is idempotent and takes the round's lock, so it
//! serialises with matching. Closing, settling and voiding refund what they
//! must in the same transaction (as owed wallet commands) and, once committed,
//! hand matches and refunds to the settler workers ([`settler`]). The
//! [`reconciler`] re-derives from PostgreSQL any of that work Redis lost.

#![forbid(unsafe_code)]

mod error;
pub mod jobs;
pub mod reconciler;
mod service;
pub mod settler;
mod store;
pub mod stuck;
mod watch;

pub use error::SettlementError;
pub use service::SettlementService;
pub use store::{MatchView, RoundRow, RoundStore, RoundTotals, Transition};
