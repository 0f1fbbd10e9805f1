//! HS256 tokens: verification on the server, minting for tools and for our own
//! service-to-service calls.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use betting_domain::UserId;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, errors::ErrorKind};
use tonic::{Request, Status, metadata::MetadataValue, service::Interceptor};

use betting_api::to_status;

use crate::{AuthError, Principal, Role};

/// The claims we issue and accept.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Claims {
    /// The user id as a decimal string; "0" for a backend token that names no user.
    pub sub: String,
    pub role: Role,
    pub exp: u64,
    pub iat: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("missing bearer token")]
    Missing,
    #[error("malformed authorization header: expected \"Bearer <token>\"")]
    Malformed,
    #[error("token expired")]
    Expired,
    #[error("invalid token")]
    Invalid,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Checks tokens: signature (HS256 only), expiry (required, no leeway), and
/// issuer and audience when configured.
pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
}

impl Verifier {
    pub fn new(secret: &[u8], issuer: Option<&str>, audience: Option<&str>) -> Self {
        // The algorithm is pinned: a token saying "none" or RS256 is refused
        // before its signature is even looked at.
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 0;
        validation.set_required_spec_claims(&["exp", "sub"]);
        match issuer {
            Some(iss) => {
                validation.set_issuer(&[iss]);
                validation.set_required_spec_claims(&["exp", "sub", "iss"]);
            }
            None => validation.iss = None,
        }
        match audience {
            Some(aud) => {
                validation.set_audience(&[aud]);
                let mut required = vec!["exp", "sub", "aud"];
                if issuer.is_some() {
                    required.push("iss");
                }
                validation.set_required_spec_claims(&required);
            }
            None => validation.validate_aud = false,
        }
        Self {
            key: DecodingKey::from_secret(secret),
            validation,
        }
    }

    pub fn verify(&self, token: &str) -> Result<Principal, TokenError> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation).map_err(
            |e| match e.kind() {
                ErrorKind::ExpiredSignature => TokenError::Expired,
                _ => TokenError::Invalid,
            },
        )?;
        let claims = data.claims;
        let user_id = match claims.sub.parse::<i64>() {
            Ok(0) if claims.role != Role::Player => None,
            Ok(id) => Some(UserId::new(id).map_err(|_| TokenError::Invalid)?),
            Err(_) => return Err(TokenError::Invalid),
        };
        Ok(Principal {
            user_id,
            role: claims.role,
            expires_at: Some(claims.exp),
        })
    }

    /// Parses an `authorization` header value and verifies its token.
    pub fn verify_header(&self, header: Option<&str>) -> Result<Principal, TokenError> {
        let header = header.ok_or(TokenError::Missing)?;
        let (scheme, token) = header.split_once(' ').ok_or(TokenError::Malformed)?;
        if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
            return Err(TokenError::Malformed);
        }
        self.verify(token.trim())
    }
}

/// Mints tokens: for `betting token` and for our own service calls.
#[derive(Clone)]
pub struct TokenMinter {
    key: EncodingKey,
    issuer: Option<String>,
    audience: Option<String>,
}

impl TokenMinter {
    pub fn new(secret: &[u8], issuer: Option<&str>, audience: Option<&str>) -> Self {
        Self {
            key: EncodingKey::from_secret(secret),
            issuer: issuer.map(str::to_owned),
            audience: audience.map(str::to_owned),
        }
    }

    /// A token for `user` (0 = no user, backend and admin only) valid for `ttl`.
    pub fn mint(&self, user: i64, role: Role, ttl: Duration) -> Result<String, TokenError> {
        let iat = now();
        let claims = Claims {
            sub: user.to_string(),
            role,
            iat,
            exp: iat + ttl.as_secs(),
            iss: self.issuer.clone(),
            aud: self.audience.clone(),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.key)
            .map_err(|_| TokenError::Invalid)
    }

    /// Mints a token with explicit claims, for tests of expiry and forgery.
    pub fn mint_claims(&self, claims: &Claims) -> Result<String, TokenError> {
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &self.key)
            .map_err(|_| TokenError::Invalid)
    }
}

/// Server side: verifies the bearer token of every request that reaches a
/// guarded service and attaches the [`Principal`].
#[derive(Clone)]
pub struct AuthInterceptor {
    verifier: Arc<Verifier>,
}

impl AuthInterceptor {
    pub fn new(verifier: Arc<Verifier>) -> Self {
        Self { verifier }
    }
}

impl Interceptor for AuthInterceptor {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let header = request
            .metadata()
            .get("authorization")
            .map(|v| v.to_str().map_err(|_| TokenError::Malformed))
            .transpose();
        let principal = header
            .and_then(|h| self.verifier.verify_header(h))
            .map_err(|e| to_status(&AuthError::Token(e)))?;
        request.extensions_mut().insert(principal);
        Ok(request)
    }
}

/// A minted `authorization` value and when it expires (seconds since the epoch).
type CachedToken = (MetadataValue<tonic::metadata::Ascii>, u64);

/// Client side: attaches a short-lived backend token to our own calls to other
/// services, minting a new one shortly before the old one expires.
#[derive(Clone)]
pub struct ServiceCredentials {
    minter: TokenMinter,
    cached: Arc<Mutex<Option<CachedToken>>>,
}

impl ServiceCredentials {
    const TTL: Duration = Duration::from_secs(300);

    pub fn new(minter: TokenMinter) -> Self {
        Self {
            minter,
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
            .mint(0, Role::Backend, Self::TTL)
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

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"an-excellent-test-secret-of-32-bytes!";

    #[test]
    fn round_trip() {
        let minter = TokenMinter::new(SECRET, None, None);
        let verifier = Verifier::new(SECRET, None, None);
        let token = minter
            .mint(42, Role::Player, Duration::from_secs(60))
            .expect("mint");
        let p = verifier
            .verify_header(Some(&format!("Bearer {token}")))
            .expect("verify");
        assert_eq!(p.user_id.map(UserId::get), Some(42));
        assert_eq!(p.role, Role::Player);
    }

    #[test]
    fn refuses_bad_tokens() {
        let verifier = Verifier::new(SECRET, None, None);
        let forged = TokenMinter::new(b"another-secret-another-secret-xx", None, None)
            .mint(42, Role::Admin, Duration::from_secs(60))
            .expect("mint");
        assert_eq!(verifier.verify(&forged), Err(TokenError::Invalid));
        let minter = TokenMinter::new(SECRET, None, None);
        let expired = minter
            .mint_claims(&Claims {
                sub: "42".into(),
                role: Role::Player,
                iat: now() - 120,
                exp: now() - 60,
                iss: None,
                aud: None,
            })
            .expect("mint");
        assert_eq!(verifier.verify(&expired), Err(TokenError::Expired));
        assert_eq!(verifier.verify_header(None), Err(TokenError::Missing));
        assert_eq!(
            verifier.verify_header(Some("Basic abc")),
            Err(TokenError::Malformed)
        );
        assert_eq!(verifier.verify("not.a.jwt"), Err(TokenError::Invalid));
        // A player token must name a user.
        let nobody = minter
            .mint(0, Role::Player, Duration::from_secs(60))
            .expect("mint");
        assert_eq!(verifier.verify(&nobody), Err(TokenError::Invalid));
    }

    #[test]
    fn checks_issuer_and_audience_when_configured() {
        let verifier = Verifier::new(SECRET, Some("betting"), Some("games"));
        let right = TokenMinter::new(SECRET, Some("betting"), Some("games"))
            .mint(1, Role::Player, Duration::from_secs(60))
            .expect("mint");
        assert!(verifier.verify(&right).is_ok());
        let wrong = TokenMinter::new(SECRET, Some("other"), Some("games"))
            .mint(1, Role::Player, Duration::from_secs(60))
            .expect("mint");
        assert_eq!(verifier.verify(&wrong), Err(TokenError::Invalid));
        let missing = TokenMinter::new(SECRET, None, None)
            .mint(1, Role::Player, Duration::from_secs(60))
            .expect("mint");
        assert_eq!(verifier.verify(&missing), Err(TokenError::Invalid));
    }

    /// The README promises every error an `ErrorInfo` reason; the
    /// interceptor's refusals used to be bare statuses without one.
    #[test]
    fn the_interceptor_refuses_through_the_mapping_with_a_reason() {
        let mut interceptor = AuthInterceptor::new(Arc::new(Verifier::new(SECRET, None, None)));
        for header in [None, Some("Bearer nonsense"), Some("Basic abc")] {
            let mut request = Request::new(());
            if let Some(header) = header {
                request
                    .metadata_mut()
                    .insert("authorization", header.parse().expect("header"));
            }
            let status = interceptor.call(request).expect_err("refused");
            assert_eq!(status.code(), tonic::Code::Unauthenticated, "{header:?}");
            assert_eq!(
                betting_api::reason_of(&status).as_deref(),
                Some("UNAUTHENTICATED"),
                "{header:?}"
            );
        }
    }
}
