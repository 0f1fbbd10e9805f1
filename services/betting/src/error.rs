//! What can go wrong placing, reading or cancelling bets.

use betting_auth::AuthError;
use betting_domain::{ErrorCode, FieldViolation, InvalidRequest, ServiceError};

#[derive(Debug, thiserror::Error)]
pub enum BettingError {
    #[error(transparent)]
    Invalid(#[from] InvalidRequest),
    #[error(transparent)]
    Auth(#[from] AuthError),
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
    WalletUnavailable(#[source] tonic::Status),
    #[error("database unavailable")]
    Unavailable(#[source] sqlx::Error),
    #[error("unexpected betting failure")]
    Internal(#[source] anyhow::Error),
}

impl From<sqlx::Error> for BettingError {
    fn from(err: sqlx::Error) -> Self {
        if betting_db::is_unavailable(&err) {
            BettingError::Unavailable(err)
        } else {
            BettingError::Internal(err.into())
        }
    }
}

impl ServiceError for BettingError {
    fn code(&self) -> ErrorCode {
        match self {
            BettingError::Invalid(e) => e.code(),
            BettingError::Auth(e) => e.code(),
            BettingError::RoundNotFound | BettingError::BetNotFound => ErrorCode::NotFound,
            BettingError::RoundNotOpen
            | BettingError::InsufficientFunds
            | BettingError::NotCancellable(_) => ErrorCode::FailedPrecondition,
            BettingError::IdempotencyConflict => ErrorCode::AlreadyExists,
            BettingError::WalletUnavailable(_) | BettingError::Unavailable(_) => {
                ErrorCode::Unavailable
            }
            BettingError::Internal(_) => ErrorCode::Internal,
        }
    }

    fn reason(&self) -> &'static str {
        match self {
            BettingError::Invalid(e) => e.reason(),
            BettingError::Auth(e) => e.reason(),
            BettingError::RoundNotFound => "ROUND_NOT_FOUND",
            BettingError::RoundNotOpen => "ROUND_NOT_OPEN",
            BettingError::InsufficientFunds => "INSUFFICIENT_FUNDS",
            BettingError::IdempotencyConflict => "IDEMPOTENCY_KEY_REUSED",
            BettingError::BetNotFound => "BET_NOT_FOUND",
            BettingError::NotCancellable(_) => "BET_NOT_CANCELLABLE",
            BettingError::WalletUnavailable(_) | BettingError::Unavailable(_) => "UNAVAILABLE",
            BettingError::Internal(_) => "INTERNAL",
        }
    }

    fn violations(&self) -> Vec<FieldViolation> {
        match self {
            BettingError::Invalid(e) => e.violations(),
            BettingError::Auth(e) => e.violations(),
            _ => Vec::new(),
        }
    }
}
