//! What can go wrong placing, reading or cancelling bets.

use betting_auth::AuthError;
use betting_db::StoreError;
use betting_domain::{
    ErrorCode, ErrorReason, FieldViolation, InvalidRequest, LimitError, ServiceError,
};

#[derive(Debug, thiserror::Error)]
pub enum BettingError {
    #[error(transparent)]
    Invalid(#[from] InvalidRequest),
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error(transparent)]
    Limit(#[from] LimitError),
    #[error("round not found")]
    RoundNotFound,
    #[error("round is not open for bets")]
    RoundNotOpen,
    #[error("insufficient funds")]
    InsufficientFunds,
    #[error("idempotency key already used with a different request")]
    IdempotencyConflict,
    #[error("bet not found")]
    BetNotFound,
    #[error("bet is {0} and can no longer be cancelled")]
    NotCancellable(&'static str),
    #[error("wallet service unavailable")]
    WalletUnavailable(#[source] betting_wallet_client::WalletCallError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("unexpected betting failure")]
    Internal(#[source] anyhow::Error),
    /// One failure of a group-committed batch of PlaceBets, answered to
    /// each of them (`placer.rs`).
    #[error(transparent)]
    Shared(std::sync::Arc<BettingError>),
}

impl From<sqlx::Error> for BettingError {
    fn from(err: sqlx::Error) -> Self {
        BettingError::Store(err.into())
    }
}

impl From<betting_refunds::RefundError> for BettingError {
    fn from(err: betting_refunds::RefundError) -> Self {
        use betting_refunds::RefundError;
        match err {
            RefundError::Store(e) => BettingError::Store(e),
            RefundError::WalletUnavailable(e) => BettingError::WalletUnavailable(e),
            e @ RefundError::Refused { .. } => BettingError::Internal(e.into()),
        }
    }
}

impl ServiceError for BettingError {
    fn code(&self) -> ErrorCode {
        match self {
            BettingError::Invalid(e) => e.code(),
            BettingError::Auth(e) => e.code(),
            BettingError::Limit(e) => e.code(),
            BettingError::RoundNotFound | BettingError::BetNotFound => ErrorCode::NotFound,
            BettingError::RoundNotOpen
            | BettingError::InsufficientFunds
            | BettingError::NotCancellable(_) => ErrorCode::FailedPrecondition,
            BettingError::IdempotencyConflict => ErrorCode::AlreadyExists,
            BettingError::WalletUnavailable(_) => ErrorCode::Unavailable,
            BettingError::Store(e) => e.code(),
            BettingError::Internal(_) => ErrorCode::Internal,
            BettingError::Shared(e) => e.code(),
        }
    }

    fn reason(&self) -> ErrorReason {
        match self {
            BettingError::Invalid(e) => e.reason(),
            BettingError::Auth(e) => e.reason(),
            BettingError::Limit(e) => e.reason(),
            BettingError::RoundNotFound => ErrorReason::RoundNotFound,
            BettingError::RoundNotOpen => ErrorReason::RoundNotOpen,
            BettingError::InsufficientFunds => ErrorReason::InsufficientFunds,
            BettingError::IdempotencyConflict => ErrorReason::IdempotencyKeyReused,
            BettingError::BetNotFound => ErrorReason::BetNotFound,
            BettingError::NotCancellable(_) => ErrorReason::BetNotCancellable,
            BettingError::WalletUnavailable(_) => ErrorReason::Unavailable,
            BettingError::Store(e) => e.reason(),
            BettingError::Internal(_) => ErrorReason::Internal,
            BettingError::Shared(e) => e.reason(),
        }
    }

    fn violations(&self) -> Vec<FieldViolation> {
        match self {
            BettingError::Invalid(e) => e.violations(),
            BettingError::Auth(e) => e.violations(),
            BettingError::Shared(e) => e.violations(),
            _ => Vec::new(),
        }
    }

    fn retry_after(&self) -> Option<std::time::Duration> {
        match self {
            BettingError::Limit(e) => e.retry_after(),
            BettingError::Shared(e) => e.retry_after(),
            _ => None,
        }
    }
}
