//! The server side of one gRPC stream: a bounded buffer the stream's task
//! fills, and an abort slot that lets the task end the stream with a status
//! even when the buffer is full (the client stopped reading).

use std::{
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use betting_domain::{ErrorCode, ErrorReason, ServiceError};
use tokio::sync::mpsc;
use tonic::Status;

/// Why the server ends a stream. Sent through the one status mapping, so a
/// client gets the code, our message and an `ErrorInfo` reason like any
/// other error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamEnd {
    /// This instance is shutting down: reconnect (elsewhere) with the cursor.
    #[error("server shutting down; reconnect with your cursor")]
    ShuttingDown,
    /// The token the stream was opened with has expired.
    #[error("token expired")]
    TokenExpired,
    /// The client stopped reading and fell too far behind.
    #[error("the client is not reading its stream; reconnect with the last cursor")]
    TooSlow,
    /// The feed behind the stream ended; reconnect.
    #[error("stream feed ended; reconnect")]
    FeedEnded,
}

impl ServiceError for StreamEnd {
    fn code(&self) -> ErrorCode {
        match self {
            StreamEnd::ShuttingDown | StreamEnd::FeedEnded => ErrorCode::ShuttingDown,
            StreamEnd::TokenExpired => ErrorCode::Unauthenticated,
            StreamEnd::TooSlow => ErrorCode::ResourceExhausted,
        }
    }

    fn reason(&self) -> ErrorReason {
        match self {
            StreamEnd::ShuttingDown => ErrorReason::ShuttingDown,
            StreamEnd::TokenExpired => ErrorReason::Unauthenticated,
            StreamEnd::TooSlow => ErrorReason::StreamTooSlow,
            StreamEnd::FeedEnded => ErrorReason::StreamEnded,
        }
    }
}

/// The stream handed to tonic.
pub struct EventStream<T> {
    rx: mpsc::Receiver<T>,
    abort: Arc<Mutex<Option<Status>>>,
    done: bool,
}

impl<T> Drop for EventStream<T> {
    fn drop(&mut self) {
        metrics::gauge!("streams_open").decrement(1.0);
    }
}

/// The task's end of it.
pub struct EventSink<T> {
    tx: mpsc::Sender<T>,
    abort: Arc<Mutex<Option<Status>>>,
    send_timeout: Duration,
}

/// Why the task must stop sending.
#[derive(Debug, PartialEq, Eq)]
pub enum SinkClosed {
    /// The client went away.
    Gone,
    /// The client stopped reading; the stream was ended with RESOURCE_EXHAUSTED.
    TooSlow,
}

/// A stream of at most `buffer` undelivered events.
pub fn event_stream<T>(buffer: usize, send_timeout: Duration) -> (EventSink<T>, EventStream<T>) {
    let (tx, rx) = mpsc::channel(buffer);
    let abort = Arc::new(Mutex::new(None));
    // Counted down when tonic drops the stream: the call ended or the
    // client went away.
    metrics::gauge!("streams_open").increment(1.0);
    (
        EventSink {
            tx,
            abort: abort.clone(),
            send_timeout,
        },
        EventStream {
            rx,
            abort,
            done: false,
        },
    )
}

impl<T> EventSink<T> {
    /// Sends an event, waiting at most the send timeout for the client to make
    /// room; a client that does not is cut off rather than buffered for.
    pub async fn send(&self, event: T) -> Result<(), SinkClosed> {
        match self.tx.send_timeout(event, self.send_timeout).await {
            Ok(()) => Ok(()),
            Err(mpsc::error::SendTimeoutError::Closed(_)) => Err(SinkClosed::Gone),
            Err(mpsc::error::SendTimeoutError::Timeout(_)) => {
                self.end(&StreamEnd::TooSlow);
                metrics::counter!("streams_dropped_slow_total").increment(1);
                Err(SinkClosed::TooSlow)
            }
        }
    }

    /// Sends if there is room right now (heartbeats: skip rather than wait).
    pub fn try_send(&self, event: T) -> Result<(), SinkClosed> {
        match self.tx.try_send(event) {
            Ok(()) | Err(mpsc::error::TrySendError::Full(_)) => Ok(()),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(SinkClosed::Gone),
        }
    }

    /// Ends the stream with `error`'s status, ahead of anything still buffered.
    pub fn end<E: ServiceError>(&self, error: &E) {
        if let Ok(mut slot) = self.abort.lock() {
            slot.get_or_insert_with(|| betting_api::to_status(error));
        }
    }

    /// Resolves when the client has gone.
    pub async fn closed(&self) {
        self.tx.closed().await;
    }
}

impl<T> futures::Stream for EventStream<T> {
    type Item = Result<T, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        let aborted = self.abort.lock().ok().and_then(|mut slot| slot.take());
        if let Some(status) = aborted {
            self.done = true;
            return Poll::Ready(Some(Err(status)));
        }
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(event)) => Poll::Ready(Some(Ok(event))),
            Poll::Ready(None) => {
                // The task ended: with a status, if it left one.
                self.done = true;
                let aborted = self.abort.lock().ok().and_then(|mut slot| slot.take());
                Poll::Ready(aborted.map(Err))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

/// Stream cursors: opaque to clients, a change time in microseconds to us.
pub mod cursor {
    use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
    use chrono::{DateTime, Utc};

    pub fn encode(at: DateTime<Utc>) -> String {
        URL_SAFE_NO_PAD.encode(format!("c1:{}", at.timestamp_micros()))
    }

    pub fn decode(text: &str) -> Option<DateTime<Utc>> {
        let bytes = URL_SAFE_NO_PAD.decode(text).ok()?;
        let text = String::from_utf8(bytes).ok()?;
        let micros: i64 = text.strip_prefix("c1:")?.parse().ok()?;
        DateTime::from_timestamp_micros(micros)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Streams end through the same mapping as every other error: the right
    /// code, our message, and a reason a client can switch on.
    #[test]
    fn stream_ends_carry_code_and_reason() {
        for (end, code, reason) in [
            (
                StreamEnd::ShuttingDown,
                tonic::Code::Unavailable,
                "SHUTTING_DOWN",
            ),
            (
                StreamEnd::TokenExpired,
                tonic::Code::Unauthenticated,
                "UNAUTHENTICATED",
            ),
            (
                StreamEnd::TooSlow,
                tonic::Code::ResourceExhausted,
                "STREAM_TOO_SLOW",
            ),
            (
                StreamEnd::FeedEnded,
                tonic::Code::Unavailable,
                "STREAM_ENDED",
            ),
        ] {
            let status = betting_api::to_status(&end);
            assert_eq!(status.code(), code, "{end:?}");
            assert_eq!(status.message(), end.to_string());
            assert_eq!(betting_api::reason_of(&status).as_deref(), Some(reason));
        }
    }

    #[tokio::test]
    async fn an_ended_stream_yields_its_status_first() {
        use futures::StreamExt;
        let (sink, mut stream) = event_stream::<u32>(4, Duration::from_millis(10));
        sink.send(1).await.expect("room");
        sink.end(&StreamEnd::ShuttingDown);
        let first = stream.next().await.expect("an item");
        let status = first.expect_err("the end comes ahead of buffered events");
        assert_eq!(
            betting_api::reason_of(&status).as_deref(),
            Some("SHUTTING_DOWN")
        );
    }
}
