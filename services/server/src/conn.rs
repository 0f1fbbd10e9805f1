//! The cap on open client connections.
//!
//! Each accepted connection holds a permit for its whole life; one accepted
//! over the cap is closed at once (and counted), so a flood of connections
//! costs us a socket each for an instant, not a task, buffers and streams.
//! Closing beats not accepting: a connection left in the kernel's backlog
//! would hang its client until it times out, and hide the refusal.

use std::{
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use futures::{Stream, StreamExt};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::server::{Connected, TcpConnectInfo};

/// An accepted connection that holds its place under the cap.
pub(crate) struct CappedConn {
    stream: TcpStream,
    _permit: Option<OwnedSemaphorePermit>,
}

/// The connections `listener` accepts, at most `cap` open at once (0 = no
/// cap). Small RPCs: Nagle is off so replies are not held back.
pub(crate) fn incoming(
    listener: TcpListener,
    cap: usize,
) -> impl Stream<Item = io::Result<CappedConn>> {
    let slots = (cap > 0).then(|| Arc::new(Semaphore::new(cap)));
    TcpListenerStream::new(listener).filter_map(move |accepted| {
        let slots = slots.clone();
        async move {
            let stream = match accepted {
                Ok(stream) => stream,
                // A failed accept (the peer gave up, or we are out of file
                // descriptors) is not the server's end: skip it.
                Err(_) => return None,
            };
            let permit = match slots {
                None => None,
                Some(slots) => match slots.try_acquire_owned() {
                    Ok(permit) => Some(permit),
                    Err(_) => {
                        metrics::counter!("connections_refused_total").increment(1);
                        drop(stream);
                        return None;
                    }
                },
            };
            let _ = stream.set_nodelay(true);
            Some(Ok(CappedConn {
                stream,
                _permit: permit,
            }))
        }
    })
}

impl Connected for CappedConn {
    // The same information a plain TCP stream gives, so handlers and layers
    // that read the peer's address work unchanged.
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for CappedConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for CappedConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}
