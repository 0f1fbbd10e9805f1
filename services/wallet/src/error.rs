//! What can go wrong when moving money.

use betting_auth::AuthError;
use betting_db::StoreError;
use betting_domain::{ErrorCode, ErrorReason, FieldViolation, InvalidRequest, ServiceError};

#[derive(Debug, thiserror::Error)]
pub enum WalletError {
    #[error(transparent)]
    Invalid(#[from] InvalidRequest),
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("insufficient funds")]
    InsufficientFunds,
    #[error("the wallet balance would exceed its limit")]
    BalanceLimit,
    #[error("idempotency key already used with a different request")]
    IdempotencyConflict,
    /// PlaceStakes: the user's bet key names another bet already.
    #[error("the bet key names another bet")]
    BetKeyTaken,
    /// PlaceStakes: the bet's round is not open (or does not exist).
    #[error("the round is not open for bets")]
    RoundNotOpen,
    #[error("no stake is held for this bet with this user and amount")]
    NoMatchingStake,
    #[error("a bet of this movement was already paid out")]
    AlreadyPaid,
    #[error("a bet of this movement was already refunded")]
    AlreadyRefunded,
    /// RefundStake for a bet the betting side owes no refund (see `due.rs`).
    #[error("refund not due: {0}")]
    RefundNotDue(&'static str),
    /// PayWinnings for a match that is not a settled round's, or to a loser,
    /// or of the wrong amount (see `due.rs`).
    #[error("payout not due: {0}")]
    PayoutNotDue(&'static str),
    #[error(transparent)]
    Busy(#[from] crate::gate::UserBusy),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<sqlx::Error> for WalletError {
    fn from(err: sqlx::Error) -> Self {
        use betting_db::Failure;
        match betting_db::classify(&err) {
            Failure::CheckViolation(c) if c == "wallets_balance_non_negative" => {
                WalletError::InsufficientFunds
            }
            // The column's backstop (10^18), far past the deposit limit: money
            // owed into such a wallet is refused visibly (the job that carries
            // it ends in the dead-letter list, its money counted) for an
            // operator, rather than failing as an internal error.
            Failure::CheckViolation(c) if c == "wallets_balance_range" => WalletError::BalanceLimit,
            _ => WalletError::Store(err.into()),
        }
    }
}

impl WalletError {
    /// The reason this refusal is kept under its key as the key's answer for
    /// good (`wallet_refusals`); `None` for failures that are not answers
    /// (unavailable, internal, a malformed request, a reused key).
    pub(crate) fn recorded_reason(&self) -> Option<&'static str> {
        match self {
            WalletError::InsufficientFunds
            | WalletError::BalanceLimit
            | WalletError::NoMatchingStake
            | WalletError::AlreadyPaid
            | WalletError::AlreadyRefunded => Some(self.reason().as_str()),
            _ => None,
        }
    }
}

impl ServiceError for WalletError {
    fn code(&self) -> ErrorCode {
        match self {
            WalletError::Invalid(e) => e.code(),
            WalletError::Auth(e) => e.code(),
            WalletError::InsufficientFunds
            | WalletError::BalanceLimit
            | WalletError::NoMatchingStake
            | WalletError::AlreadyPaid
            | WalletError::AlreadyRefunded
            | WalletError::RefundNotDue(_)
            | WalletError::PayoutNotDue(_)
            | WalletError::RoundNotOpen => ErrorCode::FailedPrecondition,
            WalletError::IdempotencyConflict | WalletError::BetKeyTaken => ErrorCode::AlreadyExists,
            WalletError::Busy(_) => ErrorCode::ResourceExhausted,
            WalletError::Store(e) => e.code(),
        }
    }

    fn reason(&self) -> ErrorReason {
        match self {
            WalletError::Invalid(e) => e.reason(),
            WalletError::Auth(e) => e.reason(),
            WalletError::InsufficientFunds => ErrorReason::InsufficientFunds,
            WalletError::BalanceLimit => ErrorReason::BalanceLimit,
            WalletError::IdempotencyConflict | WalletError::BetKeyTaken => {
                ErrorReason::IdempotencyKeyReused
            }
            WalletError::RoundNotOpen => ErrorReason::RoundNotOpen,
            WalletError::NoMatchingStake => ErrorReason::NoMatchingStake,
            WalletError::AlreadyPaid => ErrorReason::AlreadyPaid,
            WalletError::AlreadyRefunded => ErrorReason::AlreadyRefunded,
            WalletError::Busy(_) => ErrorReason::UserBusy,
            WalletError::RefundNotDue(_) => ErrorReason::RefundNotDue,
            WalletError::PayoutNotDue(_) => ErrorReason::PayoutNotDue,
            WalletError::Store(e) => e.reason(),
        }
    }

    fn violations(&self) -> Vec<FieldViolation> {
        match self {
            WalletError::Invalid(e) => e.violations(),
            WalletError::Auth(e) => e.violations(),
            _ => Vec::new(),
        }
    }
}
