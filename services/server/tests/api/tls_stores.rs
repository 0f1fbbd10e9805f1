//! TLS to the stores, against real servers started by the test with
//! certificates it made: a `rediss://` Redis and a PostgreSQL with `ssl=on`.
//! Each is reached with the host name checked (fred's rediss, sqlx's
//! `sslmode=verify-full`) when we trust its CA, and refused when we trust
//! another CA; a plaintext-only PostgreSQL is refused to `sslmode=require`
//! (no silent downgrade).

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use betting_dev_certs::DevCerts;
use betting_test_kit::{ChildGuard, admin_url, free_port};

/// How long a client may take to reach a server that just started.
const REACH: Duration = Duration::from_secs(15);

/// A directory of the test's own, removed on drop.
struct Dir(PathBuf);

impl Dir {
    fn new(what: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("betting-{what}-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        Self(dir)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A redis-server that speaks TLS only, on a free port, with `certs`.
fn tls_redis(dir: &Path, certs: &DevCerts) -> (ChildGuard, u16) {
    certs.write_to(dir).expect("write certificates");
    let port = free_port();
    let child = ChildGuard::spawn(
        Command::new("redis-server")
            .args(["--port", "0", "--tls-port", &port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--tls-cert-file")
            .arg(dir.join("server.pem"))
            .arg("--tls-key-file")
            .arg(dir.join("server.key"))
            .arg("--tls-ca-cert-file")
            .arg(dir.join("ca.pem"))
            .args(["--tls-auth-clients", "no"])
            .arg("--dir")
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )
    .expect("start redis-server");
    (child, port)
}

/// Whether a client of `url` trusting `ca` answers a PING within `within`.
async fn redis_answers(url: &str, ca: Option<&[u8]>, within: Duration) -> bool {
    let client = betting_queue::connect_with(url, ca).expect("client");
    let deadline = tokio::time::Instant::now() + within;
    let answered = loop {
        if betting_queue::ping(&client).await {
            break true;
        }
        if tokio::time::Instant::now() > deadline {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let _ = fred::prelude::ClientLike::quit(&client).await;
    answered
}

#[tokio::test]
async fn rediss_is_tls_checked_against_the_configured_ca() {
    let dir = Dir::new("redis-tls");
    let certs = DevCerts::local().expect("certificates");
    let (_redis, port) = tls_redis(&dir.0, &certs);
    let url = format!("rediss://127.0.0.1:{port}");

    assert!(
        redis_answers(&url, Some(certs.ca.cert.as_bytes()), REACH).await,
        "rediss with our CA answers"
    );
    // Once that one answered the server is up: the refusals below are the
    // certificate's, not a slow start's.
    let other = DevCerts::local().expect("certificates");
    assert!(
        !redis_answers(&url, Some(other.ca.cert.as_bytes()), Duration::from_secs(2)).await,
        "a server certificate of another CA is refused"
    );
    assert!(
        !redis_answers(&url, None, Duration::from_secs(2)).await,
        "the system roots do not trust a private CA"
    );
    assert!(
        !redis_answers(
            &format!("redis://127.0.0.1:{port}"),
            None,
            Duration::from_secs(2)
        )
        .await,
        "plaintext to a TLS port is not answered"
    );
}

/// A CA given for a plaintext URL is refused, not ignored.
#[test]
fn a_redis_ca_for_a_plaintext_url_is_refused() {
    let certs = DevCerts::local().expect("certificates");
    assert!(
        betting_queue::connect_with("redis://127.0.0.1:1", Some(certs.ca.cert.as_bytes())).is_err()
    );
}

/// A PostgreSQL cluster with `ssl=on`, stopped and removed on drop.
struct TlsPostgres {
    dir: Dir,
    port: u16,
    as_root: bool,
}

impl TlsPostgres {
    fn start(certs: &DevCerts) -> Self {
        let dir = Dir::new("pg-tls");
        let as_root = Command::new("id")
            .arg("-u")
            .output()
            .map(|o| o.stdout.trim_ascii() == b"0")
            .unwrap_or(false);
        let pg = Self {
            port: free_port(),
            dir,
            as_root,
        };
        let data = pg.dir.0.join("pg");
        if as_root {
            // PostgreSQL refuses to run as root (deploy/local/lib.sh does the same).
            pg.run(Command::new("chown").arg("postgres:").arg(&pg.dir.0), false);
        }
        pg.run(
            Command::new("initdb")
                .arg("-D")
                .arg(&data)
                .args(["--auth=trust", "--username=postgres", "--no-sync"])
                .args(["--encoding=UTF8", "--locale=C"]),
            true,
        );
        // The key must belong to the server's user, mode 0600.
        certs.write_to(&data).expect("write certificates");
        if as_root {
            pg.run(
                Command::new("chown").arg("-R").arg("postgres:").arg(&data),
                false,
            );
        }
        let options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} -c ssl=on \
             -c ssl_cert_file=server.pem -c ssl_key_file=server.key -c fsync=off",
            pg.port,
            pg.dir.0.display()
        );
        pg.run(
            Command::new("pg_ctl")
                .arg("-D")
                .arg(&data)
                .args(["-o", &options, "-w", "-t", "60", "-l"])
                .arg(pg.dir.0.join("pg.log"))
                .arg("start"),
            true,
        );
        pg
    }

    /// Runs `command` (as the postgres user when we are root and `as_pg`),
    /// panicking with its output if it fails.
    fn run(&self, command: &mut Command, as_pg: bool) {
        let mut command = if self.as_root && as_pg {
            let mut runuser = Command::new("runuser");
            runuser
                .args(["-u", "postgres", "--"])
                .arg(command.get_program())
                .args(command.get_args());
            runuser
        } else {
            std::mem::replace(command, Command::new("true"))
        };
        let output = command
            .current_dir("/")
            .output()
            .expect("run a PostgreSQL tool");
        assert!(
            output.status.success(),
            "{command:?}: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    fn url(&self, query: &str) -> String {
        format!(
            "postgres://postgres@localhost:{}/postgres?{query}",
            self.port
        )
    }
}

impl Drop for TlsPostgres {
    fn drop(&mut self) {
        let data = self.dir.0.join("pg");
        let mut stop = Command::new("pg_ctl");
        stop.arg("-D").arg(&data).args(["-m", "immediate", "stop"]);
        let mut command = if self.as_root {
            let mut runuser = Command::new("runuser");
            runuser
                .args(["-u", "postgres", "--"])
                .arg("pg_ctl")
                .args(stop.get_args());
            runuser
        } else {
            stop
        };
        let _ = command.current_dir("/").output();
    }
}

/// Whether our pool reaches `url` over TLS (pg_stat_ssl says so).
async fn postgres_over_tls(url: &str) -> Result<bool, sqlx::Error> {
    let pool = betting_db::connect_lazy(url, &betting_db::PoolSettings::default())?;
    let ssl: Result<bool, sqlx::Error> =
        sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            .fetch_one(&pool)
            .await;
    pool.close().await;
    ssl
}

#[tokio::test]
async fn postgres_verify_full_reaches_a_tls_server_and_refuses_another_ca() {
    let certs = DevCerts::local().expect("certificates");
    let pg = TlsPostgres::start(&certs);
    let ca = pg.dir.0.join("pg").join("ca.pem");
    let ours = pg.url(&format!("sslmode=verify-full&sslrootcert={}", ca.display()));
    assert!(
        postgres_over_tls(&ours)
            .await
            .expect("verify-full with our CA connects"),
        "the connection is encrypted"
    );

    let other = Dir::new("pg-other-ca");
    DevCerts::local()
        .expect("certificates")
        .write_to(&other.0)
        .expect("write");
    let theirs = pg.url(&format!(
        "sslmode=verify-full&sslrootcert={}",
        other.0.join("ca.pem").display()
    ));
    postgres_over_tls(&theirs)
        .await
        .expect_err("a server certificate of another CA is refused");
}

/// The test suite's own PostgreSQL serves plaintext: `sslmode=require` must
/// fail there rather than fall back.
#[tokio::test]
async fn sslmode_require_never_falls_back_to_plaintext() {
    let admin = admin_url();
    let separator = if admin.contains('?') { '&' } else { '?' };
    let url = format!("{admin}{separator}sslmode=require");
    // Only meaningful where that server has TLS off, as deploy/local's has.
    match postgres_over_tls(&admin).await {
        Ok(false) => {
            postgres_over_tls(&url)
                .await
                .expect_err("sslmode=require is refused by a plaintext server");
        }
        other => panic!("the test PostgreSQL should serve plaintext: {other:?}"),
    }
}
