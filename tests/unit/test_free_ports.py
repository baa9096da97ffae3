"""Port-0 listeners get a free port from a cursor, never one another socket holds."""

from __future__ import annotations

import socket

from l4lb import dataplane
from l4lb.config import Address
from l4lb.dataplane import _bind_listeners, _FreePorts

ANY_PORT = Address("127.0.0.1", 0, socket.AF_INET)


def reuseport_listener() -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


def test_a_held_port_is_skipped_even_when_it_could_be_shared() -> None:
    held = reuseport_listener()
    try:
        port = held.getsockname()[1]
        ports = _FreePorts()
        low, high = ports._ephemeral()
        ports._next = port
        found = ports.find(ANY_PORT, socket.SOCK_STREAM)
        assert found != port and low <= found <= high
        # The data plane's binding goes through the same check.
        dataplane._free_ports._next = port
        socks = _bind_listeners(ANY_PORT, 2)
        try:
            bound = {s.getsockname()[1] for s in socks}
            assert len(bound) == 1 and port not in bound
        finally:
            for s in socks:
                s.close()
    finally:
        held.close()


def test_consecutive_listeners_get_distinct_ports() -> None:
    groups = [_bind_listeners(ANY_PORT, 1) for _ in range(50)]
    try:
        assert len({g[0].getsockname()[1] for g in groups}) == 50
    finally:
        for g in groups:
            g[0].close()


def test_udp_ports_are_probed_with_udp() -> None:
    taken = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    taken.bind(("127.0.0.1", 0))
    try:
        ports = _FreePorts()
        ports._ephemeral()
        ports._next = taken.getsockname()[1]
        assert ports.find(ANY_PORT, socket.SOCK_DGRAM) != taken.getsockname()[1]
    finally:
        taken.close()
