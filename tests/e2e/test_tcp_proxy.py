"""The splice data plane end to end: bytes, TCP semantics, failures, scale."""

from __future__ import annotations

import hashlib
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest

from l4lb._testbase import (
    EchoServer,
    SinkSourceServer,
    bulk_client,
    connect,
    connect_name,
    open_name,
    pattern_sha256,
    wait_for,
)

from .conftest import lb_config

MiB = 1 << 20


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _refused_address() -> tuple[socket.socket, str]:
    """A loopback port that refuses connections: bound, never listening."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    return s, f"127.0.0.1:{s.getsockname()[1]}"


def _readline(sock: socket.socket) -> bytes:
    with sock.makefile("rb") as f:
        return f.readline()


def _recv_all(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        d = sock.recv(65536)
        if not d:
            return b"".join(chunks)
        chunks.append(d)


def test_rr_sequence_is_shared_by_workers(l4lb, named_backends):
    backends = named_backends(3)
    lb = l4lb(lb_config([b.address for b in backends], workers=2))
    addr = lb.service_address("web")
    names = [connect_name(addr) for _ in range(30)]
    # IPVS order is newest first: b2, b1, b0, whatever worker accepted.
    assert names[:6] == ["b2", "b1", "b0", "b2", "b1", "b0"]
    assert Counter(names) == {"b0": 10, "b1": 10, "b2": 10}


def test_weights_are_honoured(l4lb, named_backends):
    backends = named_backends(2)
    cfg = lb_config([b.address for b in backends], service={"scheduler": "wrr"})
    cfg["services"][0]["backends"][0]["weight"] = 3
    lb = l4lb(cfg)
    names = Counter(connect_name(lb.service_address("web")) for _ in range(40))
    assert names == {"b0": 30, "b1": 10}


@pytest.mark.parametrize("workers", [1, 2])
def test_bulk_transfer_is_byte_exact(l4lb, workers):
    size = 256 * MiB
    with SinkSourceServer() as srv:
        lb = l4lb(lb_config([srv.address], workers=workers))
        res = bulk_client(lb.service_address("web"), size, size, timeout=120)
        (t,) = srv.wait_transfers(1)
    assert res.complete and res.received == size
    assert t.received == size and t.received_sha256 == res.sent_sha256
    assert res.received_sha256 == pattern_sha256(size)
    web = lb.service("web")
    assert web["backends"][0]["bytes_in"] >= size
    assert web["backends"][0]["bytes_out"] >= size


def test_backpressure_slow_client_and_slow_backend_keep_rss_bounded(l4lb):
    size = 48 * MiB
    with SinkSourceServer(read_delay=0.002, chunk=64 * 1024) as srv:
        lb = l4lb(lb_config([srv.address], workers=1))
        rss_before = _rss_kib(lb.pid)
        peak = [rss_before]
        done = threading.Event()

        def watch() -> None:
            while not done.wait(0.05):
                peak[0] = max(peak[0], _rss_kib(lb.pid))

        w = threading.Thread(target=watch)
        w.start()
        try:
            res = bulk_client(
                lb.service_address("web"),
                size,
                size,
                slow_read=0.002,
                chunk=64 * 1024,
                timeout=120,
            )
        finally:
            done.set()
            w.join()
        (t,) = srv.wait_transfers(1)
    assert res.complete and t.received_sha256 == res.sent_sha256
    assert res.received_sha256 == pattern_sha256(size)
    # 48 MiB went each way through slow readers; the proxy held at most a few pipes.
    assert peak[0] - rss_before < 8 * 1024, (rss_before, peak[0])


def test_client_half_close_reaches_backend_and_reply_still_flows(l4lb):
    with EchoServer() as echo:
        lb = l4lb(lb_config([echo.address]))
        with connect(lb.service_address("web")) as s:
            payload = os.urandom(3 * MiB)
            sender = threading.Thread(
                target=lambda: (s.sendall(payload), s.shutdown(socket.SHUT_WR))
            )
            sender.start()
            got = _recv_all(s)  # EOF arrives only after the echo server saw our FIN
            sender.join()
    assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()


def _one_shot_server(behaviour: str) -> tuple[socket.socket, str, dict[str, object]]:
    """A backend that, per connection, either resets at once ('rst'), or sends a line,
    half-closes and then reports what it still receives ('half')."""
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(16)
    seen: dict[str, object] = {}

    def run() -> None:
        c, _ = ls.accept()
        if behaviour == "rst":
            c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            c.close()
        elif behaviour == "half":
            c.sendall(b"bye\n")
            c.shutdown(socket.SHUT_WR)
            seen["data"] = _recv_all(c)
            c.close()
        else:
            try:
                seen["data"] = _recv_all(c)
            except ConnectionResetError:
                seen["reset"] = True
            c.close()
        seen["done"] = True

    threading.Thread(target=run, daemon=True).start()
    return ls, f"127.0.0.1:{ls.getsockname()[1]}", seen


def test_backend_half_close_reaches_client_and_client_can_still_send(l4lb):
    ls, addr, seen = _one_shot_server("half")
    with ls:
        lb = l4lb(lb_config([addr]))
        with connect(lb.service_address("web")) as s:
            assert _recv_all(s) == b"bye\n"  # ends with the backend's FIN
            s.sendall(b"still talking")
            s.shutdown(socket.SHUT_WR)
            wait_for(lambda: seen.get("done"), 10)
    assert seen["data"] == b"still talking"


def test_backend_reset_resets_the_client(l4lb):
    ls, addr, _ = _one_shot_server("rst")
    with ls:
        lb = l4lb(lb_config([addr]))
        # The reset can arrive before connect() even returns on loopback.
        with (
            pytest.raises((ConnectionResetError, BrokenPipeError)),
            connect(lb.service_address("web")) as s,
        ):
            s.settimeout(5)
            s.sendall(b"x")
            while s.recv(1024):
                pass


def test_client_reset_resets_the_backend(l4lb):
    ls, addr, seen = _one_shot_server("read")
    with ls:
        lb = l4lb(lb_config([addr]))
        s = connect(lb.service_address("web"))
        s.sendall(b"hello")
        wait_for(lambda: lb.service("web")["backends"][0]["bytes_in"] == 5, 10)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
        wait_for(lambda: seen.get("done"), 10)
    assert seen.get("reset") is True


def test_2000_concurrent_connections_with_two_workers(l4lb):
    n = 2000
    with EchoServer() as echo:
        lb = l4lb(lb_config([echo.address], workers=2))
        addr = lb.service_address("web")
        socks = [connect(addr, timeout=30) for _ in range(n)]
        try:
            for i, s in enumerate(socks):
                s.sendall(f"conn {i}\n".encode())
            for i, s in enumerate(socks):
                with s.makefile("rb") as f:
                    assert f.readline() == f"conn {i}\n".encode()
            assert lb.service("web")["active"] == n
        finally:
            for s in socks:
                s.close()
        wait_for(lambda: lb.service("web")["active"] == 0, 30)
    web = lb.service("web")
    assert web["total"] == n and web["backends"][0]["total"] == n


_BACKEND_SCRIPT = """
import sys, threading
from l4lb._testbase import SinkSourceServer
srv = SinkSourceServer().start()
print(srv.address, flush=True)
threading.Event().wait()
"""


def test_backend_killed_mid_transfer(l4lb, named_backends):
    proc = subprocess.Popen(
        [sys.executable, "-c", _BACKEND_SCRIPT], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        doomed = proc.stdout.readline().strip()
        (healthy,) = named_backends(1)
        cfg = lb_config([doomed])
        cfg["services"].append(
            {"name": "other", "listen": "127.0.0.1:0", "backends": [{"address": healthy.address}]}
        )
        lb = l4lb(cfg)
        result: dict[str, object] = {}

        def transfer() -> None:
            try:
                result["res"] = bulk_client(
                    lb.service_address("web"), 8, 1 << 40, slow_read=0.001, timeout=30
                )
            except OSError as e:
                result["error"] = e

        t = threading.Thread(target=transfer)
        t.start()
        wait_for(lambda: lb.service("web")["backends"][0]["bytes_out"] > MiB, 20)
        proc.kill()
        t.join(30)
        assert not t.is_alive()
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    # The client saw its connection end early (EOF or reset), not a hang.
    res = result.get("res")
    assert "error" in result or (res is not None and not res.complete)
    # And the proxy keeps serving.
    assert connect_name(lb.service_address("other")) == "b0"
    assert lb.running


def test_refused_backend_is_retried_on_the_others(l4lb, named_backends):
    live = named_backends(2)
    hole, dead = _refused_address()
    with hole:
        lb = l4lb(lb_config([live[0].address, dead, live[1].address]))
        names = [connect_name(lb.service_address("web")) for _ in range(30)]
        web = lb.service("web")
    assert set(names) == {"b0", "b1"} and len(names) == 30
    dead_stats = next(b for b in web["backends"] if b["address"] == dead)
    assert dead_stats["connect_errors"] >= 10
    assert web["failed"] == 0 and web["rejected"] == 0


def test_all_backends_refusing_resets_the_client(l4lb):
    hole, dead = _refused_address()
    with hole:
        lb = l4lb(lb_config([dead]))
        # The reset can arrive before connect() even returns on loopback.
        with (
            pytest.raises((ConnectionResetError, BrokenPipeError)),
            connect(lb.service_address("web")) as s,
        ):
            s.settimeout(10)
            s.sendall(b"x")
            while s.recv(1024):
                pass
        assert lb.service("web")["failed"] == 1


def test_sighup_changes_backends_without_breaking_established(l4lb, named_backends):
    b0, b1, b2 = named_backends(3)
    lb = l4lb(lb_config([b0.address, b1.address]))
    addr = lb.service_address("web")
    held = []
    for _ in range(2):
        s, name = open_name(addr)
        held.append((s, name))
    assert {n for _, n in held} == {"b0", "b1"}
    lb.reload(lb_config([b1.address, b2.address]))
    names = Counter(connect_name(addr) for _ in range(20))
    assert names == {"b1": 10, "b2": 10}
    for s, _ in held:  # both survive, including the one on the removed backend
        s.sendall(b"ping\n")
        assert _readline(s) == b"ping\n"
        s.close()


def test_sighup_with_a_bad_config_keeps_the_running_one(l4lb, named_backends):
    (b0,) = named_backends(1)
    lb = l4lb(lb_config([b0.address]))
    lb.reload("[[services]]\nname = 'web'\nlisten = 'nope'\n", wait=False)
    wait_for(lambda: "reload rejected" in lb.stderr_text(), 10)
    assert "services[0].listen" in lb.stderr_text()
    assert connect_name(lb.service_address("web")) == "b0"


def test_sigterm_drains_open_connections_then_exits_zero(l4lb, named_backends):
    (b0,) = named_backends(1)
    lb = l4lb(lb_config([b0.address]))
    addr = lb.service_address("web")
    s, _ = open_name(addr)
    os.kill(lb.pid, 15)
    # No new connections are accepted, the held one still works.
    wait_for(lambda: _refuses(addr), 10)
    s.sendall(b"still here\n")
    assert _readline(s) == b"still here\n"
    assert lb.running
    s.close()
    assert lb.stop(timeout=10) == 0


def test_sigterm_resets_connections_after_the_drain_timeout(l4lb, named_backends):
    (b0,) = named_backends(1)
    cfg = lb_config([b0.address])
    cfg["dataplane"]["drain_timeout"] = 0.5
    lb = l4lb(cfg)
    s, _ = open_name(lb.service_address("web"))
    started = time.monotonic()
    os.kill(lb.pid, 15)
    assert lb.stop(timeout=20) == 0
    with s, pytest.raises(ConnectionResetError):
        s.settimeout(5)
        s.sendall(b"x")
        s.recv(10)
    assert "resetting 1 open connection" in lb.stderr_text()
    assert time.monotonic() - started < 20


def _refuses(addr: str) -> bool:
    try:
        with connect(addr, timeout=1):
            return False
    except OSError:
        return True
