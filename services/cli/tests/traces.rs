//! One trace across processes and the queue: the suite as separate
//! `betting` processes (wallet; betting + settlement; matcher + settler),
//! each exporting over OTLP to a receiver in this test. A PlaceBet sent with
//! the client's own `traceparent` is one trace with the wallet's PlaceStakes
//! and the matcher's match job; a SettleRound is one trace with its settle
//! job and the wallet's payout.

use std::{
    collections::HashMap,
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use betting_api::pb;
use betting_auth::{Role, TokenMinter};
use betting_test_kit::{
    ChildGuard, SECRET, authed, eventually, free_port, fresh_database, service_url,
};
use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::any_value::Value,
};
use tonic::{Request, Response, Status, transport::Channel};

/// A span as the receiver got it.
#[derive(Debug, Clone)]
struct Seen {
    service: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent: String,
    attributes: HashMap<String, String>,
}

/// An OTLP trace receiver that keeps every span it is sent.
#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<Seen>>>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn text(value: Option<&pb_any::AnyValue>) -> String {
    match value.and_then(|v| v.value.as_ref()) {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

mod pb_any {
    pub use opentelemetry_proto::tonic::common::v1::AnyValue;
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let mut seen = Vec::new();
        for resource_spans in request.into_inner().resource_spans {
            let service = resource_spans
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .map(|kv| text(kv.value.as_ref()))
                .unwrap_or_default();
            for scope in resource_spans.scope_spans {
                for span in scope.spans {
                    seen.push(Seen {
                        service: service.clone(),
                        name: span.name,
                        trace_id: hex(&span.trace_id),
                        span_id: hex(&span.span_id),
                        parent: hex(&span.parent_span_id),
                        attributes: span
                            .attributes
                            .iter()
                            .map(|kv| (kv.key.clone(), text(kv.value.as_ref())))
                            .collect(),
                    });
                }
            }
        }
        self.spans.lock().expect("spans").extend(seen);
        Ok(Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

impl Receiver {
    fn trace(&self, trace_id: &str) -> Vec<Seen> {
        self.spans
            .lock()
            .expect("spans")
            .iter()
            .filter(|s| s.trace_id == trace_id)
            .cloned()
            .collect()
    }
}

/// What every process of the test shares.
struct Shared<'a> {
    wallet_port: u16,
    database_url: &'a str,
    namespace: &'a str,
    otlp: &'a str,
}

/// One role set as a child process exporting to the test's receiver; its
/// log (JSON) goes to `log` when given.
fn serve(
    shared: &Shared<'_>,
    roles: &[&str],
    service_name: &str,
    (port, metrics_port): (u16, u16),
    log: Option<&std::path::Path>,
) -> ChildGuard {
    let Shared {
        wallet_port,
        database_url,
        namespace,
        otlp,
    } = shared;
    let mut command = Command::new(env!("CARGO_BIN_EXE_betting"));
    command.arg("serve");
    for role in roles {
        command.args(["--role", role]);
    }
    ChildGuard::spawn(
        command
            .env("DATABASE_URL", service_url(database_url))
            .env("REDIS_URL", std::env::var("REDIS_URL").expect("REDIS_URL"))
            .env("BETTING_REDIS_NAMESPACE", namespace)
            .env("BETTING_JWT_SECRET", SECRET)
            .env(
                "BETTING_WALLET_ENDPOINT",
                format!("http://127.0.0.1:{wallet_port}"),
            )
            .env("BETTING_LISTEN_ADDR", format!("127.0.0.1:{port}"))
            .env("BETTING_METRICS_ADDR", format!("127.0.0.1:{metrics_port}"))
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", otlp)
            .env("OTEL_SERVICE_NAME", service_name)
            .env("OTEL_BSP_SCHEDULE_DELAY", "100")
            .env("RUST_LOG", "warn,betting_server::observe=debug")
            .env("BETTING_LOG_FORMAT", "json")
            .stdout(Stdio::null())
            .stderr(match log {
                Some(path) => std::fs::File::create(path).expect("log file").into(),
                None if std::env::var("TEST_LOG").is_ok() => Stdio::inherit(),
                None => Stdio::null(),
            }),
    )
    .expect("start a betting process")
}

/// A request sent as part of the caller's own trace.
fn traced<T>(message: T, token: &str, trace_id: &str, span_id: &str) -> Request<T> {
    let mut request = authed(message, token);
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-{span_id}-01")
            .parse()
            .expect("traceparent"),
    );
    request
}

async fn channel(port: u16) -> Channel {
    eventually("the process answers", Duration::from_secs(30), async || {
        let channel = Channel::from_shared(format!("http://127.0.0.1:{port}"))
            .expect("uri")
            .connect()
            .await
            .ok()?;
        let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
        let serving = health
            .check(tonic_health::pb::HealthCheckRequest::default())
            .await
            .ok()?
            .into_inner()
            .status
            == tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
        serving.then_some(channel)
    })
    .await
}

/// Every span of the trace hangs off another of the same trace, except its
/// root, whose parent is the client's span: one trace, not pieces.
fn assert_connected(spans: &[Seen], client_span: &str) {
    for span in spans {
        assert!(
            span.parent == client_span || spans.iter().any(|p| p.span_id == span.parent),
            "span {} of {} has a parent outside the trace: {spans:#?}",
            span.name,
            span.service
        );
    }
}

fn find<'a>(spans: &'a [Seen], name: &str, service: &str) -> &'a Seen {
    spans
        .iter()
        .find(|s| s.name == name && s.service == service)
        .unwrap_or_else(|| panic!("no {name} span from {service} in {spans:#?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn place_and_settle_are_each_one_trace_across_processes_and_the_queue() {
    let receiver = Receiver::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let otlp = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(receiver.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );

    let database = fresh_database().await;
    let namespace = format!("traces-{}", uuid::Uuid::new_v4());
    let (wallet_port, api_port) = (free_port(), free_port());
    let url = database.url().to_owned();
    let api_metrics = free_port();
    let api_log = std::env::temp_dir().join(format!("{namespace}-api.log"));
    let shared = Shared {
        wallet_port,
        database_url: &url,
        namespace: &namespace,
        otlp: &otlp,
    };
    let start = |roles: &[&str], name: &str, ports: (u16, u16), log: Option<&std::path::Path>| {
        serve(&shared, roles, name, ports, log)
    };
    let _wallet = start(
        &["wallet"],
        "betting-wallet",
        (wallet_port, free_port()),
        None,
    );
    let _api = start(
        &["betting", "settlement"],
        "betting-api",
        (api_port, api_metrics),
        Some(&api_log),
    );
    let _workers = start(
        &["matcher", "settler"],
        "betting-workers",
        (free_port(), free_port()),
        None,
    );
    let wallet_channel = channel(wallet_port).await;
    let api = channel(api_port).await;

    let minter = TokenMinter::new(SECRET.as_bytes(), None, None);
    let ttl = Duration::from_secs(600);
    let cashier = minter
        .mint_subject("test-cashier", Role::Cashier, ttl)
        .expect("mint");
    let game = minter
        .mint_subject("test-game", Role::Game, ttl)
        .expect("mint");
    let mut wallet = pb::wallet_service_client::WalletServiceClient::new(wallet_channel);
    let mut bets = pb::betting_service_client::BettingServiceClient::new(api.clone());
    let mut rounds = pb::settlement_service_client::SettlementServiceClient::new(api);
    for user in [1, 2] {
        wallet
            .deposit(authed(
                pb::DepositRequest {
                    user_id: user,
                    amount: "100".into(),
                    idempotency_key: format!("dep-{user}"),
                    ..Default::default()
                },
                &cashier,
            ))
            .await
            .expect("deposit");
    }
    rounds
        .open_round(authed(
            pb::OpenRoundRequest {
                round_id: "traced".into(),
            },
            &game,
        ))
        .await
        .expect("open");

    // The client's own traces: one per PlaceBet, one for the SettleRound.
    let place_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let settle_trace = "5cf92f3577b34da6a3ce929d0e0e4737";
    let client_span = "00f067aa0ba902b7";
    let mut placed = Vec::new();
    for (user, side, trace) in [
        (1, pb::Side::A, place_trace),
        (2, pb::Side::B, "6df92f3577b34da6a3ce929d0e0e4738"),
    ] {
        let token = minter.mint(user, Role::Player, ttl).expect("mint");
        let bet = bets
            .place_bet(traced(
                pb::PlaceBetRequest {
                    round_id: "traced".into(),
                    side: side as i32,
                    amount: "10".into(),
                    idempotency_key: format!("bet-{user}"),
                },
                &token,
                trace,
                client_span,
            ))
            .await
            .expect("place")
            .into_inner()
            .bet
            .expect("bet");
        placed.push((user, token, bet.bet_id));
    }
    for (_, token, bet_id) in &placed {
        eventually("the bet is matched", Duration::from_secs(30), async || {
            let bet = bets
                .clone()
                .get_bet(authed(
                    pb::GetBetRequest {
                        bet_id: bet_id.clone(),
                    },
                    token,
                ))
                .await
                .ok()?
                .into_inner()
                .bet?;
            (bet.status == pb::BetStatus::Matched as i32).then_some(())
        })
        .await;
    }
    rounds
        .settle_round(traced(
            pb::SettleRoundRequest {
                round_id: "traced".into(),
                winning_side: pb::Side::A as i32,
            },
            &game,
            settle_trace,
            client_span,
        ))
        .await
        .expect("settle");

    // PlaceBet → the batch → the wallet's PlaceStakes, and → the match job.
    let place = eventually(
        "the PlaceBet trace is exported",
        Duration::from_secs(30),
        async || {
            let spans = receiver.trace(place_trace);
            let has = |name: &str| spans.iter().any(|s| s.name == name);
            (has("betting.v1.BettingService/PlaceBet")
                && has("betting.internal.v1.StakeService/PlaceStakes")
                && has("queue.match")
                && has("match.group"))
            .then_some(spans)
        },
    )
    .await;
    assert_connected(&place, client_span);
    let rpc = find(&place, "betting.v1.BettingService/PlaceBet", "betting-api");
    assert_eq!(rpc.parent, client_span, "PlaceBet adopts the caller's span");
    assert_eq!(
        rpc.attributes
            .get("rpc.grpc.status_code")
            .map(String::as_str),
        Some("0")
    );
    find(
        &place,
        "betting.internal.v1.StakeService/PlaceStakes",
        "betting-wallet",
    );
    let job = find(&place, "queue.match", "betting-workers");
    assert!(
        job.attributes
            .get("job.id")
            .is_some_and(|id| id == &format!("match:{}", placed[0].2)),
        "{job:?}"
    );
    let group = find(&place, "match.group", "betting-workers");
    assert_eq!(group.attributes.get("bet_id"), Some(&placed[0].2));

    // SettleRound → the settle job → the wallet's payout.
    let settle = eventually(
        "the SettleRound trace is exported",
        Duration::from_secs(30),
        async || {
            let spans = receiver.trace(settle_trace);
            let has = |name: &str| spans.iter().any(|s| s.name == name);
            (has("betting.v1.SettlementService/SettleRound")
                && has("queue.settle")
                && has("settle.round")
                && has("betting.internal.v1.StakeService/PayWinningsBatch"))
            .then_some(spans)
        },
    )
    .await;
    assert_connected(&settle, client_span);
    find(
        &settle,
        "betting.v1.SettlementService/SettleRound",
        "betting-api",
    );
    find(&settle, "queue.settle", "betting-workers");
    let round = find(&settle, "settle.round", "betting-workers");
    assert_eq!(
        round.attributes.get("round_id").map(String::as_str),
        Some("traced")
    );
    let payout = find(
        &settle,
        "betting.internal.v1.StakeService/PayWinningsBatch",
        "betting-wallet",
    );
    assert_eq!(
        payout
            .attributes
            .get("rpc.grpc.status_code")
            .map(String::as_str),
        Some("0")
    );
    // Nothing of the settlement leaked into the placement's trace, or back.
    assert!(
        !place
            .iter()
            .any(|s| s.name.starts_with("betting.v1.SettlementService"))
    );
    assert!(
        !settle
            .iter()
            .any(|s| s.name == "betting.v1.BettingService/PlaceBet")
    );

    // The API process's metrics: every call counted by method and code, and
    // open streams counted down again when they close (the gauge once only
    // went up).
    let player = minter.mint(1, Role::Player, ttl).expect("mint");
    let mut streams = Vec::new();
    for _ in 0..3 {
        let mut stream = bets
            .watch_bets(authed(pb::WatchBetsRequest::default(), &player))
            .await
            .expect("watch")
            .into_inner();
        stream.message().await.expect("first event");
        streams.push(stream);
    }
    let open = async |want: f64| {
        eventually(
            "streams_open settles",
            Duration::from_secs(30),
            async || {
                (sample(&scrape(api_metrics).await, "streams_open") == Some(want)).then_some(())
            },
        )
        .await
    };
    open(3.0).await;
    drop(streams);
    open(0.0).await;
    let metrics = scrape(api_metrics).await;
    assert_eq!(
        sample(
            &metrics,
            r#"grpc_server_requests_total{method="betting.v1.BettingService/PlaceBet",code="OK"}"#
        ),
        Some(2.0),
        "{metrics}"
    );
    assert_eq!(
        sample(
            &metrics,
            r#"grpc_server_request_duration_seconds_count{method="betting.v1.SettlementService/SettleRound",code="OK"}"#
        ),
        Some(1.0),
        "{metrics}"
    );
    // The API's log line of the PlaceBet carries the client's trace id.
    let logged = std::fs::read_to_string(&api_log).expect("the API's log");
    let _ = std::fs::remove_file(&api_log);
    assert!(
        logged.lines().any(|line| line.contains("call finished")
            && line.contains("PlaceBet")
            && line.contains(&format!(r#""trace_id":"{place_trace}""#))),
        "no PlaceBet log line with trace id {place_trace}:\n{logged}"
    );
    database.drop_database().await;
}

/// The text of `GET /metrics` on `port`.
async fn scrape(port: u16) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut stream) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
        return String::new();
    };
    let _ = stream
        .write_all(b"GET /metrics HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .await;
    let mut text = String::new();
    let _ = stream.read_to_string(&mut text).await;
    text
}

/// The value of the sample named exactly `series` (name and labels).
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|line| {
        let value = line.strip_prefix(series)?.strip_prefix(' ')?;
        value.trim().parse().ok()
    })
}
