//! Verifying bearer tokens: the header (`typ`, `kid`, the key's pinned
//! algorithm), the signature, and the claims.
//!
//! What a token must be to be accepted:
//!
//! - header `typ` is exactly [`TOKEN_TYPE`] ("JWT", what every JWT library
//!   writes by default; a token of another type — an ID token, a
//!   refresh token — is not an access token to us);
//! - signed with a key we know: in production mode the header's `kid`
//!   names a key of the key set, and the header's `alg` is that key's
//!   algorithm (pinned by the key set, never taken from the token); in local
//!   mode HS256 with the shared secret;
//! - `exp` present and in the past by no leeway at all; `iat` present and
//!   not more than [`LEEWAY_SECS`] in the future (clock skew between
//!   hosts); `nbf`, when present, reached (same leeway);
//! - `exp - iat` at most the configured lifetime, and at most
//!   [`SERVICE_MAX_LIFETIME`] for service tokens, which our processes mint
//!   every few minutes: a leaked token is worth little for long;
//! - `iss` and `aud` equal to the configured ones (required in production);
//! - `role` one of ours; the retired `backend` role is refused by name;
//! - `sub` a positive user id for players, a name for every other role.

use std::time::Duration;

use betting_domain::UserId;
use jsonwebtoken::{Algorithm, DecodingKey, Validation, errors::ErrorKind};

use crate::{KeySet, Principal, Role, principal::RETIRED_BACKEND_ROLE};

/// The `typ` header every token carries.
pub const TOKEN_TYPE: &str = "JWT";

/// Clock skew allowed for `iat` and `nbf` (never for `exp`).
pub const LEEWAY_SECS: u64 = 30;

/// The longest lifetime of a service token, whatever the configured maximum.
pub const SERVICE_MAX_LIFETIME: Duration = Duration::from_secs(900);

/// The claims we issue and accept.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Claims {
    /// A player's user id as a decimal string; for other roles the caller's
    /// name (a service, a game server, an operator).
    pub sub: String,
    /// The role's name; decoded by the verifier, so that a retired or
    /// unknown role gets a clear refusal rather than a parse error.
    pub role: String,
    pub exp: u64,
    pub iat: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
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
    #[error("token type must be {TOKEN_TYPE}")]
    WrongType,
    #[error("token names no known key (kid)")]
    UnknownKey,
    #[error("token algorithm does not match its key")]
    WrongAlgorithm,
    #[error("token not valid yet")]
    NotYetValid,
    #[error("token issued in the future")]
    IssuedInFuture,
    #[error("token lifetime exceeds the maximum")]
    LifetimeTooLong,
    #[error("token issuer not accepted")]
    WrongIssuer,
    #[error("token audience not accepted")]
    WrongAudience,
    #[error(
        "the backend role was retired: ask for a token of the service, game, cashier or admin role"
    )]
    RetiredRole,
}

/// What every token must satisfy beyond its signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenPolicy {
    pub issuer: Option<String>,
    pub audience: Option<String>,
    /// The longest `exp - iat`.
    pub max_lifetime: Duration,
}

impl TokenPolicy {
    /// No `iss`/`aud`, a day's lifetime: local mode's default.
    pub fn local() -> Self {
        Self {
            issuer: None,
            audience: None,
            max_lifetime: Duration::from_secs(86_400),
        }
    }
}

/// How tokens are signed: one shared secret (local mode) or a key set.
enum Keys {
    Shared(DecodingKey),
    Set(KeySet),
}

/// Checks tokens; see the module documentation for what it requires.
pub struct Verifier {
    keys: Keys,
    policy: TokenPolicy,
}

pub(crate) fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

impl Verifier {
    /// Local mode: HS256 with a shared secret.
    pub fn hs256(secret: &[u8], policy: TokenPolicy) -> Self {
        Self {
            keys: Keys::Shared(DecodingKey::from_secret(secret)),
            policy,
        }
    }

    /// Production mode: the public keys of a key set.
    pub fn key_set(keys: KeySet, policy: TokenPolicy) -> Self {
        Self {
            keys: Keys::Set(keys),
            policy,
        }
    }

    pub fn verify(&self, token: &str) -> Result<Principal, TokenError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenError::Invalid)?;
        if header.typ.as_deref() != Some(TOKEN_TYPE) {
            return Err(TokenError::WrongType);
        }
        let (alg, key) = match &self.keys {
            Keys::Shared(key) => (Algorithm::HS256, key),
            Keys::Set(set) => {
                let kid = header.kid.as_deref().ok_or(TokenError::UnknownKey)?;
                let public = set.get(kid).ok_or(TokenError::UnknownKey)?;
                (public.alg, &public.key)
            }
        };
        if header.alg != alg {
            return Err(TokenError::WrongAlgorithm);
        }
        let mut validation = Validation::new(alg);
        validation.leeway = 0;
        // nbf is checked below with the skew leeway `exp` does not get.
        validation.validate_nbf = false;
        let mut required = vec!["exp", "iat", "sub"];
        match &self.policy.issuer {
            Some(iss) => {
                validation.set_issuer(&[iss]);
                required.push("iss");
            }
            None => validation.iss = None,
        }
        match &self.policy.audience {
            Some(aud) => {
                validation.set_audience(&[aud]);
                required.push("aud");
            }
            None => validation.validate_aud = false,
        }
        validation.set_required_spec_claims(&required);
        let claims = jsonwebtoken::decode::<Claims>(token, key, &validation)
            .map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => TokenError::Expired,
                ErrorKind::InvalidIssuer => TokenError::WrongIssuer,
                ErrorKind::InvalidAudience => TokenError::WrongAudience,
                ErrorKind::InvalidAlgorithm => TokenError::WrongAlgorithm,
                _ => TokenError::Invalid,
            })?
            .claims;
        let now = now();
        if claims.iat > now + LEEWAY_SECS {
            return Err(TokenError::IssuedInFuture);
        }
        if claims.nbf.is_some_and(|nbf| nbf > now + LEEWAY_SECS) {
            return Err(TokenError::NotYetValid);
        }
        if claims.role == RETIRED_BACKEND_ROLE {
            return Err(TokenError::RetiredRole);
        }
        let role: Role = claims.role.parse().map_err(|_| TokenError::Invalid)?;
        let mut max = self.policy.max_lifetime;
        if role == Role::Service {
            max = max.min(SERVICE_MAX_LIFETIME);
        }
        if claims.exp.saturating_sub(claims.iat) > max.as_secs() {
            return Err(TokenError::LifetimeTooLong);
        }
        principal(role, &claims.sub, claims.exp)
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

/// The caller a token's role and subject name.
fn principal(role: Role, sub: &str, exp: u64) -> Result<Principal, TokenError> {
    if role == Role::Player {
        let id = sub.parse::<i64>().map_err(|_| TokenError::Invalid)?;
        let user = UserId::new(id).map_err(|_| TokenError::Invalid)?;
        return Ok(Principal::player(user, Some(exp)));
    }
    // A name for the privileged-action trail: short, printable, no spaces.
    let named = !sub.is_empty()
        && sub.len() <= 128
        && sub
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:@-".contains(&b));
    if !named {
        return Err(TokenError::Invalid);
    }
    Ok(Principal::named(role, sub, Some(exp)))
}

#[cfg(test)]
mod tests {
    use jsonwebtoken::Header;

    use super::*;
    use crate::{SigningKey, TokenMinter, generate_ed25519};

    const SECRET: &[u8] = b"an-excellent-test-secret-of-32-bytes!";
    const HOUR: Duration = Duration::from_secs(3600);
    /// A P-256 key made for these tests only (`openssl genpkey -algorithm EC`).
    const P256_PEM: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg783/P5pzQ2Dnh2F2
jLqigETAae1e9SAOSYN8WsHc/06hRANCAAQXACRmPF6HaecG3e1a5TBv9tRetAKi
bMbnlZKLnsILzTOvr99oG1tvEx7HF427w4S3MdtzOqWVaLtBsie6vssh
-----END PRIVATE KEY-----
";

    fn production_policy() -> TokenPolicy {
        TokenPolicy {
            issuer: Some("betting".into()),
            audience: Some("betting-api".into()),
            max_lifetime: Duration::from_secs(86_400),
        }
    }

    /// An Ed25519 pair under `kid`: the verifier over its key set, and its minter.
    fn ed25519(kid: &str) -> (Verifier, TokenMinter) {
        let (pem, jwks) = generate_ed25519(kid).expect("generate");
        let verifier =
            Verifier::key_set(KeySet::from_jwks(&jwks).expect("jwks"), production_policy());
        let key = SigningKey::from_pem(pem.as_bytes(), kid).expect("pem");
        (
            verifier,
            TokenMinter::with_key(key, Some("betting"), Some("betting-api")),
        )
    }

    fn claims(role: &str, iat: u64, exp: u64) -> Claims {
        Claims {
            sub: "42".into(),
            role: role.into(),
            iat,
            exp,
            nbf: None,
            iss: Some("betting".into()),
            aud: Some("betting-api".into()),
        }
    }

    #[test]
    fn local_mode_round_trip() {
        let minter = TokenMinter::new(SECRET, None, None);
        let verifier = Verifier::hs256(SECRET, TokenPolicy::local());
        let token = minter.mint(42, Role::Player, HOUR).expect("mint");
        let p = verifier
            .verify_header(Some(&format!("Bearer {token}")))
            .expect("verify");
        assert_eq!(p.user_id.map(UserId::get), Some(42));
        assert_eq!(p.role, Role::Player);
        let admin = minter
            .mint_subject("ops:alice", Role::Admin, HOUR)
            .expect("mint");
        let p = verifier.verify(&admin).expect("verify");
        assert_eq!(
            (p.role, p.subject.as_str(), p.user_id),
            (Role::Admin, "ops:alice", None)
        );
    }

    #[test]
    fn eddsa_and_es256_round_trip_through_a_key_set() {
        let (verifier, minter) = ed25519("k1");
        let token = minter.mint(7, Role::Player, HOUR).expect("mint");
        assert_eq!(
            verifier
                .verify(&token)
                .expect("verify")
                .user_id
                .map(UserId::get),
            Some(7)
        );

        let es = SigningKey::from_pem(P256_PEM.as_bytes(), "ec-1").expect("p256 pem");
        let set = KeySet::from_jwks(&es.public_jwks().expect("jwks")).expect("set");
        set.check_signing_key(&es).expect("its own key");
        let verifier = Verifier::key_set(set, production_policy());
        let minter = TokenMinter::with_key(es, Some("betting"), Some("betting-api"));
        let token = minter
            .mint_subject("settler-1", Role::Service, Duration::from_secs(300))
            .expect("mint");
        let p = verifier.verify(&token).expect("verify");
        assert_eq!((p.role, p.subject.as_str()), (Role::Service, "settler-1"));
    }

    #[test]
    fn refuses_forged_expired_and_malformed_tokens() {
        let verifier = Verifier::hs256(SECRET, TokenPolicy::local());
        let forged = TokenMinter::new(b"another-secret-another-secret-xx", None, None)
            .mint(42, Role::Admin, HOUR)
            .expect("mint");
        assert_eq!(verifier.verify(&forged), Err(TokenError::Invalid));
        let minter = TokenMinter::new(SECRET, None, None);
        let mut expired = claims("player", now() - 120, now() - 60);
        (expired.iss, expired.aud) = (None, None);
        let expired = minter.mint_claims(&expired).expect("mint");
        assert_eq!(verifier.verify(&expired), Err(TokenError::Expired));
        assert_eq!(verifier.verify_header(None), Err(TokenError::Missing));
        assert_eq!(
            verifier.verify_header(Some("Basic abc")),
            Err(TokenError::Malformed)
        );
        assert_eq!(verifier.verify("not.a.jwt"), Err(TokenError::Invalid));
        // A player token must name a user; other roles a printable name.
        let nobody = minter.mint(0, Role::Player, HOUR).expect("mint");
        assert_eq!(verifier.verify(&nobody), Err(TokenError::Invalid));
        let spaced = minter
            .mint_subject("two words", Role::Game, HOUR)
            .expect("mint");
        assert_eq!(verifier.verify(&spaced), Err(TokenError::Invalid));
    }

    #[test]
    fn refuses_unknown_and_missing_kids_and_other_algorithms() {
        let (verifier, minter) = ed25519("k1");
        let c = claims("player", now(), now() + 60);
        // A kid the set does not hold, and none at all.
        let mut header = minter.header();
        header.kid = Some("k2".into());
        let unknown = minter.mint_with(&header, &c).expect("mint");
        assert_eq!(verifier.verify(&unknown), Err(TokenError::UnknownKey));
        header.kid = None;
        let none = minter.mint_with(&header, &c).expect("mint");
        assert_eq!(verifier.verify(&none), Err(TokenError::UnknownKey));
        // Another key under the same kid: a forgery.
        let (_, other) = ed25519("k1");
        let forged = other.mint_claims(&c).expect("mint");
        assert_eq!(verifier.verify(&forged), Err(TokenError::Invalid));
        // HS256 naming the kid: the algorithm is the key's, not the token's.
        let hs = TokenMinter::new(SECRET, Some("betting"), Some("betting-api"));
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some("k1".into());
        let swapped = hs.mint_with(&header, &c).expect("mint");
        assert_eq!(verifier.verify(&swapped), Err(TokenError::WrongAlgorithm));
        // A plain local-mode token when only the key set is configured.
        let local = hs.mint(42, Role::Player, HOUR).expect("mint");
        assert_eq!(verifier.verify(&local), Err(TokenError::UnknownKey));
    }

    #[test]
    fn refuses_a_wrong_type() {
        let (verifier, minter) = ed25519("k1");
        let c = claims("player", now(), now() + 60);
        for typ in [None, Some("at+jwt"), Some("jwt ")] {
            let mut header = minter.header();
            header.typ = typ.map(str::to_owned);
            let token = minter.mint_with(&header, &c).expect("mint");
            assert_eq!(
                verifier.verify(&token),
                Err(TokenError::WrongType),
                "{typ:?}"
            );
        }
    }

    #[test]
    fn refuses_bad_times() {
        let (verifier, minter) = ed25519("k1");
        let now = now();
        let check = |c: &Claims| verifier.verify(&minter.mint_claims(c).expect("mint"));
        // iat in the future beyond the leeway; within it is fine.
        assert_eq!(
            check(&claims("player", now + 120, now + 600)),
            Err(TokenError::IssuedInFuture)
        );
        assert!(check(&claims("player", now + 10, now + 600)).is_ok());
        // nbf not reached.
        let mut early = claims("player", now, now + 600);
        early.nbf = Some(now + 300);
        assert_eq!(check(&early), Err(TokenError::NotYetValid));
        early.nbf = Some(now - 1);
        assert!(check(&early).is_ok());
        // Longer than the maximum lifetime; service tokens are capped shorter.
        assert_eq!(
            check(&claims("player", now, now + 86_401)),
            Err(TokenError::LifetimeTooLong)
        );
        assert!(check(&claims("player", now, now + 86_400)).is_ok());
        let mut service = claims("service", now, now + 3600);
        service.sub = "betting-1".into();
        assert_eq!(check(&service), Err(TokenError::LifetimeTooLong));
        service.exp = now + SERVICE_MAX_LIFETIME.as_secs();
        assert!(check(&service).is_ok());
        // exp is required.
        let (pem, jwks) = generate_ed25519("k9").expect("generate");
        let verifier =
            Verifier::key_set(KeySet::from_jwks(&jwks).expect("set"), production_policy());
        let key = SigningKey::from_pem(pem.as_bytes(), "k9").expect("pem");
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some("k9".into());
        let no_exp = serde_json::json!({"sub": "42", "role": "player", "iat": now,
            "iss": "betting", "aud": "betting-api"});
        let token = jsonwebtoken::encode(&header, &no_exp, &key.key).expect("encode");
        assert_eq!(verifier.verify(&token), Err(TokenError::Invalid));
    }

    #[test]
    fn refuses_wrong_issuer_or_audience_and_requires_them() {
        let (verifier, minter) = ed25519("k1");
        let now = now();
        let check = |c: &Claims| verifier.verify(&minter.mint_claims(c).expect("mint"));
        let mut c = claims("player", now, now + 60);
        c.iss = Some("other".into());
        assert_eq!(check(&c), Err(TokenError::WrongIssuer));
        c.iss = None;
        assert_eq!(check(&c), Err(TokenError::Invalid), "iss is required");
        let mut c = claims("player", now, now + 60);
        c.aud = Some("another-api".into());
        assert_eq!(check(&c), Err(TokenError::WrongAudience));
        c.aud = None;
        assert_eq!(check(&c), Err(TokenError::Invalid), "aud is required");
    }

    #[test]
    fn refuses_the_retired_backend_role_and_unknown_roles_by_name() {
        let minter = TokenMinter::new(SECRET, None, None);
        let verifier = Verifier::hs256(SECRET, TokenPolicy::local());
        let now = now();
        let mut c = claims("backend", now, now + 60);
        (c.iss, c.aud, c.sub) = (None, None, "0".into());
        let token = minter.mint_claims(&c).expect("mint");
        let err = verifier.verify(&token).expect_err("retired");
        assert_eq!(err, TokenError::RetiredRole);
        assert!(
            err.to_string().contains("backend role was retired"),
            "{err}"
        );
        c.role = "superuser".into();
        let token = minter.mint_claims(&c).expect("mint");
        assert_eq!(verifier.verify(&token), Err(TokenError::Invalid));
    }
}
