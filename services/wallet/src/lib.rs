//! WalletService: wallets and the ledger.
//!
//! This is the only code that writes `wallets` and `ledger_entries`. Every
//! movement goes through [`Ledger::post`], which is idempotent by key, never
//! overdraws, and writes exactly one ledger row (a transfer between the user's
//! wallet and a system account) in the same transaction as the balance change.
//! Refunds and payouts are verified against the bets, matches and rounds
//! they are for (`due.rs`); deposits and withdrawals are recorded in the
//! privileged-action trail with the movement.

#![forbid(unsafe_code)]

mod due;
mod error;
mod gate;
mod ledger;
mod placement;
mod service;

pub use error::WalletError;
pub use ledger::{BetPlacement, Entry, Guard, Ledger, Posted, Transfer, WalletView};
pub use service::{
    EntryPage, MAX_HOLDS_PER_CALL, PayoutAsk, StakeHold, StakePlacementAsk, WalletService,
};
