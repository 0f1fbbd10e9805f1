//! The edge: HTTP/2 limits seen by a raw HTTP/2 client, the connection cap,
//! load shedding, deadlines that reach PostgreSQL, message size limits, and
//! the per-user wallet gate.

use std::time::{Duration, Instant};

use betting_api::pb;
use betting_test_kit::{TestApp, authed, dec, fresh_database, reason, settings};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tonic::Code;

/// A raw HTTP/2 client: frames written by hand, so a test can do what a
/// well-behaved client library refuses to (reset floods, bad headers).
struct RawH2 {
    stream: TcpStream,
    buffer: Vec<u8>,
}

/// One frame read back: its type, flags, stream and payload.
struct Frame {
    kind: u8,
    stream: u32,
    payload: Vec<u8>,
}

const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;
const END_HEADERS: u8 = 0x4;
const END_STREAM: u8 = 0x1;
const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// An HPACK string literal, not Huffman-coded (all ours are short).
fn hpack_string(out: &mut Vec<u8>, s: &str) {
    assert!(s.len() < 127);
    out.push(s.len() as u8);
    out.extend_from_slice(s.as_bytes());
}

/// The header block of a gRPC call to `path`, plus `extra` literal headers.
fn grpc_headers(path: &str, extra: &[(&str, &str)]) -> Vec<u8> {
    let mut block = vec![0x83, 0x86]; // :method POST, :scheme http (static table)
    block.push(0x04); // :path, literal without indexing, name from the table
    hpack_string(&mut block, path);
    block.push(0x01); // :authority
    hpack_string(&mut block, "localhost");
    block.extend_from_slice(&[0x0f, 0x10]); // content-type (index 31)
    hpack_string(&mut block, "application/grpc");
    for (name, value) in [("te", "trailers")].iter().chain(extra) {
        block.push(0x00); // literal without indexing, new name
        hpack_string(&mut block, name);
        hpack_string(&mut block, value);
    }
    block
}

impl RawH2 {
    async fn connect(app: &TestApp) -> Self {
        let mut stream = TcpStream::connect(app.addr).await.expect("connect");
        let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        hello.extend(frame(SETTINGS, 0, 0, &[]));
        stream.write_all(&hello).await.expect("preface");
        Self {
            stream,
            buffer: Vec::new(),
        }
    }

    async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await
    }

    /// The next frame, or `None` when the server closed the connection or
    /// sent nothing within `wait`.
    async fn next(&mut self, wait: Duration) -> Option<Frame> {
        loop {
            if self.buffer.len() >= 9 {
                let len = (usize::from(self.buffer[0]) << 16)
                    | (usize::from(self.buffer[1]) << 8)
                    | usize::from(self.buffer[2]);
                if self.buffer.len() >= 9 + len {
                    let head: Vec<u8> = self.buffer.drain(..9 + len).collect();
                    return Some(Frame {
                        kind: head[3],
                        stream: u32::from_be_bytes([head[5], head[6], head[7], head[8]])
                            & 0x7fff_ffff,
                        payload: head[9..].to_vec(),
                    });
                }
            }
            let mut chunk = [0_u8; 16 * 1024];
            match tokio::time::timeout(wait, self.stream.read(&mut chunk)).await {
                Ok(Ok(n)) if n > 0 => self.buffer.extend_from_slice(&chunk[..n]),
                _ => return None,
            }
        }
    }

    /// Reads until a GOAWAY (its error code) or the end of the connection.
    async fn until_goaway(&mut self, wait: Duration) -> Option<u32> {
        while let Some(frame) = self.next(wait).await {
            if frame.kind == GOAWAY {
                let p = &frame.payload;
                return Some(u32::from_be_bytes([p[4], p[5], p[6], p[7]]));
            }
        }
        None
    }
}

/// Settings of a test app with `edit` applied, on a fresh database.
async fn spawn_edited(
    edit: impl FnOnce(&mut betting_config::Settings),
) -> (TestApp, betting_test_kit::TestDatabase) {
    let database = fresh_database().await;
    let mut s = settings(&database, &betting_test_kit::redis_url());
    edit(&mut s);
    (TestApp::spawn_with(s).await, database)
}

#[tokio::test]
async fn the_server_advertises_its_stream_limit() {
    let (app, _db) = spawn_edited(|s| s.edge.max_streams_per_connection = 7).await;
    let mut h2 = RawH2::connect(&app).await;
    let settings = loop {
        let frame = h2
            .next(Duration::from_secs(5))
            .await
            .expect("server SETTINGS");
        if frame.kind == SETTINGS && frame.stream == 0 && !frame.payload.is_empty() {
            break frame.payload;
        }
    };
    let advertised: Vec<(u16, u32)> = settings
        .chunks(6)
        .map(|c| {
            (
                u16::from_be_bytes([c[0], c[1]]),
                u32::from_be_bytes([c[2], c[3], c[4], c[5]]),
            )
        })
        .collect();
    assert!(
        advertised.contains(&(SETTINGS_MAX_CONCURRENT_STREAMS, 7)),
        "{advertised:?}"
    );
}

/// CVE-2023-44487: streams opened and reset before the server gets to them
/// cost it work for nothing; past the guard the connection is closed.
#[tokio::test]
async fn a_rapid_reset_flood_gets_goaway() {
    let app = TestApp::spawn().await;
    let mut h2 = RawH2::connect(&app).await;
    let headers = grpc_headers("/betting.v1.BettingService/GetBet", &[]);
    let mut flood = Vec::new();
    for i in 0..2_000_u32 {
        let id = 2 * i + 1;
        flood.extend(frame(HEADERS, END_HEADERS, id, &headers));
        flood.extend(frame(RST_STREAM, 0, id, &8_u32.to_be_bytes())); // CANCEL
    }
    // The server may close mid-write: that is the point.
    let _ = h2.send(&flood).await;
    let code = h2.until_goaway(Duration::from_secs(5)).await;
    assert_eq!(code, Some(0xb), "GOAWAY with ENHANCE_YOUR_CALM");
}

/// Malformed requests each cost a locally reset stream; a client that keeps
/// sending them, one after another, is cut off instead of being answered
/// forever (the baseline: 20,000 drew 20,000 RST_STREAM and no GOAWAY).
/// One at a time, so the pending-accept guard above never fires and only
/// the local-error guard can.
#[tokio::test]
async fn a_stream_of_malformed_requests_gets_goaway() {
    let app = TestApp::spawn().await;
    let mut h2 = RawH2::connect(&app).await;
    // A connection-specific header is malformed in HTTP/2 (RFC 9113 8.2.2).
    let headers = grpc_headers(
        "/betting.v1.BettingService/GetBet",
        &[("connection", "close")],
    );
    let mut resets = 0;
    let mut goaway = None;
    'flood: for i in 0..300_u32 {
        let id = 2 * i + 1;
        if h2
            .send(&frame(HEADERS, END_HEADERS | END_STREAM, id, &headers))
            .await
            .is_err()
        {
            break;
        }
        // Wait for this stream's reset before sending the next.
        loop {
            let Some(frame) = h2.next(Duration::from_secs(5)).await else {
                break 'flood;
            };
            match frame.kind {
                RST_STREAM if frame.stream == id => {
                    resets += 1;
                    break;
                }
                GOAWAY => {
                    let p = &frame.payload;
                    goaway = Some(u32::from_be_bytes([p[4], p[5], p[6], p[7]]));
                    break 'flood;
                }
                _ => {}
            }
        }
    }
    assert!(resets >= 1, "malformed streams are reset");
    assert_eq!(
        goaway,
        Some(0xb),
        "GOAWAY (ENHANCE_YOUR_CALM) after {resets} resets"
    );
    assert!(resets <= 100, "cut off after about 64 resets, not {resets}");
}

#[tokio::test]
async fn connections_over_the_cap_are_closed_at_once() {
    let (app, _db) = spawn_edited(|s| s.edge.max_connections = 2).await;
    // The test app's own channel holds one connection.
    let mut second = RawH2::connect(&app).await;
    assert!(
        second.next(Duration::from_secs(5)).await.is_some(),
        "served"
    );
    let mut third = RawH2::connect(&app).await;
    assert!(third.next(Duration::from_secs(5)).await.is_none(), "closed");
    drop(second);
    // A freed place is taken by the next connection.
    let mut fourth = None;
    for _ in 0..50 {
        let mut h2 = RawH2::connect(&app).await;
        if h2.next(Duration::from_secs(1)).await.is_some() {
            fourth = Some(h2);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(fourth.is_some(), "a freed place is used again");
}

/// Holds user `user`'s wallet row, as a slow transaction or an operator's
/// session would, until the returned transaction ends.
async fn hold_wallet_row(app: &TestApp, user: i64) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let mut tx = app.pool.begin().await.expect("begin");
    sqlx::query("SELECT 1 FROM wallets WHERE user_id = $1 FOR UPDATE")
        .bind(user)
        .execute(&mut *tx)
        .await
        .expect("lock the row");
    tx
}

/// Backends of the app's database waiting for a lock.
async fn lock_waiters(app: &TestApp) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity \
         WHERE datname = current_database() AND wait_event_type = 'Lock'",
    )
    .fetch_one(&app.pool)
    .await
    .expect("pg_stat_activity")
}

/// A PlaceBet of one stake in a task of its own.
fn spawn_place(
    app: &TestApp,
    user: i64,
    key: &str,
    timeout: Duration,
) -> tokio::task::JoinHandle<Result<tonic::Response<pb::PlaceBetResponse>, tonic::Status>> {
    let mut client = app.bets();
    let request = place_request("r", key, &app.player(user), timeout);
    tokio::spawn(async move { client.place_bet(request).await })
}

fn place_request(
    round: &str,
    key: &str,
    token: &str,
    timeout: Duration,
) -> tonic::Request<pb::PlaceBetRequest> {
    let mut request = authed(
        pb::PlaceBetRequest {
            round_id: round.into(),
            side: pb::Side::A as i32,
            amount: "1".into(),
            idempotency_key: key.into(),
        },
        token,
    );
    request.set_timeout(timeout);
    request
}

/// A call never waits on a lock past its deadline: the deadline reaches
/// PostgreSQL as the transaction's lock and statement timeouts.
#[tokio::test]
async fn a_deadline_reaches_postgresql() {
    let app = TestApp::spawn().await;
    app.deposit(1, "10").await;
    app.deposit(2, "10").await;
    app.open_round("r").await;
    let held = hold_wallet_row(&app, 1).await;
    let started = Instant::now();
    let answer = app
        .bets()
        .place_bet(place_request(
            "r",
            "k1",
            &app.player(1),
            Duration::from_millis(600),
        ))
        .await;
    let took = started.elapsed();
    let status = answer.expect_err("the wallet row is held");
    assert!(
        matches!(
            status.code(),
            Code::DeadlineExceeded | Code::Unavailable | Code::Cancelled
        ),
        "{status:?}"
    );
    assert!(took < Duration::from_secs(3), "answered in {took:?}");
    // Nothing of ours is still queued on the lock once the deadline passed.
    betting_test_kit::wait::eventually("no lock waiters", Duration::from_secs(2), async || {
        (lock_waiters(&app).await == 0).then_some(())
    })
    .await;
    // Another user is not held up meanwhile.
    app.place_ok(2, "r", pb::Side::B, "1").await;
    drop(held);
    // The first bet's outcome was unknown to its client; the same key
    // resolves it to exactly one bet, and the books balance.
    let retried = app
        .bets()
        .place_bet(place_request(
            "r",
            "k1",
            &app.player(1),
            Duration::from_secs(5),
        ))
        .await;
    if let Ok(response) = retried {
        assert_eq!(response.into_inner().bet.expect("bet").user_id, 1);
    }
    app.assert_books_balanced().await;
}

/// 50 PlaceBets of one player behind a held wallet row used to take every
/// pooled connection; now at most two wait in PostgreSQL, the rest wait
/// without one, and other players are served.
#[tokio::test]
async fn a_hot_wallet_does_not_take_the_pool() {
    let app = TestApp::spawn().await;
    app.deposit(1, "100").await;
    app.deposit(2, "100").await;
    app.open_round("r").await;
    let held = hold_wallet_row(&app, 1).await;
    let mut calls = Vec::new();
    for i in 0..50 {
        calls.push(spawn_place(
            &app,
            1,
            &format!("hot-{i}"),
            Duration::from_secs(3),
        ));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let waiting = lock_waiters(&app).await;
    assert!(waiting <= 2, "{waiting} backends wait on the held row");
    let started = Instant::now();
    app.place_ok(2, "r", pb::Side::B, "1").await;
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "another player is served"
    );
    drop(held);
    // They waited without a connection, and are all served once the row is
    // free: a burst is delayed, not failed.
    for call in calls {
        let answer = call.await.expect("joins");
        assert!(answer.is_ok(), "{answer:?}");
    }
    app.assert_books_balanced().await;
}

/// Over the in-flight cap a call is refused at once; health still answers.
#[tokio::test]
async fn overload_is_refused_at_once_and_health_still_answers() {
    let (app, _db) = spawn_edited(|s| s.edge.max_inflight_requests = 2).await;
    app.deposit(1, "10").await;
    app.deposit(3, "10").await;
    app.open_round("r").await;
    let held = [
        hold_wallet_row(&app, 1).await,
        hold_wallet_row(&app, 3).await,
    ];
    // Two PlaceBets waiting for their wallet rows fill the cap (their own
    // WalletService calls count against the internal calls' cap).
    let mut slow = Vec::new();
    for (user, key) in [(1, "slow"), (3, "slower")] {
        slow.push(spawn_place(&app, user, key, Duration::from_secs(3)));
    }
    betting_test_kit::wait::eventually("two lock waiters", Duration::from_secs(2), async || {
        (lock_waiters(&app).await == 2).then_some(())
    })
    .await;
    let started = Instant::now();
    let refused = app
        .wallet()
        .get_wallet(authed(pb::GetWalletRequest { user_id: 0 }, &app.player(2)))
        .await
        .expect_err("over the cap");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert_eq!(reason(&refused), "OVERLOADED");
    assert!(started.elapsed() < Duration::from_millis(500));
    let mut health = tonic_health::pb::health_client::HealthClient::new(app.channel.clone());
    let status = health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .expect("health answers under overload")
        .into_inner()
        .status;
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    drop(held);
    for call in slow {
        let _ = call.await;
    }
    // Capacity is back.
    app.wallet()
        .get_wallet(authed(pb::GetWalletRequest { user_id: 0 }, &app.player(1)))
        .await
        .expect("served again");
}

/// The PlaceBets waiting for their batch never shed the batch's own wallet
/// call. In one process serving both, the internal StakeService once
/// counted against the same cap as the public calls: with the cap full of
/// PlaceBets, their batch's PlaceStakes was refused OVERLOADED and every
/// bet of the batch failed UNAVAILABLE (found by the attack review of
/// 2026-12-08). Here a lone PlaceBet (its wallet row held, so two calls in
/// flight) and a second PlaceBet fill a cap of three with the second's
/// PlaceStakes the fourth call: it must be served.
#[tokio::test]
async fn overload_never_sheds_the_call_that_finishes_admitted_work() {
    let (app, _db) = spawn_edited(|s| s.edge.max_inflight_requests = 3).await;
    app.deposit(1, "10").await;
    app.deposit(2, "10").await;
    app.open_round("r").await;
    let held = hold_wallet_row(&app, 1).await;
    let slow = spawn_place(&app, 1, "slow", Duration::from_secs(5));
    betting_test_kit::wait::eventually("one lock waiter", Duration::from_secs(2), async || {
        (lock_waiters(&app).await == 1).then_some(())
    })
    .await;
    let placed = app
        .bets()
        .place_bet(place_request(
            "r",
            "admitted",
            &app.player(2),
            Duration::from_secs(5),
        ))
        .await;
    assert!(
        placed.is_ok(),
        "an admitted PlaceBet failed for its own wallet call: {placed:?}"
    );
    assert_eq!(app.balance(2).await, dec("9"));
    drop(held);
    slow.await
        .expect("joins")
        .expect("placed once its row is free");
    assert_eq!(app.balance(1).await, dec("9"));
    app.assert_books_balanced().await;
}

/// Anonymous infrastructure calls decode at most 1 KiB: a 3 MiB symbol (under
/// tonic's default 4 MiB) is refused without being buffered or echoed back.
#[tokio::test]
async fn big_requests_to_health_and_reflection_are_refused() {
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest,
    };
    let app = TestApp::spawn().await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(app.channel.clone());
    let big = "x".repeat(3 * 1024 * 1024);
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: big.clone(),
        })
        .await
        .expect_err("too big");
    assert!(too_big(&status), "{:?}", status.code());
    assert!(
        status.message().len() < 1024,
        "no echo: {} bytes",
        status.message().len()
    );
    let mut reflection = ServerReflectionClient::new(app.channel.clone());
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::FileContainingSymbol(big)),
    };
    let answer = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await;
    match answer {
        Err(status) => assert!(status.message().len() < 1024),
        Ok(response) => {
            // The decoder refuses the message, so reflection never sees a
            // request: its stream ends, with no answer that could echo it.
            match response.into_inner().message().await {
                Ok(None) => {}
                Ok(Some(answer)) => panic!(
                    "answered a 3 MiB symbol: {:?}",
                    answer.message_response.is_some()
                ),
                Err(status) => assert!(status.message().len() < 1024, "no echo"),
            }
        }
    }
    // Our own services decode at most 16 KiB.
    let status = app
        .bets()
        .place_bet(authed(
            pb::PlaceBetRequest {
                round_id: "r".repeat(64 * 1024),
                side: pb::Side::A as i32,
                amount: "1".into(),
                idempotency_key: "k".into(),
            },
            &app.player(1),
        ))
        .await
        .expect_err("too big");
    assert!(too_big(&status), "{:?}", status.code());
    assert!(status.message().len() < 1024);
    // The server is fine.
    app.deposit(1, "1").await;
}

/// The decoder's refusal of a message over the limit (not the handler's).
fn too_big(status: &tonic::Status) -> bool {
    matches!(status.code(), Code::OutOfRange | Code::ResourceExhausted)
}

#[tokio::test]
async fn metrics_is_real_http() {
    let app = TestApp::spawn().await;
    let ask = |request: &'static [u8]| {
        let addr = app.metrics_addr;
        async move {
            let mut stream = TcpStream::connect(addr).await.expect("connect");
            stream.write_all(request).await.expect("request");
            let mut body = String::new();
            let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut body))
                .await;
            body
        }
    };
    let ok = ask(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n").await;
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    let missing = ask(b"GET /other HTTP/1.1\r\nhost: x\r\n\r\n").await;
    assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
    let post = ask(b"POST /metrics HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n").await;
    assert!(post.starts_with("HTTP/1.1 405"), "{post}");
    // A client that never finishes its request head is dropped.
    let mut slow = TcpStream::connect(app.metrics_addr).await.expect("connect");
    slow.write_all(b"GET /metrics HTTP/1.1\r\n")
        .await
        .expect("partial");
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), slow.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the server hung up on a slow client");
}

/// A connection that ignores every RetryInfo and keeps drawing refusals gets
/// them held back a second each; other connections are answered at once.
#[tokio::test]
async fn a_connection_flooding_refused_calls_is_tarpitted() {
    let (app, _db) = spawn_edited(|s| {
        s.limits.user_read_rate = 1;
        s.limits.user_read_burst = 1;
    })
    .await;
    app.open_round("tarpit").await;
    let token = app.player(1);
    let ask = |channel: tonic::transport::Channel| {
        let token = token.clone();
        async move {
            let started = Instant::now();
            let answer = pb::settlement_service_client::SettlementServiceClient::new(channel)
                .get_round(authed(
                    pb::GetRoundRequest {
                        round_id: "tarpit".into(),
                    },
                    &token,
                ))
                .await;
            (answer.err().map(|s| s.code()), started.elapsed())
        }
    };
    let flooder = tonic::transport::Channel::from_shared(format!("http://{}", app.addr))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    // Within the first second: 200 refusals answered at once.
    let mut fast = 0;
    for _ in 0..150 {
        let (code, took) = ask(flooder.clone()).await;
        if code == Some(Code::ResourceExhausted) && took < Duration::from_millis(500) {
            fast += 1;
        }
    }
    assert!(
        fast >= 140,
        "refusals are answered at once at first: {fast}"
    );
    // Past the budget, the flooder waits for each refusal.
    let mut slow = None;
    for _ in 0..200 {
        let (code, took) = ask(flooder.clone()).await;
        if code == Some(Code::ResourceExhausted) && took >= Duration::from_millis(900) {
            slow = Some(took);
            break;
        }
    }
    assert!(slow.is_some(), "the flooding connection is held back");
    // Another connection (the same player, even) is answered at once,
    // whatever the answer (a token may have refilled meanwhile).
    let (_, took) = ask(app.channel.clone()).await;
    assert!(took < Duration::from_millis(500), "{took:?}");
}
