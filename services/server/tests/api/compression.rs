//! Compressed calls, as grpcio, grpc-go and grpc-java clients make them:
//! gzip- and zstd-compressed requests are accepted, answers come compressed
//! when the client asks (`grpc-accept-encoding`), server streams included,
//! and decompression stays within the request size limit.

use std::time::Duration;

use betting_api::pb::{
    self, WatchEventType, betting_service_client::BettingServiceClient,
    wallet_service_client::WalletServiceClient,
};
use tonic::{Code, codec::CompressionEncoding, transport::Channel};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use betting_test_kit::{TestApp, authed, expect_code};

/// The encoding the server says it compressed a response with.
fn encoding_of(metadata: &tonic::metadata::MetadataMap) -> Option<String> {
    metadata
        .get("grpc-encoding")
        .map(|v| v.to_str().expect("ascii").to_owned())
}

fn wallet(app: &TestApp, encoding: CompressionEncoding) -> WalletServiceClient<Channel> {
    WalletServiceClient::new(app.channel.clone())
        .send_compressed(encoding)
        .accept_compressed(encoding)
}

fn bets(app: &TestApp, encoding: CompressionEncoding) -> BettingServiceClient<Channel> {
    BettingServiceClient::new(app.channel.clone())
        .send_compressed(encoding)
        .accept_compressed(encoding)
}

#[tokio::test]
async fn compressed_unary_calls_are_accepted_and_answered_compressed() {
    let app = TestApp::spawn().await;
    app.open_round("r-gzip").await;
    for (user, encoding, name) in [
        (1, CompressionEncoding::Gzip, "gzip"),
        (2, CompressionEncoding::Zstd, "zstd"),
    ] {
        let deposit = wallet(&app, encoding)
            .deposit(authed(
                pb::DepositRequest {
                    user_id: user,
                    amount: "100".into(),
                    idempotency_key: format!("dep-{name}"),
                    reference: String::new(),
                },
                &app.cashier_token(),
            ))
            .await
            .unwrap_or_else(|s| panic!("{name} deposit: {s:?}"));
        assert_eq!(encoding_of(deposit.metadata()).as_deref(), Some(name));
        assert_eq!(
            deposit.into_inner().wallet.expect("wallet").balance,
            "100",
            "{name}"
        );

        let placed = bets(&app, encoding)
            .place_bet(authed(
                pb::PlaceBetRequest {
                    round_id: "r-gzip".into(),
                    side: pb::Side::A as i32,
                    amount: "10".into(),
                    idempotency_key: format!("bet-{name}"),
                },
                &app.player(user),
            ))
            .await
            .unwrap_or_else(|s| panic!("{name} place bet: {s:?}"));
        assert_eq!(encoding_of(placed.metadata()).as_deref(), Some(name));
        assert_eq!(placed.into_inner().bet.expect("bet").amount, "10");

        let read = wallet(&app, encoding)
            .get_wallet(authed(
                pb::GetWalletRequest { user_id: user },
                &app.player(user),
            ))
            .await
            .unwrap_or_else(|s| panic!("{name} get wallet: {s:?}"));
        assert_eq!(encoding_of(read.metadata()).as_deref(), Some(name));
        assert_eq!(read.into_inner().wallet.expect("wallet").balance, "90");
    }

    // An error answers the same way through a compressing client: its code
    // and reason intact.
    let refused = wallet(&app, CompressionEncoding::Gzip)
        .withdraw(authed(
            pb::WithdrawRequest {
                user_id: 1,
                amount: "1000".into(),
                idempotency_key: "wd-gzip".into(),
                reference: String::new(),
            },
            &app.cashier_token(),
        ))
        .await;
    let status = expect_code(refused, Code::FailedPrecondition);
    assert_eq!(betting_test_kit::reason(&status), "INSUFFICIENT_FUNDS");

    // Health (anonymous, its own generated server) takes gzip too.
    let health = HealthClient::new(app.channel.clone())
        .send_compressed(CompressionEncoding::Gzip)
        .accept_compressed(CompressionEncoding::Gzip)
        .check(HealthCheckRequest::default())
        .await
        .expect("gzip health check");
    assert_eq!(encoding_of(health.metadata()).as_deref(), Some("gzip"));

    // A client that asks for nothing gets plain answers.
    let plain = app
        .wallet()
        .get_wallet(authed(pb::GetWalletRequest { user_id: 1 }, &app.player(1)))
        .await
        .expect("plain get wallet");
    assert_eq!(encoding_of(plain.metadata()), None);
    app.assert_books_balanced().await;
}

#[tokio::test]
async fn watch_bets_streams_compressed_events() {
    let app = TestApp::spawn().await;
    app.open_round("r-stream").await;
    app.deposit(7, "50").await;
    app.deposit(8, "50").await;

    let response = bets(&app, CompressionEncoding::Gzip)
        .watch_bets(authed(pb::WatchBetsRequest::default(), &app.player(7)))
        .await
        .expect("gzip watch bets");
    assert_eq!(encoding_of(response.metadata()).as_deref(), Some("gzip"));
    let mut events = response.into_inner();
    let mut next = async || {
        tokio::time::timeout(Duration::from_secs(15), events.message())
            .await
            .expect("an event within 15 s")
            .expect("stream ok")
            .expect("stream open")
    };
    assert_eq!(next().await.r#type, WatchEventType::SnapshotEnd as i32);

    let mine = app.place_ok(7, "r-stream", pb::Side::A, "5").await;
    app.place_ok(8, "r-stream", pb::Side::B, "5").await;
    let mut seen = Vec::new();
    while seen.last() != Some(&(pb::BetStatus::Matched as i32)) {
        let event = next().await;
        if let Some(bet) = event.bet {
            assert_eq!(bet.bet_id, mine.bet_id, "only user 7's bet");
            seen.push(bet.status);
        }
    }
    // The stream may coalesce PENDING into MATCHED when matching is quick;
    // what this test needs is that the change came through, compressed.
    assert!(!seen.is_empty());
}

#[tokio::test]
async fn decompression_is_bounded_by_the_request_limit() {
    let app = TestApp::spawn().await;
    app.open_round("r-bomb").await;
    app.deposit(3, "50").await;
    // 1 MiB of one letter compresses to about 1 KiB: far below the 16 KiB
    // request limit on the wire, far above it once decompressed.
    let bomb = pb::PlaceBetRequest {
        round_id: "r-bomb".into(),
        side: pb::Side::A as i32,
        amount: "1".into(),
        idempotency_key: "k".repeat(1 << 20),
    };
    for encoding in [CompressionEncoding::Gzip, CompressionEncoding::Zstd] {
        let refused = bets(&app, encoding)
            .place_bet(authed(bomb.clone(), &app.player(3)))
            .await;
        let status = expect_code(refused, Code::ResourceExhausted);
        assert!(
            status.message().contains("decompressing"),
            "{encoding:?}: {status:?}"
        );
    }
    assert_eq!(app.balance(3).await.to_string(), "50", "no bet was taken");
}
