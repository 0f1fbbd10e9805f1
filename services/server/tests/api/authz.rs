//! The authorization matrix: every RPC of the API (walked from the compiled
//! proto descriptors) × every kind of caller, against one table that is
//! also the documentation (ARCHITECTURE.md, "Authorization matrix"; this test
//! checks the two are the same). A new RPC without a row fails the test, and
//! so does a row naming no RPC.
//!
//! Each call goes through a generic client (raw protobuf bytes over
//! `tonic::client::Grpc`), so the test knows nothing of the generated
//! clients: what the descriptors list is what it calls.

use betting_api::{pb, pb_internal as pbi};
use betting_test_kit::TestApp;
use prost::{
    Message,
    bytes::{Buf, BufMut},
};
use tonic::{
    Code, Status,
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    codegen::http::uri::PathAndQuery,
    transport::Channel,
};
use uuid::Uuid;

/// Who calls. The owner is user 1, who owns the wallet, ledger and bet the
/// requests name; the other player is user 2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Caller {
    Anonymous,
    PlayerOwner,
    PlayerOther,
    Service,
    Game,
    Cashier,
    Admin,
}

const CALLERS: [Caller; 7] = [
    Caller::Anonymous,
    Caller::PlayerOwner,
    Caller::PlayerOther,
    Caller::Service,
    Caller::Game,
    Caller::Cashier,
    Caller::Admin,
];

/// What a caller gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// UNAUTHENTICATED: no valid token.
    U,
    /// PERMISSION_DENIED: the role (or the user) may not.
    D,
    /// NOT_FOUND: another player's bet, indistinguishable from a missing one.
    H,
    /// Reaches the handler: any other answer (success, or the handler's own
    /// refusal of the request's content).
    A,
}

use Outcome::{A, D, H, U};

/// The matrix. Columns: anonymous, player (owner), player (other), service,
/// game, cashier, admin.
const MATRIX: &[(&str, [Outcome; 7])] = &[
    ("betting.v1.AdminService/RunAudit", [U, D, D, D, D, D, A]),
    ("betting.v1.BettingService/PlaceBet", [U, A, A, D, D, D, D]),
    ("betting.v1.BettingService/GetBet", [U, A, H, D, D, D, A]),
    ("betting.v1.BettingService/ListBets", [U, A, D, D, D, D, A]),
    ("betting.v1.BettingService/CancelBet", [U, A, H, D, D, D, D]),
    ("betting.v1.BettingService/WatchBets", [U, A, A, D, D, D, D]),
    (
        "betting.v1.SettlementService/OpenRound",
        [U, D, D, D, A, D, D],
    ),
    (
        "betting.v1.SettlementService/CloseRound",
        [U, D, D, D, A, D, D],
    ),
    (
        "betting.v1.SettlementService/GetRound",
        [U, A, A, A, A, A, A],
    ),
    (
        "betting.v1.SettlementService/SettleRound",
        [U, D, D, D, A, D, D],
    ),
    (
        "betting.v1.SettlementService/VoidRound",
        [U, D, D, D, A, D, D],
    ),
    (
        "betting.v1.SettlementService/WatchRound",
        [U, A, A, A, A, A, A],
    ),
    ("betting.v1.WalletService/GetWallet", [U, A, D, A, D, A, A]),
    ("betting.v1.WalletService/Deposit", [U, D, D, D, D, A, D]),
    ("betting.v1.WalletService/Withdraw", [U, D, D, D, D, A, D]),
    (
        "betting.v1.WalletService/ListLedgerEntries",
        [U, A, D, D, D, A, A],
    ),
    (
        "betting.internal.v1.StakeService/HoldStake",
        [U, D, D, A, D, D, D],
    ),
    (
        "betting.internal.v1.StakeService/HoldStakes",
        [U, D, D, A, D, D, D],
    ),
    (
        "betting.internal.v1.StakeService/PlaceStakes",
        [U, D, D, A, D, D, D],
    ),
    (
        "betting.internal.v1.StakeService/RefundStake",
        [U, D, D, A, D, D, D],
    ),
    (
        "betting.internal.v1.StakeService/PayWinnings",
        [U, D, D, A, D, D, D],
    ),
    (
        "betting.internal.v1.StakeService/PayWinningsBatch",
        [U, D, D, A, D, D, D],
    ),
];

/// Every RPC the API declares, as `package.Service/Method`, with whether it streams.
fn declared_methods() -> Vec<(String, bool)> {
    let set = prost_types::FileDescriptorSet::decode(betting_api::FILE_DESCRIPTOR_SET)
        .expect("descriptor set");
    let mut methods = Vec::new();
    for file in &set.file {
        let package = file.package();
        for service in &file.service {
            for method in &service.method {
                methods.push((
                    format!("{package}.{}/{}", service.name(), method.name()),
                    method.server_streaming(),
                ));
            }
        }
    }
    assert!(
        methods.len() >= MATRIX.len(),
        "the descriptor set lists no API"
    );
    methods
}

/// Passes request and response bytes through untouched.
#[derive(Default, Clone, Copy)]
struct Raw;

impl Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;

    fn encoder(&mut self) -> Raw {
        Raw
    }

    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        let bytes = src.copy_to_bytes(src.remaining());
        Ok(Some(bytes.to_vec()))
    }
}

/// What the fixtures made for the requests to name.
struct Fixture {
    /// A PENDING bet of the owner, in the open round.
    bet_id: String,
}

const OWNER: i64 = 1;
const OTHER: i64 = 2;
/// Open, for bets and reads.
const ROUND: &str = "authz-open";
/// Walked through close, settle and void by the game column.
const ROUND_TO_RUN: &str = "authz-run";

/// The request a row sends, valid enough that an allowed caller succeeds
/// or meets the handler's own answer.
fn request_for(method: &str, fixture: &Fixture) -> Vec<u8> {
    let key = Uuid::new_v4().to_string();
    let bet = Uuid::now_v7().to_string();
    match method.rsplit('/').next().unwrap_or_default() {
        "RunAudit" => pb::RunAuditRequest {}.encode_to_vec(),
        "PlaceBet" => pb::PlaceBetRequest {
            round_id: ROUND.into(),
            side: pb::Side::A as i32,
            amount: "1".into(),
            idempotency_key: key,
        }
        .encode_to_vec(),
        "GetBet" => pb::GetBetRequest {
            bet_id: fixture.bet_id.clone(),
        }
        .encode_to_vec(),
        "ListBets" => pb::ListBetsRequest {
            user_id: OWNER,
            ..Default::default()
        }
        .encode_to_vec(),
        "CancelBet" => pb::CancelBetRequest {
            bet_id: fixture.bet_id.clone(),
        }
        .encode_to_vec(),
        "WatchBets" => pb::WatchBetsRequest::default().encode_to_vec(),
        "OpenRound" => pb::OpenRoundRequest {
            round_id: format!("authz-{}", Uuid::new_v4().simple()),
        }
        .encode_to_vec(),
        "CloseRound" => pb::CloseRoundRequest {
            round_id: ROUND_TO_RUN.into(),
        }
        .encode_to_vec(),
        "GetRound" => pb::GetRoundRequest {
            round_id: ROUND.into(),
        }
        .encode_to_vec(),
        "SettleRound" => pb::SettleRoundRequest {
            round_id: ROUND_TO_RUN.into(),
            winning_side: pb::Side::A as i32,
        }
        .encode_to_vec(),
        "VoidRound" => pb::VoidRoundRequest {
            round_id: ROUND_TO_RUN.into(),
            reason: "authz".into(),
        }
        .encode_to_vec(),
        "WatchRound" => pb::WatchRoundRequest {
            round_id: ROUND.into(),
        }
        .encode_to_vec(),
        "GetWallet" => pb::GetWalletRequest { user_id: OWNER }.encode_to_vec(),
        "Deposit" => pb::DepositRequest {
            user_id: OWNER,
            amount: "1".into(),
            idempotency_key: key,
            reference: String::new(),
        }
        .encode_to_vec(),
        "Withdraw" => pb::WithdrawRequest {
            user_id: OWNER,
            amount: "1".into(),
            idempotency_key: key,
            reference: String::new(),
        }
        .encode_to_vec(),
        "ListLedgerEntries" => pb::ListLedgerEntriesRequest {
            user_id: OWNER,
            ..Default::default()
        }
        .encode_to_vec(),
        "HoldStake" => pbi::HoldStakeRequest {
            user_id: OWNER,
            amount: "1".into(),
            idempotency_key: format!("BET:{bet}"),
            bet_id: bet,
        }
        .encode_to_vec(),
        "HoldStakes" => pbi::HoldStakesRequest {
            holds: vec![pbi::HoldStakeRequest {
                user_id: OWNER,
                amount: "1".into(),
                idempotency_key: format!("BET:{bet}"),
                bet_id: bet,
            }],
        }
        .encode_to_vec(),
        "PlaceStakes" => pbi::PlaceStakesRequest {
            placements: vec![pbi::StakePlacement {
                hold: Some(pbi::HoldStakeRequest {
                    user_id: OWNER,
                    amount: "1".into(),
                    idempotency_key: format!("BET:{bet}"),
                    bet_id: bet,
                }),
                round_id: ROUND.into(),
                side: pb::Side::A as i32,
                bet_key: key,
            }],
            wait: false,
        }
        .encode_to_vec(),
        "RefundStake" => pbi::RefundStakeRequest {
            user_id: OWNER,
            amount: "1".into(),
            idempotency_key: format!("REFUND:{}", fixture.bet_id),
            bet_id: fixture.bet_id.clone(),
        }
        .encode_to_vec(),
        "PayWinnings" => {
            let matched = Uuid::now_v7();
            pbi::PayWinningsRequest {
                user_id: OWNER,
                amount: "2".into(),
                idempotency_key: format!("SETTLE:{matched}"),
                match_id: matched.to_string(),
                bet_ids: vec![fixture.bet_id.clone(), Uuid::now_v7().to_string()],
            }
            .encode_to_vec()
        }
        "PayWinningsBatch" => {
            let matched = Uuid::now_v7();
            pbi::PayWinningsBatchRequest {
                payouts: vec![pbi::PayWinningsRequest {
                    user_id: OWNER,
                    amount: "2".into(),
                    idempotency_key: format!("SETTLE:{matched}"),
                    match_id: matched.to_string(),
                    bet_ids: vec![fixture.bet_id.clone(), Uuid::now_v7().to_string()],
                }],
            }
            .encode_to_vec()
        }
        other => panic!("no request for {other}: add one to request_for"),
    }
}

fn token(app: &TestApp, caller: Caller) -> Option<String> {
    use betting_auth::Role;
    match caller {
        Caller::Anonymous => None,
        Caller::PlayerOwner => Some(app.player(OWNER)),
        Caller::PlayerOther => Some(app.player(OTHER)),
        Caller::Service => Some(app.token_for(Role::Service)),
        Caller::Game => Some(app.token_for(Role::Game)),
        Caller::Cashier => Some(app.token_for(Role::Cashier)),
        Caller::Admin => Some(app.token_for(Role::Admin)),
    }
}

/// Calls `method` with raw `body`; for a stream, its first message or status.
async fn call(
    channel: Channel,
    method: &str,
    streaming: bool,
    body: Vec<u8>,
    token: Option<&str>,
) -> Result<(), Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let path = PathAndQuery::try_from(format!("/{method}")).expect("path");
    let mut request = tonic::Request::new(body);
    if let Some(token) = token {
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {token}").parse().expect("header"),
        );
    }
    if streaming {
        let mut stream = grpc
            .server_streaming(request, path, Raw)
            .await?
            .into_inner();
        stream.message().await?;
        Ok(())
    } else {
        grpc.unary(request, path, Raw).await.map(|_| ())
    }
}

fn classify(result: &Result<(), Status>) -> Outcome {
    match result {
        Err(s) if s.code() == Code::Unauthenticated => U,
        Err(s) if s.code() == Code::PermissionDenied => D,
        Err(s) if s.code() == Code::NotFound => H,
        _ => A,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_rpc_answers_every_caller_as_the_matrix_says() {
    let declared = declared_methods();
    let names: Vec<&str> = declared.iter().map(|(m, _)| m.as_str()).collect();
    let missing: Vec<&&str> = names
        .iter()
        .filter(|m| !MATRIX.iter().any(|(row, _)| row == *m))
        .collect();
    assert!(
        missing.is_empty(),
        "RPCs without a row in the authorization matrix: {missing:?}"
    );
    let stale: Vec<&str> = MATRIX
        .iter()
        .map(|(row, _)| *row)
        .filter(|row| !names.contains(row))
        .collect();
    assert!(stale.is_empty(), "rows naming no RPC: {stale:?}");

    let app = TestApp::spawn().await;
    app.deposit(OWNER, "100").await;
    app.deposit(OTHER, "100").await;
    app.open_round(ROUND).await;
    app.open_round(ROUND_TO_RUN).await;
    let fixture = Fixture {
        bet_id: app.place_ok(OWNER, ROUND, pb::Side::B, "3").await.bet_id,
    };

    let mut wrong = Vec::new();
    for (method, streaming) in &declared {
        let row = MATRIX
            .iter()
            .find(|(m, _)| m == method)
            .map(|(_, row)| row)
            .expect("checked above");
        for (caller, expected) in CALLERS.iter().zip(row) {
            let body = request_for(method, &fixture);
            let token = token(&app, *caller);
            let result = call(
                app.channel.clone(),
                method,
                *streaming,
                body,
                token.as_deref(),
            )
            .await;
            let got = classify(&result);
            if got != *expected {
                wrong.push(format!(
                    "{method} as {caller:?}: expected {expected:?}, got {got:?} ({result:?})"
                ));
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// The matrix as ARCHITECTURE.md shows it.
fn render() -> String {
    let word = |o: &Outcome| match o {
        U => "UNAUTHENTICATED",
        D => "PERMISSION_DENIED",
        H => "NOT_FOUND",
        A => "allowed",
    };
    let mut out = String::from(
        "| RPC | anonymous | player (owner) | player (other) | service | game | cashier | admin |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- |\n",
    );
    for (method, row) in MATRIX {
        let method = method.trim_start_matches("betting.v1.");
        let cells: Vec<&str> = row.iter().map(word).collect();
        out += &format!("| `{method}` | {} |\n", cells.join(" | "));
    }
    out
}

#[test]
fn the_documented_matrix_is_the_tested_one() {
    let doc = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../ARCHITECTURE.md"
    ))
    .expect("ARCHITECTURE.md");
    let start = "<!-- authz-matrix:start -->\n";
    let end = "<!-- authz-matrix:end -->";
    let table = doc
        .split_once(start)
        .and_then(|(_, rest)| rest.split_once(end))
        .map(|(table, _)| table);
    let expected = render();
    assert_eq!(
        table,
        Some(expected.as_str()),
        "ARCHITECTURE.md's authorization matrix differs from the tested one \
         (services/server/tests/api/authz.rs); put this between the markers:\n{expected}"
    );
}
