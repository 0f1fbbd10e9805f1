"""A TCP port on 127.0.0.1 that is free right now, below the kernel's
ephemeral range, so that no client's outgoing connection takes it before the
server given it binds (services/chaos/src/ports.rs, the same rule in Rust).
Run as a script, it prints one."""

import random
import socket

FLOOR = 10_000


def _ephemeral_start():
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768


def _binds(port):
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_port():
    ceiling = _ephemeral_start()
    if ceiling > FLOOR + 1_000:
        for _ in range(1_000):
            port = random.randrange(FLOOR, ceiling)
            if _binds(port):
                return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    print(free_port())
