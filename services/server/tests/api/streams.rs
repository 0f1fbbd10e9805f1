//! WatchBets and WatchRound: live, across instances, resumable, bounded.

use std::time::Duration;

use betting_api::pb::{self, WatchEventType};
use betting_auth::{Claims, Role, TokenMinter};
use tonic::{Code, Streaming};

use betting_test_kit::{
    API_ONLY, SECRET, TestApp, TestRedis, authed, eventually, fresh_database, settings,
};

type Events = Streaming<pb::WatchBetsResponse>;

async fn watch(app: &TestApp, user: i64, bet_ids: Vec<String>, cursor: &str) -> Events {
    app.bets()
        .watch_bets(authed(
            pb::WatchBetsRequest {
                bet_ids,
                cursor: cursor.into(),
            },
            &app.player(user),
        ))
        .await
        .expect("watch bets")
        .into_inner()
}

/// All of `user`'s bets, watched over a connection whose HTTP/2 windows are
/// 16 KiB: a client that stops reading blocks its stream after a few events.
async fn watch_with_small_windows(app: &TestApp, user: i64) -> Events {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", app.channel_addr()))
        .expect("endpoint")
        .initial_stream_window_size(Some(16 * 1024))
        .initial_connection_window_size(Some(16 * 1024))
        .connect()
        .await
        .expect("connect");
    pb::betting_service_client::BettingServiceClient::new(channel)
        .watch_bets(authed(pb::WatchBetsRequest::default(), &app.player(user)))
        .await
        .expect("watch")
        .into_inner()
}

async fn next(events: &mut Events) -> pb::WatchBetsResponse {
    tokio::time::timeout(Duration::from_secs(10), events.message())
        .await
        .expect("an event within 10 s")
        .expect("stream ok")
        .expect("stream open")
}

/// Reads until `pred` holds for an event with a bet; returns that event.
async fn until(
    events: &mut Events,
    mut pred: impl FnMut(&pb::Bet) -> bool,
) -> pb::WatchBetsResponse {
    loop {
        let event = next(events).await;
        if let Some(bet) = &event.bet
            && pred(bet)
        {
            return event;
        }
    }
}

async fn snapshot(events: &mut Events) -> Vec<pb::Bet> {
    snapshot_and_cursor(events).await.0
}

/// The snapshot's bets and the cursor its end carries.
async fn snapshot_and_cursor(events: &mut Events) -> (Vec<pb::Bet>, String) {
    let mut bets = Vec::new();
    loop {
        let event = next(events).await;
        match WatchEventType::try_from(event.r#type) {
            Ok(WatchEventType::Snapshot) => bets.push(event.bet.expect("snapshot bet")),
            Ok(WatchEventType::SnapshotEnd) => return (bets, event.cursor),
            other => panic!("unexpected event before the snapshot ended: {other:?}"),
        }
    }
}

/// A player token that expires `secs` from now.
fn expiring_token(user: i64, secs: u64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    TokenMinter::new(SECRET.as_bytes(), None, None)
        .mint_claims(&Claims {
            sub: user.to_string(),
            role: Role::Player.as_str().into(),
            iat: now,
            exp: now + secs,
            nbf: None,
            iss: None,
            aud: None,
        })
        .expect("mint")
}

/// Reads until the stream ends with a status, within 10 s.
async fn end_status(events: &mut Events) -> tonic::Status {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match events.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("stream ended without a status"),
                Err(status) => return status,
            }
        }
    })
    .await
    .expect("the stream ends in time")
}

fn status(bet: &pb::Bet) -> pb::BetStatus {
    pb::BetStatus::try_from(bet.status).expect("status")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_player_sees_their_bets_move_and_nobody_elses() {
    let app = TestApp::spawn().await;
    app.deposit(1, "100").await;
    app.deposit(2, "100").await;
    app.open_round("live").await;
    let mut events = watch(&app, 1, vec![], "").await;
    assert!(snapshot(&mut events).await.is_empty());

    let mine = app.place_ok(1, "live", pb::Side::A, "10").await;
    let theirs = app.place_ok(2, "live", pb::Side::B, "10").await;
    let mut seen = Vec::new();
    let matched = until(&mut events, |b| {
        seen.push(b.clone());
        status(b) == pb::BetStatus::Matched
    })
    .await;
    assert_eq!(matched.bet.as_ref().expect("bet").bet_id, mine.bet_id);
    assert!(!matched.cursor.is_empty());
    app.settle_round("live", pb::Side::A).await.expect("settle");
    let settled = until(&mut events, |b| {
        seen.push(b.clone());
        status(b) == pb::BetStatus::Settled
    })
    .await
    .bet
    .expect("bet");
    assert_eq!(settled.result, Some(pb::BetResult::Won as i32));
    assert_eq!(settled.payout.as_deref(), Some("20"));
    // Only the caller's bets, versions only ever growing.
    assert!(
        seen.iter()
            .all(|b| b.user_id == 1 && b.bet_id != theirs.bet_id)
    );
    let versions: Vec<i64> = seen.iter().map(|b| b.version).collect();
    assert!(versions.windows(2).all(|w| w[0] < w[1]), "{versions:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_on_one_instance_sees_changes_made_through_another() {
    let url = fresh_database().await;
    let one = TestApp::spawn_with(settings(
        &url,
        &std::env::var("REDIS_URL").expect("REDIS_URL"),
    ))
    .await;
    // Instance two: the betting and settlement services only, same stores.
    let mut s = settings(&url, &std::env::var("REDIS_URL").expect("REDIS_URL"));
    s.redis_namespace = one.namespace.clone();
    s.roles = API_ONLY.to_vec();
    let two = TestApp::spawn_with(s).await;
    one.deposit(1, "50").await;
    one.deposit(2, "50").await;
    one.open_round("x").await;
    let mut events = watch(&two, 1, vec![], "").await;
    snapshot(&mut events).await;
    let mut round_events = two
        .rounds()
        .watch_round(authed(
            pb::WatchRoundRequest {
                round_id: "x".into(),
            },
            &two.player(1),
        ))
        .await
        .expect("watch round")
        .into_inner();
    let first = round_events
        .message()
        .await
        .expect("ok")
        .expect("first")
        .round
        .expect("round");
    assert_eq!(first.status, pb::RoundStatus::Open as i32);

    // Everything happens through instance one and its workers.
    let bet = one.place_ok(1, "x", pb::Side::B, "5").await;
    one.place_ok(2, "x", pb::Side::A, "5").await;
    until(&mut events, |b| {
        b.bet_id == bet.bet_id && status(b) == pb::BetStatus::Matched
    })
    .await;
    one.settle_round("x", pb::Side::A).await.expect("settle");
    let lost = until(&mut events, |b| status(b) == pb::BetStatus::Settled)
        .await
        .bet
        .expect("bet");
    assert_eq!(
        (lost.result, lost.payout.as_deref()),
        (Some(pb::BetResult::Lost as i32), Some("0"))
    );

    // The round's watchers see the outcome and the totals.
    loop {
        let event = tokio::time::timeout(Duration::from_secs(10), round_events.message())
            .await
            .expect("round event in time")
            .expect("ok")
            .expect("open");
        let Some(round) = event.round else { continue };
        let stats = round.stats.clone().expect("stats");
        if round.status == pb::RoundStatus::Settled as i32 && stats.settled_bets == 2 {
            assert_eq!(round.winning_side, Some(pb::Side::A as i32));
            assert_eq!(stats.total_paid_out, "10");
            break;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reconnecting_with_the_cursor_resumes_without_missing_a_final_state() {
    let app = TestApp::spawn().await;
    app.deposit(1, "100").await;
    app.deposit(2, "100").await;
    app.open_round("r").await;
    app.open_round("other").await;
    // A bet that does not change while the client is away, placed more than
    // the resume margin (5 s) before the cursor: not news on the resume.
    let unchanged = app.place_ok(1, "other", pb::Side::A, "5").await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    let bet = app.place_ok(1, "r", pb::Side::A, "10").await;
    let mut events = watch(&app, 1, vec![], "").await;
    let (snap, cursor) = snapshot_and_cursor(&mut events).await;
    assert_eq!(snap.len(), 2);
    assert!(!cursor.is_empty(), "the snapshot's end carries a cursor");
    drop(events);

    // While it is away, its bet is matched and settled: a final state.
    app.place_ok(2, "r", pb::Side::B, "10").await;
    app.wait_for_bet(1, &bet.bet_id, pb::BetStatus::Matched)
        .await;
    app.settle_round("r", pb::Side::A).await.expect("settle");
    app.wait_for_bet(1, &bet.bet_id, pb::BetStatus::Settled)
        .await;

    // The resume sends what changed since the cursor, as changes — no
    // snapshot, nothing the client already had — then SNAPSHOT_END.
    let mut events = watch(&app, 1, vec![], &cursor).await;
    let mut changed = Vec::new();
    loop {
        let event = next(&mut events).await;
        match WatchEventType::try_from(event.r#type) {
            Ok(WatchEventType::Change) => changed.push(event.bet.expect("a change's bet")),
            Ok(WatchEventType::SnapshotEnd) => break,
            other => panic!("a resume sent {other:?} before catching up"),
        }
    }
    let settled = changed
        .iter()
        .find(|b| b.bet_id == bet.bet_id)
        .expect("the settled bet is sent");
    assert_eq!(status(settled), pb::BetStatus::Settled);
    assert!(
        changed.iter().all(|b| b.bet_id != unchanged.bet_id),
        "a bet unchanged since the cursor is not replayed: {changed:?}"
    );

    // Without a cursor, a settled bet is not part of the snapshot; named, it is.
    let mut fresh = watch(&app, 1, vec![], "").await;
    let ids: Vec<String> = snapshot(&mut fresh)
        .await
        .into_iter()
        .map(|b| b.bet_id)
        .collect();
    assert_eq!(ids, vec![unchanged.bet_id.clone()]);
    let mut named = watch(&app, 1, vec![bet.bet_id.clone()], "").await;
    assert_eq!(snapshot(&mut named).await.len(), 1);
    // Someone else's bet id, named, shows nothing.
    let mut intruder = watch(&app, 2, vec![bet.bet_id.clone()], "").await;
    assert!(snapshot(&mut intruder).await.is_empty());
    let status = app
        .bets()
        .watch_bets(authed(
            pb::WatchBetsRequest {
                bet_ids: vec![],
                cursor: "not-a-cursor!".into(),
            },
            &app.player(1),
        ))
        .await
        .expect_err("bad cursor");
    assert_eq!(status.code(), Code::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn heartbeats_keep_idle_streams_alive() {
    let url = fresh_database().await;
    let mut s = settings(&url, &std::env::var("REDIS_URL").expect("REDIS_URL"));
    s.stream_heartbeat_ms = 100;
    let app = TestApp::spawn_with(s).await;
    let mut events = watch(&app, 1, vec![], "").await;
    snapshot(&mut events).await;
    for _ in 0..3 {
        let event = next(&mut events).await;
        assert_eq!(event.r#type, WatchEventType::Heartbeat as i32);
    }

    // WatchRound is shaped alike: SNAPSHOT first, HEARTBEATs while idle
    // (no round; the deprecated flag still set), a CHANGE on a change.
    app.open_round("idle").await;
    let mut rounds = app
        .rounds()
        .watch_round(authed(
            pb::WatchRoundRequest {
                round_id: "idle".into(),
            },
            &app.player(1),
        ))
        .await
        .expect("watch round")
        .into_inner();
    let mut round_event = async || {
        tokio::time::timeout(Duration::from_secs(10), rounds.message())
            .await
            .expect("round event in time")
            .expect("ok")
            .expect("open")
    };
    let first = round_event().await;
    assert_eq!(first.r#type, WatchEventType::Snapshot as i32);
    assert_eq!(
        first.round.expect("round").status,
        pb::RoundStatus::Open as i32
    );
    for _ in 0..2 {
        let beat = round_event().await;
        assert_eq!(beat.r#type, WatchEventType::Heartbeat as i32);
        assert!(beat.round.is_none());
        #[allow(deprecated)]
        let flagged = beat.heartbeat;
        assert!(flagged);
    }
    app.rounds()
        .close_round(authed(
            pb::CloseRoundRequest {
                round_id: "idle".into(),
            },
            &app.game_token(),
        ))
        .await
        .expect("close");
    let closed = loop {
        let event = round_event().await;
        if event.r#type != WatchEventType::Heartbeat as i32 {
            break event;
        }
    };
    assert_eq!(closed.r#type, WatchEventType::Change as i32);
    assert_eq!(
        closed.round.expect("round").status,
        pb::RoundStatus::Closed as i32
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_expired_token_ends_the_stream_with_unauthenticated() {
    let app = TestApp::spawn().await;
    // A token that expires in two seconds ends the stream by itself.
    let token = expiring_token(1, 2);
    let mut events = app
        .bets()
        .watch_bets(authed(pb::WatchBetsRequest::default(), &token))
        .await
        .expect("watch")
        .into_inner();
    snapshot(&mut events).await;
    let ended = end_status(&mut events).await;
    assert_eq!(ended.code(), Code::Unauthenticated);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shutdown_ends_streams_with_unavailable() {
    let app = TestApp::spawn().await;
    let mut events = watch(&app, 1, vec![], "").await;
    snapshot(&mut events).await;
    let stopping = tokio::spawn(app.stop());
    let ended = end_status(&mut events).await;
    assert_eq!(ended.code(), Code::Unavailable);
    stopping.await.expect("stopped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_that_never_reads_is_cut_off_and_its_memory_freed() {
    let url = fresh_database().await;
    let mut s = settings(&url, &std::env::var("REDIS_URL").expect("REDIS_URL"));
    s.stream_send_timeout_ms = 300;
    s.roles = API_ONLY.to_vec();
    let app = TestApp::spawn_with(s).await;
    let hub = app.hub.clone().expect("hub");
    app.deposit(1, "100000").await;
    app.open_round("flood").await;
    // A client whose HTTP/2 windows are small, as a phone on a poor link, that never reads.
    let mut events = watch_with_small_windows(&app, 1).await;
    assert_eq!(hub.stream_count(), 1);
    // Far more changes than fit in the stream's buffers, and nobody reads.
    const BETS: usize = 600;
    for i in 0..BETS {
        app.place(1, "flood", pb::Side::A, "1", &format!("f{i}"))
            .await
            .expect("place");
    }
    // The stream is cut off and unregistered: nothing is held for it any more.
    eventually(
        "the slow stream is dropped",
        Duration::from_secs(15),
        async || (hub.stream_count() == 0).then_some(()),
    )
    .await;
    assert_eq!(hub.stream_count(), 0, "the slow stream was dropped");
    // When the client finally reads: what HTTP/2 had buffered, then the verdict.
    let mut delivered = 0;
    let verdict = loop {
        match tokio::time::timeout(Duration::from_secs(10), events.message())
            .await
            .expect("in time")
        {
            Ok(Some(_)) => delivered += 1,
            Ok(None) => panic!("ended without a status"),
            Err(status) => break status,
        }
    };
    assert_eq!(verdict.code(), Code::ResourceExhausted);
    assert!(
        delivered < BETS,
        "only a bounded buffer was kept ({delivered} events)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_concurrent_streams() {
    let app = TestApp::spawn_roles(API_ONLY).await;
    let hub = app.hub.clone().expect("hub");
    app.open_round("crowd").await;
    const STREAMS: i64 = 1000;
    // A few connections, many streams each, as real clients multiplex: 63
    // each, under the server's 128 streams per connection.
    const CONNECTIONS: i64 = 16;
    let channels: Vec<tonic::transport::Channel> = {
        let mut v = Vec::new();
        for _ in 0..CONNECTIONS {
            v.push(
                tonic::transport::Channel::from_shared(format!("http://{}", app.channel_addr()))
                    .expect("endpoint")
                    .connect()
                    .await
                    .expect("connect"),
            );
        }
        v
    };
    let opened = futures::future::join_all((1..=STREAMS).map(|user| {
        let channel = channels[(user % CONNECTIONS) as usize].clone();
        let token = app.player(user);
        async move {
            let mut client = pb::betting_service_client::BettingServiceClient::new(channel);
            let mut events = client
                .watch_bets(authed(pb::WatchBetsRequest::default(), &token))
                .await
                .expect("watch")
                .into_inner();
            assert!(snapshot(&mut events).await.is_empty());
            (user, events)
        }
    }))
    .await;
    assert_eq!(hub.stream_count(), STREAMS as usize);
    // A change for a sample of users reaches exactly their streams.
    let sample: Vec<i64> = (1..=STREAMS).step_by(50).collect();
    for user in &sample {
        app.deposit(*user, "1").await;
        app.place_ok(*user, "crowd", pb::Side::A, "1").await;
    }
    let mut streams: std::collections::HashMap<i64, Events> = opened.into_iter().collect();
    for user in &sample {
        let events = streams.get_mut(user).expect("stream");
        let event = until(events, |b| status(b) == pb::BetStatus::Pending).await;
        assert_eq!(event.bet.expect("bet").user_id, *user);
    }
    drop(streams);
    eventually(
        "closed streams are unregistered",
        Duration::from_secs(8),
        async || (hub.stream_count() == 0).then_some(()),
    )
    .await;
    assert_eq!(hub.stream_count(), 0, "closed streams are unregistered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redis_restart_mid_stream_heals() {
    let mut redis = TestRedis::start();
    let url = fresh_database().await;
    let mut s = settings(&url, &redis.url());
    s.roles = API_ONLY.to_vec();
    let app = TestApp::spawn_with(s).await;
    app.deposit(1, "100").await;
    app.open_round("rr").await;
    let mut events = watch(&app, 1, vec![], "").await;
    snapshot(&mut events).await;
    let first = app.place_ok(1, "rr", pb::Side::A, "1").await;
    until(&mut events, |b| b.bet_id == first.bet_id).await;

    redis.stop();
    // Redis is gone: bets still work (PostgreSQL is the truth), notes are lost...
    let during = app.place_ok(1, "rr", pb::Side::A, "2").await;
    // ...but the stream still delivers it, and heals when Redis is back.
    until(&mut events, |b| b.bet_id == during.bet_id).await;
    redis.restart();
    let mut resynced = false;
    for _ in 0..200 {
        let event = next(&mut events).await;
        if event.r#type == WatchEventType::Resync as i32 {
            resynced = true;
            break;
        }
    }
    assert!(
        resynced,
        "the hub resynchronised its streams after re-subscribing"
    );
    let after = app.place_ok(1, "rr", pb::Side::A, "3").await;
    until(&mut events, |b| b.bet_id == after.bet_id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn browsers_can_watch_over_grpc_web() {
    if std::process::Command::new("buf")
        .arg("--version")
        .output()
        .is_err()
    {
        panic!("buf is installed by deploy/local/test");
    }
    let app = TestApp::spawn().await;
    // A token that expires in two seconds ends the stream by itself.
    let token = expiring_token(1, 2);
    let url = format!(
        "http://{}/betting.v1.BettingService/WatchBets",
        app.channel_addr()
    );
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new("buf")
            .args(["curl", "--protocol", "grpcweb", "-H"])
            .arg(format!("authorization: Bearer {token}"))
            .args(["-d", "{}", &url])
            .output()
    })
    .await
    .expect("join")
    .expect("run buf curl");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stdout.contains("WATCH_EVENT_TYPE_SNAPSHOT_END"),
        "stdout: {stdout}\nstderr: {stderr}"
    );
    assert!(stderr.contains("unauthenticated"), "stderr: {stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn streams_of_one_user_share_one_read_per_change_and_their_feed_leaves_with_them() {
    let app = TestApp::spawn().await;
    let betting = app.betting().clone();
    let hub = app.hub.clone().expect("hub");
    app.deposit(1, "1000").await;
    app.open_round("shared").await;
    const STREAMS: usize = 20;
    const CHANGES: usize = 6;
    let mut streams = Vec::new();
    for _ in 0..STREAMS {
        let mut events = watch(&app, 1, vec![], "").await;
        assert!(snapshot(&mut events).await.is_empty());
        streams.push(events);
    }
    assert_eq!(betting.watched_users(), 1, "one feed for the user");
    assert_eq!(hub.stream_count(), 1, "one hub registration for the user");
    let reads_before = betting.stream_change_reads();
    let mut placed = Vec::new();
    for _ in 0..CHANGES {
        // One side only: nothing matches, each bet changes once (to PENDING).
        placed.push(app.place_ok(1, "shared", pb::Side::A, "1").await.bet_id);
    }
    for events in &mut streams {
        let mut seen = std::collections::HashSet::new();
        while seen.len() < CHANGES {
            let event = next(events).await;
            if let Some(bet) = event.bet {
                assert!(placed.contains(&bet.bet_id));
                seen.insert(bet.bet_id);
            }
        }
    }
    let reads = betting.stream_change_reads() - reads_before;
    assert!(
        (1..=(2 * CHANGES) as u64).contains(&reads),
        "{reads} reads for {CHANGES} changes to {STREAMS} streams (one each, or a few more when a note comes twice)"
    );
    drop(streams);
    eventually(
        "the user's feed leaves with their last stream",
        Duration::from_secs(10),
        async || (betting.watched_users() == 0 && hub.stream_count() == 0).then_some(()),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_get_rounds_share_one_computation_and_see_every_change() {
    let app = TestApp::spawn().await;
    let settlement = app.settlement.clone().expect("settlement");
    app.deposit(1, "1000").await;
    app.deposit(2, "1000").await;
    app.open_round("stats").await;
    app.place_ok(1, "stats", pb::Side::A, "3").await;
    // Fill the cache, then twenty callers at once: one computation at most
    // (none, while the cached totals are fresh).
    app.round("stats").await;
    let before = settlement.stats_computations();
    let calls = (0..20).map(|_| {
        let mut client = app.rounds();
        let token = app.player(9);
        async move {
            client
                .get_round(authed(
                    pb::GetRoundRequest {
                        round_id: "stats".into(),
                    },
                    &token,
                ))
                .await
                .expect("get round")
                .into_inner()
                .round
                .expect("round")
        }
    });
    let rounds = futures::future::join_all(calls).await;
    let computed = settlement.stats_computations() - before;
    assert!(
        computed <= 1,
        "{computed} computations for 20 concurrent calls"
    );
    for round in &rounds {
        let stats = round.stats.as_ref().expect("stats");
        assert_eq!(stats.pending_bets, 1);
        assert_eq!(stats.total_staked, "3");
    }
    // A change is seen by the very next call (read your writes).
    app.place_ok(2, "stats", pb::Side::B, "3").await;
    let stats = app.round("stats").await.stats.expect("stats");
    assert_eq!(stats.total_staked, "6");
    assert_eq!(stats.pending_bets + stats.matched_bets, 2);
    // And the matcher's change (made by a worker, announced like any other).
    eventually(
        "both bets are counted matched",
        Duration::from_secs(10),
        async || {
            let stats = app.round("stats").await.stats.expect("stats");
            (stats.matched_bets == 2 && stats.pending_bets == 0 && stats.matches == 1).then_some(())
        },
    )
    .await;
}

/// A stream that falls behind its feed starts over with RESYNC and a fresh
/// snapshot. A bet the client holds as in play that ended while the stream
/// lagged, longer ago than the snapshot's floor, must still reach the
/// client: the resync's snapshot lists every bet this stream sent in play,
/// not only the bets still in play (the client would hold it PENDING for
/// ever).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_resync_snapshot_settles_what_the_client_holds_in_play() {
    let url = fresh_database().await;
    let mut s = settings(&url, &std::env::var("REDIS_URL").expect("REDIS_URL"));
    // Lag, but are not cut off for it.
    s.stream_send_timeout_ms = 120_000;
    s.roles = API_ONLY.to_vec();
    let app = TestApp::spawn_with(s).await;
    app.deposit(1, "100000").await;
    app.open_round("lag").await;
    // Small HTTP/2 windows: the stream blocks on its client after a few events.
    let mut events = watch_with_small_windows(&app, 1).await;
    snapshot(&mut events).await;
    let held = app.place_ok(1, "lag", pb::Side::A, "1").await;
    until(&mut events, |b| b.bet_id == held.bet_id).await;

    // The client stops reading; its stream fills up and blocks...
    const FLOOD: usize = 250;
    for _ in 0..FLOOD {
        app.place_ok(1, "lag", pb::Side::A, "1").await;
    }
    // ...then the held bet ends, and enough changes follow to push that
    // change out of the feed's buffer.
    app.bets()
        .cancel_bet(authed(
            pb::CancelBetRequest {
                bet_id: held.bet_id.clone(),
            },
            &app.player(1),
        ))
        .await
        .expect("cancel");
    for _ in 0..FLOOD {
        app.place_ok(1, "lag", pb::Side::A, "1").await;
    }
    // Past the snapshot floor's margin and the hub's sweep window.
    tokio::time::sleep(Duration::from_secs(7)).await;

    // The client reads again: RESYNC, then a snapshot that has the held bet ended.
    let mut resynced = false;
    let mut ended = None;
    for _ in 0..(4 * FLOOD + 100) {
        let event = next(&mut events).await;
        match WatchEventType::try_from(event.r#type) {
            Ok(WatchEventType::Resync) => resynced = true,
            Ok(WatchEventType::SnapshotEnd) if resynced => break,
            _ => {}
        }
        if let Some(bet) = event.bet
            && bet.bet_id == held.bet_id
            && bet.status == pb::BetStatus::Refunded as i32
        {
            ended = Some(bet);
        }
    }
    assert!(resynced, "the lagging stream resynchronised");
    let ended = ended.expect("the held bet's refund reached the client");
    assert_eq!(
        ended.refund_reason,
        Some(pb::RefundReason::Cancelled as i32)
    );
}

/// A sweep that finds more changes than it reads (one transaction changed
/// over `MAX_SWEPT` bets, `feed.rs`) cannot tell whether a lost note is
/// among the rest, so it resynchronises every stream: the change reaches
/// the client in the snapshot that follows. Before, the sweep read the
/// first 10,000 changes of its window and nothing after them, and never
/// resynchronised.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sweep_past_its_bound_resynchronises_streams() {
    let app = TestApp::spawn().await;
    app.deposit(1, "10").await;
    app.open_round("flood").await;
    let mine = app.place_ok(1, "flood", pb::Side::A, "1").await;
    let mut events = watch(&app, 1, Vec::new(), "").await;
    let before = snapshot(&mut events).await;
    let version = before
        .iter()
        .find(|b| b.bet_id == mine.bet_id)
        .expect("the bet in the snapshot")
        .version;

    // One transaction: the player's bet changes with no note published (a
    // lost note), and 100,001 bets of other players change with it, all
    // stamped with the transaction's time.
    let mut tx = app.pool.begin().await.expect("begin");
    sqlx::query(
        "INSERT INTO bets (bet_id, user_id, idempotency_key, round_id, side, amount, status, \
           balance_after, version) \
         SELECT gen_random_uuid(), 1000 + n, 'flood', 'flood', 'B', 1, 'PENDING', 0, 1 \
         FROM generate_series(1, 100001) AS n",
    )
    .execute(&mut *tx)
    .await
    .expect("the other players' bets");
    sqlx::query("UPDATE bets SET version = version + 1, updated_at = now() WHERE bet_id = $1")
        .bind(uuid::Uuid::parse_str(&mine.bet_id).expect("bet id"))
        .execute(&mut *tx)
        .await
        .expect("the player's change");
    tx.commit().await.expect("commit");

    let resynced = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let event = next(&mut events).await;
            if WatchEventType::try_from(event.r#type) == Ok(WatchEventType::Resync) {
                return snapshot(&mut events).await;
            }
        }
    })
    .await
    .expect("the stream resynchronised");
    let after = resynced
        .iter()
        .find(|b| b.bet_id == mine.bet_id)
        .expect("the bet in the new snapshot");
    assert_eq!(after.version, version + 1, "the change reached the client");
}
