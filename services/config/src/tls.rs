//! TLS settings: the server's certificate, the optional client CA that turns
//! on mutual TLS, and what our own clients trust and present when they dial
//! an `https://` wallet or a `rediss://` Redis.
//!
//! The rule everywhere: a setting that asks for TLS gets TLS or the process
//! refuses to start. Nothing is silently dialled or served in plaintext.
//! Every file is read and parsed here, at start-up, so a bad path or a file
//! that is not PEM stops the process with the variable's name instead of
//! failing the first connection.
//!
//! Mutual TLS is all or nothing per listener: with `BETTING_TLS_CLIENT_CA`
//! set, every caller must present a certificate that CA signed. Players'
//! browsers cannot present one, so a deployment that needs both runs two
//! listeners (two processes): one for backend callers with mTLS, one for
//! players with server TLS and bearer tokens only.

use std::{
    fmt,
    path::{Path, PathBuf},
};

use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};

use crate::ConfigError;

/// Where the PEM files are; every path is optional, and checked by
/// [`TlsSettings::validate`].
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TlsSettings {
    /// PEM certificate chain the gRPC server presents; with BETTING_TLS_KEY it
    /// turns TLS on for the listener (plaintext without both).
    #[arg(long, env = "BETTING_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of BETTING_TLS_CERT.
    #[arg(long, env = "BETTING_TLS_KEY")]
    pub tls_key: Option<PathBuf>,

    /// PEM CA certificates: when set, every caller must present a client
    /// certificate signed by one of them (mutual TLS, required, not optional).
    #[arg(long, env = "BETTING_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,

    /// PEM CA certificates our own clients trust when they dial an https://
    /// wallet endpoint (for a publicly signed wallet, the system bundle, e.g.
    /// /etc/ssl/certs/ca-certificates.crt). Required for https:// endpoints.
    #[arg(long, env = "BETTING_TLS_CA")]
    pub tls_ca: Option<PathBuf>,

    /// PEM certificate our own clients present to a wallet that requires
    /// mutual TLS; with BETTING_TLS_CLIENT_KEY.
    #[arg(long, env = "BETTING_TLS_CLIENT_CERT")]
    pub tls_client_cert: Option<PathBuf>,

    /// PEM private key of BETTING_TLS_CLIENT_CERT.
    #[arg(long, env = "BETTING_TLS_CLIENT_KEY")]
    pub tls_client_key: Option<PathBuf>,

    /// PEM CA certificates that sign Redis's certificate (rediss:// only);
    /// without it, the system's roots.
    #[arg(long, env = "BETTING_REDIS_TLS_CA")]
    pub redis_tls_ca: Option<PathBuf>,
}

/// A private key's PEM, never printed.
#[derive(Clone)]
pub struct KeyPem(Vec<u8>);

impl KeyPem {
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for KeyPem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeyPem(***)")
    }
}

/// A certificate chain and its key, both read and parsed.
#[derive(Debug, Clone)]
pub struct IdentityPem {
    pub cert: Vec<u8>,
    pub key: KeyPem,
}

/// What the gRPC listener serves TLS with.
#[derive(Debug, Clone)]
pub struct ServerTls {
    pub identity: IdentityPem,
    /// Callers must present a certificate signed by one of these.
    pub client_ca: Option<Vec<u8>>,
}

/// What our own gRPC clients trust and present.
#[derive(Debug, Clone)]
pub struct ClientTls {
    pub ca: Vec<u8>,
    pub identity: Option<IdentityPem>,
}

impl TlsSettings {
    /// Reads and parses every configured file; run before anything starts.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.server()?;
        self.client()?;
        self.redis_ca()?;
        Ok(())
    }

    /// The listener's TLS, `None` for plaintext.
    pub fn server(&self) -> Result<Option<ServerTls>, ConfigError> {
        let identity = identity(
            self.tls_cert.as_deref(),
            self.tls_key.as_deref(),
            "BETTING_TLS_CERT",
            "BETTING_TLS_KEY",
        )?;
        let client_ca = self
            .tls_client_ca
            .as_deref()
            .map(|path| certificates("BETTING_TLS_CLIENT_CA", path))
            .transpose()?;
        match identity {
            Some(identity) => Ok(Some(ServerTls {
                identity,
                client_ca,
            })),
            None if client_ca.is_some() => Err(ConfigError::ClientCaWithoutTls),
            None => Ok(None),
        }
    }

    /// What our clients dial https:// with, `None` when no CA is configured.
    pub fn client(&self) -> Result<Option<ClientTls>, ConfigError> {
        let identity = identity(
            self.tls_client_cert.as_deref(),
            self.tls_client_key.as_deref(),
            "BETTING_TLS_CLIENT_CERT",
            "BETTING_TLS_CLIENT_KEY",
        )?;
        let ca = self
            .tls_ca
            .as_deref()
            .map(|path| certificates("BETTING_TLS_CA", path))
            .transpose()?;
        match ca {
            Some(ca) => Ok(Some(ClientTls { ca, identity })),
            // A client identity with nothing to present it to over TLS is a
            // mistake to report, not a setting to ignore.
            None if identity.is_some() => Err(ConfigError::ClientIdentityWithoutCa),
            None => Ok(None),
        }
    }

    /// The CA Redis's certificate is checked against, PEM.
    pub fn redis_ca(&self) -> Result<Option<Vec<u8>>, ConfigError> {
        self.redis_tls_ca
            .as_deref()
            .map(|path| certificates("BETTING_REDIS_TLS_CA", path))
            .transpose()
    }
}

/// A certificate and key given together, or neither.
fn identity(
    cert: Option<&Path>,
    key: Option<&Path>,
    cert_name: &'static str,
    key_name: &'static str,
) -> Result<Option<IdentityPem>, ConfigError> {
    match (cert, key) {
        (None, None) => Ok(None),
        (Some(_), None) => Err(ConfigError::TlsHalfPair {
            set: cert_name,
            missing: key_name,
        }),
        (None, Some(_)) => Err(ConfigError::TlsHalfPair {
            set: key_name,
            missing: cert_name,
        }),
        (Some(cert), Some(key)) => Ok(Some(IdentityPem {
            cert: certificates(cert_name, cert)?,
            key: private_key(key_name, key)?,
        })),
    }
}

/// A PEM file with at least one certificate (and nothing unparsable).
pub fn certificates(variable: &'static str, path: &Path) -> Result<Vec<u8>, ConfigError> {
    let pem = read(variable, path)?;
    let mut found = 0;
    for cert in CertificateDer::pem_slice_iter(&pem) {
        cert.map_err(|_| ConfigError::TlsFile {
            variable,
            path: path.to_owned(),
            problem: "is not valid PEM".into(),
        })?;
        found += 1;
    }
    if found == 0 {
        return Err(ConfigError::TlsFile {
            variable,
            path: path.to_owned(),
            problem: "holds no PEM certificate".into(),
        });
    }
    Ok(pem)
}

/// A PEM file with a private key (PKCS#8, PKCS#1 or SEC1).
pub fn private_key(variable: &'static str, path: &Path) -> Result<KeyPem, ConfigError> {
    let pem = read(variable, path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|_| ConfigError::TlsFile {
        variable,
        path: path.to_owned(),
        problem: "holds no PEM private key".into(),
    })?;
    Ok(KeyPem(pem))
}

fn read(variable: &'static str, path: &Path) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path).map_err(|e| ConfigError::TlsFile {
        variable,
        path: path.to_owned(),
        problem: format!("cannot be read: {}", e.kind()),
    })
}
