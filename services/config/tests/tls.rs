//! Start-up refusals of TLS settings: each setting that asks for TLS the
//! process cannot give stops it with a message naming the variable.

use std::path::{Path, PathBuf};

use betting_config::{ConfigError, Settings};
use betting_dev_certs::DevCerts;
use clap::Parser;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    settings: Settings,
}

/// A fresh CA and certificates, written to a directory of its own.
struct Certs(PathBuf);

impl Certs {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("config-tls-{name}-{}", std::process::id()));
        DevCerts::local()
            .expect("generate")
            .write_to(&dir)
            .expect("write");
        Self(dir)
    }

    fn path(&self, file: &str) -> String {
        self.0.join(file).display().to_string()
    }
}

impl Drop for Certs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn settings(extra: &[&str]) -> Settings {
    let mut args = vec![
        "betting",
        "--database-url",
        "postgres://localhost/x",
        "--redis-url",
        "redis://localhost",
        "--jwt-secret",
        "0123456789abcdef0123456789abcdef",
    ];
    args.extend_from_slice(extra);
    Cli::try_parse_from(args).expect("parses").settings
}

fn refusal(extra: &[&str]) -> ConfigError {
    settings(extra).validate().expect_err("refused at start-up")
}

#[test]
fn a_server_certificate_without_its_key_is_refused() {
    let certs = Certs::new("half");
    let error = refusal(&["--tls-cert", &certs.path("server.pem")]);
    assert_eq!(
        error.to_string(),
        "BETTING_TLS_CERT is set without BETTING_TLS_KEY: give both or neither"
    );
    let error = refusal(&["--tls-key", &certs.path("server.key")]);
    assert!(matches!(
        error,
        ConfigError::TlsHalfPair {
            set: "BETTING_TLS_KEY",
            ..
        }
    ));
}

#[test]
fn a_client_ca_without_a_server_certificate_is_refused() {
    let certs = Certs::new("client-ca");
    let error = refusal(&["--tls-client-ca", &certs.path("ca.pem")]);
    assert!(matches!(error, ConfigError::ClientCaWithoutTls), "{error}");
}

#[test]
fn a_file_that_is_not_pem_is_refused_by_name() {
    let certs = Certs::new("bad-pem");
    // A key where a certificate belongs, and a certificate where a key does.
    let error = refusal(&[
        "--tls-cert",
        &certs.path("server.key"),
        "--tls-key",
        &certs.path("server.key"),
    ]);
    assert!(
        matches!(
            error,
            ConfigError::TlsFile {
                variable: "BETTING_TLS_CERT",
                ..
            }
        ),
        "{error}"
    );
    let error = refusal(&[
        "--tls-cert",
        &certs.path("server.pem"),
        "--tls-key",
        &certs.path("server.pem"),
    ]);
    assert!(
        error.to_string().starts_with("BETTING_TLS_KEY ("),
        "{error}"
    );
    assert!(
        error.to_string().ends_with("holds no PEM private key"),
        "{error}"
    );
    let garbage = certs.0.join("garbage.pem");
    std::fs::write(
        &garbage,
        "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
    )
    .expect("write");
    let error = refusal(&[
        "--tls-ca",
        &garbage.display().to_string(),
        "--wallet-endpoint",
        "https://wallet:50051",
    ]);
    assert!(error.to_string().ends_with("is not valid PEM"), "{error}");
    let error = refusal(&["--tls-ca", "/nowhere/ca.pem"]);
    assert_eq!(
        error.to_string(),
        "BETTING_TLS_CA (/nowhere/ca.pem) cannot be read: entity not found"
    );
}

#[test]
fn an_https_wallet_endpoint_without_a_ca_is_refused() {
    let error = refusal(&[
        "--role",
        "betting",
        "--wallet-endpoint",
        "https://wallet.internal:50051",
    ]);
    assert!(matches!(error, ConfigError::HttpsWithoutCa), "{error}");
    let certs = Certs::new("https");
    settings(&[
        "--role",
        "betting",
        "--wallet-endpoint",
        "https://wallet.internal:50051",
        "--tls-ca",
        &certs.path("ca.pem"),
    ])
    .validate()
    .expect("an https endpoint with a CA starts");
}

/// All-in-one under TLS dials its own listener: it must trust it, and under
/// mutual TLS present a certificate.
#[test]
fn serving_tls_all_in_one_needs_what_the_loopback_client_needs() {
    let certs = Certs::new("loopback");
    let (cert, key, ca) = (
        certs.path("server.pem"),
        certs.path("server.key"),
        certs.path("ca.pem"),
    );
    let error = refusal(&["--tls-cert", &cert, "--tls-key", &key]);
    assert!(
        matches!(error, ConfigError::LoopbackTlsWithoutCa),
        "{error}"
    );
    let error = refusal(&[
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
        "--tls-ca",
        &ca,
        "--tls-client-ca",
        &ca,
    ]);
    assert!(
        matches!(error, ConfigError::LoopbackMtlsWithoutIdentity),
        "{error}"
    );
    let all_in_one = settings(&[
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
        "--tls-ca",
        &ca,
        "--tls-client-ca",
        &ca,
        "--tls-client-cert",
        &certs.path("client.pem"),
        "--tls-client-key",
        &certs.path("client.key"),
    ]);
    all_in_one.validate().expect("starts");
    assert_eq!(
        all_in_one.wallet_url("127.0.0.1:5".parse().expect("addr")),
        "https://127.0.0.1:5"
    );
    // The wallet role alone calls nobody: server TLS is enough.
    settings(&["--role", "wallet", "--tls-cert", &cert, "--tls-key", &key])
        .validate()
        .expect("starts");
}

#[test]
fn a_client_certificate_without_a_ca_is_refused() {
    let certs = Certs::new("identity");
    let error = refusal(&[
        "--tls-client-cert",
        &certs.path("client.pem"),
        "--tls-client-key",
        &certs.path("client.key"),
    ]);
    assert!(
        matches!(error, ConfigError::ClientIdentityWithoutCa),
        "{error}"
    );
}

#[test]
fn a_redis_ca_with_a_plaintext_redis_url_is_refused() {
    let certs = Certs::new("redis");
    let error = refusal(&["--redis-tls-ca", &certs.path("ca.pem")]);
    assert!(matches!(error, ConfigError::RedisCaWithoutTls), "{error}");
    let mut rediss = settings(&["--redis-tls-ca", &certs.path("ca.pem")]);
    rediss.redis_url = betting_config::Secret::new("rediss://localhost:6380");
    rediss.validate().expect("rediss with a CA starts");
}

#[test]
fn a_database_ca_file_is_read_at_start_up() {
    let certs = Certs::new("pg");
    let mut settings = settings(&[]);
    settings.storage.database_url = betting_config::Secret::new(format!(
        "postgres://localhost/x?sslmode=verify-full&sslrootcert={}",
        certs.path("ca.pem")
    ));
    settings.validate().expect("a readable CA starts");
    settings.storage.database_url = betting_config::Secret::new(format!(
        "postgres://localhost/x?sslmode=verify-full&sslrootcert={}",
        certs.path("ca.key")
    ));
    let error = settings.validate().expect_err("refused");
    assert!(
        matches!(
            error,
            ConfigError::TlsFile {
                variable: "DATABASE_URL sslrootcert",
                ..
            }
        ),
        "{error}"
    );
    let _: &Path = &certs.0;
}
