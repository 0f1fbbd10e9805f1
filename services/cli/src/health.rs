//! `betting health`: one `grpc.health.v1.Health/Check` call, for container
//! health checks (compose, exec probes) in an image with no other tool.
//!
//! Exits 0 when the answer is SERVING and 1 otherwise: NOT_SERVING (a store
//! is down, or the process is draining), an unknown service name, no answer
//! within `--timeout`, or nothing listening. Without `--addr` it asks the
//! process configured in the same environment: `BETTING_LISTEN_ADDR` (an
//! unspecified address, `0.0.0.0` or `::`, is asked on loopback), over TLS
//! when `BETTING_TLS_CERT` is set. TLS trusts `BETTING_TLS_CA` and presents
//! `BETTING_TLS_CLIENT_CERT`/`KEY` when set, as the wallet client does.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::Context;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

#[derive(clap::Args)]
pub struct HealthArgs {
    /// The server, `http://host:port` or `https://host:port`; by default the
    /// one BETTING_LISTEN_ADDR (and BETTING_TLS_CERT) configure.
    #[arg(long)]
    addr: Option<String>,
    /// The service to ask about, e.g. betting.v1.WalletService; the whole
    /// server when absent.
    #[arg(long, default_value = "")]
    service: String,
    /// Seconds the connection and the call may take together.
    #[arg(long, default_value_t = 3)]
    timeout: u64,
    #[arg(long, env = "BETTING_LISTEN_ADDR", default_value = "127.0.0.1:50051")]
    listen_addr: SocketAddr,
    /// Only whether it is set: the server serves TLS.
    #[arg(long, env = "BETTING_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    #[arg(long, env = "BETTING_TLS_CA")]
    tls_ca: Option<PathBuf>,
    #[arg(long, env = "BETTING_TLS_CLIENT_CERT", requires = "tls_client_key")]
    tls_client_cert: Option<PathBuf>,
    #[arg(long, env = "BETTING_TLS_CLIENT_KEY", requires = "tls_client_cert")]
    tls_client_key: Option<PathBuf>,
}

pub async fn run(args: HealthArgs) -> anyhow::Result<()> {
    let addr = match &args.addr {
        Some(addr) => addr.clone(),
        None => {
            let mut local = args.listen_addr;
            if local.ip().is_unspecified() {
                local.set_ip(if local.is_ipv4() {
                    std::net::Ipv4Addr::LOCALHOST.into()
                } else {
                    std::net::Ipv6Addr::LOCALHOST.into()
                });
            }
            let scheme = if args.tls_cert.is_some() {
                "https"
            } else {
                "http"
            };
            format!("{scheme}://{local}")
        }
    };
    let within = Duration::from_secs(args.timeout.max(1));
    let mut endpoint = Endpoint::from_shared(addr.clone())
        .with_context(|| format!("{addr:?} is not a URL"))?
        .connect_timeout(within)
        .timeout(within);
    if endpoint.uri().scheme_str() == Some("https") {
        endpoint = endpoint.tls_config(tls(&args)?)?;
    }
    let status = tokio::time::timeout(within, async {
        let channel = endpoint.connect().await?;
        let request = HealthCheckRequest {
            service: args.service.clone(),
        };
        let answer = HealthClient::new(channel).check(request).await?;
        anyhow::Ok(answer.into_inner().status)
    })
    .await
    .with_context(|| format!("{addr}: no answer within {within:?}"))?
    .with_context(|| format!("{addr}: health check failed"))?;
    let status = ServingStatus::try_from(status).unwrap_or(ServingStatus::Unknown);
    println!("{}", status.as_str_name());
    anyhow::ensure!(
        status == ServingStatus::Serving,
        "{addr} {:?}: {}",
        args.service,
        status.as_str_name()
    );
    Ok(())
}

fn tls(args: &HealthArgs) -> anyhow::Result<ClientTlsConfig> {
    let ca = args
        .tls_ca
        .as_deref()
        .context("an https:// server needs BETTING_TLS_CA (or --tls-ca)")?;
    let ca = betting_config::tls::certificates("BETTING_TLS_CA", ca)?;
    let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
    if let (Some(cert), Some(key)) = (&args.tls_client_cert, &args.tls_client_key) {
        let cert = betting_config::tls::certificates("BETTING_TLS_CLIENT_CERT", cert)?;
        let key = betting_config::tls::private_key("BETTING_TLS_CLIENT_KEY", key)?;
        config = config.identity(Identity::from_pem(cert, key.expose()));
    }
    Ok(config)
}
