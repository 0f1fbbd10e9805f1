//! `betting dev-certs --out DIR`: a local CA and what it signed, so that the
//! TLS path of `deploy/local/up` is one command away. For local use only:
//! the CA's key is written beside the certificates.

use std::path::PathBuf;

use anyhow::Context;
use betting_dev_certs::{DevCerts, LOCAL_NAMES};

#[derive(clap::Args)]
pub(crate) struct DevCertsArgs {
    /// Directory to write ca.pem, server.pem, client.pem and their keys to
    /// (keys with mode 0600); created if needed, files in it replaced.
    /// `.local/` is git-ignored.
    #[arg(long, default_value = ".local/certs")]
    out: PathBuf,
}

pub(crate) fn run(args: &DevCertsArgs) -> anyhow::Result<()> {
    let certs = DevCerts::local().context("generate certificates")?;
    certs.write_to(&args.out)?;
    let dir = std::fs::canonicalize(&args.out).unwrap_or_else(|_| args.out.clone());
    let dir = dir.display();
    eprintln!(
        "wrote a local CA and certificates for {} to {dir}; for TLS, export:",
        LOCAL_NAMES.join(", ")
    );
    println!("export BETTING_TLS_CERT={dir}/server.pem");
    println!("export BETTING_TLS_KEY={dir}/server.key");
    println!("export BETTING_TLS_CA={dir}/ca.pem");
    eprintln!("and for mutual TLS as well:");
    println!("export BETTING_TLS_CLIENT_CA={dir}/ca.pem");
    println!("export BETTING_TLS_CLIENT_CERT={dir}/client.pem");
    println!("export BETTING_TLS_CLIENT_KEY={dir}/client.key");
    Ok(())
}
