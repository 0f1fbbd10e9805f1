//! The server side: verifies the bearer token of every request that reaches a
//! guarded service, attaches the [`crate::Principal`], and logs refusals — at most
//! [`FailureLog::PER_SECOND`] lines a second, so that a client hammering us
//! with bad tokens cannot flood the log, with a count of the lines it held
//! back. The token itself is never logged: only why it was refused and
//! where the request came from.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tonic::{Request, Status, service::Interceptor};

use betting_api::to_status;

use crate::{AuthError, TokenError, Verifier};

#[derive(Clone)]
pub struct AuthInterceptor {
    verifier: Arc<Verifier>,
    failures: Arc<FailureLog>,
}

impl AuthInterceptor {
    pub fn new(verifier: Arc<Verifier>) -> Self {
        Self {
            verifier,
            failures: Arc::new(FailureLog::default()),
        }
    }
}

impl Interceptor for AuthInterceptor {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let header = request
            .metadata()
            .get("authorization")
            .map(|v| v.to_str().map_err(|_| TokenError::Malformed))
            .transpose();
        match header.and_then(|h| self.verifier.verify_header(h)) {
            Ok(principal) => {
                request.extensions_mut().insert(principal);
                Ok(request)
            }
            Err(error) => {
                if let Some(suppressed) = self.failures.admit(Instant::now()) {
                    let peer = request.remote_addr().map(|a| a.ip().to_string());
                    tracing::warn!(
                        reason = %error,
                        peer = peer.as_deref().unwrap_or("unknown"),
                        suppressed_since_last = suppressed,
                        "authentication failed"
                    );
                }
                metrics::counter!("auth_failures_total").increment(1);
                Err(to_status(&AuthError::Token(error)))
            }
        }
    }
}

/// A one-second window of failure log lines.
#[derive(Default)]
pub(crate) struct FailureLog {
    state: Mutex<Window>,
}

#[derive(Default)]
struct Window {
    started: Option<Instant>,
    logged: u32,
    /// Failures not logged since the last line that was.
    suppressed: u64,
}

impl FailureLog {
    /// Warn lines per second at most.
    pub(crate) const PER_SECOND: u32 = 5;

    /// Whether a failure at `now` gets a log line; if so, how many were
    /// held back since the previous line.
    pub(crate) fn admit(&self, now: Instant) -> Option<u64> {
        let Ok(mut w) = self.state.lock() else {
            return None;
        };
        let fresh = w
            .started
            .is_none_or(|s| now.duration_since(s) >= Duration::from_secs(1));
        if fresh {
            w.started = Some(now);
            w.logged = 0;
        }
        if w.logged < Self::PER_SECOND {
            w.logged += 1;
            Some(std::mem::take(&mut w.suppressed))
        } else {
            w.suppressed += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TokenPolicy;

    const SECRET: &[u8] = b"an-excellent-test-secret-of-32-bytes!";

    #[test]
    fn failure_lines_are_rate_limited_and_count_what_they_held_back() {
        let log = FailureLog::default();
        let t0 = Instant::now();
        let admitted: Vec<_> = (0..8).map(|_| log.admit(t0)).collect();
        assert_eq!(&admitted[..5], &[Some(0); 5]);
        assert_eq!(&admitted[5..], &[None; 3]);
        // The next second's first line says three were held back.
        assert_eq!(log.admit(t0 + Duration::from_millis(1001)), Some(3));
        assert_eq!(log.admit(t0 + Duration::from_millis(1002)), Some(0));
    }

    /// The README promises every error an `ErrorInfo` reason; the
    /// interceptor's refusals used to be bare statuses without one.
    #[test]
    fn the_interceptor_refuses_through_the_mapping_with_a_reason() {
        let mut interceptor =
            AuthInterceptor::new(Arc::new(Verifier::hs256(SECRET, TokenPolicy::local())));
        for header in [None, Some("Bearer nonsense"), Some("Basic abc")] {
            let mut request = Request::new(());
            if let Some(header) = header {
                request
                    .metadata_mut()
                    .insert("authorization", header.parse().expect("header"));
            }
            let status = interceptor.call(request).expect_err("refused");
            assert_eq!(status.code(), tonic::Code::Unauthenticated, "{header:?}");
            assert_eq!(
                betting_api::reason_of(&status).as_deref(),
                Some("UNAUTHENTICATED"),
                "{header:?}"
            );
        }
    }
}
