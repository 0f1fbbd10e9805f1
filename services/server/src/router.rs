//! The gRPC router: what a process serves, and how.
//!
//! Every process serves health (`grpc.health.v1.Health`) and reflection (v1
//! and v1alpha, over our API and health's), and mounts its roles' services,
//! each through its gRPC adapter ([`crate::grpc`]), behind the auth
//! interceptor. Browsers reach all of it with gRPC-Web over
//! HTTP/1.1, and need CORS to. Health reports on the whole server ("") and on
//! each mounted service by the name its generated server answers to
//! (`NamedService::NAME`), so the list cannot drift from what is mounted.
//! Every service, these included, takes gzip- and zstd-compressed requests
//! and compresses its answers for clients that ask (`grpc::compressed!`).

use std::time::Duration;

use anyhow::Context;
use betting_auth::AuthInterceptor;
use betting_config::EdgeSettings;
use tonic::{server::NamedService, transport::Server};
use tonic_health::server::HealthReporter;
use tonic_web::GrpcWebLayer;
use tower::layer::util::{Identity, Stack};
use tower_http::cors::CorsLayer;

use crate::{
    edge::EdgeLayer, grpc, legacy::LegacyPathsLayer, observe::ObserveLayer, roles::Services,
    status_log::StatusLogLayer,
};

/// The router with its layers, outermost first: CORS, gRPC-Web, the old
/// internal paths' rewrite, the status log, the call's span and metrics,
/// the edge.
pub(crate) type GrpcRouter = tonic::transport::server::Router<
    Stack<
        EdgeLayer,
        Stack<
            ObserveLayer,
            Stack<
                StatusLogLayer,
                Stack<LegacyPathsLayer, Stack<GrpcWebLayer, Stack<CorsLayer, Identity>>>,
            >,
        >,
    >,
>;

/// The largest request health and reflection decode: a service name or a
/// symbol. Both are anonymous; 4 MiB each (tonic's default) let 100 callers
/// make the server hold 400 MiB, and reflection echoed a 4 MiB symbol back
/// in its error.
const MAX_INFRA_REQUEST_BYTES: usize = 1024;

/// A router ready to serve, and what health reports on.
pub(crate) struct Mounted {
    pub router: GrpcRouter,
    /// Sets the statuses the health service answers with.
    pub reporter: HealthReporter,
    /// The names of the mounted services of the roles.
    pub served: Vec<&'static str>,
}

/// Reflection over our API and health's, for both protocol versions.
fn reflection() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(betting_api::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
}

/// Mounts health, reflection and `services`.
pub(crate) fn mount(
    services: Services,
    auth: &AuthInterceptor,
    edge: &EdgeSettings,
) -> anyhow::Result<Mounted> {
    let (reporter, health_service) = tonic_health::server::health_reporter();
    let health_service =
        grpc::compressed!(health_service).max_decoding_message_size(MAX_INFRA_REQUEST_BYTES);
    let reflection_v1 = grpc::compressed!(reflection().build_v1().context("reflection v1")?)
        .max_decoding_message_size(MAX_INFRA_REQUEST_BYTES);
    let reflection_v1alpha =
        grpc::compressed!(reflection().build_v1alpha().context("reflection v1alpha")?)
            .max_decoding_message_size(MAX_INFRA_REQUEST_BYTES);

    // The wallet role serves the public WalletService and the internal
    // StakeService (betting.internal.v1) side by side.
    let stakes = services
        .wallet
        .clone()
        .map(|s| grpc::stakes::server(s, auth.clone()));
    let wallet = services
        .wallet
        .map(|s| grpc::wallet::server(s, auth.clone()));
    let betting = services
        .betting
        .map(|s| grpc::betting::server(s, services.limiter.clone(), auth.clone()));
    let settlement = services
        .settlement
        .map(|s| grpc::settlement::server(s, services.limiter.clone(), auth.clone()));
    let admin = services.admin.map(|s| grpc::admin::server(s, auth.clone()));
    let served = [
        name(&wallet),
        name(&stakes),
        name(&betting),
        name(&settlement),
        name(&admin),
    ]
    .into_iter()
    .flatten()
    .collect();

    let router = http2_limits(Server::builder(), edge)
        // Browsers speak gRPC-Web over HTTP/1.1 (and need CORS to call us).
        .accept_http1(true)
        .layer(cors())
        .layer(GrpcWebLayer::new())
        // Old callers of the internal RPCs' v1 paths, during a rolling
        // upgrade (legacy.rs): before everything that reads the path.
        .layer(LegacyPathsLayer)
        // The test suite's record of every error sent (inert unless
        // BETTING_TEST_STATUS_LOG is set); inside gRPC-Web, so it reads
        // plain gRPC headers and trailers.
        .layer(StatusLogLayer::from_env())
        // Every call's span and metrics, the edge's refusals included.
        .layer(ObserveLayer::new(&[
            betting_api::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
        ]))
        // Inside gRPC-Web, so it sees every call as gRPC; inside the status
        // log, so the log records its refusals too.
        .layer(EdgeLayer::new(edge))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_optional_service(wallet)
        .add_optional_service(stakes)
        .add_optional_service(betting)
        .add_optional_service(settlement)
        .add_optional_service(admin);
    Ok(Mounted {
        router,
        reporter,
        served,
    })
}

/// The HTTP/2 server's limits, each explicit (hyper's defaults leave several
/// unlimited, and an anonymous client must not be able to exhaust us).
fn http2_limits(server: Server, edge: &EdgeSettings) -> Server {
    let server = server
        // Advertised in SETTINGS: a client may not open more streams than
        // this on one connection (10,000 WatchBets on one connection were
        // all accepted before). Streams of one user are capped lower still
        // by the per-user limits.
        .max_concurrent_streams(edge.max_streams_per_connection)
        // The rapid-reset guard (CVE-2023-44487): a client that resets more
        // than this many streams before we accepted them gets GOAWAY.
        .http2_max_pending_accept_reset_streams(Some(20))
        // A client whose streams we keep resetting for its errors (malformed
        // headers: 20,000 drew 20,000 RST_STREAM and no GOAWAY) is cut off
        // after this many.
        .http2_max_local_error_reset_streams(Some(64))
        // Tokens are under 1 KiB; nothing needs 16 KiB of headers.
        .http2_max_header_list_size(16 * 1024)
        // Keep idle connections alive through NATs, and drop a peer that
        // stopped answering pings instead of holding its streams forever.
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)));
    match edge.max_connection_age() {
        // Old connections are asked to reconnect (GOAWAY), so load spreads
        // to new instances; their open streams get the grace to end (and
        // resume from their cursor elsewhere).
        Some(age) => server
            .max_connection_age(age)
            .max_connection_age_grace(edge.max_connection_age_grace()),
        None => server,
    }
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
