//! Attack review 10: the group commit for PlaceBet (`placer.rs`,
//! `BetStore::insert_placing_many`, `Ledger::hold_stakes`). Each test here
//! demonstrates a finding; a failing test is a bug on the code it was
//! written against.

use std::time::Duration;

use betting_api::pb;
use betting_test_kit::{TestApp, authed, dec, fresh_database, settings};
use sqlx::{PgPool, Postgres, Transaction};
use tonic::Status;
use uuid::Uuid;

/// A PlaceBet in a task of its own, with a deadline long enough for the
/// whole schedule (the server's default is 5 s).
fn spawn_place(
    app: &TestApp,
    user: i64,
    key: &str,
) -> tokio::task::JoinHandle<Result<pb::PlaceBetResponse, Status>> {
    let bets = app.bets();
    let token = app.player(user);
    let key = key.to_owned();
    tokio::spawn(async move {
        let mut request = authed(
            pb::PlaceBetRequest {
                round_id: "r".into(),
                side: pb::Side::A as i32,
                amount: "1".into(),
                idempotency_key: key,
            },
            &token,
        );
        request.set_timeout(Duration::from_secs(30));
        bets.clone()
            .place_bet(request)
            .await
            .map(tonic::Response::into_inner)
    })
}

/// An uncommitted PLACING row for each `(user, key)`: any statement that
/// inserts one of these keys waits on this transaction (ON CONFLICT's
/// speculative insertion waits for an in-progress conflicting row).
async fn hold_keys(pool: &PgPool, keys: &[(i64, &str)]) -> Transaction<'static, Postgres> {
    let mut tx = pool.begin().await.expect("begin");
    for &(user, key) in keys {
        sqlx::query(
            "INSERT INTO bets (bet_id, user_id, idempotency_key, round_id, side, amount, status) \
             VALUES ($1, $2, $3, 'r', 'A', 1, 'PLACING')",
        )
        .bind(Uuid::now_v7())
        .bind(user)
        .bind(key)
        .execute(&mut *tx)
        .await
        .expect("hold a key");
    }
    tx
}

async fn pause(ms: u64) {
    tokio::time::sleep(Duration::from_millis(ms)).await;
}

/// Finding 1: `insert_placing_many` writes a batch's rows in request order
/// (`ORDER BY v.n`), and ON CONFLICT waits for a conflicting row another
/// statement inserted and has not committed. Two concurrent batches that
/// carry the same two keys in opposite orders (a client's retries racing
/// their originals, on one instance or two) each insert their first key and
/// wait for the other's: PostgreSQL breaks the deadlock by failing one
/// INSERT (40P01), and every PlaceBet of that batch, other players' bets
/// included, is answered INTERNAL. A lone `insert_placing` writes one row
/// per statement and can never be in such a cycle: every one of these
/// PlaceBets would have been answered as placed alone (the retries with
/// their originals).
///
/// The schedule is forced: uncommitted blockers keep every batch slot busy
/// (`PLACE_BATCH_SLOTS`) so that the next batches form exactly as wanted,
/// and one more holds one key of each batch so that both stop half-way
/// through their INSERT. The two batches run on two instances of one
/// database: an instance runs one batch at a time since `PLACE_BATCH_SLOTS`
/// became one (2026-12-08).
///
/// The racing keys are of players without a wallet row (users 1 and 2):
/// since the wallet writes the bet rows (PlaceStakes), a placement of a
/// player whose wallet row another batch holds is answered "busy" and goes
/// alone, so only a player without one (refused for want of funds, its row
/// written REJECTED without a row lock) can race its key between two
/// batches. The attack review of 2026-12-08 found that the schedule had
/// stopped reaching the cycle when PlaceStakes landed (every racing player
/// had a wallet row); this one fails with the rows written in request
/// order (`insert_bets!`'s `ORDER BY v.n`: PostgreSQL breaks the cycle, and
/// every PlaceBet of the losing batch, x included, is answered UNAVAILABLE).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn attack10_two_batches_with_the_same_keys_in_opposite_orders_deadlock() {
    let database = fresh_database().await;
    let s = settings(&database, &std::env::var("REDIS_URL").expect("REDIS_URL"));
    opposite_orders(
        TestApp::spawn_with(s.clone()).await,
        TestApp::spawn_with(s).await,
    )
    .await;
}

/// The control: the same schedule placed alone (`BETTING_PLACE_GROUP_COMMIT=false`)
/// places every bet.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn attack10_the_same_schedule_placed_alone_places_every_bet() {
    let database = fresh_database().await;
    let mut s = settings(&database, &std::env::var("REDIS_URL").expect("REDIS_URL"));
    s.place_group_commit = false;
    opposite_orders(
        TestApp::spawn_with(s.clone()).await,
        TestApp::spawn_with(s).await,
    )
    .await;
}

/// The schedule, batch 1 on `app` and batch 2 on `other` (one database).
async fn opposite_orders(app: TestApp, other: TestApp) {
    const SLOTS: usize = betting_bets::PLACE_BATCH_SLOTS;
    app.open_round("r").await;
    // The slots' bets are of users of their own (9 on), so that no slot's
    // wallet row is another's and none is answered "busy". Users 1 and 2
    // have no wallet row (see above).
    let slot_user = |instance: usize, n: usize| 9 + (instance * SLOTS + n) as i64;
    for user in [3, 4]
        .into_iter()
        .chain((0..2 * SLOTS).map(|n| 9 + n as i64))
    {
        app.deposit(user, "10").await;
    }

    // Occupy every batch slot of both instances: each blocker batch waits
    // on its key.
    let mut blockers = [Vec::new(), Vec::new()];
    let mut slot_bets = Vec::new();
    for (instance, on) in [&app, &other].into_iter().enumerate() {
        for n in 0..SLOTS {
            let key = format!("slot-{instance}-{n}");
            let user = slot_user(instance, n);
            blockers[instance].push(hold_keys(&app.pool, &[(user, &key)]).await);
            slot_bets.push(spawn_place(on, user, &key));
            pause(100).await;
        }
    }
    // The two keys each batch stops at, half-way.
    let middle = hold_keys(&app.pool, &[(3, "x"), (4, "y")]).await;

    // Batch 1: [user 1 "a", user 3 "x", user 2 "b"].
    let a = spawn_place(&app, 1, "a");
    pause(50).await;
    let x = spawn_place(&app, 3, "x");
    pause(50).await;
    let b = spawn_place(&app, 2, "b");
    pause(300).await;
    blockers[0].remove(0).rollback().await.expect("free a slot");
    // Batch 1 has written "a" (and, in key order, "b") and waits on "x".
    pause(700).await;

    // Batch 2: the same keys in the other order, [user 2 "b", user 4 "y",
    // user 1 "a"] (the retries of "a" and "b").
    let b_retry = spawn_place(&other, 2, "b");
    pause(50).await;
    let y = spawn_place(&other, 4, "y");
    pause(50).await;
    let a_retry = spawn_place(&other, 1, "a");
    pause(300).await;
    blockers[1].remove(0).rollback().await.expect("free a slot");
    // In request order, batch 2 has written "b" and waits on "y"; in key
    // order it waits on batch 1's "a".
    pause(700).await;

    // Let both go on: in request order batch 1 now needs "b" and batch 2
    // "a", a cycle; in key order batch 1 finishes and batch 2 follows.
    middle.rollback().await.expect("release x and y");
    pause(100).await;
    for blocker in blockers.into_iter().flatten() {
        blocker.rollback().await.expect("free a slot");
    }

    let mut answers = Vec::new();
    for (name, task) in [
        ("a", a),
        ("x", x),
        ("b", b),
        ("b retry", b_retry),
        ("y", y),
        ("a retry", a_retry),
    ] {
        answers.push((name, task.await.expect("task")));
    }
    for task in slot_bets {
        task.await.expect("task").expect("a slot's bet");
    }
    // What a lone placing answers each: x and y placed; a, b and their
    // retries refused for want of funds (a player without a wallet row),
    // never INTERNAL, ABORTED or UNAVAILABLE.
    let wrong: Vec<String> = answers
        .iter()
        .filter_map(|(name, answer)| {
            let right = match (*name, answer) {
                ("x" | "y", Ok(_)) => true,
                ("a" | "b" | "a retry" | "b retry", Err(s)) => {
                    s.code() == tonic::Code::FailedPrecondition
                }
                _ => false,
            };
            (!right).then(|| match answer {
                Ok(r) => format!("{name}: placed {:?}", r.bet.as_ref().map(|b| &b.bet_id)),
                Err(s) => format!("{name}: {:?} {}", s.code(), s.message()),
            })
        })
        .collect();
    assert!(
        wrong.is_empty(),
        "PlaceBets answered otherwise than a lone placing answers them: {wrong:?}"
    );
    for user in [3, 4] {
        assert_eq!(app.balance(user).await, dec("9"), "user {user}");
    }
    let rejected: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM bets WHERE user_id IN (1, 2) AND status = 'REJECTED'",
    )
    .fetch_one(&app.pool)
    .await
    .expect("count");
    assert_eq!(rejected, 2, "one REJECTED row for each of the keys a and b");
    assert_eq!(app.count_bets("PLACING").await, 0);
    app.assert_books_balanced().await;
}
