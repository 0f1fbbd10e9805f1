//! Domain types shared by every service.
//!
//! Everything here is parsed, not validated: once a value of one of these types
//! exists it is known to be well formed (an [`Amount`] is positive, has at most
//! eight fractional digits and fits the ledger; a [`RoundId`] has the allowed
//! characters). Protobuf and storage types never appear here.

#![forbid(unsafe_code)]

mod error;
mod ids;
mod limits;
mod money;
mod status;

/// The most money movements one batched wallet call carries (HoldStakes,
/// PayWinningsBatch): the wallet refuses more, so the callers' batches — a
/// PlaceBet batch, a settlement page — are sized by this one constant and
/// can never outgrow it.
pub const MAX_MOVEMENTS_PER_CALL: usize = 256;

pub use error::{ErrorCode, ErrorReason, FieldViolation, InvalidRequest, ServiceError, Violations};
pub use ids::{BetId, IdempotencyKey, MatchId, ParseIdError, Reference, RoundId, UserId};
pub use limits::LimitError;
pub use money::{Amount, AmountError, Stake, format_money};
pub use status::{
    Account, BetResult, BetStatus, EntryKind, MatchStatus, RefundReason, RoundStatus, Side,
    UnknownDbValue,
};
