"""Per-VIP connection counters, driven through the facade on loopback.

Without an iptables REDIRECT the address a client dialled is the listener's local address,
so a wildcard listener reached at different 127.x addresses stands in for several VIPs (the
REDIRECT case is tests/netns/test_proxy_protocol_vip.py). The specs are built by hand because
the config rightly refuses loopback VIPs.
"""

from __future__ import annotations

import dataclasses
import socket
import tomllib

import pytest

from l4lb._testbase import EchoServer, wait_for
from l4lb.config import Address, parse_config
from l4lb.dataplane import Dataplane
from l4lb.state import ServiceSpec, desired_state, plan


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        return int(s.getsockname()[1])


def _spec(backend: str, port: int, vips: list[str]) -> dict[str, ServiceSpec]:
    text = f"""
[[services]]
name = "web"
listen = "0.0.0.0:{port}"
[[services.backends]]
address = "{backend}"
"""
    specs = desired_state(parse_config(tomllib.loads(text), source="test"))
    addrs = tuple(Address(v, port, socket.AF_INET) for v in vips)
    return {n: dataclasses.replace(s, vips=addrs) for n, s in specs.items()}


def _hello(host: str, port: int) -> None:
    with socket.create_connection((host, port), timeout=5) as c:
        c.sendall(b"hi")
        assert c.recv(2) == b"hi"


@pytest.fixture
def echo():
    with EchoServer() as server:
        yield server


def test_connections_are_counted_per_dialled_vip(echo):
    port = _free_port()
    dp = Dataplane(workers=2)
    dp.start()
    try:
        specs = _spec(echo.address, port, ["127.0.0.2", "127.0.0.3"])
        assert dp.apply(plan({}, specs)) == {}
        for host, n in (("127.0.0.2", 3), ("127.0.0.3", 1), ("127.0.0.9", 2)):
            for _ in range(n):
                _hello(host, port)
        want = {f"127.0.0.2:{port}": 3, f"127.0.0.3:{port}": 1, "other": 2}
        wait_for(lambda: dp.vip_connections("web") == want, 5)
        assert dp.service_stats("web").accepted == 6
    finally:
        dp.stop()


def test_a_vip_that_stays_keeps_its_count_when_the_list_changes(echo):
    port = _free_port()
    dp = Dataplane(workers=1)
    dp.start()
    try:
        first = _spec(echo.address, port, ["127.0.0.2", "127.0.0.3"])
        assert dp.apply(plan({}, first)) == {}
        _hello("127.0.0.2", port)
        _hello("127.0.0.3", port)
        wait_for(lambda: dp.vip_connections("web")[f"127.0.0.3:{port}"] == 1, 5)
        second = _spec(echo.address, port, ["127.0.0.4", "127.0.0.3"])
        assert dp.apply(plan(first, second)) == {}
        _hello("127.0.0.4", port)
        want = {f"127.0.0.4:{port}": 1, f"127.0.0.3:{port}": 1, "other": 0}
        wait_for(lambda: dp.vip_connections("web") == want, 5)
        assert dp.apply(plan(second, _spec(echo.address, port, []))) == {}
        assert dp.vip_connections("web") == {}
    finally:
        dp.stop()


def test_vip_list_is_validated_at_the_seam():
    from l4lb import _dataplane

    dp = _dataplane.Dataplane(1)
    dp.service_configure(0, "rr")
    with pytest.raises(ValueError, match="VIP 0"):
        dp.service_vips(0, [(socket.AF_INET, b"\x7f\x00\x00", 80)])
    with pytest.raises(ValueError, match="port"):
        dp.service_vips(0, [(socket.AF_INET6, bytes(16), 70000)])
    dp.service_vips(0, [(socket.AF_INET, b"\x7f\x00\x00\x02", 80)])
    assert dp.vip_stats(0) == ([0], 0)
