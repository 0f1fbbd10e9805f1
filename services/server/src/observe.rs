//! Every call, seen once: its span and its metrics.
//!
//! [`ObserveLayer`] sits on the router outside the edge, so it sees every
//! call the server answers, the edge's refusals included. For each one it
//!
//! - opens the call's span, named for the method
//!   (`betting.v1.BettingService/PlaceBet`), a child of the caller's trace
//!   when the request carries a W3C `traceparent`; the handler runs inside
//!   it (the adapters' spans below it carry the ids: bet, round), and it ends with
//!   the call's gRPC status;
//! - counts the call in `grpc_server_requests_total{method,code}` and times
//!   it in `grpc_server_request_duration_seconds{method,code}` (a stream's
//!   time is its whole life).
//!
//! The status is read where gRPC puts it: the response headers of a
//! trailers-only answer (how every unary error is sent), else the body's
//! trailers. A body dropped before its trailers (the client went away) is
//! `Canceled`. The method label is one of the methods this server can
//! serve, or `unknown`: a client sending made-up paths cannot grow the
//! metrics without bound.

use std::{
    collections::HashSet,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Instant,
};

use futures::future::BoxFuture;
use http::{HeaderMap, Request, Response};
use http_body::{Body as HttpBody, Frame};
use prost::Message;
use tonic::body::Body;
use tower::{Layer, Service};
use tracing::Instrument;

/// Observes every call of the services in `methods`' descriptor sets.
#[derive(Clone)]
pub struct ObserveLayer {
    methods: Arc<HashSet<String>>,
}

impl ObserveLayer {
    /// Knows the methods of the encoded `FileDescriptorSet`s given.
    pub fn new(descriptor_sets: &[&[u8]]) -> Self {
        let mut methods = HashSet::new();
        for set in descriptor_sets {
            let Ok(set) = prost_types::FileDescriptorSet::decode(*set) else {
                continue;
            };
            for file in set.file {
                let package = file.package.unwrap_or_default();
                for service in file.service {
                    let service_name = service.name.unwrap_or_default();
                    for method in service.method {
                        let method = method.name.unwrap_or_default();
                        methods.insert(format!("{package}.{service_name}/{method}"));
                    }
                }
            }
        }
        Self {
            methods: Arc::new(methods),
        }
    }

    /// The label of `path`: its method, or `unknown`.
    fn method(&self, path: &str) -> String {
        let method = path.strip_prefix('/').unwrap_or(path);
        if self.methods.contains(method) {
            method.to_owned()
        } else {
            "unknown".to_owned()
        }
    }
}

impl<S> Layer<S> for ObserveLayer {
    type Service = Observe<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Observe {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service [`ObserveLayer`] wraps around the routes.
#[derive(Clone)]
pub struct Observe<S> {
    inner: S,
    layer: ObserveLayer,
}

impl<S, B> Service<Request<B>> for Observe<S>
where
    S: Service<Request<B>, Response = Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        // The clone that was driven to readiness serves this call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let method = self.layer.method(request.uri().path());
        let (service, rpc) = method.split_once('/').unwrap_or(("unknown", "unknown"));
        let span = tracing::info_span!(
            "rpc",
            otel.name = %method,
            otel.kind = "server",
            otel.status_code = tracing::field::Empty,
            rpc.system = "grpc",
            rpc.service = %service,
            rpc.method = %rpc,
            rpc.grpc.status_code = tracing::field::Empty,
            trace_id = tracing::field::Empty,
        );
        let headers = request.headers();
        betting_telemetry::trace::adopt(&span, |key| {
            headers.get(key).and_then(|v| v.to_str().ok())
        });
        let started = Instant::now();
        let called = {
            let _entered = span.enter();
            inner.call(request)
        };
        Box::pin(
            async move {
                let response = called.await?;
                let mut call = Call {
                    method,
                    started,
                    span: tracing::Span::current(),
                    done: false,
                };
                if let Some(code) = status_in(response.headers()) {
                    call.finish(code);
                }
                Ok(response.map(|body| Body::new(ObservedBody { inner: body, call })))
            }
            .instrument(span),
        )
    }
}

/// One call until its status is known.
struct Call {
    method: String,
    started: Instant,
    span: tracing::Span,
    done: bool,
}

impl Call {
    fn finish(&mut self, code: i32) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let code_name = code_name(code);
        self.span.record("rpc.grpc.status_code", code);
        if is_server_error(code) {
            self.span.record("otel.status_code", "ERROR");
        }
        let labels = [
            ("method", self.method.clone()),
            ("code", code_name.to_owned()),
        ];
        metrics::counter!("grpc_server_requests_total", &labels).increment(1);
        metrics::histogram!("grpc_server_request_duration_seconds", &labels)
            .record(self.started.elapsed().as_secs_f64());
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        // The body went away before its trailers: the client cancelled.
        self.finish(1);
    }
}

/// A response body that finishes its call at the trailers, or when dropped.
struct ObservedBody {
    inner: Body,
    call: Call,
}

impl HttpBody for ObservedBody {
    type Data = <Body as HttpBody>::Data;
    type Error = <Body as HttpBody>::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(code) = frame.trailers_ref().and_then(status_in) {
                    self.call.finish(code);
                }
            }
            // A body that broke off is a failed call, not a cancelled one.
            Poll::Ready(Some(Err(_))) => self.call.finish(13),
            // A body that ended without a status: gRPC calls it UNKNOWN.
            Poll::Ready(None) => self.call.finish(2),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

fn status_in(headers: &HeaderMap) -> Option<i32> {
    headers.get("grpc-status")?.to_str().ok()?.parse().ok()
}

/// Codes that say the server failed (OpenTelemetry's gRPC conventions):
/// the caller's own mistakes leave the span unset.
fn is_server_error(code: i32) -> bool {
    matches!(code, 2 | 4 | 12 | 13 | 14 | 15)
}

/// gRPC's names of its codes, as Prometheus exporters of other gRPC
/// stacks label them.
fn code_name(code: i32) -> &'static str {
    match code {
        0 => "OK",
        1 => "Canceled",
        2 => "Unknown",
        3 => "InvalidArgument",
        4 => "DeadlineExceeded",
        5 => "NotFound",
        6 => "AlreadyExists",
        7 => "PermissionDenied",
        8 => "ResourceExhausted",
        9 => "FailedPrecondition",
        10 => "Aborted",
        11 => "OutOfRange",
        12 => "Unimplemented",
        13 => "Internal",
        14 => "Unavailable",
        15 => "DataLoss",
        16 => "Unauthenticated",
        _ => "Unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_served_methods_are_labels() {
        let layer = ObserveLayer::new(&[betting_api::FILE_DESCRIPTOR_SET]);
        assert_eq!(
            layer.method("/betting.v1.BettingService/PlaceBet"),
            "betting.v1.BettingService/PlaceBet"
        );
        assert_eq!(layer.method("/betting.v1.BettingService/Nope"), "unknown");
        assert_eq!(layer.method("/x"), "unknown");
    }
}
