//! Least privilege (`migrations/20261124000002_roles.sql`): the services run
//! as `betting_service`, a member of `betting_app`, and that role can do what
//! the code does and nothing that would rewrite history. Every other test of
//! the suite runs its app as that role too, so "the normal paths work" is the
//! whole suite; this file checks what must fail, and that the app really is
//! the restricted role.

use betting_api::pb;
use betting_test_kit::{SERVICE_ROLE, TestApp, service_url};
use sqlx::{AssertSqlSafe, Connection, PgConnection};

/// Every table of the schema the services use.
const TABLES: &[&str] = &[
    "wallets",
    "ledger_entries",
    "wallet_refusals",
    "payout_bets",
    "rounds",
    "bets",
    "matches",
    "wallet_commands",
];

/// A connection to the app's database as the services' role.
async fn as_service(app: &TestApp) -> PgConnection {
    let url = service_url(&app.database_url);
    PgConnection::connect(&url)
        .await
        .expect("connect as the services' role")
}

/// Runs `sql` and expects PostgreSQL to refuse it for want of a privilege
/// (42501: "permission denied" or "must be owner"), not for any other reason
/// (the append-only triggers use 42501 too, so their text is excluded).
async fn refused(conn: &mut PgConnection, sql: &str) {
    let error = sqlx::query(AssertSqlSafe(sql.to_owned()))
        .execute(&mut *conn)
        .await
        .expect_err(&format!("{sql} must be refused"));
    let db = error
        .as_database_error()
        .unwrap_or_else(|| panic!("{sql}: not a database error: {error}"));
    assert_eq!(db.code().as_deref(), Some("42501"), "{sql}: {db}");
    assert!(
        db.message().contains("permission denied") || db.message().contains("must be owner"),
        "{sql} refused by something else than privileges: {db}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_services_role_cannot_rewrite_or_destroy_history() {
    let app = TestApp::spawn().await;
    // Money moved through the app: there are rows to protect.
    app.deposit(1, "100").await;
    app.open_round("r").await;
    app.place_ok(1, "r", pb::Side::A, "10").await;

    let mut conn = as_service(&app).await;
    for sql in [
        "ALTER TABLE ledger_entries DISABLE TRIGGER ledger_entries_no_update_delete",
        "ALTER TABLE ledger_entries DISABLE TRIGGER ALL",
        "DROP TRIGGER ledger_entries_no_truncate ON ledger_entries",
        "UPDATE ledger_entries SET amount = amount * 2",
        "DELETE FROM ledger_entries",
        "UPDATE wallet_refusals SET reason = 'BALANCE_LIMIT'",
        "UPDATE payout_bets SET entry_id = entry_id",
        "CREATE TABLE sneaky (id int)",
        "DROP FUNCTION ledger_entries_append_only() CASCADE",
        "DROP VIEW account_balances",
    ] {
        refused(&mut conn, sql).await;
    }
    for table in TABLES {
        refused(&mut conn, &format!("TRUNCATE {table}")).await;
        refused(&mut conn, &format!("DROP TABLE {table}")).await;
        refused(&mut conn, &format!("DELETE FROM {table}")).await;
        refused(
            &mut conn,
            &format!("ALTER TABLE {table} OWNER TO {SERVICE_ROLE}"),
        )
        .await;
        // A non-owner's GRANT is no error, only a warning that it granted
        // nothing: check it did not.
        let _ = sqlx::query(AssertSqlSafe(format!(
            "GRANT ALL ON {table} TO {SERVICE_ROLE}"
        )))
        .execute(&mut conn)
        .await;
        for privilege in ["DELETE", "TRUNCATE"] {
            let held: bool = sqlx::query_scalar("SELECT has_table_privilege($1, $2, $3)")
                .bind(SERVICE_ROLE)
                .bind(table)
                .bind(privilege)
                .fetch_one(&mut conn)
                .await
                .expect("privilege");
            assert!(!held, "{SERVICE_ROLE} holds {privilege} on {table}");
        }
    }
    // Nothing above changed the books.
    let entries: i64 = sqlx::query_scalar("SELECT count(*) FROM ledger_entries")
        .fetch_one(&app.pool)
        .await
        .expect("count");
    assert_eq!(entries, 2, "a deposit and a stake");
    app.assert_audit_clean().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_app_connects_as_the_restricted_role_which_owns_nothing() {
    let app = TestApp::spawn().await;
    app.deposit(1, "5").await;
    // The app's own connections (the pool is warm after the deposit).
    let users: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT usename::text FROM pg_stat_activity \
         WHERE datname = current_database() AND pid <> pg_backend_pid()",
    )
    .fetch_all(&app.pool)
    .await
    .expect("sessions");
    assert_eq!(users, [SERVICE_ROLE], "the app's sessions");

    let mut conn = as_service(&app).await;
    let (superuser, create_role, create_db): (bool, bool, bool) = sqlx::query_as(
        "SELECT rolsuper, rolcreaterole, rolcreatedb FROM pg_roles WHERE rolname = current_user",
    )
    .fetch_one(&mut conn)
    .await
    .expect("own role");
    assert!(!superuser && !create_role && !create_db);
    let owned: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_class c JOIN pg_roles r ON r.oid = c.relowner \
         WHERE r.rolname IN ('betting_app', 'betting_service')",
    )
    .fetch_one(&mut conn)
    .await
    .expect("owned");
    assert_eq!(owned, 0, "the services' roles own no relation");
}

/// A later migration's table (the owner creates it) gets read and append for
/// the app with no GRANT of its own, and nothing more.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tables_created_later_by_the_owner_get_the_apps_default_grants() {
    let app = TestApp::spawn().await;
    sqlx::query(
        "CREATE TABLE later_audit_trail (id BIGINT GENERATED ALWAYS AS IDENTITY, what TEXT)",
    )
    .execute(&app.pool)
    .await
    .expect("create as the owner");
    let mut conn = as_service(&app).await;
    sqlx::query("INSERT INTO later_audit_trail (what) VALUES ('x')")
        .execute(&mut conn)
        .await
        .expect("the app appends");
    let read: i64 = sqlx::query_scalar("SELECT count(*) FROM later_audit_trail")
        .fetch_one(&mut conn)
        .await
        .expect("the app reads");
    assert_eq!(read, 1);
    refused(&mut conn, "UPDATE later_audit_trail SET what = 'y'").await;
    refused(&mut conn, "DELETE FROM later_audit_trail").await;
    refused(&mut conn, "TRUNCATE later_audit_trail").await;
}

/// Roles are cluster-wide and migrations run per database, many at once in
/// the tests: the migration's role creation, run by several sessions at the
/// same moment, succeeds in every one of them (the losers catch
/// `unique_violation`/`duplicate_object`). Run on a role of its own name so
/// the suite's `betting_app` is never dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_role_creation_survives_concurrent_migrations() {
    let migration = betting_db::MIGRATOR
        .iter()
        .find(|m| m.version == 20261124000002)
        .expect("the roles migration");
    let sql = migration.sql.as_str();
    let start = sql.find("DO $$").expect("a DO block");
    let end = start + sql[start..].find("$$;").expect("its end") + "$$;".len();
    let role = format!("betting_app_race_{}", uuid::Uuid::new_v4().simple());
    let block = sql[start..end].replace("betting_app", &role);

    let app = TestApp::spawn().await;
    let mut sessions = Vec::new();
    for _ in 0..8 {
        sessions.push(
            PgConnection::connect(&app.database_url)
                .await
                .expect("connect as the owner"),
        );
    }
    // Each session opens a transaction (as sqlx runs a migration) and the
    // creations overlap: the first holds its new catalog row uncommitted
    // while the others insert theirs.
    let runs = sessions.into_iter().map(|mut conn| {
        let block = block.clone();
        tokio::spawn(async move {
            let mut tx = conn.begin().await?;
            sqlx::query(AssertSqlSafe(block)).execute(&mut *tx).await?;
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            tx.commit().await
        })
    });
    for result in futures::future::join_all(runs).await {
        result
            .expect("task")
            .expect("every concurrent creation succeeds");
    }
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_roles WHERE rolname = $1")
        .bind(&role)
        .fetch_one(&app.pool)
        .await
        .expect("count");
    assert_eq!(count, 1);
    sqlx::query(AssertSqlSafe(format!("DROP ROLE {role}")))
        .execute(&app.pool)
        .await
        .expect("drop the race's role");
}
