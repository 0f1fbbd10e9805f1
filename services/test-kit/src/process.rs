//! Processes a test starts, and the ports they listen on. Whatever a test
//! starts is killed (SIGKILL) and reaped when its guard drops, so a failing
//! test leaves nothing running behind it.

use std::{
    io,
    ops::{Deref, DerefMut},
    path::PathBuf,
    process::{Child, Command, Stdio},
};

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// A child process that is killed and reaped when the guard drops, also
/// while a panicking test unwinds. Derefs to the [`Child`], so `kill` and
/// `wait` work on it as usual (killing an already reaped child again on drop
/// is harmless).
#[derive(Debug)]
pub struct ChildGuard(Child);

impl ChildGuard {
    pub fn spawn(command: &mut Command) -> io::Result<Self> {
        command.spawn().map(Self)
    }
}

impl From<Child> for ChildGuard {
    fn from(child: Child) -> Self {
        Self(child)
    }
}

impl Deref for ChildGuard {
    type Target = Child;

    fn deref(&self) -> &Child {
        &self.0
    }
}

impl DerefMut for ChildGuard {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        // Never panics: this may run while a failed test unwinds.
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

/// A Redis server of a test's own, for tests that stop, restart or flush it
/// without disturbing the others. Stopped and removed on drop.
pub struct TestRedis {
    port: u16,
    dir: PathBuf,
    child: Option<ChildGuard>,
}

impl TestRedis {
    /// Starts one on a free port; panics if `redis-server` cannot be run.
    pub fn start() -> Self {
        Self::try_start().expect("redis-server is installed by deploy/local/test")
    }

    /// Starts one on a free port.
    pub fn try_start() -> io::Result<Self> {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("betting-test-redis-{port}"));
        std::fs::create_dir_all(&dir)?;
        let mut redis = Self {
            port,
            dir,
            child: None,
        };
        redis.try_restart()?;
        Ok(redis)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Waits (at most `within`) until it accepts connections; whether it
    /// did. A client connecting earlier may give up for good (fred fails
    /// fast on a first connection that is refused).
    pub async fn ready(&self, within: std::time::Duration) -> bool {
        crate::poll_until(within, async || {
            tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .ok()
        })
        .await
        .is_some()
    }

    /// Kills it (SIGKILL: no chance to save anything, not that it would).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("kill redis");
            child.wait().expect("reap redis");
        }
    }

    /// Starts it again, empty, on the same port.
    pub fn restart(&mut self) {
        self.try_restart()
            .expect("redis-server is installed by deploy/local/test");
    }

    fn try_restart(&mut self) -> io::Result<()> {
        self.stop();
        let child = ChildGuard::spawn(
            Command::new("redis-server")
                .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .arg("--dir")
                .arg(&self.dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )?;
        self.child = Some(child);
        Ok(())
    }
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        // The guard kills and reaps without panicking.
        self.child.take();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
