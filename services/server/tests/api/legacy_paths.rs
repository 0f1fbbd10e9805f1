//! The internal RPCs' old `betting.v1.WalletService` paths (legacy.rs): for
//! one release they are rewritten to `betting.internal.v1.StakeService`'s.
//! The authorization matrix (authz.rs) walks the descriptors, which no
//! longer list the old paths; these tests hold the old paths to the same
//! answers: every caller but the service role refused, whatever the
//! transport (gRPC, gRPC-Web over HTTP/1.1) or the spelling of the path, the
//! same idempotency keys and replays as the new paths, and the same labels
//! in the metrics.

use std::time::Duration;

use betting_api::codec::LeanCodec as ProstCodec;
use betting_api::pb_internal as pbi;
use betting_auth::Role;
use betting_test_kit::TestApp;
use prost::Message;
use rust_decimal::Decimal;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tonic::{Code, Status, codegen::http::uri::PathAndQuery};
use uuid::Uuid;

const OWNER: i64 = 1;

/// Calls `path` with `message` (prost-encoded) over the app's channel.
async fn call<Req, Resp>(
    app: &TestApp,
    path: &str,
    message: Req,
    token: Option<&str>,
) -> Result<tonic::Response<Resp>, Status>
where
    Req: Message + Send + Sync + 'static,
    Resp: Message + Default + Send + Sync + 'static,
{
    let mut grpc = tonic::client::Grpc::new(app.channel.clone());
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let mut request = tonic::Request::new(message);
    if let Some(token) = token {
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {token}").parse().expect("header"),
        );
    }
    let path = PathAndQuery::try_from(path.to_owned()).expect("path");
    grpc.unary(request, path, ProstCodec::<Req, Resp>::default())
        .await
}

fn hold(bet: Uuid, amount: &str) -> pbi::HoldStakeRequest {
    pbi::HoldStakeRequest {
        user_id: OWNER,
        amount: amount.into(),
        idempotency_key: format!("BET:{bet}"),
        bet_id: bet.to_string(),
    }
}

/// Sends each old path's request as `token` and returns the code.
async fn old_path_codes(app: &TestApp, token: Option<&str>) -> Vec<(String, Code)> {
    let bet = Uuid::now_v7();
    let matched = Uuid::now_v7();
    let payout = pbi::PayWinningsRequest {
        user_id: OWNER,
        amount: "2".into(),
        idempotency_key: format!("SETTLE:{matched}"),
        match_id: matched.to_string(),
        bet_ids: vec![bet.to_string(), Uuid::now_v7().to_string()],
    };
    let code = |r: Result<(), Status>| r.err().map_or(Code::Ok, |s| s.code());
    vec![
        (
            "HoldStake".into(),
            code(
                call::<_, pbi::HoldStakeResponse>(
                    app,
                    "/betting.v1.WalletService/HoldStake",
                    hold(bet, "1"),
                    token,
                )
                .await
                .map(|_| ()),
            ),
        ),
        (
            "HoldStakes".into(),
            code(
                call::<_, pbi::HoldStakesResponse>(
                    app,
                    "/betting.v1.WalletService/HoldStakes",
                    pbi::HoldStakesRequest {
                        holds: vec![hold(Uuid::now_v7(), "1")],
                    },
                    token,
                )
                .await
                .map(|_| ()),
            ),
        ),
        (
            "RefundStake".into(),
            code(
                call::<_, pbi::RefundStakeResponse>(
                    app,
                    "/betting.v1.WalletService/RefundStake",
                    pbi::RefundStakeRequest {
                        user_id: OWNER,
                        amount: "1".into(),
                        idempotency_key: format!("REFUND:{bet}"),
                        bet_id: bet.to_string(),
                    },
                    token,
                )
                .await
                .map(|_| ()),
            ),
        ),
        (
            "PayWinnings".into(),
            code(
                call::<_, pbi::PayWinningsResponse>(
                    app,
                    "/betting.v1.WalletService/PayWinnings",
                    payout.clone(),
                    token,
                )
                .await
                .map(|_| ()),
            ),
        ),
        (
            "PayWinningsBatch".into(),
            code(
                call::<_, pbi::PayWinningsBatchResponse>(
                    app,
                    "/betting.v1.WalletService/PayWinningsBatch",
                    pbi::PayWinningsBatchRequest {
                        payouts: vec![payout],
                    },
                    token,
                )
                .await
                .map(|_| ()),
            ),
        ),
    ]
}

/// The old paths answer every caller as the new ones do (the matrix's rows
/// for StakeService): UNAUTHENTICATED without a token, PERMISSION_DENIED
/// for every role but `service`, and the handler for the service role.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn old_internal_paths_answer_every_caller_as_the_new_ones() {
    let app = TestApp::spawn().await;
    app.deposit(OWNER, "100").await;
    let before = app.balance(OWNER).await;

    let mut wrong = Vec::new();
    for (who, token, expected) in [
        ("anonymous", None, Code::Unauthenticated),
        ("owner", Some(app.player(OWNER)), Code::PermissionDenied),
        ("other player", Some(app.player(2)), Code::PermissionDenied),
        (
            "game",
            Some(app.token_for(Role::Game)),
            Code::PermissionDenied,
        ),
        (
            "cashier",
            Some(app.token_for(Role::Cashier)),
            Code::PermissionDenied,
        ),
        (
            "admin",
            Some(app.token_for(Role::Admin)),
            Code::PermissionDenied,
        ),
    ] {
        for (method, got) in old_path_codes(&app, token.as_deref()).await {
            if got != expected {
                wrong.push(format!("{method} as {who}: {got:?}, expected {expected:?}"));
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    assert_eq!(
        app.balance(OWNER).await,
        before,
        "no refused caller moved money"
    );

    // The service role reaches the handlers (served, not UNIMPLEMENTED).
    let service = app.service_token();
    for (method, got) in old_path_codes(&app, Some(&service)).await {
        assert!(
            !matches!(
                got,
                Code::Unimplemented | Code::Unauthenticated | Code::PermissionDenied
            ),
            "{method} as service over its old path: {got:?}"
        );
    }
}

/// An old caller and a new one holding the same bet's stake are one
/// movement: the same key replays across the two paths (same entry,
/// `idempotent-replayed`), and the same key with another amount is refused
/// on either.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn old_and_new_paths_share_idempotency_keys() {
    let app = TestApp::spawn().await;
    app.deposit(OWNER, "100").await;
    let service = app.service_token();
    let bet = Uuid::now_v7();

    let old = call::<_, pbi::HoldStakeResponse>(
        &app,
        "/betting.v1.WalletService/HoldStake",
        hold(bet, "7"),
        Some(&service),
    )
    .await
    .expect("held over the old path");
    assert!(old.metadata().get("idempotent-replayed").is_none());
    let new = call::<_, pbi::HoldStakeResponse>(
        &app,
        "/betting.internal.v1.StakeService/HoldStake",
        hold(bet, "7"),
        Some(&service),
    )
    .await
    .expect("replayed over the new path");
    assert_eq!(
        new.metadata()
            .get("idempotent-replayed")
            .map(|v| v.to_str().expect("ascii")),
        Some("true")
    );
    let entry = |r: &tonic::Response<pbi::HoldStakeResponse>| {
        r.get_ref().entry.clone().expect("entry").entry_id
    };
    assert_eq!(entry(&old), entry(&new), "one movement");
    assert_eq!(app.balance(OWNER).await, Decimal::from(93), "held once");

    for path in [
        "/betting.v1.WalletService/HoldStake",
        "/betting.internal.v1.StakeService/HoldStake",
    ] {
        let reused =
            call::<_, pbi::HoldStakeResponse>(&app, path, hold(bet, "8"), Some(&service)).await;
        assert_eq!(
            reused.expect_err("another payload").code(),
            Code::AlreadyExists,
            "{path}"
        );
    }
    assert_eq!(app.balance(OWNER).await, Decimal::from(93));
}

/// Spellings of the old and new paths that are not the paths (percent
/// encoding, doubled or trailing slashes, case) reach nothing: no caller
/// moves money through them, not even the service role.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn other_spellings_of_the_paths_reach_nothing() {
    let app = TestApp::spawn().await;
    app.deposit(OWNER, "100").await;
    let before = app.balance(OWNER).await;
    let tricks = [
        "/betting.v1.WalletService/Hold%53take",
        "/betting.v1.WalletService%2FHoldStake",
        "/betting.v1.WalletService/HoldStake/",
        "//betting.v1.WalletService/HoldStake",
        "/betting.v1.WalletService//HoldStake",
        "/betting.v1.walletservice/holdstake",
        "/BETTING.V1.WalletService/HoldStake",
        "/betting.internal.v1.StakeService/Hold%53take",
        "/betting.internal.v1.StakeService/HoldStake/",
        "//betting.internal.v1.StakeService/HoldStake",
        "/betting%2Einternal.v1.StakeService/HoldStake",
        "/betting.v1.StakeService/HoldStake",
        "/betting.internal.v1.WalletService/Deposit",
    ];
    for token in [app.player(OWNER), app.service_token()] {
        for path in tricks {
            let got = call::<_, pbi::HoldStakeResponse>(
                &app,
                path,
                hold(Uuid::now_v7(), "1"),
                Some(&token),
            )
            .await;
            let code = got.err().map_or(Code::Ok, |s| s.code());
            assert_eq!(code, Code::Unimplemented, "{path}");
        }
    }
    assert_eq!(app.balance(OWNER).await, before);
}

/// One gRPC-Web call over HTTP/1.1: `path`, `body`, the bearer `token`;
/// returns the raw response.
async fn grpc_web(app: &TestApp, path: &str, body: &[u8], token: &str) -> String {
    let mut frame = vec![0u8];
    frame.extend_from_slice(&u32::try_from(body.len()).expect("small").to_be_bytes());
    frame.extend_from_slice(body);
    let mut stream = TcpStream::connect(app.channel_addr())
        .await
        .expect("connect");
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: localhost\r\n\
         content-type: application/grpc-web+proto\r\nx-grpc-web: 1\r\n\
         authorization: Bearer {token}\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n",
        frame.len()
    );
    stream.write_all(head.as_bytes()).await.expect("head");
    stream.write_all(&frame).await.expect("body");
    let mut response = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut response)).await;
    String::from_utf8_lossy(&response).into_owned()
}

/// Whether a gRPC-Web response carries `grpc-status` `code`, as a header
/// (trailers-only) or in the trailer frame of its body.
fn grpc_status(response: &str, code: u32) -> bool {
    response.contains(&format!("grpc-status: {code}\r\n"))
        || response.contains(&format!("grpc-status:{code}\r\n"))
}

/// gRPC-Web (a browser's transport, over HTTP/1.1) reaches the old paths
/// through the same rewrite, and so the same authorization.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn grpc_web_on_the_old_paths_is_authorized_as_grpc() {
    let app = TestApp::spawn().await;
    app.deposit(OWNER, "100").await;
    let path = "/betting.v1.WalletService/HoldStake";

    let refused = grpc_web(
        &app,
        path,
        &hold(Uuid::now_v7(), "5").encode_to_vec(),
        &app.player(OWNER),
    )
    .await;
    assert!(refused.starts_with("HTTP/1.1 200"), "{refused}");
    // Trailers-only: the status comes as a header.
    assert!(grpc_status(&refused, 7), "{refused}");
    assert_eq!(app.balance(OWNER).await, Decimal::from(100));

    let held = grpc_web(
        &app,
        path,
        &hold(Uuid::now_v7(), "5").encode_to_vec(),
        &app.service_token(),
    )
    .await;
    assert!(grpc_status(&held, 0), "{held}");
    assert_eq!(app.balance(OWNER).await, Decimal::from(95));
}

/// A compressed call on an old path (grpc-go and grpc-java callers
/// compress) is served as WalletService served it before the move: every
/// other generated server accepts gzip and zstd (`grpc::compressed!`).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn compressed_calls_on_the_old_and_new_paths_are_accepted() {
    let app = TestApp::spawn().await;
    app.deposit(OWNER, "100").await;
    let service = app.service_token();
    for path in [
        "/betting.v1.WalletService/HoldStake",
        "/betting.internal.v1.StakeService/HoldStake",
    ] {
        let mut grpc = tonic::client::Grpc::new(app.channel.clone())
            .send_compressed(tonic::codec::CompressionEncoding::Gzip);
        grpc.ready().await.expect("ready");
        let mut request = tonic::Request::new(hold(Uuid::now_v7(), "1"));
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {service}").parse().expect("header"),
        );
        let got = grpc
            .unary(
                request,
                PathAndQuery::try_from(path.to_owned()).expect("path"),
                ProstCodec::<pbi::HoldStakeRequest, pbi::HoldStakeResponse>::default(),
            )
            .await;
        assert!(got.is_ok(), "{path}: {got:?}");
    }
    assert_eq!(app.balance(OWNER).await, Decimal::from(98));
}

/// The metrics count an old-path call under the new method (and in the
/// legacy counter), never as `unknown`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn old_path_calls_are_counted_as_the_new_method() {
    let app = TestApp::spawn().await;
    app.deposit(OWNER, "100").await;
    call::<_, pbi::HoldStakeResponse>(
        &app,
        "/betting.v1.WalletService/HoldStake",
        hold(Uuid::now_v7(), "1"),
        Some(&app.service_token()),
    )
    .await
    .expect("held");
    let mut stream = TcpStream::connect(app.metrics_addr).await.expect("connect");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .expect("request");
    let mut body = String::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut body)).await;
    assert!(
        body.lines()
            .any(|l| l.starts_with("legacy_internal_calls_total")
                && l.contains("betting.internal.v1.StakeService/HoldStake")),
        "{body}"
    );
    assert!(
        body.lines()
            .any(|l| l.starts_with("grpc_server_requests_total")
                && l.contains("method=\"betting.internal.v1.StakeService/HoldStake\"")),
        "{body}"
    );
}
