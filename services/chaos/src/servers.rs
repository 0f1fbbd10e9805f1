//! The chaos run's own PostgreSQL and Redis, which it stops and restarts.
//!
//! PostgreSQL keeps its default durability for commits
//! (`synchronous_commit = on`): a stop with `-m immediate` loses whatever
//! was in its WAL buffers, so an acknowledged commit must already be in the
//! WAL file. `fsync` is off, since the kernel's page cache survives a
//! PostgreSQL crash (only a machine crash needs fsync, and this run never
//! crashes the machine). Redis persists nothing: a restart comes back empty,
//! the worst case for the queue, which the reconciler rebuilds from
//! PostgreSQL.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::Context;

use crate::supervise::Child;

/// Where Debian installs PostgreSQL's server binaries: the newest version.
fn pg_bin() -> anyhow::Result<PathBuf> {
    let mut found: Vec<PathBuf> = fs::read_dir("/usr/lib/postgresql")
        .context("PostgreSQL's server binaries are not under /usr/lib/postgresql (apt-get install postgresql)")?
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|bin| bin.join("initdb").exists() && bin.join("pg_ctl").exists())
        .collect();
    found.sort_by_key(|bin| {
        bin.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    found
        .pop()
        .context("no initdb and pg_ctl under /usr/lib/postgresql/*/bin")
}

fn is_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|uids| uids.split_whitespace().next().map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// A command that runs as the `postgres` OS user when we are root
/// (initdb and postgres refuse to run as root).
fn as_pg(program: &Path) -> Command {
    if is_root() {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(program);
        command
    } else {
        Command::new(program)
    }
}

fn run(mut command: Command, what: &str) -> anyhow::Result<()> {
    let output = command
        .current_dir("/")
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {what}"))?;
    anyhow::ensure!(
        output.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

/// A private PostgreSQL cluster under the run's directory.
pub struct Postgres {
    bin: PathBuf,
    data: PathBuf,
    log: PathBuf,
    pub port: u16,
}

impl Postgres {
    /// initdb, then start.
    pub fn create(dir: &Path, port: u16) -> anyhow::Result<Self> {
        let bin = pg_bin()?;
        let data = dir.join("pg");
        if is_root() {
            // The postgres OS user owns the cluster and must reach it.
            if Command::new("id")
                .args(["-u", "postgres"])
                .output()
                .map(|o| !o.status.success())
                .unwrap_or(true)
            {
                let mut useradd = Command::new("useradd");
                useradd.args([
                    "--system",
                    "--user-group",
                    "--no-create-home",
                    "--shell",
                    "/usr/sbin/nologin",
                    "postgres",
                ]);
                run(useradd, "useradd postgres")?;
            }
            let mut chown = Command::new("chown");
            chown.arg("postgres:").arg(dir);
            run(chown, "chown")?;
        }
        let mut initdb = as_pg(&bin.join("initdb"));
        initdb
            .arg("-D")
            .arg(&data)
            .args(["--auth=trust", "--username=postgres", "--no-sync"]);
        run(initdb, "initdb")?;
        let pg = Self {
            bin,
            log: dir.join("pg.log"),
            data,
            port,
        };
        pg.start()?;
        Ok(pg)
    }

    pub fn start(&self) -> anyhow::Result<()> {
        let opts = format!(
            "-c listen_addresses=127.0.0.1 -c port={} -c unix_socket_directories='' \
             -c fsync=off -c full_page_writes=off -c max_connections=300",
            self.port
        );
        let mut start = as_pg(&self.bin.join("pg_ctl"));
        start
            .arg("-D")
            .arg(&self.data)
            .arg("-l")
            .arg(&self.log)
            .args(["-o", &opts, "-w", "-t", "60", "start"]);
        run(start, "pg_ctl start")
    }

    /// Stops at once, as a crash would: no checkpoint, every backend killed.
    pub fn stop_immediate(&self) -> anyhow::Result<()> {
        let mut stop = as_pg(&self.bin.join("pg_ctl"));
        stop.arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "-w", "-t", "30", "stop"]);
        run(stop, "pg_ctl stop -m immediate")
    }

    pub fn url(&self, user: &str, database: &str) -> String {
        format!("postgres://{user}@127.0.0.1:{}/{database}", self.port)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let mut stop = as_pg(&self.bin.join("pg_ctl"));
        stop.arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "-w", "-t", "30", "stop"])
            .current_dir("/")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let _ = stop.status();
    }
}

/// A private Redis that persists nothing: a restart comes back empty.
pub struct Redis {
    dir: PathBuf,
    pub port: u16,
    child: Option<Child>,
}

impl Redis {
    pub fn start(dir: &Path, port: u16) -> anyhow::Result<Self> {
        let mut redis = Self {
            dir: dir.to_owned(),
            port,
            child: None,
        };
        redis.spawn()?;
        Ok(redis)
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let mut command = Command::new("redis-server");
        command
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&self.dir);
        let child = Child::spawn(
            command,
            &self.dir.join("redis.log"),
            "redis-server (apt-get install redis-server)",
        )?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            anyhow::ensure!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        self.child = Some(child);
        Ok(())
    }

    /// An exit of Redis the run did not cause (see
    /// [`crate::supervise::Process::reap_unexpected`]); started again empty.
    pub fn reap_unexpected(&mut self) -> anyhow::Result<Option<std::process::ExitStatus>> {
        let Some(status) = self.child.as_mut().and_then(Child::exited) else {
            return Ok(None);
        };
        self.child = None;
        self.spawn()?;
        Ok(Some(status))
    }

    /// Kills Redis and starts an empty one on the same port.
    pub fn restart_empty(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill();
        }
        self.spawn()
    }
}
