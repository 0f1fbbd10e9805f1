//! Authentication and the caller's identity.
//!
//! Every RPC except health and reflection carries `authorization: Bearer <JWT>`.
//! In production the token is signed (EdDSA or ES256) by a key whose public
//! half is in the configured key set, named by the token's `kid`; in local
//! mode it is HS256 with a shared secret. [`AuthInterceptor`] verifies it and
//! puts the caller's [`Principal`] into the request's extensions; handlers
//! read it with [`Principal::caller`] and decide with its helpers who may do
//! what. Identity always comes from the token, never from the request body.

#![forbid(unsafe_code)]

mod interceptor;
mod keys;
mod mint;
mod principal;
pub mod setup;
mod verify;

pub use interceptor::AuthInterceptor;
pub use keys::{KeyError, KeySet, SigningKey, generate_ed25519, public_key_set};
pub use mint::{ServiceCredentials, TokenMinter};
pub use principal::{AuthError, Principal, Role};
pub use verify::{
    Claims, LEEWAY_SECS, SERVICE_MAX_LIFETIME, TOKEN_TYPE, TokenError, TokenPolicy, Verifier,
};
