//! Authentication and the caller's identity.
//!
//! Every RPC except health and reflection carries `authorization: Bearer <JWT>`,
//! HS256-signed with the shared secret. [`AuthInterceptor`] verifies it and puts
//! the caller's [`Principal`] into the request's extensions; handlers read it
//! with [`Principal::of`] and decide with its helpers who may do what. Identity
//! always comes from the token, never from the request body.

#![forbid(unsafe_code)]

mod principal;
mod token;

pub use principal::{AuthError, Principal, Role};
pub use token::{AuthInterceptor, Claims, ServiceCredentials, TokenError, TokenMinter, Verifier};
