"""Ports for services that tests start on a fixed port.

A port from bind(("127.0.0.1", 0)) comes from the ephemeral range, and is free only until someone else
takes it: a service that binds its configured port late (the inference service binds after its engine
has started, seconds later) can find it handed in the meantime to vLLM's own sockets, another service's
port 0 or a client's outgoing connection. Ports below the ephemeral range are never handed out that
way, so a port picked there stays free until the service binds it; each is given out once per session.
"""

from __future__ import annotations

import random
import socket
import threading
from pathlib import Path

_given: set[int] = set()
_lock = threading.Lock()


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A loopback TCP port below the ephemeral range, bindable now and not given out before."""
    high = min(_ephemeral_low(), 65536) - 1
    low = max(1024, high - 12000)
    with _lock:
        for _ in range(1000):
            port = random.randint(low, high)
            if port in _given:
                continue
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
            _given.add(port)
            return port
    raise RuntimeError(f"no free port in {low}..{high}")
