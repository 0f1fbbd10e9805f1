//! The suite split into processes, and what the run does to them: SIGKILL,
//! SIGSTOP (then SIGCONT), SIGTERM, restart.
//!
//! Every process is `betting serve` with one role, started from this very
//! binary, each with its own gRPC port (kept across restarts, so clients and
//! the link proxies find it again) and its log under the run's directory.

use std::{
    fs::OpenOptions,
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use anyhow::Context;

/// A child process, killed and reaped when dropped.
pub struct Child(std::process::Child);

impl Child {
    /// Spawns `command` with stdout and stderr appended to `log`.
    pub fn spawn(mut command: Command, log: &Path, what: &str) -> anyhow::Result<Self> {
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("cannot open {}", log.display()))?;
        let err = out.try_clone()?;
        command
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err));
        let child = command
            .spawn()
            .with_context(|| format!("cannot start {what}"))?;
        Ok(Self(child))
    }

    pub fn id(&self) -> u32 {
        self.0.id()
    }

    /// SIGKILL, and reap.
    pub fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }

    /// Sends a signal by name (`STOP`, `CONT`, `TERM`).
    pub fn signal(&self, name: &str) -> anyhow::Result<()> {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.id().to_string())
            .status()
            .context("cannot run kill")?;
        anyhow::ensure!(status.success(), "kill -{name} {} failed", self.id());
        Ok(())
    }

    /// Waits up to `within` for the process to exit; how it did, if it
    /// did (`None` also when it can no longer be waited for).
    pub async fn exited_within(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            match self.0.try_wait() {
                Ok(Some(status)) => return Some(status),
                Err(_) => return None,
                Ok(None) => {}
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Whether it is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.0.try_wait(), Ok(None))
    }

    /// How it exited, if it has (reaped: asked again, the answer stays).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.0.try_wait().ok().flatten()
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        // A stopped process must be woken to die promptly on some kernels;
        // SIGKILL works on stopped processes on Linux, so kill is enough.
        self.kill();
    }
}

/// The roles a process of the suite runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Wallet,
    Betting,
    Settlement,
    Matcher,
    Settler,
}

impl Kind {
    pub fn role(self) -> &'static str {
        match self {
            Kind::Wallet => "wallet",
            Kind::Betting => "betting",
            Kind::Settlement => "settlement",
            Kind::Matcher => "matcher",
            Kind::Settler => "settler",
        }
    }

    /// Whether it serves the API clients call (as opposed to a worker).
    pub fn is_api(self) -> bool {
        matches!(self, Kind::Wallet | Kind::Betting | Kind::Settlement)
    }
}

/// How a SIGTERM ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drain {
    /// Nothing was running.
    NotRunning,
    /// It exited by itself within the wait, so.
    Exited(ExitStatus),
    /// Still running after the wait (or it could not be signalled): SIGKILLed.
    Killed,
}

/// One process of the suite.
pub struct Process {
    pub kind: Kind,
    pub name: String,
    pub port: u16,
    /// What runs: this binary's `serve` (another command in tests).
    program: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    log: PathBuf,
    child: Option<Child>,
    stopped: bool,
}

impl Process {
    pub fn new(
        kind: Kind,
        index: usize,
        port: u16,
        env: Vec<(String, String)>,
        dir: &Path,
    ) -> Self {
        let name = format!("{}-{index}", kind.role());
        Self {
            kind,
            log: dir.join(format!("{name}.log")),
            name,
            port,
            program: std::env::current_exe().unwrap_or_else(|_| "betting".into()),
            args: vec!["serve".into()],
            env,
            child: None,
            stopped: false,
        }
    }

    pub fn start(&mut self) -> anyhow::Result<()> {
        if self.child.as_mut().is_some_and(Child::alive) {
            return Ok(());
        }
        let mut command = Command::new(&self.program);
        command
            .args(&self.args)
            .env("BETTING_ROLES", self.kind.role())
            .env("BETTING_LISTEN_ADDR", format!("127.0.0.1:{}", self.port))
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        self.child = Some(Child::spawn(command, &self.log, &self.name)?);
        self.stopped = false;
        Ok(())
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill();
        }
        self.stopped = false;
    }

    /// SIGSTOP: alive but frozen, as a process stuck in a long GC pause or
    /// a VM migration is.
    pub fn freeze(&mut self) -> anyhow::Result<()> {
        if let Some(child) = &self.child {
            child.signal("STOP")?;
            self.stopped = true;
        }
        Ok(())
    }

    /// SIGCONT.
    pub fn thaw(&mut self) -> anyhow::Result<()> {
        if let Some(child) = &self.child
            && self.stopped
        {
            child.signal("CONT")?;
        }
        self.stopped = false;
        Ok(())
    }

    /// SIGTERM, then waits up to `wait` for the drain (SIGKILL after it).
    pub async fn terminate(&mut self, wait: Duration) -> Drain {
        let Some(mut child) = self.child.take() else {
            return Drain::NotRunning;
        };
        if self.stopped {
            let _ = child.signal("CONT");
            self.stopped = false;
        }
        if child.signal("TERM").is_err() {
            child.kill();
            return Drain::Killed;
        }
        let exited = child.exited_within(wait).await;
        child.kill();
        exited.map_or(Drain::Killed, Drain::Exited)
    }

    /// An exit the run did not cause: every kill and SIGTERM of the run
    /// takes the child out of the slot first, so a child still in it that
    /// has exited did so by itself (a crash, a panic, a fatal error). Its
    /// status, once; the slot is then empty, and heal starts it again.
    pub fn reap_unexpected(&mut self) -> Option<ExitStatus> {
        let status = self.child.as_mut()?.exited()?;
        self.child = None;
        self.stopped = false;
        Some(status)
    }

    /// Whether it is running (frozen counts as running).
    pub fn alive(&mut self) -> bool {
        self.child.as_mut().is_some_and(Child::alive)
    }

    pub fn frozen(&self) -> bool {
        self.stopped
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

#[cfg(test)]
impl Process {
    fn running(program: &str, args: &[&str]) -> Self {
        let dir = std::env::temp_dir();
        let mut process = Process::new(Kind::Matcher, std::process::id() as usize, 0, vec![], &dir);
        process.program = program.into();
        process.args = args.iter().map(|a| (*a).to_owned()).collect();
        process
    }
}

/// Waits until `port` answers gRPC health as SERVING.
pub async fn wait_serving(port: u16, within: Duration) -> anyhow::Result<()> {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    let deadline = Instant::now() + within;
    let endpoint = format!("http://127.0.0.1:{port}");
    loop {
        let serving = async {
            let channel = tonic::transport::Endpoint::from_shared(endpoint.clone())?
                .connect_timeout(Duration::from_millis(500))
                .timeout(Duration::from_millis(1000))
                .connect()
                .await?;
            let status = HealthClient::new(channel)
                .check(HealthCheckRequest::default())
                .await?
                .into_inner()
                .status;
            anyhow::Ok(status == ServingStatus::Serving as i32)
        }
        .await
        .unwrap_or(false);
        if serving {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "nothing served gRPC health on port {port} within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_exit_nobody_caused_is_seen_once() {
        let mut process = Process::running("sh", &["-c", "exit 3"]);
        process.start().expect("start");
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(status) = process.reap_unexpected() {
                break status;
            }
            assert!(Instant::now() < deadline, "sh -c 'exit 3' did not exit");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!(status.code(), Some(3));
        assert!(process.reap_unexpected().is_none(), "seen twice");
        assert!(!process.alive());
    }

    #[tokio::test]
    async fn exits_the_run_caused_are_not_unexpected() {
        let mut process = Process::running("sleep", &["30"]);
        process.start().expect("start");
        process.kill();
        assert!(process.reap_unexpected().is_none());
        process.start().expect("start");
        let drain = process.terminate(Duration::from_secs(10)).await;
        assert!(
            matches!(drain, Drain::Exited(status) if status.code().is_none()),
            "{drain:?}"
        );
        assert!(process.reap_unexpected().is_none());
        assert_eq!(
            process.terminate(Duration::from_secs(1)).await,
            Drain::NotRunning
        );
    }

    #[tokio::test]
    async fn a_drain_past_the_wait_is_killed() {
        let mut process = Process::running("sh", &["-c", "trap '' TERM; sleep 30"]);
        process.start().expect("start");
        // Give the shell the moment it needs to set its trap.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let drain = process.terminate(Duration::from_millis(300)).await;
        assert_eq!(drain, Drain::Killed);
    }
}
