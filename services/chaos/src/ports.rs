//! Ports for servers a run starts, picked so that nothing else takes them
//! between the pick and the server's bind.
//!
//! The kernel hands ports of its ephemeral range
//! (`/proc/sys/net/ipv4/ip_local_port_range`, 32768-60999 by default) to
//! every outgoing connection and to every bind of port 0. A port picked by
//! binding port 0 and handed to a server that binds it later can meanwhile
//! be taken by any client's connection: under a loaded parallel test run,
//! with thousands of connections opening, that happens. A port below the
//! range is never handed out by the kernel, so only another picker like
//! this one could take it, and a random pick among some twenty thousand
//! makes that rare; each pick is also checked free at the time.

use std::net::TcpListener;

use rand::Rng;

/// Where picks start: well above the ports services are usually given.
const FLOOR: u16 = 10_000;

/// A TCP port on 127.0.0.1 that is free right now, below the kernel's
/// ephemeral range (the kernel's own pick of port 0 if none is found).
pub fn free_port() -> std::io::Result<u16> {
    let ceiling = ephemeral_start().unwrap_or(32_768);
    if ceiling > FLOOR + 1_000 {
        let mut rng = rand::rng();
        for _ in 0..1_000 {
            let port = rng.random_range(FLOOR..ceiling);
            if TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return Ok(port);
            }
        }
    }
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The first port of the kernel's ephemeral range.
fn ephemeral_start() -> Option<u16> {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pick_is_free_and_outside_the_ephemeral_range() {
        let ceiling = ephemeral_start().unwrap_or(32_768);
        for _ in 0..50 {
            let port = free_port().expect("a port");
            assert!((FLOOR..ceiling).contains(&port), "{port}");
            // Free: a server can bind it.
            TcpListener::bind(("127.0.0.1", port)).expect("the picked port binds");
        }
    }
}
