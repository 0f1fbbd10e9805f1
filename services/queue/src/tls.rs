//! The rustls client configuration for `rediss://` with a private CA.

use std::sync::Arc;

use fred::types::config::TlsConnector;
use rustls::{
    ClientConfig, RootCertStore,
    pki_types::{CertificateDer, pem::PemObject},
};

use crate::QueueError;

/// Only `ca_pem`'s certificates are trusted; the host name is checked. The
/// provider is ring, named here so that a second provider compiled into the
/// build could never make rustls pick one at run time.
pub(crate) fn with_roots(ca_pem: &[u8]) -> Result<TlsConnector, QueueError> {
    let bad = |e: &dyn std::fmt::Display| QueueError::Tls(e.to_string());
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem) {
        roots.add(cert.map_err(|e| bad(&e))?).map_err(|e| bad(&e))?;
    }
    if roots.is_empty() {
        return Err(QueueError::Tls("the Redis CA holds no certificate".into()));
    }
    let config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| bad(&e))?
            .with_root_certificates(roots)
            .with_no_client_auth();
    Ok(TlsConnector::from(config))
}
