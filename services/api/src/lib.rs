//! The `betting.v1` API: generated messages, clients and servers, the encoded
//! descriptor set for reflection, and the edge conversions.
//!
//! Architecture invariant: this is the only crate that knows prost types and
//! builds `tonic::Status` from domain errors ([`status`]). The server's gRPC
//! adapters convert to and from the services' domain types with the helpers
//! in [`convert`].

#![forbid(unsafe_code)]

pub mod codec;
pub mod convert;
mod status;

pub use status::{
    IDEMPOTENT_REPLAYED, Replayable, reason_of, refusal_status, respond, respond_replayable,
    to_status,
};

/// Generated code for package `betting.v1`.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod pb {
    tonic::include_proto!("betting.v1");
}

/// The encoded `FileDescriptorSet` of every betting.v1 file and its imports,
/// served by gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/betting_descriptor.bin"));

/// The `google.rpc.ErrorInfo.domain` of our errors.
pub const ERROR_DOMAIN: &str = "betting.v1";
