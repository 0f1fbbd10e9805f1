//! SettlementService: rounds.
//!
//! A round is OPEN (taking bets), then CLOSED (no new bets), then SETTLED or
//! VOIDED; every transition is idempotent and takes the round's lock, so it
//! serialises with matching. Closing, settling and voiding refund what they
//! must in the same transaction (as owed wallet commands) and, once committed,
//! hand matches and refunds to the settler workers ([`settler`] pays
//! matches; `betting-refunds` carries out refunds). The reconciler (its own
//! crate) re-derives from PostgreSQL any of that work Redis lost.

#![forbid(unsafe_code)]

mod error;
mod service;
pub mod settler;
mod stats;
mod store;
mod watch;

pub use error::SettlementError;
pub use service::{RoundView, SettlementService};
pub use stats::MAX_AGE as ROUND_STATS_MAX_AGE;
pub use store::{MatchView, RoundRow, RoundStore, RoundTotals, Transition};
pub use watch::{RoundEventKind, RoundUpdate};
