//! A throwaway certificate authority: a CA, a server certificate for the
//! names a local deployment is reached by, and a client certificate for
//! mutual TLS. `betting dev-certs` writes them for `deploy/local`, and the
//! TLS tests make fresh ones per test, so no key is ever committed.
//!
//! Keys are ECDSA P-256 (rcgen on ring: no OpenSSL, no aws-lc). Nothing here
//! is meant for production: the CA's key sits next to the certificates.

#![forbid(unsafe_code)]

use std::{fs, io, path::Path};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// The names the server certificate of [`DevCerts::local`] carries.
pub const LOCAL_NAMES: &[&str] = &["localhost", "127.0.0.1", "::1"];

#[derive(Debug, thiserror::Error)]
pub enum DevCertsError {
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        #[source]
        source: io::Error,
    },
}

/// A certificate and its private key, PEM.
#[derive(Clone)]
pub struct Pair {
    pub cert: String,
    pub key: String,
}

impl std::fmt::Debug for Pair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pair").finish_non_exhaustive()
    }
}

/// A CA and what it signed.
#[derive(Debug, Clone)]
pub struct DevCerts {
    pub ca: Pair,
    /// For `names` (DNS names and IP addresses), server authentication.
    pub server: Pair,
    /// Client authentication, for mutual TLS.
    pub client: Pair,
}

impl DevCerts {
    /// A CA, a server certificate for localhost, 127.0.0.1 and ::1, and a
    /// client certificate.
    pub fn local() -> Result<Self, DevCertsError> {
        Self::for_names(LOCAL_NAMES)
    }

    /// A CA, a server certificate for `names`, and a client certificate.
    pub fn for_names(names: &[&str]) -> Result<Self, DevCertsError> {
        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "betting local CA");
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_key_pem = ca_key.serialize_pem();
        let ca = CertifiedIssuer::self_signed(ca_params, ca_key)?;

        let server = leaf(
            &ca,
            names.iter().map(|n| (*n).to_owned()).collect(),
            "betting server",
            ExtendedKeyUsagePurpose::ServerAuth,
        )?;
        let client = leaf(
            &ca,
            Vec::new(),
            "betting client",
            ExtendedKeyUsagePurpose::ClientAuth,
        )?;
        Ok(Self {
            ca: Pair {
                cert: ca.pem(),
                key: ca_key_pem,
            },
            server,
            client,
        })
    }

    /// Writes `ca.pem`, `ca.key`, `server.pem`, `server.key`, `client.pem`
    /// and `client.key` into `dir` (created if needed); keys are readable by
    /// their owner only.
    pub fn write_to(&self, dir: &Path) -> Result<(), DevCertsError> {
        let error = |path: &Path| {
            let path = path.display().to_string();
            move |source| DevCertsError::Write { path, source }
        };
        fs::create_dir_all(dir).map_err(error(dir))?;
        for (name, pair) in [
            ("ca", &self.ca),
            ("server", &self.server),
            ("client", &self.client),
        ] {
            let cert = dir.join(format!("{name}.pem"));
            fs::write(&cert, &pair.cert).map_err(error(&cert))?;
            let key = dir.join(format!("{name}.key"));
            write_private(&key, &pair.key).map_err(error(&key))?;
        }
        Ok(())
    }
}

/// A certificate signed by `ca` for one purpose.
fn leaf(
    ca: &CertifiedIssuer<'_, KeyPair>,
    names: Vec<String>,
    common_name: &str,
    purpose: ExtendedKeyUsagePurpose,
) -> Result<Pair, DevCertsError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(names)?;
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![purpose];
    params.use_authority_key_identifier_extension = true;
    let cert = params.signed_by(&key, ca)?;
    Ok(Pair {
        cert: cert.pem(),
        key: key.serialize_pem(),
    })
}

/// Creates (or truncates) `path` with mode 0600 before any byte is written,
/// so the key is never readable by others, not even for a moment.
fn write_private(path: &Path, contents: &str) -> io::Result<()> {
    use std::io::Write;
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        options.mode(0o600);
        let mut file = options.open(path)?;
        // An existing file keeps its mode through `open`: narrow it too.
        file.set_permissions(fs::Permissions::from_mode(0o600))?;
        file.write_all(contents.as_bytes())
    }
    #[cfg(not(unix))]
    {
        options.open(path)?.write_all(contents.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_written_for_their_owner_only() {
        let dir = std::env::temp_dir().join(format!("dev-certs-{}", std::process::id()));
        DevCerts::local()
            .expect("generate")
            .write_to(&dir)
            .expect("write");
        #[cfg(unix)]
        for key in ["ca.key", "server.key", "client.key"] {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(dir.join(key))
                .expect("key")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{key}");
        }
        for cert in ["ca.pem", "server.pem", "client.pem"] {
            let text = fs::read_to_string(dir.join(cert)).expect("cert");
            assert!(text.starts_with("-----BEGIN CERTIFICATE-----"), "{cert}");
        }
        fs::remove_dir_all(&dir).expect("clean up");
    }
}
