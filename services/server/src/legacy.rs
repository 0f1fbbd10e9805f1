//! The internal RPCs' old paths, kept for one release.
//!
//! HoldStake, HoldStakes, RefundStake, PayWinnings and PayWinningsBatch were
//! `betting.v1.WalletService` methods; they are now
//! `betting.internal.v1.StakeService`'s, with the same messages (same field
//! numbers, so the same bytes). During a rolling upgrade, betting and settler
//! instances of the previous release still call the old paths: this layer
//! rewrites those five paths to the new ones before anything else sees the
//! call, so an old caller is served (and counted, traced and authorized)
//! exactly as a new one. Every rewritten call counts in
//! `legacy_internal_calls_total{method}`: once it stays at zero after an
//! upgrade, the next release removes this module.

use std::task::{Context, Poll};

use http::{Request, Uri};
use tower::{Layer, Service};

/// The old paths and the new path of each.
pub(crate) const RENAMED: &[(&str, &str)] = &[
    (
        "/betting.v1.WalletService/HoldStake",
        "/betting.internal.v1.StakeService/HoldStake",
    ),
    (
        "/betting.v1.WalletService/HoldStakes",
        "/betting.internal.v1.StakeService/HoldStakes",
    ),
    (
        "/betting.v1.WalletService/RefundStake",
        "/betting.internal.v1.StakeService/RefundStake",
    ),
    (
        "/betting.v1.WalletService/PayWinnings",
        "/betting.internal.v1.StakeService/PayWinnings",
    ),
    (
        "/betting.v1.WalletService/PayWinningsBatch",
        "/betting.internal.v1.StakeService/PayWinningsBatch",
    ),
];

/// Rewrites the old internal paths ([`RENAMED`]) to the new ones.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct LegacyPathsLayer;

impl<S> Layer<S> for LegacyPathsLayer {
    type Service = LegacyPaths<S>;

    fn layer(&self, inner: S) -> Self::Service {
        LegacyPaths { inner }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct LegacyPaths<S> {
    inner: S,
}

impl<S, B> Service<Request<B>> for LegacyPaths<S>
where
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        if let Some(new) = renamed(request.uri().path()) {
            metrics::counter!("legacy_internal_calls_total", "method" => &new[1..]).increment(1);
            // The path alone: gRPC requests carry no query.
            let mut parts = request.uri().clone().into_parts();
            parts.path_and_query = Some(http::uri::PathAndQuery::from_static(new));
            if let Ok(uri) = Uri::from_parts(parts) {
                *request.uri_mut() = uri;
            }
        }
        self.inner.call(request)
    }
}

/// The new path of an old internal path, if `path` is one.
fn renamed(path: &str) -> Option<&'static str> {
    RENAMED
        .iter()
        .find(|(old, _)| *old == path)
        .map(|(_, new)| *new)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_old_path_names_a_stake_service_method_and_nothing_else_moves() {
        for (old, new) in RENAMED {
            let method = old.rsplit('/').next().expect("a method");
            assert_eq!(*new, format!("/betting.internal.v1.StakeService/{method}"));
            assert_eq!(renamed(old), Some(*new));
        }
        assert_eq!(renamed("/betting.v1.WalletService/Deposit"), None);
        assert_eq!(
            renamed("/betting.internal.v1.StakeService/HoldStakes"),
            None
        );
    }
}
