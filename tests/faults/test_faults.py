"""Fault cases on loopback: the real ``l4lb run`` against backends in their own processes.

Every case injects one fault while verified traffic flows, fills a :class:`FaultResult` and
checks it: connections that had a healthy path must all complete byte-exact (``lost`` is
0); those the fault broke by its nature (in flight on a backend that crashed) are counted
as ``failed`` and must be exactly the ones the fault could reach.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from l4lb._testbase import (
    SERVER_SEED,
    L4lbProcess,
    SinkSourceServer,
    bulk_client,
    connect,
    dumps_toml,
    pattern_sha256,
    wait_for,
)

from .conftest import HEALTH, backend_stats, lb_config
from .record import FaultResult
from .traffic import (
    BackendProcess,
    Load,
    Outcome,
    Session,
    exchange,
    open_fds,
    recovery_time,
    run_exchanges,
)

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]
Fault = Callable[..., FaultResult]
Start = Callable[..., L4lbProcess]


def _named(outcomes: Sequence[Outcome], name: str) -> list[Outcome]:
    """Outcomes with those that reached no named backend attributed to ``name``."""
    return [o if o.backend else dataclasses.replace(o, backend=name) for o in outcomes]


def _fds_back(lb: L4lbProcess, baseline: int) -> None:
    # A few descriptors may come and go (admin keep-alive, health probes): allow a small slack.
    wait_for(lambda: open_fds(lb.pid) <= baseline + 4, 15, message="descriptors back")


def test_backend_crash_mid_stream(l4lb: Start, fault: Fault) -> None:
    r = fault(
        "backend crash mid-stream",
        "SIGKILL one of 2 backend processes with 20 x 1 MiB echo sessions and load in flight",
        "sessions on the survivor complete; new connections retried; health marks it down",
    )
    with BackendProcess("a") as a, BackendProcess("b") as b:
        lb = l4lb(lb_config([a.address, b.address], retries=2, health=HEALTH))
        addr = lb.service_address("web")
        sessions = [Session(addr, 1 << 20) for _ in range(20)]
        with Load(addr, threads=4) as load:
            load.wait_count(40)
            killed = time.monotonic()
            a.kill()
            dead = time.monotonic()
            wait_for(lambda: not backend_stats(lb, a.address)["up"], 10, message="a marked down")
            detected = time.monotonic()
            load.wait_count(200)
        outcomes = [s.finish() for s in sessions]
    assert {s.backend for s in sessions} == {"a", "b"}
    r.count(outcomes, broken=frozenset({"a"}))
    r.count(load.tally.outcomes, broken=frozenset({"a"}), fault_at=[(killed, dead)])
    r.recover_s, r.recovery = detected - killed, "until marked down"
    r.check(min_completed=200, max_failed=30)


def test_backend_accepts_and_never_answers(l4lb: Start, fault: Fault) -> None:
    r = fault(
        "backend accepts, never answers",
        "one of 2 backends completes handshakes and never reads or writes",
        "its clients are cut at idle_timeout (1 s), never hang; the other backend's all complete",
    )
    with BackendProcess("good") as good, BackendProcess("mute", "silent") as mute:
        lb = l4lb(lb_config([good.address, mute.address], idle_timeout=1.0))
        tally = run_exchanges(lb.service_address("web"), 120, concurrency=24, timeout=10.0)
        on_mute = backend_stats(lb, mute.address)["total"]
    hung = [o for o in tally.failures if o.error and "timed out" in o.error]
    assert not hung, f"{len(hung)} client(s) hung past the idle timeout"
    # A connection that never got a name was on the mute backend; the admin API's count of
    # its connections checks that.
    r.count(_named(tally.outcomes, "mute"), broken=frozenset({"mute"}))
    assert r.failed == on_mute, (r.failed, on_mute)
    r.check(min_completed=40)


def test_backend_reset_storm(l4lb: Start, fault: Fault) -> None:
    r = fault(
        "backend reset storm",
        "one of 2 backends accepts and resets every connection (SO_LINGER 0)",
        "only connections it took fail; the other's complete; no descriptor leaks",
    )
    with BackendProcess("good") as good, BackendProcess("rst", "reset") as rst:
        lb = l4lb(lb_config([good.address, rst.address]))
        baseline = open_fds(lb.pid)
        tally = run_exchanges(lb.service_address("web"), 600, concurrency=32)
        on_rst = backend_stats(lb, rst.address)["total"]
        wait_for(lambda: lb.service("web")["active"] == 0, 10, message="no active connections")
        _fds_back(lb, baseline)
    r.count(_named(tally.outcomes, "rst"), broken=frozenset({"rst"}))
    # A reset that arrives before the first byte is retried like a failed connect.
    assert 0 < r.failed <= on_rst, (r.failed, on_rst)
    r.notes.append(f"{on_rst} connections reached the resetting backend")
    r.check(min_completed=250)


_VANISHING_CLIENT = r"""
import socket, sys
addr, n = sys.argv[1], int(sys.argv[2])
host, port = addr.rsplit(":", 1)
socks = []
for _ in range(n):
    s = socket.create_connection((host, int(port)), timeout=10)
    s.recv(64)                       # the backend's name: the connection is through
    s.sendall(b"x" * 65536)          # mid-transfer: echo on its way back, unread
    socks.append(s)
print("ready", flush=True)
sys.stdin.readline()
"""


def test_client_vanishes_mid_transfer(l4lb: Start, fault: Fault) -> None:
    r = fault(
        "clients vanish",
        "a client process with 500 connections mid-transfer is SIGKILLed",
        "l4lb closes both sides of all 500; concurrent load unaffected; descriptors back",
    )
    with BackendProcess("b") as b:
        lb = l4lb(lb_config([b.address]))
        addr = lb.service_address("web")
        baseline = open_fds(lb.pid)
        with Load(addr, threads=4) as load:
            client = subprocess.Popen(
                [sys.executable, "-c", _VANISHING_CLIENT, addr, "500"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            assert client.stdout is not None and client.stdout.readline() == "ready\n"
            wait_for(lambda: lb.service("web")["active"] >= 500, 10)
            killed = time.monotonic()
            client.kill()
            client.wait()
            wait_for(lambda: lb.service("web")["active"] <= 4, 15, message="dead clients closed")
            recovered = time.monotonic()
            load.wait_count(50)
        _fds_back(lb, baseline)
        for stream in (client.stdin, client.stdout):
            if stream is not None:
                stream.close()
    r.count(load.tally.outcomes)
    r.recover_s, r.recovery = recovered - killed, "until all 500 closed"
    r.notes.append("500 vanished clients are not counted as attempts")
    r.check(min_completed=50)


def test_slow_readers_and_writers(l4lb: Start, fault: Fault) -> None:
    r = fault(
        "slow readers and writers",
        "4 MiB each way: clients reading 16 KiB per 2 ms, a backend reading likewise, "
        "a client trickling 1 KiB per ms; fast transfers alongside",
        "backpressure, no loss: every transfer byte-exact",
    )
    size = 4 << 20
    results: list[Any] = []
    with SinkSourceServer(read_delay=0.002, chunk=16384) as slow_be, SinkSourceServer() as fast_be:
        cfg = lb_config([fast_be.address])
        cfg["services"].append(
            {"name": "slow", "listen": "127.0.0.1:0", "backends": [{"address": slow_be.address}]}
        )
        lb = l4lb(cfg)
        fast, slow = lb.service_address("web"), lb.service_address("slow")
        jobs: list[tuple[str, dict[str, Any]]] = [
            *[(fast, {"slow_read": 0.002, "chunk": 16384})] * 4,
            *[(slow, {})] * 2,
            *[(fast, {})] * 4,
        ]

        def run(job: tuple[str, dict[str, Any]]) -> None:
            results.append(bulk_client(job[0], size, size, timeout=60, **job[1]))

        threads = [threading.Thread(target=run, args=(j,)) for j in jobs]
        threads.append(threading.Thread(target=lambda: results.append(_trickle(fast))))
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)
        transfers = fast_be.wait_transfers(9) + slow_be.wait_transfers(2)
    want = pattern_sha256(size, SERVER_SEED)
    for res in results:
        r.attempted += 1
        if isinstance(res, Outcome):
            ok = res.ok
            r.bytes_verified += res.nbytes
        else:
            ok = res.complete and res.received_sha256 == want
            ok = ok and any(t.received_sha256 == res.sent_sha256 for t in transfers)
            if ok:
                r.bytes_verified += res.sent + res.received
        r.completed += ok
        r.lost += not ok
    r.check(min_completed=len(jobs) + 1)


def _trickle(address: str, size: int = 256 * 1024) -> Outcome:
    """An echo through ``address`` written 1 KiB per millisecond (a slow writer)."""
    payload = os.urandom(size)
    started = time.monotonic()
    with connect(address, timeout=30) as sock:
        # The "web" backend is a SinkSourceServer: ask for the payload size back.
        sock.sendall(size.to_bytes(8, "big") + size.to_bytes(8, "big"))
        for i in range(0, size, 1024):
            sock.sendall(payload[i : i + 1024])
            time.sleep(0.001)
        got = b"".join(iter(lambda: sock.recv(65536), b""))
    ok = len(got) == 8 + size and got[8:] == _pattern_bytes(size)
    return Outcome(ok, "web", 2 * size if ok else 0, started, time.monotonic())


def _pattern_bytes(size: int) -> bytes:
    from l4lb._testbase import _pattern

    return b"".join(bytes(p) for p in _pattern(SERVER_SEED, size))


def test_sighup_reloads_under_load(l4lb: Start, fault: Fault) -> None:
    r = fault(
        "SIGHUP reloads under load",
        "20 reloads adding/removing a third backend and changing weights, 8 clients running",
        "no connection fails",
    )
    with BackendProcess("a") as a, BackendProcess("b") as b, BackendProcess("c") as c:
        small = lb_config([a.address, b.address])
        lb = l4lb(small)
        # Name the bound port in the file before the load: a listen address that changes
        # (port 0 to the port it got) re-binds the listener, resetting what is queued on it.
        small["services"][0]["listen"] = lb.service_address("web")
        lb.reload(small)
        with Load(lb.service_address("web"), threads=8) as load:
            for i in range(20):
                cfg = lb_config([a.address, b.address, c.address]) if i % 2 == 0 else small
                cfg["services"][0]["backends"][0]["weight"] = 1 + i % 3
                cfg["services"][0]["listen"] = lb.service_address("web")
                lb.reload(cfg)
                load.wait_count(10)
    r.count(load.tally.outcomes)
    assert set(load.tally.by_backend()) == {"a", "b", "c"}
    r.check(min_completed=200)


def test_sigterm_under_load(l4lb: Start, fault: Fault) -> None:
    r = fault(
        "SIGTERM under load",
        "SIGTERM with 30 x 1 MiB echo sessions in flight (drain_timeout 10 s)",
        "every open session completes, then l4lb exits 0",
    )
    with BackendProcess("a") as a:
        cfg = lb_config([a.address])
        cfg["dataplane"]["drain_timeout"] = 10.0
        lb = l4lb(cfg)
        sessions = [Session(lb.service_address("web"), 1 << 20) for _ in range(30)]
        signalled = time.monotonic()
        os.kill(lb.pid, signal.SIGTERM)
        outcomes = [s.finish() for s in sessions]
        code = lb.stop(timeout=20)
        r.recover_s, r.recovery = time.monotonic() - signalled, "SIGTERM to exit"
    assert code == 0
    r.count(outcomes)
    r.check(min_completed=30)


def test_whole_process_paused_with_a_connect_burst(l4lb: Start, fault: Fault) -> None:
    r = fault(
        "l4lb paused, listen queue fills",
        "SIGSTOP l4lb for 1 s while 300 clients connect (they wait in the listen queue)",
        "after SIGCONT every queued connection is served",
    )
    with BackendProcess("a") as a:
        lb = l4lb(lb_config([a.address]))
        addr = lb.service_address("web")
        os.kill(lb.pid, signal.SIGSTOP)
        try:
            results: list[Outcome] = []
            threads = [
                threading.Thread(target=lambda: results.append(exchange(addr, timeout=20)))
                for _ in range(300)
            ]
            for t in threads:
                t.start()
            time.sleep(1.0)
        finally:
            resumed = time.monotonic()
            os.kill(lb.pid, signal.SIGCONT)
        for t in threads:
            t.join(30)
    r.count(results)
    r.recover_s = max(o.ended for o in results) - resumed
    r.recovery = "SIGCONT to the last served"
    r.check(min_completed=300)


def _full_listener() -> tuple[list[socket.socket], str]:
    """A listener whose accept queue is full: its SYNs are dropped, connects hang."""
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(0)
    filler = socket.create_connection(ls.getsockname(), timeout=5)
    return [ls, filler], f"127.0.0.1:{ls.getsockname()[1]}"


def test_backend_listen_backlog_overflow(l4lb: Start, fault: Fault) -> None:
    r = fault(
        "backend listen queue full",
        "one of 2 backends never accepts and its queue is full (SYNs dropped)",
        "connects to it time out (0.3 s) and are retried on the other: none fails",
    )
    socks, full = _full_listener()
    try:
        with BackendProcess("good") as good:
            lb = l4lb(lb_config([full, good.address], connect_timeout=0.3, retries=2))
            tally = run_exchanges(lb.service_address("web"), 100, concurrency=20)
            errors = backend_stats(lb, full)["connect_errors"]
    finally:
        for s in socks:
            s.close()
    assert errors > 0
    r.count(tally.outcomes)
    r.notes.append(f"{errors} connect timeouts retried")
    r.check(min_completed=100)


def test_descriptor_exhaustion(l4lb: Start, fault: Fault) -> None:
    r = fault(
        "descriptor exhaustion",
        "l4lb under RLIMIT_NOFILE 256; 200 connections opened and held",
        "connections beyond the limit wait or are refused; held ones keep working; "
        "after release all new connections succeed",
    )
    if not _prlimit_works():
        pytest.skip("prlimit cannot set RLIMIT_NOFILE here")
    with BackendProcess("a") as a:
        lb = l4lb(
            lb_config([a.address]),
            command=["prlimit", "--nofile=256:256", sys.executable, "-m", "l4lb"],
        )
        addr = lb.service_address("web")
        held: list[Session] = []
        try:
            with ThreadPoolExecutor(max_workers=50) as pool:
                held = list(pool.map(lambda _: Session(addr, 4096, timeout=1.0), range(200)))
            got_through = [s for s in held if s.error is None]
            refused = len(held) - len(got_through)
            assert refused > 0, "the limit was never reached"
            finished = [s.finish() for s in got_through]
        finally:
            for s in held:
                s.close()
        released = time.monotonic()
        after = Load(addr, threads=2)
        with after:
            after.wait_count(100)
    r.count(finished)
    r.count(after.tally.outcomes)
    r.attempted += refused
    r.failed += refused
    r.recover_s = recovery_time(after.tally.outcomes, released)
    r.recovery = "release to the last failure"
    r.notes.append(f"{refused} connections over the limit")
    r.check(min_completed=100 + len(got_through), max_failed=refused)


def _prlimit_works() -> bool:
    try:
        return subprocess.run(["prlimit", "--nofile=256:256", "true"], check=False).returncode == 0
    except OSError:
        return False


_HOLDING_CLIENT = r"""
import selectors, socket, sys
addr, n = sys.argv[1], int(sys.argv[2])
host, port = addr.rsplit(":", 1)
socks, named = [], 0
for _ in range(n):
    s = socket.create_connection((host, int(port)), timeout=10)
    socks.append(s)
for s in socks:
    s.settimeout(10)
    if s.recv(64) == b"h\n":
        named += 1
print(named, flush=True)
sys.stdin.readline()
"""


def test_nine_thousand_concurrent_connections(l4lb: Start, fault: Fault) -> None:
    # Two descriptors per connection in l4lb, plus its own: 9,000 is what a 20,000 hard
    # limit allows (clients and backend are other processes, with limits of their own).
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    n = min(9000, (hard - 1000) // 2)
    if n < 2000:
        pytest.skip(f"the hard open-file limit {hard} leaves room for only {n} connections")
    r = fault(
        f"{n:,} concurrent connections",
        f"{n:,} connections opened and held at once by a client process "
        f"(2 descriptors each in l4lb under a {hard:,} hard limit)",
        "all reach the backend; all close cleanly; descriptors back to baseline",
    )
    with BackendProcess("h", "hold") as h:
        lb = l4lb(lb_config([h.address]))
        addr = lb.service_address("web")
        baseline = open_fds(lb.pid)
        started = time.monotonic()
        client = subprocess.Popen(
            [sys.executable, "-c", _HOLDING_CLIENT, addr, str(n)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert client.stdout is not None and client.stdin is not None
        named = int(client.stdout.readline() or 0)
        wait_for(lambda: lb.service("web")["active"] == n, 20, message=f"{n} active")
        peak = open_fds(lb.pid)
        client.stdin.close()
        client.wait(30)
        client.stdout.close()
        wait_for(lambda: lb.service("web")["active"] == 0, 30, message="all closed")
        r.recover_s, r.recovery = time.monotonic() - started, "open, hold, close all"
        _fds_back(lb, baseline)
    r.attempted, r.completed = n, named
    r.lost = n - named
    r.notes.append(f"l4lb held {peak - baseline} descriptors at the peak")
    assert peak - baseline >= 2 * n
    r.check(min_completed=n)


def test_control_plane_stall(l4lb: Start, fault: Fault, tmp_path: Path) -> None:
    r = fault(
        "control plane stalls",
        "SIGHUP with a 25,000-service config whose last line is bad: the event loop "
        "is busy parsing it for seconds",
        "the admin API stalls, the data plane keeps forwarding; the reload is rejected",
    )
    with BackendProcess("a") as a:
        cfg = lb_config([a.address])
        lb = l4lb(cfg)
        addr = lb.service_address("web")
        big = dumps_toml(cfg) + "".join(
            f'[[services]]\nname = "s{i}"\nlisten = "127.0.0.1:{1024 + i}"\n'
            'backends = [{ address = "127.0.0.1:9" }]\n'
            for i in range(25000)
        )
        with Load(addr, threads=4) as load:
            load.wait_count(20)
            lb.config_path.write_text(big + "bogus = 1\n")
            stalled = time.monotonic()
            os.kill(lb.pid, signal.SIGHUP)
            time.sleep(0.1)
            before = load.count()
            slow_admin = _admin_stalled(lb)
            wait_for(lambda: "reload rejected" in lb.stderr_text(), 60, message="rejection")
            stall = time.monotonic() - stalled
            moved = load.count() - before
            load.wait_count(20)
    r.count(load.tally.outcomes)
    r.recover_s, r.recovery = stall, "length of the stall"
    r.notes.append(f"admin stalled: {slow_admin}; {moved} exchanges during the stall")
    assert slow_admin, "the event loop never stalled: the case tests nothing"
    assert moved > 0, "nothing was forwarded while the control plane stalled"
    assert lb.service("web")["name"] == "web"
    r.check(min_completed=40)


def _admin_stalled(lb: L4lbProcess) -> bool:
    try:
        lb.http_get("/healthz", timeout=0.5)
    except OSError:
        return True
    return False


class _GarbageHttp(threading.Thread):
    """Answers every connection with random bytes (or a huge header line), then closes."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.served = 0
        self._closing = threading.Event()

    def run(self) -> None:
        replies = [os.urandom(65536), b"HTTP/1.1 200 " + b"x" * 200000, b"\r\n\r\n", b""]
        while not self._closing.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            with conn, contextlib.suppress(OSError):
                conn.sendall(replies[self.served % len(replies)])
            self.served += 1

    def close(self) -> None:
        self._closing.set()
        self.join(5)
        self.sock.close()


def test_health_checks_answered_with_garbage(l4lb: Start, fault: Fault) -> None:
    r = fault(
        "health checks get garbage",
        "HTTP health checks answered with random bytes, a 200 kB status line, or nothing",
        "every backend is marked down with a reason; with all_down = all the data plane "
        "keeps forwarding; the control plane keeps answering",
    )
    garbage = _GarbageHttp()
    garbage.start()
    try:
        with BackendProcess("a") as a, BackendProcess("b") as b:
            health = {**HEALTH, "kind": "http", "port": garbage.port, "all_down": "all"}
            lb = l4lb(lb_config([a.address, b.address], health=health))
            with Load(lb.service_address("web"), threads=4) as load:
                wait_for(
                    lambda: not any(x["up"] for x in lb.service("web")["backends"]),
                    10,
                    message="both marked down",
                )
                wait_for(lambda: garbage.served >= 20, 10, message="20 garbage answers")
                load.wait_count(100)
            reasons = [x["health"]["reason"] for x in lb.service("web")["backends"]]
            assert lb.http_get("/healthz")[0] == 200
    finally:
        garbage.close()
    assert all(reasons), reasons
    r.count(load.tally.outcomes)
    r.notes.append(f"{garbage.served} garbage answers; reasons: {sorted(set(reasons))}")
    r.check(min_completed=100)
