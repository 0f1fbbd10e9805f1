//! Keys: the public key set tokens are verified against (a JWKS file), the
//! private key a signing process mints its service tokens with (a PEM file),
//! and the generation of an Ed25519 pair for `betting keys generate`.
//!
//! Each key's algorithm is pinned when the key is loaded, from the key set,
//! never from a token's header: a token that names another algorithm for a
//! key (`none`, HS256 with the public key as the secret) is refused.

use std::collections::HashMap;

use base64::{Engine, engine::general_purpose::STANDARD};
use jsonwebtoken::{
    Algorithm, DecodingKey, EncodingKey,
    jwk::{AlgorithmParameters, EllipticCurve, Jwk, JwkSet, KeyAlgorithm, PublicKeyUse},
};
use rand::RngCore;

/// Why a key file could not be used; said at start-up.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("the key set is not JWKS JSON: {0}")]
    NotJwks(String),
    #[error("the key set holds private key material (\"d\"): publish only public keys")]
    PrivateMaterial,
    #[error("every key of the key set needs a kid")]
    NoKid,
    #[error("kid {0:?} appears twice in the key set")]
    DuplicateKid(String),
    #[error(
        "key {0:?}: only EdDSA (Ed25519) and ES256 (P-256) keys are accepted, with their \"alg\""
    )]
    Unsupported(String),
    #[error("key {0:?} cannot be read: {1}")]
    BadKey(String, String),
    #[error("the key set is empty")]
    Empty,
    #[error("the signing key is not a PKCS#8 PEM Ed25519 or P-256 private key")]
    BadSigningKey,
    #[error("the signing key's kid {0:?} is not in the key set")]
    SigningKidUnknown(String),
    #[error("the signing key does not match the public key the key set has for kid {0:?}")]
    SigningKeyMismatch(String),
}

/// A verifying key with its pinned algorithm.
pub(crate) struct PublicKey {
    pub alg: Algorithm,
    pub key: DecodingKey,
    /// The JWK as loaded, to compare a signing key's public half against.
    jwk: Jwk,
}

/// The public keys tokens are verified against, by `kid`.
pub struct KeySet {
    keys: HashMap<String, PublicKey>,
}

impl KeySet {
    /// Reads a JWKS document. Refuses private material, keys without a
    /// `kid` or `alg`, duplicate kids and algorithms other than EdDSA and ES256.
    pub fn from_jwks(json: &str) -> Result<Self, KeyError> {
        let raw: serde_json::Value =
            serde_json::from_str(json).map_err(|e| KeyError::NotJwks(e.to_string()))?;
        let holds_private = raw
            .get("keys")
            .and_then(|k| k.as_array())
            .is_some_and(|keys| keys.iter().any(|k| k.get("d").is_some()));
        if holds_private {
            return Err(KeyError::PrivateMaterial);
        }
        let set: JwkSet =
            serde_json::from_value(raw).map_err(|e| KeyError::NotJwks(e.to_string()))?;
        let mut keys = HashMap::new();
        for jwk in set.keys {
            let kid = jwk.common.key_id.clone().ok_or(KeyError::NoKid)?;
            let alg = match (&jwk.common.key_algorithm, &jwk.algorithm) {
                (Some(KeyAlgorithm::EdDSA), AlgorithmParameters::OctetKeyPair(p))
                    if p.curve == EllipticCurve::Ed25519 =>
                {
                    Algorithm::EdDSA
                }
                (Some(KeyAlgorithm::ES256), AlgorithmParameters::EllipticCurve(p))
                    if p.curve == EllipticCurve::P256 =>
                {
                    Algorithm::ES256
                }
                _ => return Err(KeyError::Unsupported(kid)),
            };
            let key = DecodingKey::from_jwk(&jwk)
                .map_err(|e| KeyError::BadKey(kid.clone(), e.to_string()))?;
            if keys
                .insert(kid.clone(), PublicKey { alg, key, jwk })
                .is_some()
            {
                return Err(KeyError::DuplicateKid(kid));
            }
        }
        if keys.is_empty() {
            return Err(KeyError::Empty);
        }
        Ok(Self { keys })
    }

    pub(crate) fn get(&self, kid: &str) -> Option<&PublicKey> {
        self.keys.get(kid)
    }

    /// Checks that `signing` is the private half of a key in this set, so a
    /// process refuses to start with a key whose tokens nobody would accept.
    pub fn check_signing_key(&self, signing: &SigningKey) -> Result<(), KeyError> {
        let kid = signing.kid.clone();
        let public = self
            .keys
            .get(&kid)
            .ok_or_else(|| KeyError::SigningKidUnknown(kid.clone()))?;
        let derived = Jwk::from_encoding_key(&signing.key, signing.alg)
            .map_err(|_| KeyError::BadSigningKey)?;
        if public.alg != signing.alg || public.jwk.algorithm != derived.algorithm {
            return Err(KeyError::SigningKeyMismatch(kid));
        }
        Ok(())
    }
}

/// A private key and the `kid` its public half is published under.
#[derive(Clone)]
pub struct SigningKey {
    pub(crate) alg: Algorithm,
    pub(crate) kid: String,
    pub(crate) key: EncodingKey,
}

impl SigningKey {
    /// A PKCS#8 PEM private key: Ed25519 (EdDSA) or P-256 (ES256).
    pub fn from_pem(pem: &[u8], kid: &str) -> Result<Self, KeyError> {
        let (alg, key) = if let Ok(key) = EncodingKey::from_ed_pem(pem) {
            (Algorithm::EdDSA, key)
        } else if let Ok(key) = EncodingKey::from_ec_pem(pem) {
            (Algorithm::ES256, key)
        } else {
            return Err(KeyError::BadSigningKey);
        };
        // Both constructors accept any DER; derive the public half to be
        // sure the key is usable for its algorithm now, not at first mint.
        Jwk::from_encoding_key(&key, alg).map_err(|_| KeyError::BadSigningKey)?;
        Ok(Self {
            alg,
            kid: kid.to_owned(),
            key,
        })
    }

    /// The public half as a JWKS document, to publish for the verifiers.
    pub fn public_jwks(&self) -> Result<String, KeyError> {
        public_key_set(&[self])
    }

    fn public_jwk(&self) -> Result<Jwk, KeyError> {
        let mut jwk =
            Jwk::from_encoding_key(&self.key, self.alg).map_err(|_| KeyError::BadSigningKey)?;
        jwk.common.key_id = Some(self.kid.clone());
        jwk.common.public_key_use = Some(PublicKeyUse::Signature);
        Ok(jwk)
    }
}

/// A JWKS document of the public halves of `keys`, each under its kid.
pub fn public_key_set(keys: &[&SigningKey]) -> Result<String, KeyError> {
    let keys = keys
        .iter()
        .map(|k| k.public_jwk())
        .collect::<Result<Vec<_>, _>>()?;
    serde_json::to_string_pretty(&JwkSet { keys }).map_err(|e| KeyError::NotJwks(e.to_string()))
}

/// The DER prefix of a PKCS#8 Ed25519 private key (RFC 8410): what precedes
/// the 32-byte seed.
const ED25519_PKCS8_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

/// A new Ed25519 key pair: the private key as PKCS#8 PEM, and a JWKS
/// document holding only its public half under `kid`.
pub fn generate_ed25519(kid: &str) -> Result<(String, String), KeyError> {
    let mut der = ED25519_PKCS8_PREFIX.to_vec();
    let mut seed = [0u8; 32];
    rand::rng().fill_bytes(&mut seed);
    der.extend_from_slice(&seed);
    let key = SigningKey {
        alg: Algorithm::EdDSA,
        kid: kid.to_owned(),
        key: EncodingKey::from_ed_der(&der),
    };
    let jwks = key.public_jwks()?;
    let body = STANDARD.encode(&der);
    let pem = format!("-----BEGIN PRIVATE KEY-----\n{body}\n-----END PRIVATE KEY-----\n");
    Ok((pem, jwks))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_pair_loads_and_matches() {
        let (pem, jwks) = generate_ed25519("k1").expect("generate");
        let set = KeySet::from_jwks(&jwks).expect("jwks");
        let signing = SigningKey::from_pem(pem.as_bytes(), "k1").expect("pem");
        assert_eq!(signing.alg, Algorithm::EdDSA);
        set.check_signing_key(&signing).expect("matches");
        // Another pair's private key does not match this set's public key.
        let (other, _) = generate_ed25519("k1").expect("generate");
        let other = SigningKey::from_pem(other.as_bytes(), "k1").expect("pem");
        assert!(matches!(
            set.check_signing_key(&other),
            Err(KeyError::SigningKeyMismatch(_))
        ));
        let unknown = SigningKey::from_pem(pem.as_bytes(), "k2").expect("pem");
        assert!(matches!(
            set.check_signing_key(&unknown),
            Err(KeyError::SigningKidUnknown(_))
        ));
    }

    #[test]
    fn key_sets_refuse_what_they_must_not_hold() {
        let (_, jwks) = generate_ed25519("k1").expect("generate");
        let mut doc: serde_json::Value = serde_json::from_str(&jwks).expect("json");
        // Private material.
        let mut private = doc.clone();
        private["keys"][0]["d"] = "AAAA".into();
        assert!(matches!(
            KeySet::from_jwks(&private.to_string()),
            Err(KeyError::PrivateMaterial)
        ));
        // No kid.
        let mut no_kid = doc.clone();
        no_kid["keys"][0]
            .as_object_mut()
            .expect("key")
            .remove("kid");
        assert!(matches!(
            KeySet::from_jwks(&no_kid.to_string()),
            Err(KeyError::NoKid)
        ));
        // No alg: the algorithm must be pinned by the key set.
        let mut no_alg = doc.clone();
        no_alg["keys"][0]
            .as_object_mut()
            .expect("key")
            .remove("alg");
        assert!(matches!(
            KeySet::from_jwks(&no_alg.to_string()),
            Err(KeyError::Unsupported(_))
        ));
        // A symmetric key.
        let oct = serde_json::json!({"keys": [{"kty": "oct", "k": "c2VjcmV0", "alg": "HS256", "kid": "s"}]});
        assert!(matches!(
            KeySet::from_jwks(&oct.to_string()),
            Err(KeyError::Unsupported(_))
        ));
        // Duplicate kids, and an empty set.
        let key = doc["keys"][0].clone();
        doc["keys"] = serde_json::json!([key.clone(), key]);
        assert!(matches!(
            KeySet::from_jwks(&doc.to_string()),
            Err(KeyError::DuplicateKid(_))
        ));
        assert!(matches!(
            KeySet::from_jwks(r#"{"keys": []}"#),
            Err(KeyError::Empty)
        ));
    }
}
