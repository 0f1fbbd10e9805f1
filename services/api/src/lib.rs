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

/// Generated code, in modules shaped like the packages: prost refers from
/// `betting.internal.v1` to `betting.v1` types as `super::super::v1`.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
mod generated {
    pub mod betting {
        pub mod v1 {
            tonic::include_proto!("betting.v1");
        }
        pub mod internal {
            pub mod v1 {
                tonic::include_proto!("betting.internal.v1");
            }
        }
    }
}

/// Generated code for package `betting.v1`: the public API.
pub use generated::betting::v1 as pb;

/// Generated code for package `betting.internal.v1`: what only our own
/// processes call (StakeService), kept out of the public SDKs.
pub use generated::betting::internal::v1 as pb_internal;

/// The encoded `FileDescriptorSet` of every betting.v1 and
/// betting.internal.v1 file and their imports, served by gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/betting_descriptor.bin"));

/// The `google.rpc.ErrorInfo.domain` of our errors.
pub const ERROR_DOMAIN: &str = "betting.v1";

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use betting_domain::ErrorReason;
    use prost::Message;

    fn descriptor_set() -> prost_types::FileDescriptorSet {
        prost_types::FileDescriptorSet::decode(super::FILE_DESCRIPTOR_SET).expect("descriptor set")
    }

    /// The values of `betting.v1.ErrorReason` as the proto declares them,
    /// prefix stripped: what `ErrorInfo.reason` may be.
    fn declared_reasons() -> BTreeSet<String> {
        let set = descriptor_set();
        let reasons = set
            .file
            .iter()
            .filter(|f| f.package() == "betting.v1")
            .flat_map(|f| &f.enum_type)
            .find(|e| e.name() == "ErrorReason")
            .expect("betting.v1.ErrorReason is declared");
        reasons
            .value
            .iter()
            .filter(|v| v.number() != 0)
            .map(|v| {
                v.name()
                    .strip_prefix("ERROR_REASON_")
                    .unwrap_or_else(|| panic!("{} lacks the ERROR_REASON_ prefix", v.name()))
                    .to_owned()
            })
            .collect()
    }

    /// Every reason the code can send (`ServiceError::reason` returns an
    /// `ErrorReason`) is a value of the proto's enum, and the proto lists
    /// none the code cannot send: the two lists are the same.
    #[test]
    fn the_code_emits_exactly_the_reasons_the_proto_declares() {
        let emitted: BTreeSet<String> = ErrorReason::ALL
            .iter()
            .map(|r| r.as_str().to_owned())
            .collect();
        assert_eq!(
            emitted.len(),
            ErrorReason::ALL.len(),
            "a reason string twice"
        );
        let declared = declared_reasons();
        let undeclared: Vec<_> = emitted.difference(&declared).collect();
        assert!(
            undeclared.is_empty(),
            "reasons the code sends but errors.proto's ErrorReason lacks: {undeclared:?}"
        );
        let unused: Vec<_> = declared.difference(&emitted).collect();
        assert!(
            unused.is_empty(),
            "ErrorReason values no code sends (add them to betting_domain::ErrorReason): {unused:?}"
        );
        // The generated enum agrees, name for name.
        for reason in ErrorReason::ALL {
            let name = format!("ERROR_REASON_{}", reason.as_str());
            assert!(
                super::pb::ErrorReason::from_str_name(&name).is_some(),
                "{name}"
            );
        }
    }

    /// What a status carries is the reason's string, unprefixed.
    #[test]
    fn error_info_carries_the_unprefixed_name() {
        let err = betting_domain::InvalidRequest(vec![betting_domain::FieldViolation::new(
            "amount", "is bad",
        )]);
        let status = super::to_status(&err);
        assert_eq!(
            super::reason_of(&status).as_deref(),
            Some("INVALID_ARGUMENT")
        );
    }

    /// Public SDKs generate from proto/betting/v1 alone: nothing there may
    /// import the internal package.
    #[test]
    fn the_public_api_imports_nothing_internal() {
        let set = descriptor_set();
        let mut internal = 0;
        for file in &set.file {
            if file.package().starts_with("betting.internal.") {
                internal += 1;
            }
            if file.package() == "betting.v1" {
                for dependency in &file.dependency {
                    assert!(
                        !dependency.starts_with("betting/internal/"),
                        "{} imports {dependency}",
                        file.name()
                    );
                }
            }
        }
        assert!(internal > 0, "the internal package is compiled too");
    }
}
