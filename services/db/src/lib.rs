//! PostgreSQL: the pool, the embedded migrations, and the one place that tells
//! what kind of failure a `sqlx::Error` is.
//!
//! Storage errors are classified here and turned into service errors at each
//! service's storage boundary; driver text never travels further than a log line.
//!
//! Rows are decoded into domain types as they are read: a status column into
//! its enum with `#[sqlx(try_from = "String")]`, a nullable one with
//! `#[sqlx(try_from = "betting_db::NullableText")]`. A stored value the domain
//! type refuses is a [`StoreError::Corrupt`].

#![forbid(unsafe_code)]

pub mod actions;

use std::time::Duration;

use sqlx::{
    Postgres,
    error::BoxDynError,
    migrate::Migrator,
    postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgTypeInfo, PgValueRef},
};

pub use sqlx::PgPool as Pool;

/// Every migration in `migrations/`, compiled into the binary.
pub static MIGRATOR: Migrator = sqlx::migrate!("../../migrations");

/// The status argument of a statement that moves many rows, named by id,
/// out of one status: `n` copies of `status`, for a column of the ids' rows
/// (`unnest($ids, …, $from) AS v(id, …, from_status) … WHERE t.id = v.id AND
/// t.status = v.from_status`).
///
/// Written as a constant (`AND t.status = 'PLACING'`) the condition lets
/// the planner fetch the rows through a partial index on that status
/// (`bets_placing_idx`, `bets_pending_idx`)
/// and join them to the ids. Such an index holds an entry for every row
/// that ever passed through the status until VACUUM removes it (a bitmap
/// scan never marks one dead), so the statement read them all: 12,000
/// entries and 660 buffers to move 16 bets in a 10-second benchmark, and
/// growing with the table between vacuums. Compared with a column of the
/// ids' rows, the status is a join condition, from which no partial index
/// can be chosen: the rows are found by primary key whatever the
/// statistics say (`tests/api/plans.rs`). PostgreSQL re-checks such a
/// condition, as it did the constant, on the latest version of a row that
/// changed while the statement waited for it (EvalPlanQual), against the
/// joined row the first version was paired with. So a statement moving rows
/// out of any of several statuses joins one row holding all of them
/// (`status = ANY(f.from_statuses)`, `betting_refunds::refund_bets`), never
/// a row per status: a row that moved from one of them to another meanwhile
/// would be re-checked against the first one alone and skipped
/// (`attack15_refund_from_several_statuses_...`).
pub fn from_status(n: usize, status: &'static str) -> Vec<&'static str> {
    vec![status; n]
}

/// Pool settings.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    pub max_connections: u32,
    /// How long a request waits for a connection before it is told UNAVAILABLE.
    pub acquire_timeout: Duration,
    /// Server-side guard against a runaway query holding locks.
    pub statement_timeout: Duration,
}

impl Default for PoolSettings {
    fn default() -> Self {
        Self {
            max_connections: 32,
            acquire_timeout: Duration::from_secs(3),
            statement_timeout: Duration::from_secs(10),
        }
    }
}

/// Builds a pool that connects lazily: the process starts (and reports
/// NOT_SERVING) while PostgreSQL is down, and recovers when it returns.
pub fn connect_lazy(url: &str, settings: &PoolSettings) -> Result<PgPool, sqlx::Error> {
    let options: PgConnectOptions = url.parse()?;
    let options = options.options([(
        "statement_timeout",
        settings.statement_timeout.as_millis().to_string(),
    )]);
    Ok(PgPoolOptions::new()
        .max_connections(settings.max_connections)
        .acquire_timeout(settings.acquire_timeout)
        .connect_lazy_with(options))
}

/// Begins a transaction that ends, at the latest, at the current request's
/// deadline ([`betting_deadline`]).
///
/// Inside a request, the transaction's `statement_timeout` and
/// `lock_timeout` are the time the request has left, set with `SET LOCAL` in
/// the same round trip as the `BEGIN`: a call whose client has given up does
/// not go on holding a connection, or waiting in a lock queue (a wallet row
/// held by someone else), past that moment — PostgreSQL cancels the statement
/// and the transaction rolls back. Outside a request (workers, recovery) the
/// pool's session `statement_timeout` is the only bound.
pub async fn begin(pool: &PgPool) -> Result<sqlx::Transaction<'static, Postgres>, sqlx::Error> {
    let left = betting_deadline::remaining();
    let statement = left.map(|left| {
        // A budget under 1 ms would read as "0 = no timeout".
        let ms = left.as_millis().max(1);
        // statement_timeout last: PostgreSQL (13+) times each statement of
        // a multi-statement query on its own, so a statement after it would
        // run under the new, possibly 1 ms, timeout; cancelled there, BEGIN
        // answered an error and sqlx put the connection back in the pool
        // inside the aborted transaction (every later statement on it
        // failed 25P02; attack9's test caught it under load).
        format!("BEGIN; SET LOCAL lock_timeout = {ms}; SET LOCAL statement_timeout = {ms}")
    });
    // BEGIN runs in a task of its own, which a cancelled caller cannot
    // interrupt. sqlx counts a transaction as begun only once BEGIN's answer
    // is read: a caller dropped between sending BEGIN and that answer (its
    // deadline, a client's cancel) left a pooled connection inside an open
    // transaction that nothing would ever roll back, and later autocommit
    // writes on it "succeeded" without committing. Now the task always gets
    // its `Transaction`; if the caller is gone it drops it, which rolls back.
    let pool = pool.clone();
    // Timed from the wait for a connection to BEGIN's answer.
    let begun = tokio::spawn(timed("begin", async move {
        match statement {
            None => pool.begin().await,
            Some(statement) => pool.begin_with(sqlx::AssertSqlSafe(statement)).await,
        }
    }));
    let joined = match left {
        None => begun.await,
        // Waiting for a connection counts against the deadline too.
        Some(left) => match tokio::time::timeout(left, begun).await {
            Ok(joined) => joined,
            Err(_) => return Err(sqlx::Error::PoolTimedOut),
        },
    };
    joined.unwrap_or(Err(sqlx::Error::WorkerCrashed))
}

/// Applies every pending migration.
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    MIGRATOR.run(pool).await
}

/// Whether PostgreSQL answers right now; the round trip is timed in
/// `db_query_duration_seconds{op="ping"}`, and the pool's connections
/// counted in `db_pool_connections{state}` (`in_use`, `idle`) beside the
/// pool's size, `db_pool_max_connections`.
pub async fn ping(pool: &PgPool) -> bool {
    let answered = timed("ping", sqlx::query("SELECT 1").execute(pool))
        .await
        .is_ok();
    let idle = pool.num_idle() as f64;
    let size = f64::from(pool.size());
    metrics::gauge!("db_pool_connections", "state" => "idle").set(idle);
    metrics::gauge!("db_pool_connections", "state" => "in_use").set((size - idle).max(0.0));
    metrics::gauge!("db_pool_max_connections").set(f64::from(pool.options().get_max_connections()));
    answered
}

/// Runs `call` and records how long it took in
/// `db_query_duration_seconds{op}`, whatever its outcome: the latency
/// PostgreSQL's callers see, per named operation (`op` is a fixed name,
/// never data).
pub async fn timed<F: std::future::IntoFuture>(op: &'static str, call: F) -> F::Output {
    let started = std::time::Instant::now();
    let output = call.await;
    metrics::histogram!("db_query_duration_seconds", "op" => op)
        .record(started.elapsed().as_secs_f64());
    output
}

/// What kind of failure a storage error is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The database cannot be reached or is shutting down: retry later.
    Unavailable,
    /// A unique constraint, by name.
    UniqueViolation(String),
    /// A CHECK constraint, by name.
    CheckViolation(String),
    /// A serialization failure or deadlock: the transaction may simply be retried.
    Conflict,
    /// Anything else: a bug.
    Other,
}

pub fn classify(err: &sqlx::Error) -> Failure {
    match err {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => Failure::Unavailable,
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default();
            let constraint = db.constraint().unwrap_or_default().to_owned();
            match code.as_ref() {
                "23505" => Failure::UniqueViolation(constraint),
                "23514" => Failure::CheckViolation(constraint),
                "40001" | "40P01" => Failure::Conflict,
                // 57014: a statement cancelled (its timeout, that is its
                // request's deadline, or an operator); 55P03: a lock not
                // granted within lock_timeout. Both say "busy now", not "bug".
                "57014" | "55P03" => Failure::Unavailable,
                // Class 08: connection exceptions; 57P0x: shutdown, crash
                // recovery; 53300: too many connections.
                c if c.starts_with("08") || c.starts_with("57P") || c == "53300" => {
                    Failure::Unavailable
                }
                // Refused at connect: the role may not log in (class 28) or
                // the database does not exist (3D000). The process cannot
                // reach its database, whatever the request: an outage for
                // the caller (and its operator's to fix), not a bug.
                c if c.starts_with("28") || c == "3D000" => Failure::Unavailable,
                _ => Failure::Other,
            }
        }
        _ => Failure::Other,
    }
}

/// Whether an error means "the database is not there right now".
pub fn is_unavailable(err: &sqlx::Error) -> bool {
    classify(err) == Failure::Unavailable
}

/// Serialises, inside the caller's transaction, everything that changes which
/// bets of a round are matchable: matching, closing, settling, voiding. Until
/// the transaction ends, no other of those runs for this round.
pub async fn lock_round(conn: &mut sqlx::PgConnection, round_id: &str) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('round:' || $1, 0))")
        .bind(round_id)
        .execute(conn)
        .await?;
    Ok(())
}

/// A storage failure, as the stores hand it to the services: whether to try
/// again later, or a bug. The driver's text stays inside (for logs); the
/// services' error mappings never show it to a client.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached right now (UNAVAILABLE to a client;
    /// an outage, not an attempt, to a queue job).
    #[error("database unavailable")]
    Unavailable(#[source] sqlx::Error),
    /// A stored value the code cannot hold (a status no version wrote).
    #[error("stored data is impossible: {0}")]
    Corrupt(String),
    /// Anything else the database said: a bug.
    #[error("unexpected database error")]
    Other(#[source] sqlx::Error),
}

impl StoreError {
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
}

impl betting_domain::ServiceError for StoreError {
    fn code(&self) -> betting_domain::ErrorCode {
        match self {
            StoreError::Unavailable(_) => betting_domain::ErrorCode::Unavailable,
            StoreError::Corrupt(_) | StoreError::Other(_) => betting_domain::ErrorCode::Internal,
        }
    }

    fn reason(&self) -> betting_domain::ErrorReason {
        match self {
            StoreError::Unavailable(_) => betting_domain::ErrorReason::Unavailable,
            StoreError::Corrupt(_) | StoreError::Other(_) => betting_domain::ErrorReason::Internal,
        }
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(err: sqlx::Error) -> Self {
        if is_unavailable(&err) {
            StoreError::Unavailable(err)
        } else if matches!(err, sqlx::Error::ColumnDecode { .. }) {
            // A row whose column its domain type refuses (see NullableText).
            StoreError::Corrupt(err.to_string())
        } else {
            StoreError::Other(err)
        }
    }
}

/// A nullable TEXT column on its way into an `Option` of a type that decodes
/// from text (a domain enum): `#[sqlx(try_from = "betting_db::NullableText")]`
/// on an `Option<RefundReason>` field reads NULL as `None` and refuses a word
/// the enum does not spell. (`try_from = "String"` does this for NOT NULL
/// columns.)
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NullableText(Option<String>);

impl sqlx::Type<Postgres> for NullableText {
    fn type_info() -> PgTypeInfo {
        <String as sqlx::Type<Postgres>>::type_info()
    }

    fn compatible(ty: &PgTypeInfo) -> bool {
        <String as sqlx::Type<Postgres>>::compatible(ty)
    }
}

impl<'r> sqlx::Decode<'r, Postgres> for NullableText {
    fn decode(value: PgValueRef<'r>) -> Result<Self, BoxDynError> {
        <Option<String> as sqlx::Decode<'r, Postgres>>::decode(value).map(NullableText)
    }
}

impl<T: TryFrom<String>> TryFrom<NullableText> for Option<T> {
    type Error = T::Error;

    fn try_from(text: NullableText) -> Result<Self, T::Error> {
        text.0.map(T::try_from).transpose()
    }
}

/// A bet a statement changed, as its `RETURNING user_id, bet_id, round_id,
/// version` reads: what a change note needs.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct ChangedBet {
    pub user_id: i64,
    pub bet_id: uuid::Uuid,
    pub round_id: String,
    pub version: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Stands in for a domain enum: decodes from its one spelling.
    #[derive(Debug, PartialEq, Eq)]
    struct Yes;

    impl TryFrom<String> for Yes {
        type Error = String;

        fn try_from(text: String) -> Result<Self, String> {
            if text == "YES" { Ok(Yes) } else { Err(text) }
        }
    }

    #[test]
    fn nullable_text_decodes_null_as_none_and_refuses_unknown_words() {
        assert_eq!(Option::<Yes>::try_from(NullableText(None)), Ok(None));
        assert_eq!(
            Option::<Yes>::try_from(NullableText(Some("YES".to_owned()))),
            Ok(Some(Yes))
        );
        assert_eq!(
            Option::<Yes>::try_from(NullableText(Some("NO".to_owned()))),
            Err("NO".to_owned())
        );
    }

    #[test]
    fn a_column_that_does_not_decode_is_corrupt_data() {
        let err = sqlx::Error::ColumnDecode {
            index: "\"status\"".to_owned(),
            source: "\"FOO\" is not a stored BetStatus".into(),
        };
        assert!(matches!(StoreError::from(err), StoreError::Corrupt(_)));
        assert!(matches!(
            StoreError::from(sqlx::Error::RowNotFound),
            StoreError::Other(_)
        ));
        assert!(StoreError::from(sqlx::Error::PoolTimedOut).is_unavailable());
    }
}
