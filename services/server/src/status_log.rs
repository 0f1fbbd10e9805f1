//! The test suite's record of every error message the server sends, so that
//! `deploy/local/test` can prove none of them leaks SQL, driver text, a
//! path or a panic (the checker is `betting_tidy::leaks`).
//!
//! With `BETTING_TEST_STATUS_LOG=<file>` in the environment, [`StatusLogLayer`]
//! appends one line per non-OK gRPC status to that file: its code, its
//! `grpc-message` (decoded), and the text of its `grpc-status-details-bin`
//! (ErrorInfo, BadRequest descriptions). It sits on the router, not in
//! `to_status`, so it also sees what tonic says by itself (a request that
//! does not decode, an unknown method, a message too large) and what other
//! layers answer: it reads the response headers (a trailers-only error, how
//! every unary error is sent) and the body's trailers (a stream's end).
//! Without the variable it passes everything through untouched; production
//! never sets it.

use std::{
    fs::{File, OpenOptions},
    io::Write,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use base64::{
    Engine, alphabet,
    engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig},
};
use futures::future::BoxFuture;
use http::{HeaderMap, Request, Response};
use http_body::{Body as HttpBody, Frame};
use tonic::body::Body;
use tower::{Layer, Service};

/// The variable naming the file to append to.
pub const STATUS_LOG_ENV: &str = "BETTING_TEST_STATUS_LOG";

/// Appends the statuses of every response to the file of
/// [`STATUS_LOG_ENV`], when it is set.
#[derive(Clone, Default)]
pub struct StatusLogLayer {
    sink: Option<Arc<Mutex<File>>>,
}

impl StatusLogLayer {
    /// Opens the file the environment names, if any. A file that cannot be
    /// opened is reported on stderr and nothing is logged: the scan then
    /// fails for want of a log, which is where the problem shows.
    pub fn from_env() -> Self {
        let Some(path) = std::env::var_os(STATUS_LOG_ENV) else {
            return Self::default();
        };
        match OpenOptions::new().create(true).append(true).open(&path) {
            Ok(file) => Self {
                sink: Some(Arc::new(Mutex::new(file))),
            },
            Err(error) => {
                eprintln!("{STATUS_LOG_ENV}: cannot open {path:?}: {error}");
                Self::default()
            }
        }
    }
}

impl<S> Layer<S> for StatusLogLayer {
    type Service = StatusLog<S>;

    fn layer(&self, inner: S) -> Self::Service {
        StatusLog {
            inner,
            sink: self.sink.clone(),
        }
    }
}

/// The service [`StatusLogLayer`] wraps around the routes.
#[derive(Clone)]
pub struct StatusLog<S> {
    inner: S,
    sink: Option<Arc<Mutex<File>>>,
}

impl<S, B> Service<Request<B>> for StatusLog<S>
where
    S: Service<Request<B>, Response = Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
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
        let Some(sink) = self.sink.clone() else {
            return Box::pin(inner.call(request));
        };
        let path = request.uri().path().to_owned();
        Box::pin(async move {
            let response = inner.call(request).await?;
            record(&sink, &path, response.headers());
            Ok(response.map(|body| {
                Body::new(LoggedBody {
                    inner: body,
                    sink,
                    path,
                })
            }))
        })
    }
}

/// A response body that records the status in its trailers.
struct LoggedBody {
    inner: Body,
    sink: Arc<Mutex<File>>,
    path: String,
}

impl HttpBody for LoggedBody {
    type Data = <Body as HttpBody>::Data;
    type Error = <Body as HttpBody>::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(trailers) = frame.trailers_ref()
        {
            record(&self.sink, &self.path, trailers);
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

/// Appends `path<TAB>code<TAB>message<TAB>details` if `headers` carry a
/// non-OK status; one write per line, so processes sharing the file do not
/// interleave within a line.
fn record(sink: &Mutex<File>, path: &str, headers: &HeaderMap) {
    let Some(code) = headers.get("grpc-status").and_then(|v| v.to_str().ok()) else {
        return;
    };
    if code == "0" {
        return;
    }
    let message = headers
        .get("grpc-message")
        .map(|v| percent_decode(v.as_bytes()))
        .unwrap_or_default();
    let details = headers
        .get("grpc-status-details-bin")
        .and_then(|v| DETAILS_BASE64.decode(v.as_bytes()).ok())
        .map(|bytes| printable(&bytes))
        .unwrap_or_default();
    let line = format!(
        "{path}\t{code}\t{}\t{}\n",
        one_line(&message),
        one_line(&details)
    );
    if let Ok(mut file) = sink.lock() {
        let _ = file.write_all(line.as_bytes());
    }
}

/// `-bin` headers are base64, padded or not (gRPC over HTTP/2).
const DETAILS_BASE64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// `grpc-message` is percent-encoded (gRPC over HTTP/2, "Responses").
fn percent_decode(raw: &[u8]) -> String {
    let hex = |b: &u8| (*b as char).to_digit(16);
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let escaped = (raw[i] == b'%')
            .then(|| Some((hex(raw.get(i + 1)?)?, hex(raw.get(i + 2)?)?)))
            .flatten();
        match escaped {
            Some((high, low)) => {
                out.push((high * 16 + low) as u8);
                i += 3;
            }
            None => {
                out.push(raw[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The text runs of a serialized `google.rpc.Status`: protobuf strings are
/// plain UTF-8, so whatever a detail says is in here, between field tags.
fn printable(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// Tabs and newlines would break the line format.
fn one_line(text: &str) -> String {
    text.replace(['\t', '\n', '\r'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_messages_are_percent_decoded() {
        assert_eq!(percent_decode(b"a%20b%25c%zz"), "a b%c%zz");
    }

    /// A non-OK status becomes one line with its message and its details'
    /// text; an OK one, or none, writes nothing.
    #[test]
    fn records_a_line_per_error_status() {
        let path = std::env::temp_dir().join(format!("status-log-{}", uuid::Uuid::new_v4()));
        let sink = Mutex::new(File::create(&path).expect("create"));
        let mut ok = HeaderMap::new();
        ok.insert("grpc-status", "0".parse().expect("value"));
        record(&sink, "/x/Ok", &ok);
        record(&sink, "/x/None", &HeaderMap::new());
        let mut error = HeaderMap::new();
        error.insert("grpc-status", "13".parse().expect("value"));
        error.insert("grpc-message", "internal%20error".parse().expect("value"));
        // A google.rpc.Status whose message (field 2) is "leak", unpadded.
        error.insert(
            "grpc-status-details-bin",
            "CA0SBGxlYWs".parse().expect("value"),
        );
        record(&sink, "/x/Fail", &error);
        let log = std::fs::read_to_string(&path).expect("read");
        let _ = std::fs::remove_file(&path);
        assert_eq!(log.lines().count(), 1, "{log}");
        assert!(log.starts_with("/x/Fail\t13\tinternal error\t"), "{log}");
        assert!(log.contains("leak"), "{log}");
    }
}
