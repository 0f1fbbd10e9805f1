//! WatchBets resumes with cursors the stream did not just hand out: one
//! ahead of the database's clock (forged, or the clock stepped back, e.g. a
//! failover), one at the edge of what a cursor can encode. A resume keeps
//! a floor (the cursor less 5 s) under which changes of bets it has not
//! sent are skipped; a floor in the future would skip every change.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use betting_api::pb::{self, WatchEventType};
use betting_test_kit::{TestApp, authed};
use tonic::{Code, Streaming};

type Events = Streaming<pb::WatchBetsResponse>;

/// `cursor::encode`'s format: base64url, unpadded, of `c1:{micros}`.
fn cursor_at_micros(micros: i64) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let bytes = format!("c1:{micros}").into_bytes();
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        let chars = chunk.len() + 1;
        for i in 0..chars {
            out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

fn now_micros() -> i64 {
    i64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("after the epoch")
            .as_micros(),
    )
    .expect("fits")
}

async fn watch(app: &TestApp, user: i64, cursor: &str) -> Result<Events, tonic::Status> {
    app.bets()
        .watch_bets(authed(
            pb::WatchBetsRequest {
                bet_ids: vec![],
                cursor: cursor.into(),
            },
            &app.player(user),
        ))
        .await
        .map(tonic::Response::into_inner)
}

/// Events until the catch-up (or a RESYNC's snapshot) ends.
async fn until_caught_up(events: &mut Events) {
    loop {
        let event = tokio::time::timeout(Duration::from_secs(10), events.message())
            .await
            .expect("an event within 10 s")
            .expect("stream ok")
            .expect("stream open");
        if event.r#type == WatchEventType::SnapshotEnd as i32 {
            return;
        }
    }
}

/// A resume whose cursor is an hour ahead of the database's clock must
/// still hear of the bets that change from then on (or be told to
/// resynchronise): with the floor at the cursor less 5 s, every change of
/// a bet the stream has not sent (all of them, on a resume) is older than
/// the floor and skipped, and the stream stays silent until the clock
/// passes the cursor.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_resume_with_a_cursor_ahead_of_the_clock_still_sees_new_changes() {
    let app = TestApp::spawn().await;
    app.deposit(1, "100").await;
    app.open_round("ahead").await;
    let ahead = cursor_at_micros(now_micros() + 3_600_000_000);
    let mut events = watch(&app, 1, &ahead).await.expect("watch");
    until_caught_up(&mut events).await;

    let bet = app.place_ok(1, "ahead", pb::Side::A, "10").await;
    let seen = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let event = events
                .message()
                .await
                .expect("stream ok")
                .expect("stream open");
            if event.bet.as_ref().is_some_and(|b| b.bet_id == bet.bet_id) {
                return event;
            }
        }
    })
    .await;
    assert!(
        seen.is_ok(),
        "a bet placed after the resume never reached the stream"
    );
}

/// A cursor this service cannot have issued (at the very start of what
/// the timestamp type holds: the resume margin cannot be taken from it) is
/// refused as INVALID_ARGUMENT, not a panic in the stream's task.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cursor_at_the_edge_of_time_is_refused_not_a_panic() {
    let app = TestApp::spawn().await;
    // A second after chrono's DateTime::<Utc>::MIN_UTC (-262144-01-01 or
    // -262143-01-01, by version), in µs: less the margin, it overflows.
    for (i, cursor) in [
        cursor_at_micros((-8_334_632_937_600 + 1) * 1_000_000),
        cursor_at_micros((-8_334_601_315_200 + 1) * 1_000_000),
        // Before any PostgreSQL timestamp (4713 BC).
        cursor_at_micros(-300_000_000_000_000_000),
    ]
    .into_iter()
    .enumerate()
    {
        match watch(&app, 1, &cursor).await {
            Err(status) => assert_eq!(status.code(), Code::InvalidArgument, "#{i}: {status:?}"),
            Ok(mut events) => {
                let first = tokio::time::timeout(Duration::from_secs(10), events.message())
                    .await
                    .expect("an answer within 10 s");
                panic!("cursor #{i}, before any PostgreSQL time, opened a stream: {first:?}");
            }
        }
    }
}
