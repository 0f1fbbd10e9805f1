//! TLS on the gRPC port, terminated here rather than by tonic's
//! `Server::tls_config`: tonic's acceptor offers ALPN `h2` only, and the
//! router also serves gRPC-Web over HTTP/1.1, so a client that offers only
//! `http/1.1` would be refused. Ours offers both; hyper serves whichever was
//! negotiated.
//!
//! With a client CA, every caller must present a certificate it signed
//! (mutual TLS, required; see `betting_config::tls`).
//!
//! Handshakes run concurrently, each bounded in time, so a caller that opens
//! a connection and says nothing holds one of [`MAX_HANDSHAKES`] slots for at
//! most [`HANDSHAKE_TIMEOUT`] and never stalls the accept loop. A failed
//! handshake (a plaintext client, a missing or foreign client certificate) is
//! logged at debug and dropped: it must not end the server.

use std::{
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use anyhow::Context as _;
use betting_config::TlsSettings;
use futures::{Stream, StreamExt};
use rustls::{
    RootCertStore, ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::WebPkiClientVerifier,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tonic::transport::server::{Connected, TcpConnectInfo};

use crate::conn::CappedConn;

/// A client that has not finished its handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Handshakes under way at once; more connections wait in the listen backlog.
const MAX_HANDSHAKES: usize = 256;

/// The acceptor of the configured certificate, `None` for plaintext.
pub(crate) fn acceptor(settings: &TlsSettings) -> anyhow::Result<Option<TlsAcceptor>> {
    let Some(tls) = settings.server()? else {
        return Ok(None);
    };
    // Named, not the process default: a second provider compiled in could
    // otherwise make rustls refuse to choose at run time.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?;
    let builder = match &tls.client_ca {
        None => builder.with_no_client_auth(),
        Some(pem) => {
            let mut roots = RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(pem) {
                roots
                    .add(cert.context("BETTING_TLS_CLIENT_CA")?)
                    .context("BETTING_TLS_CLIENT_CA")?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                .build()
                .context("BETTING_TLS_CLIENT_CA")?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let chain = CertificateDer::pem_slice_iter(&tls.identity.cert)
        .collect::<Result<Vec<_>, _>>()
        .context("BETTING_TLS_CERT")?;
    let key =
        PrivateKeyDer::from_pem_slice(tls.identity.key.expose()).context("BETTING_TLS_KEY")?;
    let mut config = builder
        .with_single_cert(chain, key)
        .context("BETTING_TLS_CERT and BETTING_TLS_KEY do not match")?;
    // gRPC needs h2; gRPC-Web from browsers may come over HTTP/1.1.
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Some(TlsAcceptor::from(Arc::new(config))))
}

/// The connections the server serves: `tcp` as it is, or through TLS.
pub(crate) fn incoming(
    tcp: impl Stream<Item = io::Result<CappedConn>> + Send + 'static,
    tls: Option<TlsAcceptor>,
) -> Pin<Box<dyn Stream<Item = io::Result<Conn>> + Send>> {
    let Some(acceptor) = tls else {
        return Box::pin(tcp.map(|conn| conn.map(Conn::Plain)));
    };
    let handshakes = tcp
        .map(move |conn| {
            let acceptor = acceptor.clone();
            async move {
                let stream = match conn {
                    Ok(stream) => stream,
                    // The accept loop's own errors go to tonic, as before.
                    Err(error) => return Some(Err(error)),
                };
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => Some(Ok(Conn::Tls(Box::new(tls)))),
                    Ok(Err(error)) => {
                        tracing::debug!(%error, "tls handshake failed");
                        None
                    }
                    Err(_) => {
                        tracing::debug!("tls handshake timed out");
                        None
                    }
                }
            }
        })
        .buffer_unordered(MAX_HANDSHAKES)
        .filter_map(std::future::ready);
    Box::pin(handshakes)
}

/// A served connection, plaintext or TLS.
pub(crate) enum Conn {
    Plain(CappedConn),
    Tls(Box<TlsStream<CappedConn>>),
}

impl Connected for Conn {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        match self {
            Conn::Plain(stream) => stream.connect_info(),
            Conn::Tls(stream) => stream.get_ref().0.connect_info(),
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(stream) => Pin::new(stream).poll_read(cx, buf),
            Conn::Tls(stream) => Pin::new(stream.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(stream) => Pin::new(stream).poll_write(cx, buf),
            Conn::Tls(stream) => Pin::new(stream.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(stream) => Pin::new(stream).poll_write_vectored(cx, bufs),
            Conn::Tls(stream) => Pin::new(stream.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Plain(stream) => stream.is_write_vectored(),
            Conn::Tls(stream) => stream.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(stream) => Pin::new(stream).poll_flush(cx),
            Conn::Tls(stream) => Pin::new(stream.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(stream) => Pin::new(stream).poll_shutdown(cx),
            Conn::Tls(stream) => Pin::new(stream.as_mut()).poll_shutdown(cx),
        }
    }
}
