//! Bearer-token settings: which keys verify tokens, which key (if any) this
//! process signs its own service tokens with, and the claims every token must
//! carry.
//!
//! Two modes, told apart by what is configured:
//!
//! - **local**: `BETTING_JWT_SECRET` (HS256) and no key set. Every process
//!   holding the secret can mint any token, so this is for a laptop and the
//!   tests only; `iss` and `aud` are checked when set.
//! - **production**: `BETTING_JWT_JWKS`, a JWKS file of public keys (EdDSA or
//!   ES256, each with a `kid`). Verifying holds no secret; `iss` and `aud` are
//!   required. Only the processes that call WalletService (the betting and
//!   settler roles) get `BETTING_JWT_SIGNING_KEY` + `BETTING_JWT_SIGNING_KID`.
//!
//! A mix of the two (a secret beside a key set) is refused at start-up: an
//! HS256 secret next to a key set would let whoever holds the secret mint
//! tokens the key set was meant to make impossible.

use std::path::PathBuf;

use crate::{ConfigError, Secret};

/// Token settings, flattened into [`crate::Settings`].
#[derive(Debug, Clone, clap::Args)]
pub struct TokenSettings {
    /// HS256 secret for bearer tokens (local mode only); at least 32 bytes.
    #[arg(long, env = "BETTING_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<Secret>,

    /// A JWKS file of the public keys tokens are verified with (production mode).
    #[arg(long, env = "BETTING_JWT_JWKS")]
    pub jwt_jwks: Option<PathBuf>,

    /// PEM private key (PKCS#8, Ed25519 or P-256) this process signs its own
    /// service tokens with; only for processes running the betting or settler role.
    #[arg(long, env = "BETTING_JWT_SIGNING_KEY")]
    pub jwt_signing_key: Option<PathBuf>,

    /// The `kid` of the signing key, as the JWKS names its public half.
    #[arg(long, env = "BETTING_JWT_SIGNING_KID")]
    pub jwt_signing_kid: Option<String>,

    /// Required `iss` claim (required setting in production mode).
    #[arg(long, env = "BETTING_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,

    /// Required `aud` claim (required setting in production mode).
    #[arg(long, env = "BETTING_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,

    /// Longest lifetime (exp - iat) a token may have, in seconds: a leaked
    /// token is worth at most this long.
    #[arg(long, env = "BETTING_JWT_MAX_LIFETIME_SECS", default_value_t = 86_400)]
    pub jwt_max_lifetime_secs: u64,
}

impl TokenSettings {
    /// Local mode: an HS256 secret, for development and tests.
    pub fn local(secret: impl Into<String>) -> Self {
        Self {
            jwt_secret: Some(Secret::new(secret)),
            jwt_jwks: None,
            jwt_signing_key: None,
            jwt_signing_kid: None,
            jwt_issuer: None,
            jwt_audience: None,
            jwt_max_lifetime_secs: 86_400,
        }
    }

    /// Whether tokens are verified against a key set (production mode).
    pub fn is_production(&self) -> bool {
        self.jwt_jwks.is_some()
    }

    /// Checks the mode is consistent. `signs` says whether this process mints
    /// service tokens for its calls to WalletService.
    pub fn validate(&self, signs: bool) -> Result<(), ConfigError> {
        if self.jwt_max_lifetime_secs == 0 {
            return Err(ConfigError::Tokens(
                "BETTING_JWT_MAX_LIFETIME_SECS must be positive",
            ));
        }
        if !self.is_production() {
            let secret = self.jwt_secret.as_ref().ok_or(ConfigError::Tokens(
                "set BETTING_JWT_JWKS (production) or BETTING_JWT_SECRET (local mode)",
            ))?;
            if secret.expose().len() < 32 {
                return Err(ConfigError::WeakSecret);
            }
            if self.jwt_signing_key.is_some() || self.jwt_signing_kid.is_some() {
                return Err(ConfigError::Tokens(
                    "BETTING_JWT_SIGNING_KEY needs BETTING_JWT_JWKS: local mode signs with the HS256 secret",
                ));
            }
            return Ok(());
        }
        if self.jwt_secret.is_some() {
            return Err(ConfigError::Tokens(
                "BETTING_JWT_SECRET and BETTING_JWT_JWKS are both set: a shared secret would let its holders mint tokens the key set forbids; unset the secret",
            ));
        }
        if self.jwt_issuer.is_none() || self.jwt_audience.is_none() {
            return Err(ConfigError::Tokens(
                "BETTING_JWT_ISSUER and BETTING_JWT_AUDIENCE are required with BETTING_JWT_JWKS",
            ));
        }
        match (signs, &self.jwt_signing_key, &self.jwt_signing_kid) {
            (true, Some(_), Some(_)) => Ok(()),
            (true, _, _) => Err(ConfigError::Tokens(
                "the betting and settler roles call WalletService: set BETTING_JWT_SIGNING_KEY and BETTING_JWT_SIGNING_KID",
            )),
            (false, None, None) => Ok(()),
            (false, _, _) => Err(ConfigError::Tokens(
                "BETTING_JWT_SIGNING_KEY is set for a process that signs nothing (neither the betting nor the settler role): verifying processes hold no private key",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn production() -> TokenSettings {
        TokenSettings {
            jwt_secret: None,
            jwt_jwks: Some("keys.json".into()),
            jwt_signing_key: None,
            jwt_signing_kid: None,
            jwt_issuer: Some("betting".into()),
            jwt_audience: Some("betting-api".into()),
            jwt_max_lifetime_secs: 3600,
        }
    }

    #[test]
    fn local_mode_needs_a_strong_secret() {
        assert!(
            TokenSettings::local("0123456789abcdef0123456789abcdef")
                .validate(true)
                .is_ok()
        );
        assert!(matches!(
            TokenSettings::local("short").validate(false),
            Err(ConfigError::WeakSecret)
        ));
        let mut nothing = TokenSettings::local("x");
        nothing.jwt_secret = None;
        assert!(nothing.validate(false).is_err());
    }

    #[test]
    fn unsafe_mixes_are_refused() {
        assert!(production().validate(false).is_ok());
        let mut mixed = production();
        mixed.jwt_secret = Some(Secret::new("0123456789abcdef0123456789abcdef"));
        assert!(mixed.validate(false).is_err(), "secret beside a key set");
        let mut open = production();
        open.jwt_audience = None;
        assert!(open.validate(false).is_err(), "no audience in production");
        // A signer needs its key; a verifier must not hold one.
        assert!(production().validate(true).is_err());
        let mut signer = production();
        signer.jwt_signing_key = Some("key.pem".into());
        signer.jwt_signing_kid = Some("k1".into());
        assert!(signer.validate(true).is_ok());
        assert!(signer.validate(false).is_err());
        let mut local_key = TokenSettings::local("0123456789abcdef0123456789abcdef");
        local_key.jwt_signing_key = Some("key.pem".into());
        assert!(local_key.validate(true).is_err());
    }
}
