//! The gRPC router: what a process serves, and how.
//!
//! Every process serves health (`grpc.health.v1.Health`) and reflection (v1
//! and v1alpha, over our API and health's), and mounts its roles' services,
//! each through its gRPC adapter ([`crate::grpc`]), behind the auth
//! interceptor. Browsers reach all of it with gRPC-Web over
//! HTTP/1.1, and need CORS to. Health reports on the whole server ("") and on
//! each mounted service by the name its generated server answers to
//! (`NamedService::NAME`), so the list cannot drift from what is mounted.

use std::time::Duration;

use anyhow::Context;
use betting_auth::AuthInterceptor;
use tonic::{server::NamedService, transport::Server};
use tonic_health::server::HealthReporter;
use tonic_web::GrpcWebLayer;
use tower::layer::util::{Identity, Stack};
use tower_http::cors::CorsLayer;

use crate::{grpc, roles::Services, status_log::StatusLogLayer};

/// The router with its layers: gRPC-Web outside CORS.
pub(crate) type GrpcRouter = tonic::transport::server::Router<
    Stack<StatusLogLayer, Stack<GrpcWebLayer, Stack<CorsLayer, Identity>>>,
>;

/// A router ready to serve, and what health reports on.
pub(crate) struct Mounted {
    pub router: GrpcRouter,
    /// Sets the statuses the health service answers with.
    pub reporter: HealthReporter,
    /// The names of the mounted services of the roles.
    pub served: Vec<&'static str>,
}

/// Mounts health, reflection and `services`.
pub(crate) fn mount(services: Services, auth: &AuthInterceptor) -> anyhow::Result<Mounted> {
    let (reporter, health_service) = tonic_health::server::health_reporter();
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(betting_api::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("reflection v1")?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(betting_api::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .context("reflection v1alpha")?;

    let wallet = services
        .wallet
        .map(|s| grpc::wallet::server(s, auth.clone()));
    let betting = services
        .betting
        .map(|s| grpc::betting::server(s, auth.clone()));
    let settlement = services
        .settlement
        .map(|s| grpc::settlement::server(s, auth.clone()));
    let admin = services.admin.map(|s| grpc::admin::server(s, auth.clone()));
    let served = [
        name(&wallet),
        name(&betting),
        name(&settlement),
        name(&admin),
    ]
    .into_iter()
    .flatten()
    .collect();

    let router = Server::builder()
        // Keep idle client connections alive through NATs and notice dead peers.
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        // Browsers speak gRPC-Web over HTTP/1.1 (and need CORS to call us).
        .accept_http1(true)
        .layer(cors())
        .layer(GrpcWebLayer::new())
        // The test suite's record of every error sent (inert unless
        // BETTING_TEST_STATUS_LOG is set); inside gRPC-Web, so it reads
        // plain gRPC headers and trailers.
        .layer(StatusLogLayer::from_env())
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_optional_service(wallet)
        .add_optional_service(betting)
        .add_optional_service(settlement)
        .add_optional_service(admin);
    Ok(Mounted {
        router,
        reporter,
        served,
    })
}

/// The name a service is mounted under (its generated server's, through the
/// interceptor), if it is mounted.
fn name<S: NamedService>(service: &Option<S>) -> Option<&'static str> {
    service.as_ref().map(|_| S::NAME)
}

/// CORS for browser clients: any origin may call (tokens, not cookies,
/// authenticate), and may read the gRPC status headers.
fn cors() -> CorsLayer {
    use http::{HeaderName, Method};
    CorsLayer::new()
        .allow_origin(tower_http::cors::Any)
        .allow_methods([Method::POST, Method::OPTIONS])
        .allow_headers(tower_http::cors::Any)
        .expose_headers([
            HeaderName::from_static("grpc-status"),
            HeaderName::from_static("grpc-message"),
            HeaderName::from_static("grpc-status-details-bin"),
            HeaderName::from_static("idempotent-replayed"),
        ])
        .max_age(Duration::from_secs(600))
}
