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

/// StakeService's limit (and WalletService's): its HoldStakes carries up to
/// `betting_wallet::MAX_HOLDS_PER_CALL` (256) holds of about 120 bytes each.
/// Only the service role may call it, but every caller's message is decoded
/// before the handler checks the role, so it stays bounded.
pub(crate) const MAX_WALLET_REQUEST_BYTES: usize = 64 * 1024;

/// Compression for a generated tonic server (ours, health's, reflection's):
/// requests compressed with gzip or zstd are accepted (without it grpcio,
/// grpc-go and grpc-java clients that compress get UNIMPLEMENTED), and
/// responses are compressed when the client advertises one of them in
/// `grpc-accept-encoding` (its first choice of the two wins). Plain calls
/// stay plain. A macro, not a function: each generated server has these
/// builder methods as its own, under no common trait.
///
/// Decompression is bounded too: tonic applies the server's
/// `max_decoding_message_size` to the decompressed message, so a small
/// compressed request cannot expand past the limit (a test sends one).
macro_rules! compressed {
    ($server:expr) => {{
        use tonic::codec::CompressionEncoding::{Gzip, Zstd};
        $server
            .accept_compressed(Gzip)
            .accept_compressed(Zstd)
            .send_compressed(Gzip)
            .send_compressed(Zstd)
    }};
}
pub(crate) use compressed;

pub(crate) mod admin;
pub(crate) mod betting;
pub(crate) mod settlement;
pub(crate) mod stakes;
pub(crate) mod wallet;
