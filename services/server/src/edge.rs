//! The edge's per-call protection, one tower layer inside gRPC-Web (so it sees
//! every call as gRPC, whatever the client spoke):
//!
//! - **Load shedding.** At most `BETTING_MAX_INFLIGHT_REQUESTS` calls are
//!   worked on at once; one more is answered RESOURCE_EXHAUSTED (reason
//!   OVERLOADED) at once. Queueing it instead would only make every caller
//!   wait behind work the server cannot finish in time, and hold its memory
//!   meanwhile. A call counts until its response head is ready: a stream
//!   counts while it opens (its snapshot query), not for its whole life.
//!   The internal StakeService (`betting.internal.`, the services' own calls
//!   to the wallet) counts against a cap of its own, of the same size: in
//!   one process serving both, the PlaceBets waiting for their batch once
//!   filled the shared cap, and the batch's own PlaceStakes was then shed,
//!   failing every bet of the batch (found by the attack review of
//!   2026-12-08; `overload_never_sheds_the_call_that_finishes_admitted_work`).
//!   A wallet serving only internal calls is capped as before.
//! - **Deadlines.** Every call runs inside a [`betting_deadline::scope`]: the
//!   client's `grpc-timeout`, capped, or the server's default when it sent
//!   none. PostgreSQL transactions (`betting_db::begin`) and calls to
//!   WalletService spend no more than what is left, and the call itself is
//!   dropped at the deadline with DEADLINE_EXCEEDED. Dropping a call is what
//!   a client's cancel does anyway; every handler is written to survive it
//!   (see ARCHITECTURE.md, "Interleavings").
//!
//! - **A tarpit for refused floods.** A connection that draws more than
//!   [`REFUSALS_PER_SECOND`] RESOURCE_EXHAUSTED answers in a second (a
//!   client ignoring every `RetryInfo`: the open-and-reset flood, a loop of
//!   rate-limited reads) gets its further refusals after [`TARPIT`]. Each
//!   refusal is cheap, but 20,000 a second of them still took the CPU from
//!   everyone else; held back, a closed-loop flooder sends at most its
//!   stream limit per [`TARPIT`]. The refusal holds no in-flight slot and no
//!   connection to a store while it waits.
//!
//! Health and reflection pass untouched: an orchestrator must see an
//! overloaded server as overloaded-but-alive, not dead, and both are cheap.

use std::{
    collections::HashMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex, PoisonError},
    task::{Context, Poll},
    time::Duration,
};

use betting_config::EdgeSettings;
use betting_domain::{ErrorCode, ErrorReason, ServiceError};
use futures::future::BoxFuture;
use tokio::{sync::Semaphore, time::Instant};
use tower::{Layer, Service};

/// What the edge refuses a call with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum EdgeError {
    #[error("the server is at capacity; retry with backoff")]
    Overloaded,
    #[error("the call's deadline passed before it finished")]
    DeadlineExceeded,
    /// The request could not be read to its end (the client's connection
    /// broke mid-request): the handler never ran, so a retry is safe.
    #[error("the request could not be read; retry")]
    Unreadable,
}

impl ServiceError for EdgeError {
    fn code(&self) -> ErrorCode {
        match self {
            EdgeError::Overloaded => ErrorCode::ResourceExhausted,
            EdgeError::DeadlineExceeded => ErrorCode::DeadlineExceeded,
            EdgeError::Unreadable => ErrorCode::Unavailable,
        }
    }

    fn reason(&self) -> ErrorReason {
        match self {
            EdgeError::Overloaded => ErrorReason::Overloaded,
            EdgeError::DeadlineExceeded => ErrorReason::DeadlineExceeded,
            EdgeError::Unreadable => ErrorReason::RequestUnreadable,
        }
    }
}

/// RESOURCE_EXHAUSTED answers a connection may draw in a second before the
/// next ones are held back.
const REFUSALS_PER_SECOND: u32 = 200;
/// How long a flooding connection's refusals are held back.
const TARPIT: Duration = Duration::from_secs(1);
/// Connections whose refusals are counted at once; past it, stale counts go.
const TRACKED_CONNECTIONS: usize = 8192;

/// Calls allowed a longer default than the rest: an audit reads every table.
const LONG_CALLS: &[&str] = &["/betting.v1.AdminService/RunAudit"];

/// The path prefix of the internal services (their own in-flight cap).
const INTERNAL: &str = "/betting.internal.";

/// Paths that bypass the edge: infrastructure, never shed.
fn is_infrastructure(path: &str) -> bool {
    path.starts_with("/grpc.health.v1.Health/") || path.starts_with("/grpc.reflection.")
}

#[derive(Clone)]
pub(crate) struct EdgeLayer {
    edge: Arc<Edge>,
}

struct Edge {
    inflight: Option<Arc<Semaphore>>,
    /// The internal StakeService's calls' own cap (see the module doc).
    internal: Option<Arc<Semaphore>>,
    default_timeout: Duration,
    max_timeout: Duration,
    /// Per connection (peer address): when its count started, and the
    /// RESOURCE_EXHAUSTED answers since.
    refusals: Mutex<HashMap<SocketAddr, (Instant, u32)>>,
}

impl EdgeLayer {
    pub fn new(settings: &EdgeSettings) -> Self {
        let limit = settings.max_inflight_requests;
        let cap = || (limit > 0).then(|| Arc::new(Semaphore::new(limit)));
        Self {
            edge: Arc::new(Edge {
                inflight: cap(),
                internal: cap(),
                default_timeout: settings.request_timeout(),
                max_timeout: settings.request_timeout_max(),
                refusals: Mutex::default(),
            }),
        }
    }
}

impl Edge {
    /// How long a call to `path` may take: the client's timeout up to the
    /// cap, else the default for the path.
    fn budget(&self, path: &str, headers: &http::HeaderMap) -> Duration {
        let default = if LONG_CALLS.contains(&path) {
            self.max_timeout
        } else {
            self.default_timeout
        };
        headers
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_grpc_timeout)
            .map_or(default, |asked| asked.min(self.max_timeout))
    }
}

impl Edge {
    /// Counts a RESOURCE_EXHAUSTED answer to `peer`; whether it floods.
    fn flooding(&self, peer: SocketAddr) -> bool {
        let now = Instant::now();
        let mut refusals = self.refusals.lock().unwrap_or_else(PoisonError::into_inner);
        if refusals.len() >= TRACKED_CONNECTIONS && !refusals.contains_key(&peer) {
            refusals.retain(|_, (since, _)| now.duration_since(*since) < Duration::from_secs(1));
        }
        let (since, count) = refusals.entry(peer).or_insert((now, 0));
        if now.duration_since(*since) >= Duration::from_secs(1) {
            *since = now;
            *count = 0;
        }
        *count = count.saturating_add(1);
        *count > REFUSALS_PER_SECOND
    }
}

/// Whether a response is a trailers-only RESOURCE_EXHAUSTED answer.
/// A status tonic made by itself from a transport failure: UNKNOWN, which
/// our mapping never sends, carrying the driver's words ("h2 protocol
/// error: error reading a body from connection" when a client's connection
/// breaks mid-request; `betting chaos` found it by cutting links).
fn is_transport_failure<B>(response: &http::Response<B>) -> bool {
    response
        .headers()
        .get("grpc-status")
        .is_some_and(|code| code.as_bytes() == b"2")
}

/// Replaces a transport failure's status with ours: the driver's text never
/// reaches a client.
fn scrub<B: Default>(response: http::Response<B>) -> http::Response<B> {
    if is_transport_failure(&response) {
        refuse(EdgeError::Unreadable)
    } else {
        response
    }
}

fn is_refusal<B>(response: &http::Response<B>) -> bool {
    response
        .headers()
        .get("grpc-status")
        .is_some_and(|code| code.as_bytes() == b"8")
}

impl<S> Layer<S> for EdgeLayer {
    type Service = EdgeService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        EdgeService {
            inner,
            edge: self.edge.clone(),
        }
    }
}

#[derive(Clone)]
pub(crate) struct EdgeService<S> {
    inner: S,
    edge: Arc<Edge>,
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for EdgeService<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>, Error = Infallible>,
    S::Future: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = http::Response<ResBody>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let path = request.uri().path();
        if is_infrastructure(path) {
            return Box::pin(self.inner.call(request));
        }
        let cap = match path.starts_with(INTERNAL) {
            true => &self.edge.internal,
            false => &self.edge.inflight,
        };
        let permit = match cap {
            None => None,
            Some(slots) => match slots.clone().try_acquire_owned() {
                Ok(permit) => Some(permit),
                Err(_) => {
                    metrics::counter!("requests_shed_total").increment(1);
                    return Box::pin(std::future::ready(Ok(refuse(EdgeError::Overloaded))));
                }
            },
        };
        let deadline = Instant::now() + self.edge.budget(path, request.headers());
        let peer = request
            .extensions()
            .get::<tonic::transport::server::TcpConnectInfo>()
            .and_then(|info| info.remote_addr());
        let edge = self.edge.clone();
        let call = self.inner.call(request);
        Box::pin(async move {
            let timed = tokio::time::timeout_at(deadline, call);
            let answer = match betting_deadline::scope(deadline, timed).await {
                Ok(response) => response,
                Err(_) => {
                    metrics::counter!("requests_deadline_exceeded_total").increment(1);
                    Ok(refuse(EdgeError::DeadlineExceeded))
                }
            };
            drop(permit);
            let answer = answer.map(scrub);
            if let (Ok(response), Some(peer)) = (&answer, peer)
                && is_refusal(response)
                && edge.flooding(peer)
            {
                metrics::counter!("requests_tarpitted_total").increment(1);
                tokio::time::sleep(TARPIT).await;
            }
            answer
        })
    }
}

/// A trailers-only gRPC answer refusing the call, made by the one mapping.
fn refuse<B: Default>(err: EdgeError) -> http::Response<B> {
    betting_api::to_status(&err).into_http()
}

/// Parses a `grpc-timeout` value: at most 8 digits and a unit (H, M, S, m,
/// u, n). Anything else is ignored, as if the client had sent none.
fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_transport_failure_reaches_the_client_in_our_words() {
        // What tonic answers by itself when a request's body breaks off.
        let broken =
            tonic::Status::unknown("h2 protocol error: error reading a body from connection")
                .into_http::<tonic::body::Body>();
        let answer = scrub(broken);
        let header = |name: &str| {
            answer
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned()
        };
        assert_eq!(
            header("grpc-status"),
            "14",
            "UNAVAILABLE: the call never ran"
        );
        let message = header("grpc-message");
        assert!(!message.contains("h2"), "driver text sent: {message}");
        let status = tonic::Status::from_header_map(answer.headers()).expect("a status");
        assert_eq!(
            betting_api::reason_of(&status).as_deref(),
            Some("REQUEST_UNREADABLE")
        );
        // Our own answers pass untouched.
        let ours = refuse::<tonic::body::Body>(EdgeError::Overloaded);
        assert_eq!(
            scrub(ours)
                .headers()
                .get("grpc-status")
                .map(|v| v.as_bytes()),
            Some(&b"8"[..])
        );
    }

    #[test]
    fn grpc_timeouts_parse_as_the_spec_says() {
        assert_eq!(parse_grpc_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("5M"), Some(Duration::from_secs(300)));
        assert_eq!(parse_grpc_timeout("7u"), Some(Duration::from_micros(7)));
        assert_eq!(
            parse_grpc_timeout("99999999n"),
            Some(Duration::from_nanos(99_999_999))
        );
        for bad in ["", "m", "100", "100x", "-1S", "123456789S", "1.5S", " 1S"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_clients_timeout_is_honoured_up_to_the_cap() {
        let edge = EdgeLayer::new(&EdgeSettings::default()).edge;
        let mut headers = http::HeaderMap::new();
        let path = "/betting.v1.BettingService/PlaceBet";
        assert_eq!(edge.budget(path, &headers), Duration::from_secs(5));
        headers.insert("grpc-timeout", http::HeaderValue::from_static("250m"));
        assert_eq!(edge.budget(path, &headers), Duration::from_millis(250));
        headers.insert("grpc-timeout", http::HeaderValue::from_static("1H"));
        assert_eq!(edge.budget(path, &headers), Duration::from_secs(60));
        headers.insert("grpc-timeout", http::HeaderValue::from_static("junk"));
        assert_eq!(edge.budget(path, &headers), Duration::from_secs(5));
        let audit = "/betting.v1.AdminService/RunAudit";
        assert_eq!(
            edge.budget(audit, &http::HeaderMap::new()),
            Duration::from_secs(60)
        );
    }
}
