//! Calls and what they answered: bearer tokens on requests, the code, reason
//! and bad fields of a failed call, decimals from text.

use rust_decimal::Decimal;
use tonic::{Code, Request, Status};

/// A request with a bearer token.
pub fn authed<T>(message: T, token: &str) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("header value"),
    );
    request
}

/// Asserts a failed call's code and returns the status.
#[track_caller]
pub fn expect_code<T: std::fmt::Debug>(result: Result<T, Status>, code: Code) -> Status {
    match result {
        Ok(value) => panic!("expected {code:?}, got success: {value:?}"),
        Err(status) => {
            assert_eq!(status.code(), code, "unexpected status: {status:?}");
            status
        }
    }
}

/// The `ErrorInfo.reason` of a status.
pub fn reason(status: &Status) -> String {
    betting_api::reason_of(status).unwrap_or_default()
}

/// The `BadRequest` fields of a status.
pub fn bad_fields(status: &Status) -> Vec<String> {
    use tonic_types::StatusExt;
    status
        .get_error_details()
        .bad_request()
        .map(|b| b.field_violations.iter().map(|v| v.field.clone()).collect())
        .unwrap_or_default()
}

/// The `RetryInfo` delay of a status, if it has one.
pub fn retry_delay(status: &Status) -> Option<std::time::Duration> {
    use tonic_types::StatusExt;
    status
        .get_error_details()
        .retry_info()
        .and_then(|r| r.retry_delay)
}

/// A decimal from text.
#[track_caller]
pub fn dec(text: &str) -> Decimal {
    text.parse().expect("decimal")
}
