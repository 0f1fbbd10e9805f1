//! Processes a test starts, and the ports they listen on. Whatever a test
//! starts is killed (SIGKILL) and reaped when its guard drops, so a failing
//! test leaves nothing running behind it.

use std::{
    io::{self, Read, Write},
    net::TcpStream,
    ops::{Deref, DerefMut},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// A free TCP port on loopback, below the kernel's ephemeral range, so
/// that no client's connection takes it before the server given it binds
/// (`betting_chaos::ports`).
pub fn free_port() -> u16 {
    betting_chaos::ports::free_port().expect("a free port")
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
///
/// Starting returns once this very server answers on its port (its
/// `process_id` is the child's): a client that connected earlier could give
/// up for good (fred fails fast on a refused first connection), and a port
/// taken meanwhile by someone else's server is detected and another one
/// tried.
pub struct TestRedis {
    port: u16,
    dir: PathBuf,
    child: Option<ChildGuard>,
}

/// How long a redis-server may take to answer after it was started.
const REDIS_START: Duration = Duration::from_secs(10);

impl TestRedis {
    /// Starts one on a free port; panics if that fails.
    pub fn start() -> Self {
        Self::try_start().expect("start redis-server (deploy/local/test installs it)")
    }

    /// Starts one on a free port.
    pub fn try_start() -> io::Result<Self> {
        let mut attempt = 1;
        loop {
            let port = free_port();
            let dir = std::env::temp_dir().join(format!("betting-test-redis-{port}"));
            std::fs::create_dir_all(&dir)?;
            let mut redis = Self {
                port,
                dir,
                child: None,
            };
            match redis.try_restart() {
                Ok(()) => return Ok(redis),
                // The port was taken between picking and binding it: another.
                Err(error) if attempt < 5 && error.kind() == io::ErrorKind::AddrInUse => {
                    attempt += 1;
                }
                Err(error) => return Err(error),
            }
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills it (SIGKILL: no chance to save anything, not that it would).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("kill redis");
            child.wait().expect("reap redis");
        }
    }

    /// Starts it again, empty, on the same port; returns once it answers.
    pub fn restart(&mut self) {
        self.try_restart().expect("restart redis-server");
    }

    fn try_restart(&mut self) -> io::Result<()> {
        self.stop();
        let mut child = ChildGuard::spawn(
            Command::new("redis-server")
                .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .arg("--dir")
                .arg(&self.dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )?;
        wait_until_serving(&mut child, self.port)?;
        self.child = Some(child);
        Ok(())
    }
}

/// Waits until the redis-server `child` answers on `port`. An error of kind
/// `AddrInUse` if it exited (it could not bind the port) or another server
/// answers there.
fn wait_until_serving(child: &mut ChildGuard, port: u16) -> io::Result<()> {
    let pid = child.id();
    let taken = |why: String| io::Error::new(io::ErrorKind::AddrInUse, why);
    let deadline = Instant::now() + REDIS_START;
    loop {
        if let Some(status) = child.try_wait()? {
            return Err(taken(format!(
                "redis-server on port {port} exited at once ({status}): the port is taken?"
            )));
        }
        if let Some(serving) = process_id(port) {
            return if serving == pid {
                Ok(())
            } else {
                Err(taken(format!(
                    "port {port} is served by process {serving}, not by our redis-server {pid}"
                )))
            };
        }
        if Instant::now() >= deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("redis-server on port {port} did not answer within {REDIS_START:?}"),
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The `process_id` of the Redis answering on `port`, if one does.
fn process_id(port: u16) -> Option<u32> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
    stream.write_all(b"INFO server\r\n").ok()?;
    let mut reply = Vec::new();
    let mut buffer = [0_u8; 4096];
    while !reply.windows(11).any(|w| w == b"process_id:") || !reply.ends_with(b"\r\n") {
        let n = stream.read(&mut buffer).ok()?;
        if n == 0 {
            break;
        }
        reply.extend_from_slice(&buffer[..n]);
    }
    let text = String::from_utf8_lossy(&reply);
    let line = text.lines().find_map(|l| l.strip_prefix("process_id:"))?;
    line.trim().parse().ok()
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        // The guard kills and reaps without panicking.
        self.child.take();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
