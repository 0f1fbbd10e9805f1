//! Compiles `proto/` with protox (pure Rust, no system `protoc`) and generates
//! the tonic clients and servers. The encoded descriptor set is written to
//! OUT_DIR too: server reflection serves it.

use std::{env, path::PathBuf};

const PROTO_ROOT: &str = "../../proto";
const FILES: &[&str] = &[
    "betting/v1/types.proto",
    "betting/v1/wallet.proto",
    "betting/v1/betting.proto",
    "betting/v1/settlement.proto",
    "betting/v1/admin.proto",
    "betting/v1/errors.proto",
    // Internal: our own processes' calls (not in the public SDKs).
    "betting/internal/v1/stakes.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed={PROTO_ROOT}");
    let fds = protox::compile(FILES, [PROTO_ROOT])?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("betting_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Small starting buffers: a stream keeps its own (src/codec.rs).
        .codec_path("crate::codec::LeanCodec")
        .compile_fds(fds)?;
    Ok(())
}
