//! A database per test, cloned from a migrated template and dropped when the
//! test ends.
//!
//! The template is named after a hash of the migrations
//! ([`betting_db::MIGRATOR`]'s versions and checksums), so a change to them
//! gets a template of its own. The first test process to need it builds it
//! under a PostgreSQL advisory lock: test processes run at once (nextest runs
//! each test in a process of its own), and the others wait on the lock, then
//! find it built. It is built under another name and renamed when complete,
//! so a process killed half-way leaves no half-migrated template behind.
//! Nobody may connect to it (`ALLOW_CONNECTIONS false`), so cloning it never
//! meets "source database is being accessed by other users"; should it
//! anyway, the clone is retried briefly.
//!
//! Each `DROP DATABASE` costs PostgreSQL (15) a checkpoint, which the other
//! tests running at once feel: on a throwaway server, which takes every
//! database with it, `BETTING_TEST_KEEP_DATABASES=1` skips the drops
//! (`deploy/local/test` sets it for the server it starts itself).
//!
//! Templates of older migrations stay on the server (another checkout may
//! still use them); a throwaway server, as `deploy/local/test` starts, takes
//! them with it, and on a long-lived one `DROP DATABASE betting_tpl_...`
//! removes one (the next test builds it again).
//!
//! The services under test connect as [`SERVICE_ROLE`], a LOGIN member of
//! the migrations' `betting_app` group (see `migrations/*_roles.sql`), so
//! the whole suite proves they need nothing more; tests themselves (their
//! checks, and the audit tests that break a database as a superuser would)
//! keep the admin URL's user. The role is cluster-wide: the first process to
//! miss it creates it, under the template's lock.

use std::{collections::HashSet, fmt, ops::Deref, sync::Mutex, time::Duration};

use anyhow::Context;
use sha2::{Digest, Sha256};
use sqlx::{Connection, PgConnection, PgPool};
use uuid::Uuid;

/// The advisory lock that serialises building the template ("betting!").
const TEMPLATE_LOCK: i64 = 0x6265_7474_696e_6721;

/// How long cloning retries while the template is in use.
const CLONE_RETRY: Duration = Duration::from_secs(10);

/// How long dropping a database may take before it is left behind.
const DROP_TIMEOUT: Duration = Duration::from_secs(30);

/// The LOGIN role the services under test connect as, a member of the
/// migrations' `betting_app`. Made here, not in a migration: a migration
/// never holds a login or its password.
pub const SERVICE_ROLE: &str = "betting_service";

/// Its password: only for test clusters (the throwaway ones trust loopback
/// and ignore it; a server that asks for passwords gets this one).
const SERVICE_PASSWORD: &str = "betting-service-test";

/// `url` (any user) with the services' role instead of its user.
pub fn service_url(url: &str) -> String {
    with_user(url, &format!("{SERVICE_ROLE}:{SERVICE_PASSWORD}"))
}

/// The admin URL's user on `url`'s database: what a test inspects (or
/// corrupts) a database with, whoever the services connect as.
pub fn owner_url(url: &str) -> String {
    database_url(&crate::admin_url(), database_of(url))
}

/// The database name of a `postgres://` URL.
fn database_of(url: &str) -> &str {
    let base = url.split_once('?').map_or(url, |(b, _)| b);
    base.rsplit_once('/').map_or("", |(_, name)| name)
}

/// `url` with `userinfo` (`user[:password]`) in place of its own.
fn with_user(url: &str, userinfo: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let host = rest.find('/').map_or(rest, |slash| &rest[..slash]);
    let tail = &rest[host.len()..];
    let host = host.rsplit_once('@').map_or(host, |(_, h)| h);
    format!("{scheme}://{userinfo}@{host}{tail}")
}

/// Creates [`SERVICE_ROLE`] unless it exists. Called under [`TEMPLATE_LOCK`],
/// after the template's migrations made `betting_app`; a racing creator
/// elsewhere (another checkout's tests) is no error.
async fn ensure_service_role(conn: &mut PgConnection) -> anyhow::Result<()> {
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1)")
            .bind(SERVICE_ROLE)
            .fetch_one(&mut *conn)
            .await?;
    if exists {
        return Ok(());
    }
    let created = execute(
        conn,
        format!(
            "CREATE ROLE {SERVICE_ROLE} LOGIN PASSWORD '{SERVICE_PASSWORD}' IN ROLE betting_app"
        ),
    )
    .await;
    match created {
        // 42710 duplicate_object, 23505 unique_violation: created meanwhile.
        Err(sqlx::Error::Database(e)) if matches!(e.code().as_deref(), Some("42710" | "23505")) => {
            Ok(())
        }
        other => Ok(other.context("create the services' role")?),
    }
}

/// The admin URL with another database name.
pub fn database_url(admin: &str, name: &str) -> String {
    let (base, query) = match admin.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (admin, None),
    };
    let prefix = match base.rfind('/') {
        Some(i) if i > "postgres://".len() => &base[..i],
        _ => base,
    };
    match query {
        Some(q) => format!("{prefix}/{name}?{q}"),
        None => format!("{prefix}/{name}"),
    }
}

/// The template's name: a hash of every migration's version and checksum.
pub fn template_name() -> String {
    let mut hash = Sha256::new();
    for migration in betting_db::MIGRATOR.iter() {
        hash.update(migration.version.to_be_bytes());
        hash.update(&*migration.checksum);
    }
    let digest = hash.finalize();
    let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("betting_tpl_{hex}")
}

/// Admin URLs on whose server this process has seen the template.
static TEMPLATES: Mutex<Option<HashSet<String>>> = Mutex::new(None);

fn known(admin: &str) -> bool {
    TEMPLATES
        .lock()
        .map(|t| t.as_ref().is_some_and(|t| t.contains(admin)))
        .unwrap_or(false)
}

fn remember(admin: &str) {
    if let Ok(mut t) = TEMPLATES.lock() {
        t.get_or_insert_default().insert(admin.to_owned());
    }
}

async fn exists(conn: &mut PgConnection, name: &str) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
        .bind(name)
        .fetch_one(conn)
        .await
}

async fn execute(conn: &mut PgConnection, sql: String) -> Result<(), sqlx::Error> {
    sqlx::query(sqlx::AssertSqlSafe(sql)).execute(conn).await?;
    Ok(())
}

/// The migrated template on the server of `admin`, built if missing; returns
/// its name.
pub async fn template(admin: &str) -> anyhow::Result<String> {
    let name = template_name();
    if known(admin) {
        return Ok(name);
    }
    let mut conn = PgConnection::connect(admin)
        .await
        .context("connect to the admin database")?;
    let role: Option<bool> = sqlx::query_scalar("SELECT true FROM pg_roles WHERE rolname = $1")
        .bind(SERVICE_ROLE)
        .fetch_optional(&mut conn)
        .await?;
    if !exists(&mut conn, &name).await? || role.is_none() {
        sqlx::query("SELECT pg_advisory_lock($1)")
            .bind(TEMPLATE_LOCK)
            .execute(&mut conn)
            .await?;
        let built = match build_template(&mut conn, admin, &name).await {
            Ok(()) => ensure_service_role(&mut conn).await,
            failed => failed,
        };
        // Also released when the connection closes, should this fail.
        let _ = sqlx::query("SELECT pg_advisory_unlock($1)")
            .bind(TEMPLATE_LOCK)
            .execute(&mut conn)
            .await;
        built?;
    }
    let _ = conn.close().await;
    remember(admin);
    Ok(name)
}

/// Under the lock: builds the template unless another process just did.
async fn build_template(conn: &mut PgConnection, admin: &str, name: &str) -> anyhow::Result<()> {
    if exists(conn, name).await? {
        return Ok(());
    }
    let building = format!("{name}_building");
    execute(
        conn,
        format!("DROP DATABASE IF EXISTS {building} WITH (FORCE)"),
    )
    .await?;
    execute(conn, format!("CREATE DATABASE {building}")).await?;
    let pool = PgPool::connect(&database_url(admin, &building)).await?;
    let migrated = betting_db::migrate(&pool).await;
    pool.close().await;
    migrated.context("migrate the template")?;
    execute(conn, format!("ALTER DATABASE {building} RENAME TO {name}")).await?;
    execute(
        conn,
        format!("ALTER DATABASE {name} WITH ALLOW_CONNECTIONS false"),
    )
    .await?;
    Ok(())
}

/// `{prefix}_{12 random hex digits}_{test}`, at most 63 bytes: the test's
/// name (libtest names the thread after it) tells whose database is whose.
fn database_name(prefix: &str) -> String {
    let random = Uuid::new_v4().simple().to_string();
    let mut name = format!("{prefix}_{}", &random[..12]);
    let thread = std::thread::current();
    let test = thread.name().unwrap_or_default();
    let test = test.rsplit("::").next().unwrap_or_default();
    if !test.is_empty() && test != "main" {
        name.push('_');
        name.extend(
            test.chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() {
                        c.to_ascii_lowercase()
                    } else {
                        '_'
                    }
                })
                .take(62 - name.len()),
        );
    }
    name
}

/// Whether test databases are left for the throwaway server to take with it.
fn keep_databases() -> bool {
    std::env::var_os("BETTING_TEST_KEEP_DATABASES").is_some_and(|v| v == "1")
}

/// A database of a test's own, cloned from the template. Derefs to its URL.
/// Dropped (`WITH (FORCE)`, whoever is still connected) when the guard
/// drops, synchronously, also while a failed test unwinds; or kept, see
/// [`TestDatabase::keep`].
pub struct TestDatabase {
    admin: String,
    name: String,
    url: String,
    dropped: bool,
}

impl TestDatabase {
    /// A database on the server of `admin`, named after `prefix`, a random
    /// part and the test that asked for it (see [`database_name`]).
    pub async fn create_in(admin: &str, prefix: &str) -> anyhow::Result<Self> {
        let template = template(admin).await?;
        let name = database_name(prefix);
        let mut conn = PgConnection::connect(admin)
            .await
            .context("connect to the admin database")?;
        let deadline = tokio::time::Instant::now() + CLONE_RETRY;
        loop {
            match execute(
                &mut conn,
                format!("CREATE DATABASE {name} TEMPLATE {template}"),
            )
            .await
            {
                Ok(()) => break,
                // 55006 object_in_use: "source database is being accessed by other users".
                Err(sqlx::Error::Database(e))
                    if e.code().as_deref() == Some("55006")
                        && tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => {
                    return Err(e).with_context(|| format!("create {name} from {template}"));
                }
            }
        }
        let _ = conn.close().await;
        Ok(Self {
            url: database_url(admin, &name),
            admin: admin.to_owned(),
            name,
            dropped: keep_databases(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Its URL for the services' role ([`SERVICE_ROLE`]).
    pub fn service_url(&self) -> String {
        service_url(&self.url)
    }

    /// Keeps the database (for inspection); returns its name.
    pub fn keep(mut self) -> String {
        self.dropped = true;
        std::mem::take(&mut self.name)
    }

    /// Drops it now, from async code, instead of on drop (unless
    /// `BETTING_TEST_KEEP_DATABASES` is set).
    pub async fn drop_database(mut self) {
        if std::mem::replace(&mut self.dropped, true) {
            return;
        }
        if let Err(error) = drop_database_retrying(&self.admin, &self.name).await {
            eprintln!("test database {} was not dropped: {error:#}", self.name);
        }
    }
}

impl Deref for TestDatabase {
    type Target = str;

    fn deref(&self) -> &str {
        &self.url
    }
}

impl fmt::Debug for TestDatabase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("TestDatabase").field(&self.name).finish()
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        if self.dropped {
            return;
        }
        // A runtime of its own on a thread of its own: this may run inside
        // the test's runtime (which must not block on itself) or outside any.
        let (admin, name) = (self.admin.clone(), self.name.clone());
        let dropped = std::thread::spawn(move || -> anyhow::Result<()> {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(async {
                    tokio::time::timeout(DROP_TIMEOUT, drop_database_retrying(&admin, &name))
                        .await
                        .context("timed out")?
                })
        })
        .join();
        // Never panics: this may run while a failed test unwinds.
        match dropped {
            Ok(Ok(())) => {}
            Ok(Err(error)) => eprintln!("test database {} was not dropped: {error:#}", self.name),
            Err(_) => eprintln!("test database {} was not dropped: panicked", self.name),
        }
    }
}

/// [`drop_database`], tried three times: a busy server may refuse a
/// connection now and then.
async fn drop_database_retrying(admin: &str, name: &str) -> anyhow::Result<()> {
    let mut attempt = 1;
    loop {
        match drop_database(admin, name).await {
            Err(error) if attempt < 3 => {
                eprintln!("dropping test database {name} failed (will retry): {error:#}");
                tokio::time::sleep(Duration::from_millis(200 * attempt)).await;
                attempt += 1;
            }
            result => return result,
        }
    }
}

/// Drops a database whose app may still be connected. `WITH (FORCE)` alone
/// would do, but it waits for the backends it terminates in steps of 100 ms;
/// refusing new connections, terminating the open ones and watching them go
/// is quicker. FORCE still deals with anything left.
async fn drop_database(admin: &str, name: &str) -> anyhow::Result<()> {
    let mut conn = PgConnection::connect(admin).await?;
    if execute(
        &mut conn,
        format!("ALTER DATABASE {name} WITH ALLOW_CONNECTIONS false"),
    )
    .await
    .is_ok()
    {
        sqlx::query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = $1 AND pid <> pg_backend_pid()",
        )
        .bind(name)
        .execute(&mut conn)
        .await?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while tokio::time::Instant::now() < deadline {
            let open: i64 =
                sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE datname = $1")
                    .bind(name)
                    .fetch_one(&mut conn)
                    .await?;
            if open == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    execute(
        &mut conn,
        format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
    )
    .await?;
    let _ = conn.close().await;
    Ok(())
}

/// A fresh, migrated database on the server of `DATABASE_URL`; derefs to
/// its URL, and is dropped with the returned guard.
pub async fn fresh_database() -> TestDatabase {
    TestDatabase::create_in(&crate::admin_url(), "test")
        .await
        .expect("create a test database")
}
