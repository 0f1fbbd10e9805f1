//! The suite split into processes, and what the run does to them: SIGKILL,
//! SIGSTOP (then SIGCONT), SIGTERM, restart.
//!
//! Every process is `betting serve` with one role, started from this very
//! binary, each with its own gRPC port (kept across restarts, so clients and
//! the link proxies find it again) and its log under the run's directory.

use std::{
    fs::OpenOptions,
    path::{Path, PathBuf},
    process::{Command, Stdio},
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

    /// Waits up to `within` for the process to exit; whether it did.
    pub async fn exited_within(&mut self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        loop {
            if matches!(self.0.try_wait(), Ok(Some(_)) | Err(_)) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Whether it is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.0.try_wait(), Ok(None))
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

/// One process of the suite.
pub struct Process {
    pub kind: Kind,
    pub name: String,
    pub port: u16,
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
            env,
            child: None,
            stopped: false,
        }
    }

    pub fn start(&mut self) -> anyhow::Result<()> {
        if self.child.as_mut().is_some_and(Child::alive) {
            return Ok(());
        }
        let mut command = Command::new(std::env::current_exe()?);
        command
            .arg("serve")
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

    /// SIGTERM, then waits for the drain (SIGKILL after `grace`); whether
    /// it exited by itself.
    pub async fn terminate(&mut self, grace: Duration) -> bool {
        let Some(mut child) = self.child.take() else {
            return true;
        };
        if self.stopped {
            let _ = child.signal("CONT");
            self.stopped = false;
        }
        if child.signal("TERM").is_err() {
            child.kill();
            return false;
        }
        let clean = child.exited_within(grace).await;
        child.kill();
        clean
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
