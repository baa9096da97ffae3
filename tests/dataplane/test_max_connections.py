"""Per-service max_connections in the data plane, driven through the facade on loopback.

The limit is one atomic count over all workers, so it holds exactly however the kernel
spreads connections over the workers' SO_REUSEPORT listeners.
"""

from __future__ import annotations

import dataclasses
import socket
import tomllib
from collections.abc import Iterator

import pytest

from l4lb._testbase import EchoServer, NamedServer, open_name, wait_for
from l4lb.config import parse_config
from l4lb.dataplane import Dataplane
from l4lb.state import ServiceSpec, desired_state, plan


def _specs(backend: str, limit: int, protocol: str = "tcp") -> dict[str, ServiceSpec]:
    text = f"""
[[services]]
name = "web"
listen = "127.0.0.1:0"
max_connections = {limit}
[[services.backends]]
address = "{backend}"
"""
    specs = desired_state(parse_config(tomllib.loads(text), source="test"))
    return {n: dataclasses.replace(s, protocol=protocol) for n, s in specs.items()}


@pytest.fixture
def dp() -> Iterator[Dataplane]:
    d = Dataplane(workers=4)
    d.start()
    yield d
    d.stop()


def _greeted(address: str) -> socket.socket | None:
    """The held connection if the backend's greeting came through, None if reset."""
    try:
        return open_name(address)[0]
    except ConnectionError:
        return None


def test_the_limit_holds_exactly_over_all_workers(dp):
    with NamedServer("b0") as b0:
        assert dp.apply(plan({}, _specs(b0.address, 5))) == {}
        la = dp.listen_address("web")
        address = f"{la.host}:{la.port}"
        results = [_greeted(address) for _ in range(12)]
        held = [s for s in results if s is not None]
        try:
            assert len(held) == 5
            st = dp.service_stats("web")
            assert (st.active, st.limit_rejected, st.accepted) == (5, 7, 12)
            assert st.rejected == 0 and st.failed == 0
        finally:
            for s in held:
                s.close()
        wait_for(lambda: dp.service_stats("web").active == 0, 10)
        again = _greeted(address)
        assert again is not None
        again.close()


def test_zero_means_unlimited(dp):
    with NamedServer("b0") as b0:
        assert dp.apply(plan({}, _specs(b0.address, 0))) == {}
        la = dp.listen_address("web")
        held = [_greeted(f"{la.host}:{la.port}") for _ in range(50)]
        try:
            assert all(s is not None for s in held)
            assert dp.service_stats("web").limit_rejected == 0
        finally:
            for s in held:
                if s is not None:
                    s.close()


class _UdpEcho:
    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"

    def answer(self, n: int) -> None:
        for _ in range(n):
            data, peer = self.sock.recvfrom(2048)
            self.sock.sendto(data, peer)


def test_udp_flows_count_against_the_limit(dp):
    echo = _UdpEcho()
    clients = []
    try:
        echo.sock.settimeout(5)
        assert dp.apply(plan({}, _specs(echo.address, 2, "udp"))) == {}
        la = dp.listen_address("web")
        for _ in range(3):
            c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            clients.append(c)
            c.settimeout(5)
        # One after the other: which of several simultaneous new flows wins is a race.
        for i, c in enumerate(clients[:2]):
            c.sendto(f"q{i}".encode(), (la.host, la.port))
            echo.answer(1)
            assert c.recv(100) == f"q{i}".encode()
        clients[2].sendto(b"q2", (la.host, la.port))
        wait_for(lambda: dp.service_stats("web").limit_rejected == 1, 5)
        echo.sock.settimeout(0.3)
        with pytest.raises(TimeoutError):  # the third flow never reached the backend
            echo.sock.recvfrom(2048)
        st = dp.service_stats("web")
        assert st.active == 2 and st.limit_rejected == 1
    finally:
        for c in clients:
            c.close()
        echo.sock.close()


def test_an_echo_through_a_limited_service_is_intact(dp):
    with EchoServer() as echo:
        assert dp.apply(plan({}, _specs(echo.address, 1))) == {}
        la = dp.listen_address("web")
        payload = bytes(range(256)) * 1024
        with socket.create_connection((la.host, la.port), timeout=10) as c:
            c.sendall(payload)
            c.shutdown(socket.SHUT_WR)
            got = b""
            while data := c.recv(65536):
                got += data
        assert got == payload
