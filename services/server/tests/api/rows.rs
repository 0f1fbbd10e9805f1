//! Rows written straight into a fresh database, for the tests that pin an
//! interleaving of the stores' own statements (`attack15.rs`, `attack16.rs`):
//! a round, and bets of stake 1 in a status, ordered by when they were made;
//! and the waits until a statement under test waits for the round's lock or
//! for a row another transaction holds.

use std::time::Duration;

use betting_test_kit::{TestDatabase, eventually, fresh_database};
use sqlx::{PgPool, postgres::PgPoolOptions};
use uuid::Uuid;

pub struct Db {
    _db: TestDatabase,
    pub pool: PgPool,
    pub round: &'static str,
}

/// A fresh, migrated database with one OPEN round, and a pool of
/// `connections` to it.
pub async fn db(round: &'static str, connections: u32) -> Db {
    let db = fresh_database().await;
    let pool = PgPoolOptions::new()
        .max_connections(connections)
        .connect(&db)
        .await
        .expect("connect");
    sqlx::query("INSERT INTO rounds (round_id) VALUES ($1)")
        .bind(round)
        .execute(&pool)
        .await
        .expect("round");
    Db {
        _db: db,
        pool,
        round,
    }
}

/// A bet of stake 1 in `status` (PLACING, with no balance yet, or PENDING),
/// made `nth` milliseconds into the round, so that bets are ordered by `nth`.
pub async fn bet(db: &Db, nth: i64, user: i64, side: &str, status: &str) -> Uuid {
    let id = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO bets (bet_id, user_id, idempotency_key, round_id, side, amount, status, \
           balance_after, version, created_at) \
         VALUES ($1, $2, $1::text, $3, $4, 1, $5, CASE WHEN $5 = 'PLACING' THEN NULL ELSE 0 END, \
           0, timestamptz '2026-01-01' + make_interval(secs => $6::float8 / 1000))",
    )
    .bind(id)
    .bind(user)
    .bind(db.round)
    .bind(side)
    .bind(status)
    .bind(nth)
    .execute(&db.pool)
    .await
    .expect("insert bet");
    id
}

/// Until `n` backends of this database wait for an advisory lock (the
/// round's); `pg_locks` is the whole cluster's, other tests' included.
pub async fn advisory_waiters(pool: &PgPool, n: i64) {
    eventually(
        "runs wait for the round's lock",
        Duration::from_secs(20),
        async || {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted \
                 AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            )
            .fetch_one(pool)
            .await
            .expect("pg_locks");
            (waiting == n).then_some(())
        },
    )
    .await;
}

/// Until a backend of this database waits for a row or a transaction (a
/// held row, or a unique key another transaction inserted) in a statement
/// starting with `prefix`: the statement under test has reached the held
/// row and waits for its holder.
pub async fn row_lock_waiter(pool: &PgPool, prefix: &str) {
    eventually(
        &format!("a statement starting {prefix:?} waits for a held row"),
        Duration::from_secs(20),
        async || {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE datname = current_database() AND wait_event_type = 'Lock' \
                   AND wait_event IN ('transactionid', 'tuple') \
                   AND ltrim(query) LIKE $1 || '%'",
            )
            .bind(prefix)
            .fetch_one(pool)
            .await
            .expect("pg_stat_activity");
            (waiting > 0).then_some(())
        },
    )
    .await;
}
