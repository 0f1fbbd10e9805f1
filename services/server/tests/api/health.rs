//! Health and reflection, and what clients see while a store is down.

use std::time::Duration;

use betting_api::pb;
use tonic::Code;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use betting_test_kit::{
    TestApp, TestRedis, authed, eventually, expect_code, free_port, fresh_database, settings,
};

async fn status(app: &TestApp, service: &str) -> ServingStatus {
    let response = HealthClient::new(app.channel.clone())
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .expect("health check")
        .into_inner();
    ServingStatus::try_from(response.status).expect("known status")
}

async fn wait_for(app: &TestApp, want: ServingStatus) {
    eventually(
        &format!("health becomes {want:?}"),
        Duration::from_secs(15),
        async || (status(app, "").await == want).then_some(()),
    )
    .await;
}

#[tokio::test]
async fn every_service_reports_serving_and_reflection_lists_them() {
    let app = TestApp::spawn().await;
    for service in [
        "",
        "betting.v1.WalletService",
        "betting.v1.BettingService",
        "betting.v1.SettlementService",
    ] {
        assert_eq!(
            status(&app, service).await,
            ServingStatus::Serving,
            "{service:?}"
        );
    }
    use tonic_reflection_client::*;
    let services = list_services(app.channel.clone()).await;
    for wanted in [
        "betting.v1.WalletService",
        "betting.v1.BettingService",
        "betting.v1.SettlementService",
        "betting.v1.AdminService",
        "grpc.health.v1.Health",
    ] {
        assert!(
            services.iter().any(|s| s == wanted),
            "{wanted} missing from {services:?}"
        );
    }
}

/// A minimal reflection client (v1) over the generated tonic-reflection types.
mod tonic_reflection_client {
    use tonic::transport::Channel;
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };

    pub async fn list_services(channel: Channel) -> Vec<String> {
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut stream = ServerReflectionClient::new(channel)
            .server_reflection_info(tokio_stream::iter(vec![request]))
            .await
            .expect("reflection")
            .into_inner();
        let response = stream
            .message()
            .await
            .expect("message")
            .expect("a response");
        match response.message_response {
            Some(MessageResponse::ListServicesResponse(list)) => {
                list.service.into_iter().map(|s| s.name).collect()
            }
            other => panic!("unexpected reflection answer {other:?}"),
        }
    }
}

#[tokio::test]
async fn health_follows_redis_down_and_back() {
    let mut redis = TestRedis::start();
    let url = fresh_database().await;
    let app = TestApp::spawn_with(settings(&url, &redis.url())).await;
    wait_for(&app, ServingStatus::Serving).await;
    redis.stop();
    wait_for(&app, ServingStatus::NotServing).await;
    redis.restart();
    wait_for(&app, ServingStatus::Serving).await;
}

/// Found while building the test kit: a client's first connection did not
/// retry (fred's `fail_fast`), so a process started while Redis was down
/// stayed NOT_SERVING for good. It must recover once Redis is up, and do
/// its work: a deposit, a round and a bet go through.
#[tokio::test]
async fn a_process_started_while_redis_is_down_recovers_when_it_comes_up() {
    let mut redis = TestRedis::start();
    redis.stop();
    let url = fresh_database().await;
    let app = TestApp::spawn_with(settings(&url, &redis.url())).await;
    wait_for(&app, ServingStatus::NotServing).await;
    redis.restart();
    wait_for(&app, ServingStatus::Serving).await;
    app.deposit(1, "10").await;
    app.open_round("r").await;
    app.place_ok(1, "r", pb::Side::A, "5").await;
}

#[tokio::test]
async fn postgres_down_means_not_serving_and_unavailable_without_internals() {
    // A database URL where nothing listens.
    let url = format!("postgres://postgres@127.0.0.1:{}/nowhere", free_port());
    let app = TestApp::spawn_with(settings(
        &url,
        &std::env::var("REDIS_URL").expect("REDIS_URL"),
    ))
    .await;
    wait_for(&app, ServingStatus::NotServing).await;
    let status = expect_code(
        app.wallet()
            .get_wallet(authed(pb::GetWalletRequest { user_id: 0 }, &app.player(1)))
            .await,
        Code::Unavailable,
    );
    let message = status.message().to_lowercase();
    for leak in [
        "sql",
        "connection refused",
        "postgres",
        "127.0.0.1",
        "pool",
        "/",
    ] {
        assert!(!message.contains(leak), "{leak:?} leaked in {message:?}");
    }
    expect_code(
        app.place(1, "r", pb::Side::A, "1", "k").await,
        Code::Unavailable,
    );
}

/// PostgreSQL answers but refuses the connection (here: the database does
/// not exist). The process cannot reach its data whatever the request:
/// UNAVAILABLE, as when nothing listens, never INTERNAL. (A test server that
/// took the "nothing listens" port of the test above made it answer INTERNAL
/// once, which is how this was found.)
#[tokio::test]
async fn a_refused_database_connection_is_unavailable_not_internal() {
    let admin = betting_test_kit::admin_url();
    let (server, _) = admin
        .rsplit_once('/')
        .expect("a database name in DATABASE_URL");
    let url = format!("{server}/missing_{}", uuid::Uuid::new_v4().simple());
    let app = TestApp::spawn_with(settings(
        &url,
        &std::env::var("REDIS_URL").expect("REDIS_URL"),
    ))
    .await;
    expect_code(
        app.wallet()
            .get_wallet(authed(pb::GetWalletRequest { user_id: 0 }, &app.player(1)))
            .await,
        Code::Unavailable,
    );
}

#[tokio::test]
async fn shutdown_is_graceful() {
    let app = TestApp::spawn().await;
    app.deposit(1, "1").await;
    // Returns only once the server has drained and every background task stopped.
    tokio::time::timeout(Duration::from_secs(10), app.stop())
        .await
        .expect("the server stops within its grace period");
}

#[tokio::test]
async fn prometheus_metrics_are_served() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = TestApp::spawn().await;
    app.deposit(1, "5").await;
    app.open_round("m").await;
    app.place_ok(1, "m", pb::Side::A, "1").await;
    let scrape = async || {
        let mut stream = tokio::net::TcpStream::connect(app.metrics_addr)
            .await
            .expect("connect");
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nhost: localhost\r\n\r\n")
            .await
            .expect("request");
        let mut body = String::new();
        stream.read_to_string(&mut body).await.expect("response");
        assert!(body.starts_with("HTTP/1.1 200"), "{body}");
        body
    };
    // The bet's match job goes out right after PlaceBet's answer.
    let enqueued = betting_test_kit::poll_until(Duration::from_secs(5), async || {
        let body = scrape().await;
        body.contains("queue_jobs_enqueued_total").then_some(())
    })
    .await;
    assert!(enqueued.is_some(), "{}", scrape().await);
    // The bet's wait for its batch, recorded before its answer.
    let body = scrape().await;
    assert!(body.contains("place_batch_wait_seconds"), "{body}");
}
