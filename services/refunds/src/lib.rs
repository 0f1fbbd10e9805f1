//! Refunds: money the betting side owes back, from "owed" to "done".
//!
//! A bet is refunded (cancelled, timed out, its round closed before it was
//! matched, or voided) by [`refund_bets`], the one statement that marks bets
//! `REFUNDED` and records, in the same transaction, the refund each is owed
//! in the `wallet_commands` outbox under the wallet key
//! [`IdempotencyKey::refund`](betting_domain::IdempotencyKey::refund). So the
//! money is owed the moment the bet says so, whoever refunded it.
//!
//! The [`Refunder`] carries an owed refund out through WalletService (whose
//! idempotency key makes a repeat harmless) and marks it done; the
//! [`RefundHandler`] runs it for jobs of the `refund` queue, and the
//! reconciler re-enqueues whatever stays owed.

#![forbid(unsafe_code)]

mod handler;
mod outbox;
mod refund;
mod runner;

pub use handler::RefundHandler;
pub use outbox::{DuePage, Outbox, OwedRefund};
pub use refund::{Refunds, refund_bets};
pub use runner::{RefundError, Refunder};
