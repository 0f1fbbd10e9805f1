//! The one mapping from domain errors to gRPC statuses, and the one way a
//! handler answers ([`respond`], [`respond_replayable`]).

use std::collections::HashMap;

use betting_domain::{ErrorCode, ServiceError};
use tonic::{Code, Response, Status, metadata::MetadataValue};
use tonic_types::{ErrorDetails, StatusExt};

use crate::ERROR_DOMAIN;

/// Response header set on a replayed idempotent request.
pub const IDEMPOTENT_REPLAYED: &str = "idempotent-replayed";

/// Turns a service error into the status a client sees.
///
/// Client-caused errors carry their (ours, safe) message, a
/// `google.rpc.ErrorInfo` with a stable reason and, for bad requests, a
/// `google.rpc.BadRequest`. Unavailable and internal errors are logged here
/// with their full chain and sent with a generic message: no SQL, driver text,
/// path or panic ever reaches a client.
pub fn to_status<E: ServiceError>(err: &E) -> Status {
    let code = err.code();
    let (grpc, message) = match code {
        ErrorCode::InvalidArgument => (Code::InvalidArgument, err.to_string()),
        ErrorCode::FailedPrecondition => (Code::FailedPrecondition, err.to_string()),
        ErrorCode::NotFound => (Code::NotFound, err.to_string()),
        ErrorCode::AlreadyExists => (Code::AlreadyExists, err.to_string()),
        ErrorCode::PermissionDenied => (Code::PermissionDenied, err.to_string()),
        ErrorCode::Unauthenticated => (Code::Unauthenticated, err.to_string()),
        ErrorCode::ResourceExhausted => (Code::ResourceExhausted, err.to_string()),
        ErrorCode::DeadlineExceeded => (Code::DeadlineExceeded, err.to_string()),
        ErrorCode::ShuttingDown => (Code::Unavailable, err.to_string()),
        ErrorCode::Unavailable => {
            tracing::warn!(error = %chain(err), "dependency unavailable");
            (
                Code::Unavailable,
                "service temporarily unavailable, retry later".to_owned(),
            )
        }
        ErrorCode::Internal => {
            tracing::error!(error = %chain(err), "internal error");
            (Code::Internal, "internal error".to_owned())
        }
    };
    let mut details = ErrorDetails::new();
    details.set_error_info(err.reason().as_str(), ERROR_DOMAIN, HashMap::new());
    for v in err.violations() {
        details.add_bad_request_violation(v.field, v.description);
    }
    if let Some(delay) = err.retry_after() {
        details.set_retry_info(Some(delay));
    }
    Status::with_error_details(grpc, message, details)
}

/// The `ErrorInfo.reason` of a status produced by [`to_status`], if any. Our
/// services use it to tell, say, insufficient funds from other refusals when
/// they call each other.
pub fn reason_of(status: &Status) -> Option<String> {
    status
        .get_error_details()
        .error_info()
        .filter(|info| info.domain == ERROR_DOMAIN)
        .map(|info| info.reason.clone())
}

/// The status a refusal carried inside a batch's answer (a HoldStakes
/// outcome: its code, ErrorInfo reason and message) rebuilt, as
/// [`to_status`] built it for the lone call, so that the caller reads a
/// batched refusal exactly as a lone one ([`reason_of`] included).
pub fn refusal_status(code: i32, reason: &str, message: String) -> Status {
    let mut details = ErrorDetails::new();
    if !reason.is_empty() {
        details.set_error_info(reason, ERROR_DOMAIN, HashMap::new());
    }
    Status::with_error_details(Code::from_i32(code), message, details)
}

fn chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// The one way a handler answers: its result, errors through [`to_status`].
pub fn respond<T, E: ServiceError>(result: Result<T, E>) -> Result<Response<T>, Status> {
    result.map(Response::new).map_err(|e| to_status(&e))
}

/// An answer to an idempotent request, and whether it replays an earlier one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replayable<T> {
    pub message: T,
    /// The key had been seen before: this is the original answer again.
    pub replayed: bool,
}

/// Like [`respond`], and marks a replay with `idempotent-replayed: true`.
pub fn respond_replayable<T, E: ServiceError>(
    result: Result<Replayable<T>, E>,
) -> Result<Response<T>, Status> {
    let answer = result.map_err(|e| to_status(&e))?;
    let mut response = Response::new(answer.message);
    if answer.replayed {
        response
            .metadata_mut()
            .insert(IDEMPOTENT_REPLAYED, MetadataValue::from_static("true"));
    }
    Ok(response)
}
