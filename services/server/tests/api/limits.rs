//! Per-user limits: over a limit the right code and reason, under it
//! business as usual, and a limit set to 0 is no limit.

use std::time::Duration;

use betting_api::pb;
use betting_config::UserLimits;
use betting_test_kit::{
    TestApp, authed, bad_fields, eventually, expect_code, fresh_database, reason, retry_delay,
    settings,
};
use tonic::Code;

/// An app with these limits (everything else as in every test).
async fn app_with(limits: UserLimits) -> (TestApp, betting_test_kit::TestDatabase) {
    let database = fresh_database().await;
    let mut s = settings(&database, &std::env::var("REDIS_URL").expect("REDIS_URL"));
    s.limits = limits;
    (TestApp::spawn_with(s).await, database)
}

async fn watch_bets(
    client: &mut pb::betting_service_client::BettingServiceClient<tonic::transport::Channel>,
    token: &str,
) -> Result<tonic::Streaming<pb::WatchBetsResponse>, tonic::Status> {
    client
        .watch_bets(authed(pb::WatchBetsRequest::default(), token))
        .await
        .map(tonic::Response::into_inner)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bets_over_the_rate_are_refused_with_a_retry_delay() {
    let (app, _db) = app_with(UserLimits {
        user_bet_rate: 1,
        user_bet_burst: 3,
        ..UserLimits::off()
    })
    .await;
    app.deposit(1, "100").await;
    app.deposit(2, "100").await;
    app.open_round("rate").await;
    let first = app.place_ok(1, "rate", pb::Side::A, "1").await;
    app.place_ok(1, "rate", pb::Side::A, "1").await;
    // CancelBet draws on the same bucket.
    app.bets()
        .cancel_bet(authed(
            pb::CancelBetRequest {
                bet_id: first.bet_id.clone(),
            },
            &app.player(1),
        ))
        .await
        .expect("third call, within the burst");
    let refused = expect_code(
        app.place(1, "rate", pb::Side::A, "1", "over").await,
        Code::ResourceExhausted,
    );
    assert_eq!(reason(&refused), "RATE_LIMITED");
    let delay = retry_delay(&refused).expect("a RetryInfo");
    assert!(
        delay > Duration::ZERO && delay <= Duration::from_secs(1),
        "{delay:?}"
    );
    // Nothing was taken for the refused bet: 100 - 1 (the other bet) = 99.
    assert_eq!(app.balance(1).await, "99".parse().expect("dec"));
    // Another player is not slowed down by this one.
    app.place_ok(2, "rate", pb::Side::B, "5").await;
    // After the delay the same request goes through.
    tokio::time::sleep(delay).await;
    app.place(1, "rate", pb::Side::A, "1", "over")
        .await
        .expect("a token refilled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn open_bets_over_the_cap_are_refused_and_a_cancel_frees_a_place() {
    let (app, _db) = app_with(UserLimits {
        user_max_open_bets: 2,
        ..UserLimits::off()
    })
    .await;
    app.deposit(1, "100").await;
    app.open_round("cap").await;
    let first = app.place_ok(1, "cap", pb::Side::A, "1").await;
    app.place(1, "cap", pb::Side::A, "2", "second")
        .await
        .expect("second");
    let refused = expect_code(
        app.place(1, "cap", pb::Side::A, "3", "third").await,
        Code::ResourceExhausted,
    );
    assert_eq!(reason(&refused), "TOO_MANY_OPEN_BETS");
    assert_eq!(retry_delay(&refused), None, "waiting alone does not help");
    assert_eq!(app.balance(1).await, "97".parse().expect("dec"));
    // A retry of a placed bet is answered as before, at the cap too.
    let replay = app
        .place(1, "cap", pb::Side::A, "2", "second")
        .await
        .expect("a retry is not a new bet");
    assert_eq!(
        replay
            .metadata()
            .get("idempotent-replayed")
            .map(|v| v.to_str().ok()),
        Some(Some("true"))
    );
    app.bets()
        .cancel_bet(authed(
            pb::CancelBetRequest {
                bet_id: first.bet_id,
            },
            &app.player(1),
        ))
        .await
        .expect("cancel");
    app.place(1, "cap", pb::Side::A, "3", "third")
        .await
        .expect("a place was freed");
    app.assert_books_balanced().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stake_below_the_minimum_is_an_invalid_amount() {
    let (app, _db) = app_with(UserLimits {
        min_stake: "0.5".parse().expect("dec"),
        ..UserLimits::off()
    })
    .await;
    app.deposit(1, "100").await;
    app.open_round("min").await;
    let refused = expect_code(
        app.place(1, "min", pb::Side::A, "0.49", "small").await,
        Code::InvalidArgument,
    );
    assert_eq!(bad_fields(&refused), vec!["amount".to_owned()]);
    assert!(
        refused.message().contains("at least 0.5"),
        "{}",
        refused.message()
    );
    app.place(1, "min", pb::Side::A, "0.5", "enough")
        .await
        .expect("the minimum itself is fine");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_defaults_are_on() {
    let (app, _db) = app_with(UserLimits::default()).await;
    app.deposit(1, "100").await;
    app.open_round("defaults").await;
    let refused = expect_code(
        app.place(1, "defaults", pb::Side::A, "0.001", "tiny").await,
        Code::InvalidArgument,
    );
    assert_eq!(bad_fields(&refused), vec!["amount".to_owned()]);
    // The default burst lets a player's ordinary bursts through.
    for i in 0..20 {
        app.place(1, "defaults", pb::Side::A, "1", &format!("b{i}"))
            .await
            .expect("within the defaults");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn limits_set_to_zero_are_no_limits() {
    // What every other test runs with.
    let app = TestApp::spawn().await;
    app.deposit(1, "10000").await;
    app.open_round("free").await;
    // More than the default burst, as fast as we can, all left open.
    for i in 0..120 {
        app.place(1, "free", pb::Side::A, "0.001", &format!("f{i}"))
            .await
            .expect("unlimited");
    }
    let mut client = app.bets();
    let mut streams = Vec::new();
    for _ in 0..70 {
        streams.push(
            watch_bets(&mut client, &app.player(1))
                .await
                .expect("unlimited streams"),
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn streams_per_user_are_capped_across_watch_bets_and_watch_round() {
    let (app, _db) = app_with(UserLimits {
        user_max_streams: 2,
        ..UserLimits::off()
    })
    .await;
    app.open_round("streams").await;
    let mut bets = app.bets();
    let first = watch_bets(&mut bets, &app.player(1)).await.expect("first");
    let _round = app
        .rounds()
        .watch_round(authed(
            pb::WatchRoundRequest {
                round_id: "streams".into(),
            },
            &app.player(1),
        ))
        .await
        .expect("second, a WatchRound");
    let refused = expect_code(
        watch_bets(&mut bets, &app.player(1)).await,
        Code::ResourceExhausted,
    );
    assert_eq!(reason(&refused), "TOO_MANY_STREAMS");
    // Another user is not affected.
    let _other = watch_bets(&mut bets, &app.player(2)).await.expect("user 2");
    // A closed stream gives its place back.
    drop(first);
    eventually(
        "the closed stream's place is free",
        Duration::from_secs(10),
        async || watch_bets(&mut bets.clone(), &app.player(1)).await.ok(),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn streams_per_connection_are_capped_whoever_the_users() {
    let (app, _db) = app_with(UserLimits {
        connection_max_streams: 3,
        ..UserLimits::off()
    })
    .await;
    let mut bets = app.bets();
    let mut open = Vec::new();
    for user in 1..=3 {
        open.push(
            watch_bets(&mut bets, &app.player(user))
                .await
                .expect("under the cap"),
        );
    }
    let refused = expect_code(
        watch_bets(&mut bets, &app.player(4)).await,
        Code::ResourceExhausted,
    );
    assert_eq!(reason(&refused), "TOO_MANY_STREAMS");
    // Another connection has its own count.
    let other = tonic::transport::Channel::from_shared(format!("http://{}", app.channel_addr()))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let mut other = pb::betting_service_client::BettingServiceClient::new(other);
    watch_bets(&mut other, &app.player(4))
        .await
        .expect("a new connection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_open_then_reset_flood_runs_out_of_tokens() {
    let (app, _db) = app_with(UserLimits {
        user_stream_open_rate: 1,
        user_stream_open_burst: 5,
        ..UserLimits::off()
    })
    .await;
    let mut bets = app.bets();
    let mut refused = None;
    for _ in 0..20 {
        match watch_bets(&mut bets, &app.player(1)).await {
            // Opened and reset at once: it still cost a token.
            Ok(stream) => drop(stream),
            Err(status) => {
                refused = Some(status);
                break;
            }
        }
    }
    let refused = refused.expect("the flood is refused within 20 opens");
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert_eq!(reason(&refused), "RATE_LIMITED");
    assert!(retry_delay(&refused).is_some());
}

/// Reads are cheap one at a time (GetRound is cached), but a player calling
/// them in a tight loop from many clients took the CPU from everyone else:
/// they draw on a read rate of their own, apart from the bet rate.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reads_over_the_rate_are_refused_and_bets_are_not_affected() {
    let (app, _db) = app_with(UserLimits {
        user_read_rate: 1,
        user_read_burst: 2,
        ..UserLimits::off()
    })
    .await;
    app.deposit(1, "100").await;
    app.open_round("reads").await;
    let get_round = || {
        let mut rounds = app.rounds();
        let token = app.player(1);
        async move {
            rounds
                .get_round(authed(
                    pb::GetRoundRequest {
                        round_id: "reads".into(),
                    },
                    &token,
                ))
                .await
        }
    };
    get_round().await.expect("first read");
    get_round().await.expect("second read, within the burst");
    let refused = expect_code(get_round().await, Code::ResourceExhausted);
    assert_eq!(reason(&refused), "RATE_LIMITED");
    assert!(retry_delay(&refused).is_some(), "a RetryInfo");
    // GetBet and ListBets draw on the same bucket.
    expect_code(
        app.bets()
            .list_bets(authed(pb::ListBetsRequest::default(), &app.player(1)))
            .await,
        Code::ResourceExhausted,
    );
    // Betting is another bucket: the player still bets.
    app.place_ok(1, "reads", pb::Side::A, "1").await;
    // Other roles are not limited here.
    app.rounds()
        .get_round(authed(
            pb::GetRoundRequest {
                round_id: "reads".into(),
            },
            &app.game_token(),
        ))
        .await
        .expect("a game server reads freely");
}
