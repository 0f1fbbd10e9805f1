//! The gRPC adapters: one per service, each a local newtype over the
//! service crate's domain-typed service that implements the generated tonic
//! trait. An adapter gets the caller with `Principal::caller`, parses the
//! wire request (with `betting_api::convert` and `Violations`), calls the
//! service, converts its rows to messages and answers with
//! `betting_api::respond` or `respond_replayable`. The service crates know
//! no transport; this module and the api crate are where gRPC lives.

/// The largest request message our services decode. Every request of the
/// API is a few hundred bytes (ids, an amount, a key); tonic's default of
/// 4 MiB would let any caller make the server buffer 4 MiB per stream.
pub(crate) const MAX_REQUEST_BYTES: usize = 16 * 1024;

/// WalletService's limit: its HoldStakes carries up to
/// `betting_wallet::MAX_HOLDS_PER_CALL` (256) holds of about 120 bytes each.
/// Only the service role may call it, but every caller's message is decoded
/// before the handler checks the role, so it stays bounded.
pub(crate) const MAX_WALLET_REQUEST_BYTES: usize = 64 * 1024;

pub(crate) mod admin;
pub(crate) mod betting;
pub(crate) mod settlement;
pub(crate) mod wallet;
