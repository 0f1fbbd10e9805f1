//! Refusals of the per-user limits: what a caller is told when it asked for
//! more than its share (`RESOURCE_EXHAUSTED`, with a stable reason and, where
//! waiting helps, how long to wait).

use std::time::Duration;

use crate::{ErrorCode, ErrorReason, ServiceError};

/// A per-user (or per-connection) limit was hit. Nothing was done: the
/// request never reached storage or money.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    /// Too many requests of one kind in too short a time; retry after the delay.
    #[error("too many requests, retry later")]
    RateLimited { retry_after: Duration },
    /// The user has as many unmatched bets as allowed.
    #[error("too many open bets: at most {limit}")]
    TooManyOpenBets { limit: u32 },
    /// The user (or the connection) has as many live streams as allowed.
    #[error("too many live streams: at most {limit} per {per}")]
    TooManyStreams { limit: u32, per: &'static str },
}

impl ServiceError for LimitError {
    fn code(&self) -> ErrorCode {
        ErrorCode::ResourceExhausted
    }

    fn reason(&self) -> ErrorReason {
        match self {
            LimitError::RateLimited { .. } => ErrorReason::RateLimited,
            LimitError::TooManyOpenBets { .. } => ErrorReason::TooManyOpenBets,
            LimitError::TooManyStreams { .. } => ErrorReason::TooManyStreams,
        }
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            LimitError::RateLimited { retry_after } => Some(*retry_after),
            // Waiting alone does not help: a bet must match, a stream must close.
            LimitError::TooManyOpenBets { .. } | LimitError::TooManyStreams { .. } => None,
        }
    }
}
