//! A fault-injecting TCP proxy: the link between the services and
//! WalletService, or Redis. It forwards bytes untouched until told to
//! delay them, to hold them (a partition: nothing gets through, nothing is
//! refused, so calls time out, possibly after their effect committed), or to
//! cut every connection it carries.

use std::{sync::Arc, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::watch,
};

/// What the link does to traffic right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Pass,
    /// Every chunk waits this long before it is forwarded.
    Delay(Duration),
    /// Nothing is forwarded (connections stay open, bytes wait).
    Hold,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct State {
    mode: Mode,
    /// Bumped to cut every open connection.
    generation: u64,
}

/// A running proxy; dropping it stops accepting (open connections end with
/// their sockets).
pub struct Link {
    pub name: &'static str,
    pub port: u16,
    state: Arc<watch::Sender<State>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Link {
    /// Listens on a free loopback port and forwards to `upstream`.
    pub async fn start(name: &'static str, upstream: u16) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let port = listener.local_addr()?.port();
        let state = Arc::new(watch::Sender::new(State {
            mode: Mode::Pass,
            generation: 0,
        }));
        let accept = tokio::spawn(accept(listener, upstream, state.clone()));
        Ok(Self {
            name,
            port,
            state,
            accept,
        })
    }

    pub fn set(&self, mode: Mode) {
        self.state.send_modify(|s| s.mode = mode);
    }

    /// Closes every connection open now (new ones are accepted).
    pub fn cut(&self) {
        self.state.send_modify(|s| s.generation += 1);
    }

    pub fn heal(&self) {
        self.set(Mode::Pass);
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

async fn accept(listener: TcpListener, upstream: u16, state: Arc<watch::Sender<State>>) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let state = state.subscribe();
        tokio::spawn(async move {
            let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)).await else {
                // The upstream is down (a killed wallet): the caller sees
                // the connection close, as it would without the proxy.
                return;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let generation = state.borrow().generation;
            let (client_read, client_write) = client.into_split();
            let (server_read, server_write) = server.into_split();
            let up = pipe(client_read, server_write, state.clone(), generation);
            let down = pipe(server_read, client_write, state, generation);
            // Either direction ending ends both: the sockets drop together.
            tokio::select! {
                () = up => {}
                () = down => {}
            }
        });
    }
}

/// Copies one direction, obeying the link's mode, until either side closes
/// or the link is cut.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut state: watch::Receiver<State>,
    generation: u64,
) {
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        let read = tokio::select! {
            read = from.read(&mut buffer) => read,
            _ = cut(&mut state, generation) => return,
        };
        let n = match read {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        // Wait out a hold, and a delay, before forwarding.
        loop {
            let mode = state.borrow().mode;
            match mode {
                Mode::Pass => break,
                Mode::Delay(delay) => {
                    tokio::select! {
                        () = tokio::time::sleep(delay) => break,
                        _ = cut(&mut state, generation) => return,
                    }
                }
                Mode::Hold => {
                    if state.changed().await.is_err() || state.borrow().generation != generation {
                        return;
                    }
                }
            }
        }
        if to.write_all(&buffer[..n]).await.is_err() {
            return;
        }
    }
}

/// Resolves once the link's generation moves past `generation` (or the
/// link is gone).
async fn cut(state: &mut watch::Receiver<State>, generation: u64) {
    loop {
        if state.borrow_and_update().generation != generation {
            return;
        }
        if state.changed().await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn echo_server() -> u16 {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buffer = [0u8; 1024];
                    while let Ok(n) = socket.read(&mut buffer).await {
                        if n == 0 || socket.write_all(&buffer[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        port
    }

    async fn round_trip(socket: &mut TcpStream, within: Duration) -> Option<Vec<u8>> {
        socket.write_all(b"ping").await.ok()?;
        let mut buffer = [0u8; 4];
        match tokio::time::timeout(within, socket.read_exact(&mut buffer)).await {
            Ok(Ok(_)) => Some(buffer.to_vec()),
            _ => None,
        }
    }

    #[tokio::test]
    async fn passes_holds_delays_and_cuts() {
        let link = Link::start("echo", echo_server().await)
            .await
            .expect("link");
        let mut socket = TcpStream::connect(("127.0.0.1", link.port))
            .await
            .expect("connect");
        assert_eq!(
            round_trip(&mut socket, Duration::from_secs(5)).await,
            Some(b"ping".to_vec())
        );

        link.set(Mode::Hold);
        assert_eq!(
            round_trip(&mut socket, Duration::from_millis(200)).await,
            None,
            "a held link forwarded bytes"
        );
        // Healing releases what waited.
        link.heal();
        let mut buffer = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(5), socket.read_exact(&mut buffer))
            .await
            .expect("released")
            .expect("read");
        assert_eq!(&buffer, b"ping");

        link.set(Mode::Delay(Duration::from_millis(150)));
        let started = std::time::Instant::now();
        assert!(
            round_trip(&mut socket, Duration::from_secs(5))
                .await
                .is_some()
        );
        assert!(started.elapsed() >= Duration::from_millis(150));
        link.heal();

        link.cut();
        let mut buffer = [0u8; 4];
        let read = tokio::time::timeout(Duration::from_secs(5), socket.read(&mut buffer))
            .await
            .expect("the cut connection should close");
        assert!(matches!(read, Ok(0) | Err(_)), "read {read:?} after a cut");
        // New connections still work.
        let mut socket = TcpStream::connect(("127.0.0.1", link.port))
            .await
            .expect("connect");
        assert!(
            round_trip(&mut socket, Duration::from_secs(5))
                .await
                .is_some()
        );
    }
}
