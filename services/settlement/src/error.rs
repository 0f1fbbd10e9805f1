//! What can go wrong running rounds.

use betting_auth::AuthError;
use betting_db::StoreError;
use betting_domain::{ErrorCode, ErrorReason, FieldViolation, InvalidRequest, ServiceError};

#[derive(Debug, thiserror::Error)]
pub enum SettlementError {
    #[error(transparent)]
    Invalid(#[from] InvalidRequest),
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("round not found")]
    RoundNotFound,
    #[error("round already exists and is {0}")]
    RoundExists(&'static str),
    #[error("round is {0}")]
    WrongState(&'static str),
    #[error("round was already settled with the other outcome")]
    OtherOutcome,
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("unexpected settlement failure")]
    Internal(#[source] anyhow::Error),
}

impl From<sqlx::Error> for SettlementError {
    fn from(err: sqlx::Error) -> Self {
        SettlementError::Store(err.into())
    }
}

impl ServiceError for SettlementError {
    fn code(&self) -> ErrorCode {
        match self {
            SettlementError::Invalid(e) => e.code(),
            SettlementError::Auth(e) => e.code(),
            SettlementError::RoundNotFound => ErrorCode::NotFound,
            SettlementError::RoundExists(_) => ErrorCode::AlreadyExists,
            SettlementError::WrongState(_) | SettlementError::OtherOutcome => {
                ErrorCode::FailedPrecondition
            }
            SettlementError::Store(e) => e.code(),
            SettlementError::Internal(_) => ErrorCode::Internal,
        }
    }

    fn reason(&self) -> ErrorReason {
        match self {
            SettlementError::Invalid(e) => e.reason(),
            SettlementError::Auth(e) => e.reason(),
            SettlementError::RoundNotFound => ErrorReason::RoundNotFound,
            SettlementError::RoundExists(_) => ErrorReason::RoundExists,
            SettlementError::WrongState(_) => ErrorReason::RoundWrongState,
            SettlementError::OtherOutcome => ErrorReason::RoundSettledOtherwise,
            SettlementError::Store(e) => e.reason(),
            SettlementError::Internal(_) => ErrorReason::Internal,
        }
    }

    fn violations(&self) -> Vec<FieldViolation> {
        match self {
            SettlementError::Invalid(e) => e.violations(),
            SettlementError::Auth(e) => e.violations(),
            _ => Vec::new(),
        }
    }
}
