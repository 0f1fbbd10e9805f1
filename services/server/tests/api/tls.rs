//! TLS on the gRPC port and on our own service-to-service calls, with
//! certificates made per test (`betting-dev-certs`, rcgen): a TLS client is
//! answered and a plaintext one is not; gRPC-Web still works over HTTP/1.1
//! inside TLS; mutual TLS refuses a client without a certificate and one
//! whose certificate another CA signed; a betting process reaches a split-off
//! wallet over https:// with mutual TLS and places a bet end to end; and a
//! setting that asks for TLS the process cannot give stops it at start-up.

use std::{path::PathBuf, sync::Arc, time::Duration};

use betting_api::pb;
use betting_config::{ProcessRole, Settings};
use betting_dev_certs::DevCerts;
use betting_server::Application;
use betting_test_kit::{TestApp, authed, fresh_database, redis_url};
use rustls::pki_types::pem::PemObject;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    sync::oneshot,
};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

/// A CA and its certificates on disk, removed on drop.
struct Certs {
    dir: PathBuf,
    pem: DevCerts,
}

impl Certs {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("betting-tls-{}", uuid::Uuid::new_v4()));
        let pem = DevCerts::local().expect("generate certificates");
        pem.write_to(&dir).expect("write certificates");
        Self { dir, pem }
    }

    fn path(&self, file: &str) -> Option<PathBuf> {
        Some(self.dir.join(file))
    }

    /// Server TLS with this CA's server certificate; the loopback wallet
    /// client trusts this CA.
    fn serve(&self, settings: &mut Settings) {
        settings.tls.tls_cert = self.path("server.pem");
        settings.tls.tls_key = self.path("server.key");
        settings.tls.tls_ca = self.path("ca.pem");
    }

    /// Mutual TLS: callers need a certificate of this CA, and our own
    /// clients present this CA's client certificate.
    fn require_clients(&self, settings: &mut Settings) {
        settings.tls.tls_client_ca = self.path("ca.pem");
        settings.tls.tls_client_cert = self.path("client.pem");
        settings.tls.tls_client_key = self.path("client.key");
    }

    /// A client config trusting this CA, presenting `identity`'s client
    /// certificate if given.
    fn client(&self, identity: Option<&Certs>) -> ClientTlsConfig {
        let config =
            ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&self.pem.ca.cert));
        match identity {
            Some(certs) => config.identity(Identity::from_pem(
                &certs.pem.client.cert,
                &certs.pem.client.key,
            )),
            None => config,
        }
    }
}

impl Drop for Certs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A running application the test stops by dropping.
struct Running {
    port: u16,
    _stop: oneshot::Sender<()>,
}

async fn run(settings: Settings) -> Running {
    let app = Application::build(settings)
        .await
        .expect("build application");
    let port = app.port();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(app.run_until(async {
        let _ = stopped.await;
    }));
    Running { port, _stop: stop }
}

/// Asks the health service over `channel`; any answer means the transport
/// worked.
async fn health(channel: Channel) -> Result<(), tonic::Status> {
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .map(drop)
}

/// A channel to `port` over TLS with `config` (named `localhost`, which the
/// server certificate carries); connecting lazily, so that a refused
/// handshake shows as the call's error.
fn tls_channel(port: u16, config: ClientTlsConfig) -> Channel {
    Channel::from_shared(format!("https://localhost:{port}"))
        .expect("endpoint")
        .tls_config(config)
        .expect("tls config")
        .connect_timeout(Duration::from_secs(5))
        .connect_lazy()
}

fn plaintext_channel(port: u16) -> Channel {
    Channel::from_shared(format!("http://127.0.0.1:{port}"))
        .expect("endpoint")
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5))
        .connect_lazy()
}

#[tokio::test]
async fn a_tls_server_answers_tls_clients_and_refuses_plaintext_ones() {
    let database = fresh_database().await;
    let certs = Certs::new();
    let mut settings = betting_test_kit::app::settings(&database, &redis_url());
    certs.serve(&mut settings);
    let app = run(settings).await;

    health(tls_channel(app.port, certs.client(None)))
        .await
        .expect("a TLS client is answered");
    assert!(
        health(plaintext_channel(app.port)).await.is_err(),
        "a plaintext client is not served"
    );
    // A client that trusts another CA refuses our certificate.
    let other = Certs::new();
    assert!(
        health(tls_channel(app.port, other.client(None)))
            .await
            .is_err()
    );
}

/// Browsers may speak gRPC-Web over HTTP/1.1: the listener offers ALPN
/// `http/1.1` beside `h2` (tonic's own acceptor offers only `h2`).
#[tokio::test]
async fn grpc_web_over_http1_works_inside_tls() {
    let database = fresh_database().await;
    let certs = Certs::new();
    let mut settings = betting_test_kit::app::settings(&database, &redis_url());
    certs.serve(&mut settings);
    let app = run(settings).await;

    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(
            rustls::pki_types::CertificateDer::from_pem_slice(certs.pem.ca.cert.as_bytes())
                .expect("ca"),
        )
        .expect("add ca");
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", app.port))
        .await
        .expect("connect");
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(
            rustls::pki_types::ServerName::try_from("localhost").expect("name"),
            tcp,
        )
        .await
        .expect("TLS handshake with ALPN http/1.1 only");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    // An empty HealthCheckRequest: a frame header of five bytes, no body.
    tls.write_all(
        b"POST /grpc.health.v1.Health/Check HTTP/1.1\r\nhost: localhost\r\n\
          content-type: application/grpc-web+proto\r\nx-grpc-web: 1\r\n\
          content-length: 5\r\nconnection: close\r\n\r\n\0\0\0\0\0",
    )
    .await
    .expect("write");
    let mut response = Vec::new();
    let _ = tls.read_to_end(&mut response).await;
    let response = String::from_utf8_lossy(&response);
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.contains("grpc-status:0"), "{response}");
}

#[tokio::test]
async fn mutual_tls_refuses_clients_without_a_certificate_of_its_ca() {
    let database = fresh_database().await;
    let certs = Certs::new();
    let mut settings = betting_test_kit::app::settings(&database, &redis_url());
    certs.serve(&mut settings);
    certs.require_clients(&mut settings);
    let app = run(settings).await;

    assert!(
        health(tls_channel(app.port, certs.client(None)))
            .await
            .is_err(),
        "a client without a certificate is refused"
    );
    let other = Certs::new();
    assert!(
        health(tls_channel(app.port, certs.client(Some(&other))))
            .await
            .is_err(),
        "a client certificate of another CA is refused"
    );
    health(tls_channel(app.port, certs.client(Some(&certs))))
        .await
        .expect("a client certificate of our CA is accepted");
}

/// The betting role in one process, the wallet in another behind mutual TLS:
/// the bet's stake is held over https:// with the configured CA and client
/// certificate.
#[tokio::test]
async fn a_split_deployment_places_a_bet_through_an_mtls_wallet() {
    let database = fresh_database().await;
    let certs = Certs::new();
    let mut wallet = betting_test_kit::app::settings(&database, &redis_url());
    wallet.roles = vec![ProcessRole::Wallet];
    certs.serve(&mut wallet);
    certs.require_clients(&mut wallet);
    let wallet = run(wallet).await;
    let wallet_channel = tls_channel(wallet.port, certs.client(Some(&certs)));

    let mut betting = betting_test_kit::app::settings(&database, &redis_url());
    betting.roles = vec![ProcessRole::Betting, ProcessRole::Settlement];
    betting.wallet_endpoint = Some(format!("https://localhost:{}", wallet.port));
    betting.tls.tls_ca = certs.path("ca.pem");
    betting.tls.tls_client_cert = certs.path("client.pem");
    betting.tls.tls_client_key = certs.path("client.key");
    let betting = TestApp::spawn_with(betting).await;

    let mut wallet_client = pb::wallet_service_client::WalletServiceClient::new(wallet_channel);
    wallet_client
        .deposit(authed(
            pb::DepositRequest {
                user_id: 7,
                amount: "100".into(),
                idempotency_key: "tls-dep-7".into(),
                reference: String::new(),
            },
            &betting.cashier_token(),
        ))
        .await
        .expect("deposit over mTLS");
    betting.open_round("tls-round").await;
    betting.place_ok(7, "tls-round", pb::Side::A, "10").await;
    let wallet_now = wallet_client
        .get_wallet(authed(
            pb::GetWalletRequest { user_id: 7 },
            &betting.cashier_token(),
        ))
        .await
        .expect("get wallet")
        .into_inner()
        .wallet
        .expect("wallet");
    assert_eq!(
        wallet_now
            .balance
            .parse::<rust_decimal::Decimal>()
            .expect("decimal"),
        rust_decimal::Decimal::from(90)
    );
}

/// The same split without the CA: refused at start-up, before anything is
/// dialled (it used to be dialled in plaintext).
#[tokio::test]
async fn an_https_wallet_endpoint_without_a_ca_stops_the_process() {
    let database = fresh_database().await;
    let mut betting = betting_test_kit::app::settings(&database, &redis_url());
    betting.roles = vec![ProcessRole::Betting];
    betting.wallet_endpoint = Some("https://localhost:1".into());
    let error = Application::build(betting)
        .await
        .err()
        .expect("refused at start-up");
    assert_eq!(
        error.to_string(),
        "BETTING_WALLET_ENDPOINT is https:// but BETTING_TLS_CA is not set: give the CA that signs the wallet's certificate"
    );
}
