"""Timeouts and resource exhaustion: the proxy gives up cleanly and keeps serving."""

from __future__ import annotations

import contextlib
import os
import resource
import select
import socket
import time

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
