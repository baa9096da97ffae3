"""Timeouts and resource exhaustion: the proxy gives up cleanly and keeps serving."""

from __future__ import annotations

import contextlib
import os
import resource
import select
import socket
import time
from typing import Any

import pytest

from l4lb._testbase import connect, connect_name, open_name, wait_for

from .conftest import lb_config


def _blackhole() -> tuple[list[socket.socket], str]:
    """A loopback listener whose accept queue is full, so new SYNs are dropped and
    connects hang (as to a firewalled host) instead of being refused."""
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(0)
    addr = ls.getsockname()
    filler = socket.create_connection(addr, timeout=5)
    probe = socket.socket()
    probe.settimeout(0.3)
    with pytest.raises(TimeoutError):  # the queue really is full
        probe.connect(addr)
    probe.close()
    return [ls, filler], f"127.0.0.1:{addr[1]}"


def test_connect_timeout_moves_on_to_the_next_backend(l4lb, named_backends):
    (good,) = named_backends(1)
    socks, hole = _blackhole()
    try:
        lb = l4lb(lb_config([hole, good.address], service={"connect_timeout": 0.3}))
        names = [connect_name(lb.service_address("web"), timeout=10) for _ in range(4)]
        web = lb.service("web")
    finally:
        for s in socks:
            s.close()
    assert names == ["b0"] * 4
    hole_stats = next(b for b in web["backends"] if b["address"] == hole)
    assert hole_stats["connect_errors"] >= 2 and web["failed"] == 0


def test_a_client_never_hangs_beyond_the_connect_timeout(l4lb):
    socks, hole = _blackhole()
    try:
        lb = l4lb(lb_config([hole], service={"connect_timeout": 0.3}))
        with (
            connect(lb.service_address("web"), timeout=10) as s,
            pytest.raises(ConnectionResetError),
        ):
            while s.recv(100):
                pass
        assert lb.service("web")["failed"] == 1
    finally:
        for s in socks:
            s.close()


def test_idle_connections_are_closed_after_the_idle_timeout(l4lb, named_backends):
    (b0,) = named_backends(1)
    lb = l4lb(lb_config([b0.address], service={"idle_timeout": 0.3}))
    s, name = open_name(lb.service_address("web"))
    with s:
        s.settimeout(10)
        with pytest.raises(ConnectionResetError):
            while s.recv(100):
                pass
    assert name == "b0"
    wait_for(lambda: lb.service("web")["active"] == 0, 10)


def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _answered(socks: list[socket.socket], within: float) -> int:
    """How many sockets received the backend's greeting within ``within`` seconds."""
    pending = {s.fileno(): s for s in socks}
    got = 0
    deadline = time.monotonic() + within
    while pending and (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select(list(pending), [], [], left)
        for fd in ready:
            s = pending.pop(fd)
            with contextlib.suppress(OSError):
                got += s.recv(3) == b"b0\n"
    return got


def test_fd_exhaustion_backs_off_and_recovers(l4lb, named_backends):
    (b0,) = named_backends(1)
    lb = l4lb(lb_config([b0.address], workers=1))
    addr = lb.service_address("web")
    soft, hard = resource.prlimit(lb.pid, resource.RLIMIT_NOFILE)
    resource.prlimit(lb.pid, resource.RLIMIT_NOFILE, (_open_fds(lb.pid) + 24, hard))
    held = []
    try:
        # The kernel completes handshakes into the backlog even when l4lb cannot accept.
        held = [connect(addr, timeout=10) for _ in range(60)]
        ok = _answered(held, 3.0)
        for s in held:
            s.close()
    finally:
        for s in held:
            s.close()
        resource.prlimit(lb.pid, resource.RLIMIT_NOFILE, (soft, hard))
    assert 0 < ok < 60  # some got through, the rest were held back
    assert lb.running
    wait_for(lambda: lb.http_get("/healthz")[0] == 200, 20)
    metrics = lb.http_get("/metrics")[1].decode()
    errors = [line for line in metrics.splitlines() if line.startswith("l4lb_accept_errors_total")]
    assert errors and float(errors[0].split()[-1]) > 0, errors
    wait_for(lambda: lb.service("web")["active"] == 0, 20)
    assert connect_name(addr) == "b0"


def _two_services(web: str, api: str, max_connections: int) -> dict[str, Any]:
    return {
        "admin": {"listen": "127.0.0.1:0"},
        "dataplane": {"workers": 2},
        "services": [
            {
                "name": "web",
                "listen": "127.0.0.1:0",
                "max_connections": max_connections,
                "backends": [{"address": web}],
            },
            {"name": "api", "listen": "127.0.0.1:0", "backends": [{"address": api}]},
        ],
    }


def _assert_reset(address: str) -> None:
    """The connection is accepted, then reset at once: no greeting from the backend (the
    timeout only bounds a wrong outcome). On loopback the reset may already surface in
    connect()."""
    with pytest.raises(ConnectionResetError), connect(address, timeout=5) as s:
        while s.recv(100):
            pass


def _try_name(address: str) -> tuple[socket.socket, str] | None:
    try:
        return open_name(address)
    except ConnectionError:  # reset by the limit
        return None


def _limit_sample(metrics: str, service: str) -> float | None:
    prefix = f'l4lb_service_limit_rejected_total{{service="{service}"}}'
    for line in metrics.splitlines():
        if line.startswith(prefix):
            return float(line.split()[-1])
    return None


def test_max_connections_refuses_at_the_limit_and_counts_it(l4lb, named_backends):
    b0, b1 = named_backends(2)
    lb = l4lb(_two_services(b0.address, b1.address, 3))
    web, api = lb.service_address("web"), lb.service_address("api")
    held = [open_name(web)[0] for _ in range(3)]  # over both workers: the limit is global
    try:
        for _ in range(4):
            _assert_reset(web)
        svc = lb.service("web")
        assert svc["limit_rejected"] == 4 and svc["active"] == 3
        assert svc["rejected"] == 0 and svc["failed"] == 0
        assert b0.accepted == 3  # refused clients never reached the backend
        # The other service is not limited by web's limit.
        others = [open_name(api) for _ in range(5)]
        assert [name for _, name in others] == ["b1"] * 5
        for s, _ in others:
            s.close()
        assert lb.service("api")["limit_rejected"] == 0
        metrics = lb.http_get("/metrics")[1].decode()
        assert _limit_sample(metrics, "web") == 4.0
        assert _limit_sample(metrics, "api") == 0.0
        # Closing some makes room again.
        for s in held[:2]:
            s.close()
        wait_for(lambda: lb.service("web")["active"] == 1, 10)
        again = [open_name(web) for _ in range(2)]
        assert [name for _, name in again] == ["b0", "b0"]
        held += [s for s, _ in again]
        _assert_reset(web)
        assert lb.service("web")["limit_rejected"] == 5
    finally:
        for s in held:
            s.close()


def test_max_connections_can_be_changed_by_a_reload(l4lb, named_backends):
    b0, b1 = named_backends(2)
    lb = l4lb(_two_services(b0.address, b1.address, 1))
    web = lb.service_address("web")
    held = [open_name(web)[0]]
    try:
        _assert_reset(web)
        lb.reload(_two_services(b0.address, b1.address, 0))  # 0: unlimited
        # The API does not show the limit: wait until a second connection gets through.
        refused: list[None] = []

        def attempt() -> tuple[socket.socket, str] | None:
            got = _try_name(web)
            if got is None:
                refused.append(None)
            return got

        first = wait_for(attempt, 10, interval=0.1)
        more = [first, *(open_name(web) for _ in range(4))]
        held += [s for s, _ in more]
        assert [name for _, name in more] == ["b0"] * 5
        assert lb.service("web")["limit_rejected"] == 1 + len(refused)
    finally:
        for s in held:
            s.close()
