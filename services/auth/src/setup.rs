//! From [`TokenSettings`] to a verifier and, for the processes that call
//! WalletService, the minter of their service tokens. Files are read once,
//! at start-up; a key that cannot be used stops the process there.

use std::time::Duration;

use betting_config::TokenSettings;

use crate::{KeyError, KeySet, SigningKey, TokenMinter, TokenPolicy, Verifier};

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Key {
        what: &'static str,
        source: KeyError,
    },
    #[error("no token keys configured: set BETTING_JWT_JWKS or BETTING_JWT_SECRET")]
    NoKeys,
}

fn read(what: &'static str, path: &std::path::Path) -> Result<String, SetupError> {
    std::fs::read_to_string(path).map_err(|source| SetupError::Read {
        what,
        path: path.display().to_string(),
        source,
    })
}

/// What the settings require of every token.
pub fn policy(settings: &TokenSettings) -> TokenPolicy {
    TokenPolicy {
        issuer: settings.jwt_issuer.clone(),
        audience: settings.jwt_audience.clone(),
        max_lifetime: Duration::from_secs(settings.jwt_max_lifetime_secs),
    }
}

/// The verifier of the configured mode (validate the settings first).
pub fn verifier(settings: &TokenSettings) -> Result<Verifier, SetupError> {
    let policy = policy(settings);
    if let Some(path) = &settings.jwt_jwks {
        let keys = KeySet::from_jwks(&read("BETTING_JWT_JWKS", path)?).map_err(|source| {
            SetupError::Key {
                what: "BETTING_JWT_JWKS",
                source,
            }
        })?;
        return Ok(Verifier::key_set(keys, policy));
    }
    let secret = settings.jwt_secret.as_ref().ok_or(SetupError::NoKeys)?;
    Ok(Verifier::hs256(secret.expose().as_bytes(), policy))
}

/// The minter of this process's service tokens: the private key in
/// production mode (checked against the key set, so our own tokens are
/// ones the wallet accepts), the shared secret in local mode.
pub fn service_minter(settings: &TokenSettings) -> Result<TokenMinter, SetupError> {
    let iss = settings.jwt_issuer.as_deref();
    let aud = settings.jwt_audience.as_deref();
    match (&settings.jwt_signing_key, &settings.jwt_signing_kid) {
        (Some(path), Some(kid)) => {
            let pem = read("BETTING_JWT_SIGNING_KEY", path)?;
            let key =
                SigningKey::from_pem(pem.as_bytes(), kid).map_err(|source| SetupError::Key {
                    what: "BETTING_JWT_SIGNING_KEY",
                    source,
                })?;
            if let Some(jwks) = &settings.jwt_jwks {
                KeySet::from_jwks(&read("BETTING_JWT_JWKS", jwks)?)
                    .and_then(|set| set.check_signing_key(&key))
                    .map_err(|source| SetupError::Key {
                        what: "BETTING_JWT_SIGNING_KEY",
                        source,
                    })?;
            }
            Ok(TokenMinter::with_key(key, iss, aud))
        }
        _ => {
            let secret = settings.jwt_secret.as_ref().ok_or(SetupError::NoKeys)?;
            Ok(TokenMinter::new(secret.expose().as_bytes(), iss, aud))
        }
    }
}
