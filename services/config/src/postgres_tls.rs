//! What a `DATABASE_URL` asks of TLS, checked before the first connection.
//!
//! sqlx (with rustls on ring and the webpki roots) honours libpq's `sslmode`:
//! `require` encrypts without checking the certificate, `verify-ca` checks
//! the chain, `verify-full` the chain and the host name; `sslrootcert` adds a
//! private CA. What is left to check here is what sqlx would only find out at
//! the first connection, or would quietly skip:
//!
//! - an `sslmode` sqlx does not know;
//! - a `sslrootcert`/`sslcert`/`sslkey` file that cannot be read or is not PEM;
//! - a CA or client certificate given with a mode that does not verify
//!   (`prefer` would fall back to plaintext, `require` would not check the
//!   CA): a setting that asks for verified TLS must get it.
//!
//! Without `sslmode` the default stays libpq's and sqlx's `prefer`, so
//! `deploy/local/up` keeps working on loopback without certificates; a
//! deployment whose database is across a network sets `verify-full` (README,
//! "TLS").

use std::path::PathBuf;

use crate::{ConfigError, tls};

/// Checks the TLS parameters of a PostgreSQL URL.
pub(crate) fn check(url: &str) -> Result<(), ConfigError> {
    let Some((_, query)) = url.split_once('?') else {
        return Ok(());
    };
    let mut mode = None;
    let mut files = Vec::new();
    for pair in query.split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let value = percent_decode(value);
        match key {
            "sslmode" | "ssl-mode" => mode = Some(value),
            "sslrootcert" | "ssl-root-cert" => files.push(("sslrootcert", value)),
            "sslcert" | "ssl-cert" => files.push(("sslcert", value)),
            "sslkey" | "ssl-key" => files.push(("sslkey", value)),
            _ => {}
        }
    }
    let verifies = match mode.as_deref() {
        None | Some("disable" | "allow" | "prefer" | "require") => false,
        Some("verify-ca" | "verify-full") => true,
        Some(_) => return Err(ConfigError::BadSslMode),
    };
    for (name, path) in files {
        if !verifies {
            return Err(ConfigError::SslFileWithoutVerify(name));
        }
        let path = PathBuf::from(path);
        match name {
            "sslkey" => {
                tls::private_key("DATABASE_URL sslkey", &path)?;
            }
            "sslcert" => {
                tls::certificates("DATABASE_URL sslcert", &path)?;
            }
            _ => {
                tls::certificates("DATABASE_URL sslrootcert", &path)?;
            }
        }
    }
    Ok(())
}

/// `%2F` and friends, as in a URL's query; bad escapes stay as they are.
fn percent_decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%')
            .then(|| bytes.get(i + 1..i + 3))
            .flatten()
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match escaped {
            Some(byte) => {
                out.push(byte);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mode_sqlx_does_not_know_is_refused() {
        assert!(matches!(
            check("postgres://h/db?sslmode=verify_full"),
            Err(ConfigError::BadSslMode)
        ));
        assert!(check("postgres://h/db?sslmode=verify-full").is_ok());
        assert!(check("postgres://h/db").is_ok());
    }

    /// `prefer` with a CA would fall back to plaintext when the server
    /// offers no TLS: a CA asks for verification, so it is refused.
    #[test]
    fn a_ca_without_a_verifying_mode_is_refused() {
        for url in [
            "postgres://h/db?sslrootcert=/x.pem",
            "postgres://h/db?sslmode=prefer&sslrootcert=/x.pem",
            "postgres://h/db?sslmode=require&sslrootcert=/x.pem",
        ] {
            assert!(
                matches!(
                    check(url),
                    Err(ConfigError::SslFileWithoutVerify("sslrootcert"))
                ),
                "{url}"
            );
        }
    }

    #[test]
    fn an_unreadable_root_certificate_is_refused_by_name() {
        let error = check("postgres://h/db?sslmode=verify-full&sslrootcert=%2Fnowhere%2Fca.pem")
            .expect_err("refused");
        assert_eq!(
            error.to_string(),
            "DATABASE_URL sslrootcert (/nowhere/ca.pem) cannot be read: entity not found"
        );
    }
}
