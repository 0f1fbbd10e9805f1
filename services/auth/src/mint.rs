//! Minting tokens: for `betting token`, the tests, and our own
//! service-to-service calls ([`ServiceCredentials`]).

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use tonic::{Request, Status, metadata::MetadataValue, service::Interceptor};

use betting_api::to_status;

use crate::{AuthError, Claims, Role, SigningKey, TokenError, verify::now};

/// How a minter signs: the shared HS256 secret (local mode) or a private key.
#[derive(Clone)]
enum Signer {
    Shared(EncodingKey),
    Key(SigningKey),
}

/// Mints tokens with the `typ`, `kid` and `alg` the verifier expects.
#[derive(Clone)]
pub struct TokenMinter {
    signer: Signer,
    issuer: Option<String>,
    audience: Option<String>,
}

impl TokenMinter {
    /// Local mode: HS256 with the shared secret.
    pub fn new(secret: &[u8], issuer: Option<&str>, audience: Option<&str>) -> Self {
        Self {
            signer: Signer::Shared(EncodingKey::from_secret(secret)),
            issuer: issuer.map(str::to_owned),
            audience: audience.map(str::to_owned),
        }
    }

    /// Production mode: a private key whose public half the key set names `kid`.
    pub fn with_key(key: SigningKey, issuer: Option<&str>, audience: Option<&str>) -> Self {
        Self {
            signer: Signer::Key(key),
            issuer: issuer.map(str::to_owned),
            audience: audience.map(str::to_owned),
        }
    }

    /// A token for player `user`, or for a caller of another role named by
    /// the decimal `user` (0 for an unnamed one), valid for `ttl`.
    pub fn mint(&self, user: i64, role: Role, ttl: Duration) -> Result<String, TokenError> {
        self.mint_subject(&user.to_string(), role, ttl)
    }

    /// A token whose `sub` is `subject`: a player's user id, or the name of
    /// a service, game server or operator.
    pub fn mint_subject(
        &self,
        subject: &str,
        role: Role,
        ttl: Duration,
    ) -> Result<String, TokenError> {
        let iat = now();
        self.mint_claims(&Claims {
            sub: subject.to_owned(),
            role: role.as_str().to_owned(),
            iat,
            exp: iat + ttl.as_secs(),
            nbf: None,
            iss: self.issuer.clone(),
            aud: self.audience.clone(),
        })
    }

    /// The header this minter writes: `typ` JWT, its algorithm, its `kid`.
    pub fn header(&self) -> Header {
        match &self.signer {
            Signer::Shared(_) => Header::new(Algorithm::HS256),
            Signer::Key(key) => {
                let mut header = Header::new(key.alg);
                header.kid = Some(key.kid.clone());
                header
            }
        }
    }

    /// Mints a token with explicit claims, for tests of expiry and forgery.
    pub fn mint_claims(&self, claims: &Claims) -> Result<String, TokenError> {
        self.mint_with(&self.header(), claims)
    }

    /// Mints with an explicit header, for tests of the header checks.
    pub fn mint_with(&self, header: &Header, claims: &Claims) -> Result<String, TokenError> {
        let key = match &self.signer {
            Signer::Shared(key) => key,
            Signer::Key(key) => &key.key,
        };
        jsonwebtoken::encode(header, claims, key).map_err(|_| TokenError::Invalid)
    }
}

/// A minted `authorization` value and when it expires (seconds since the epoch).
type CachedToken = (MetadataValue<tonic::metadata::Ascii>, u64);

/// Client side: attaches a short-lived service token to our own calls to
/// WalletService, minting a new one shortly before the old one expires.
#[derive(Clone)]
pub struct ServiceCredentials {
    minter: TokenMinter,
    subject: String,
    cached: Arc<Mutex<Option<CachedToken>>>,
}

impl ServiceCredentials {
    /// Five minutes: well under the verifier's cap for service tokens
    /// ([`crate::SERVICE_MAX_LIFETIME`]), renewed a minute before it ends.
    const TTL: Duration = Duration::from_secs(300);

    /// Credentials for the process named `subject` (the privileged-action
    /// trail and the wallet's logs say who called).
    pub fn new(minter: TokenMinter) -> Self {
        Self::named(minter, "betting-service")
    }

    pub fn named(minter: TokenMinter, subject: &str) -> Self {
        Self {
            minter,
            subject: subject.to_owned(),
            cached: Arc::new(Mutex::new(None)),
        }
    }

    fn header(&self) -> Result<MetadataValue<tonic::metadata::Ascii>, Status> {
        let refuse = || to_status(&AuthError::Credentials);
        let mut cached = self.cached.lock().map_err(|_| refuse())?;
        let now = now();
        if let Some((value, expires)) = cached.as_ref()
            && *expires > now + 60
        {
            return Ok(value.clone());
        }
        let token = self
            .minter
            .mint_subject(&self.subject, Role::Service, Self::TTL)
            .map_err(|_| refuse())?;
        let value: MetadataValue<_> = format!("Bearer {token}").parse().map_err(|_| refuse())?;
        *cached = Some((value.clone(), now + Self::TTL.as_secs()));
        Ok(value)
    }
}

impl Interceptor for ServiceCredentials {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let value = self.header()?;
        request.metadata_mut().insert("authorization", value);
        Ok(request)
    }
}
