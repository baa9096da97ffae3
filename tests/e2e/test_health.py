"""Health checks through ``l4lb run``: detection, policies and recovery with real backends."""

from __future__ import annotations

import contextlib
import http.client
import http.server
import os
import random
import re
import selectors
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from l4lb._testbase import connect, connect_name, parse_address, wait_for

from .conftest import lb_config

ROOT = Path(__file__).resolve().parents[2]

INTERVAL = 0.2
FALL = 3
TIMEOUT = 0.2
JITTER = 0.1
# How late a failure may be noticed: fall probes, each up to one jittered interval apart,
# the last one taking up to the timeout, plus one interval of slack.
DETECT_WITHIN = FALL * INTERVAL * (1 + JITTER) + TIMEOUT + INTERVAL

# Connections a sequential client can have begun while a backend was dying (or turning
# into a blackhole): those may fail, no later one may.
IN_FLIGHT = 5

# The active checks' reason, or the passive one when client traffic noticed first.
DOWN_REASON = r"%s|passive: ([3-9]|\d\d+) consecutive connect failures"

FAST = {"interval": INTERVAL, "timeout": TIMEOUT, "fall": FALL, "rise": 2, "jitter": JITTER}

# A stand-alone backend (standard library only, so it also runs inside a network
# namespace): binds HOST:PORT (0 = any), prints the port, greets each connection with NAME.
_BACKEND = r"""
import socket, sys, threading
host, port, name = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode() + b"\n"
ls = socket.socket(socket.AF_INET)
ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind((host, port))
ls.listen(1024)
print(ls.getsockname()[1], flush=True)

def serve(c):
    try:
        c.sendall(name)
        while c.recv(65536):
            pass
    except OSError:
        pass
    finally:
        c.close()

while True:
    c, _ = ls.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""


class BackendProcess:
    """A backend in its own process, so that it can be killed with SIGKILL."""

    def __init__(self, name: str, port: int = 0, *, host: str = "127.0.0.1", netns: str = ""):
        prefix = ["ip", "netns", "exec", netns] if netns else []
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-c", _BACKEND, host, str(port), name],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if not line.isdigit():
            self.kill()
            raise RuntimeError(f"backend {name} did not start: {line!r}")
        self.port = int(line)
        self.address = f"{host}:{self.port}"

    def kill(self) -> None:
        """SIGKILL and reap; the port refuses connections from now on."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def processes() -> Iterator[list[BackendProcess]]:
    started: list[BackendProcess] = []
    yield started
    for p in started:
        p.kill()


class Clients:
    """Connects through the load balancer on a thread, one connection after another,
    counting which backend answered and every connection that failed."""

    def __init__(self, address: str, timeout: float = 5.0) -> None:
        self.address = address
        self.timeout = timeout
        self.names: Counter[str] = Counter()
        self.failures: list[tuple[float, str]] = []  # (when the attempt started, error)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        for _ in range(1_000_000):
            if self._stop.is_set():
                return
            started = time.monotonic()
            try:
                self.names[connect_name(self.address, timeout=self.timeout)] += 1
            except OSError as exc:
                self.failures.append((started, repr(exc)))

    def failed_since(self, moment: float) -> list[str]:
        """Failed attempts that started at or after ``moment`` (time.monotonic)."""
        return [error for started, error in self.failures if started >= moment]

    def __enter__(self) -> Clients:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(30)
        assert not self._thread.is_alive()


def backend_doc(lb: Any, address: str, service: str = "web") -> dict[str, Any]:
    for b in lb.service(service)["backends"]:
        if b["address"] == address:
            return dict(b)
    raise KeyError(address)


def wait_down(lb: Any, address: str, timeout: float = 20.0) -> dict[str, Any]:
    """Wait until ``address`` is down and programmed with weight 0; return its document."""

    def down() -> dict[str, Any] | None:
        b = backend_doc(lb, address)
        return b if not b["up"] and b["effective_weight"] == 0 else None

    return wait_for(down, timeout, message=f"{address} to be down")


def wait_up(lb: Any, address: str, timeout: float = 20.0) -> dict[str, Any]:
    def up() -> dict[str, Any] | None:
        b = backend_doc(lb, address)
        return b if b["up"] and b["effective_weight"] > 0 else None

    return wait_for(up, timeout, message=f"{address} to be up")


# --------------------------------------------------------------------------- kill


def test_killed_backend_is_marked_down_and_clients_never_fail(l4lb, named_backends, processes):
    (b0,) = named_backends(1)
    b1 = BackendProcess("b1")
    processes.append(b1)
    lb = l4lb(lb_config([b0.address, b1.address], service={"health": FAST}))
    addr = lb.service_address("web")
    with Clients(addr) as clients:
        wait_for(lambda: clients.names["b1"] >= 5, 20, message="traffic on b1")
        killed_at = time.time()
        b1.kill()
        dead = time.monotonic()
        doc = wait_down(lb, b1.address)
        before = backend_doc(lb, b1.address)
        served = sum(clients.names.values())
        wait_for(lambda: sum(clients.names.values()) >= served + 50, 20, message="more traffic")
    after = backend_doc(lb, b1.address)
    health = doc["health"]
    assert health["state"] == "down" and health["transitions"] == 1
    assert health["since"] - killed_at <= DETECT_WITHIN, (health, DETECT_WITHIN)
    assert re.fullmatch(DOWN_REASON % re.escape("connect refused (3/3)"), health["reason"])
    # No new connection was even tried on b1 once it was down.
    assert (after["total"], after["connect_errors"]) == (before["total"], before["connect_errors"])
    # Every connection begun once b1 was dead succeeded (connect retry covers the gap until
    # detection). Those already on b1 while it was dying cannot be saved by any proxy.
    assert clients.failed_since(dead) == []
    assert len(clients.failures) <= IN_FLIGHT, clients.failures
    assert lb.service("web")["failed"] == 0  # the data plane never ran out of backends
    assert "of web is DOWN" in lb.stderr_text()


# --------------------------------------------------------------------------- blackholes


class SwitchableServer:
    """A loopback greeting server that can turn into a blackhole: it stops accepting and
    shrinks its accept queue to nothing, so new SYNs are dropped and connects hang."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(128)
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self._accepting = threading.Event()
        self._accepting.set()
        self._stop = threading.Event()
        self._held: list[socket.socket] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with selectors.DefaultSelector() as sel:
            sel.register(self.listener, selectors.EVENT_READ)
            while not self._stop.is_set():
                if not self._accepting.is_set() or not sel.select(0.05):
                    time.sleep(0.01)
                    continue
                if not self._accepting.is_set():
                    continue
                try:
                    c, _ = self.listener.accept()
                except OSError:
                    continue
                with contextlib.suppress(OSError):
                    c.sendall(self.name.encode() + b"\n")
                c.close()

    def blackhole(self) -> None:
        self._accepting.clear()
        time.sleep(0.1)  # let the accept thread notice
        self.listener.listen(0)
        host, port = parse_address(self.address)
        for _ in range(4):  # fill the queue, then prove a connect hangs
            probe = socket.socket()
            probe.settimeout(0.3)
            try:
                probe.connect((host, port))
            except TimeoutError:
                probe.close()
                return
            self._held.append(probe)
        raise AssertionError("the accept queue never filled")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        for s in self._held:
            s.close()
        self.listener.close()


def _check_blackhole_detection(lb: Any, hole_address: str, blackhole: Any) -> None:
    connect_timeout = lb.config["services"][0]["connect_timeout"]
    addr = lb.service_address("web")
    # A client waits at most one connect timeout on the blackhole, then gets b0.
    with Clients(addr, timeout=connect_timeout + 2.0) as clients:
        wait_for(lambda: clients.names["b1"] >= 3, 20, message="traffic on b1")
        started = time.time()
        blackhole()
        closed = time.monotonic()
        doc = wait_down(lb, hole_address)
        served = sum(clients.names.values())
        wait_for(lambda: sum(clients.names.values()) >= served + 20, 20, message="more traffic")
    health = doc["health"]
    assert health["since"] - started <= DETECT_WITHIN, (health, DETECT_WITHIN)
    expected = re.escape(f"timeout after {TIMEOUT:g}s (3/3)")
    assert re.fullmatch(DOWN_REASON % expected, health["reason"])
    # Connections begun once the blackhole is in place never hang: they get b0 after one
    # connect timeout at most. One already open on b1 at that moment may stall.
    assert clients.failed_since(closed) == []
    assert len(clients.failures) <= IN_FLIGHT, clients.failures
    assert lb.service("web")["failed"] == 0


def test_blackholed_loopback_backend_is_marked_down(l4lb, named_backends):
    (b0,) = named_backends(1)
    hole = SwitchableServer("b1")
    try:
        cfg = lb_config([b0.address, hole.address], service={"health": FAST})
        cfg["services"][0]["connect_timeout"] = 0.5
        lb = l4lb(cfg)
        _check_blackhole_detection(lb, hole.address, hole.blackhole)
    finally:
        hole.close()


def _netns_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root for ip netns"
    if shutil.which("ip") is None or shutil.which("iptables") is None:
        return "needs ip and iptables"
    r = subprocess.run(["ip", "netns", "list"], capture_output=True, timeout=10, check=False)
    return None if r.returncode == 0 else f"ip netns unavailable: {r.stderr.decode()[:200]}"


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=20)


@pytest.fixture
def netns() -> Iterator[tuple[str, str]]:
    """A network namespace joined to this one by a veth pair with a private /30.

    Yields (namespace name, the namespace's address); everything is deleted at teardown.
    """
    reason = _netns_unavailable()
    if reason:
        pytest.skip(reason)
    tag = f"{os.getpid() % 100000}{random.randrange(100)}"
    ns, here, there = f"l4lbhc{tag}", f"l4h{tag}a", f"l4h{tag}b"
    routes = subprocess.run(["ip", "-4", "route"], capture_output=True, text=True, check=True)
    for _ in range(100):
        net = f"10.{random.randrange(200, 250)}.{random.randrange(256)}"
        if f"{net}." not in routes.stdout:
            break
    try:
        _run("ip", "netns", "add", ns)
        _run("ip", "link", "add", here, "type", "veth", "peer", "name", there)
        _run("ip", "link", "set", there, "netns", ns)
        _run("ip", "addr", "add", f"{net}.1/30", "dev", here)
        _run("ip", "link", "set", here, "up")
        _run("ip", "-n", ns, "addr", "add", f"{net}.2/30", "dev", there)
        _run("ip", "-n", ns, "link", "set", there, "up")
        _run("ip", "-n", ns, "link", "set", "lo", "up")
        yield ns, f"{net}.2"
    finally:
        subprocess.run(["ip", "link", "del", here], capture_output=True, timeout=20, check=False)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20, check=False)


def test_blackholed_backend_in_a_namespace_is_marked_down(l4lb, named_backends, netns, processes):
    ns, ip = netns
    (b0,) = named_backends(1)
    b1 = BackendProcess("b1", host=ip, netns=ns)
    processes.append(b1)
    assert connect_name(b1.address) == "b1"  # reachable before the firewall closes
    cfg = lb_config([b0.address, b1.address], service={"health": FAST})
    cfg["services"][0]["connect_timeout"] = 0.5
    lb = l4lb(cfg)
    drop = ["ip", "netns", "exec", ns, "iptables", "-I", "INPUT", "-p", "tcp"]
    _check_blackhole_detection(
        lb, b1.address, lambda: _run(*drop, "--dport", str(b1.port), "-j", "DROP")
    )


# --------------------------------------------------------------------------- http


class HttpBackend:
    """An HTTP/1.1 keep-alive server: GET /health answers ``status``, anything else 200
    with the backend's name as the body."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.status = 200
        self.health_requests = 0
        backend = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                if self.path == "/health":
                    backend.health_requests += 1
                    code, body = backend.status, b"health\n"
                else:
                    code, body = 200, backend.name.encode()
                self.send_response(code)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # health checks end with a reset; that is expected

        self.server = Server(("127.0.0.1", 0), Handler)
        self.address = f"127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(10)


@pytest.fixture
def http_backends() -> Iterator[list[HttpBackend]]:
    backends = [HttpBackend("h0"), HttpBackend("h1")]
    yield backends
    for b in backends:
        b.close()


def get_name(address: str) -> str:
    """GET /name through ``address`` on a fresh connection."""
    host, port = parse_address(address)
    conn = http.client.HTTPConnection(host, port, timeout=5)
    try:
        return ask_name(conn)
    finally:
        conn.close()


def ask_name(conn: http.client.HTTPConnection) -> str:
    """GET /name on an open (keep-alive) connection."""
    conn.request("GET", "/name")
    return conn.getresponse().read().decode()


HTTP_CHECK = {**FAST, "kind": "http", "http_path": "/health", "fall": 2, "rise": 2}


def test_http_check_500_marks_down_and_200_brings_back(l4lb, http_backends):
    h0, h1 = http_backends
    lb = l4lb(lb_config([h0.address, h1.address], service={"health": HTTP_CHECK}))
    addr = lb.service_address("web")
    wait_for(lambda: h1.health_requests >= 2, 20, message="checks on h1")
    assert {get_name(addr) for _ in range(4)} == {"h0", "h1"}

    h1.status = 500
    doc = wait_down(lb, h1.address)
    assert doc["health"]["reason"] == "HTTP 500 (expected 200-399) (2/2)"
    assert doc["health"]["last_check"]["ok"] is False
    assert [get_name(addr) for _ in range(6)] == ["h0"] * 6
    metrics = lb.http_get("/metrics")[1].decode()
    assert f'l4lb_backend_up{{backend="{h1.address}",service="web"}} 0.0' in metrics
    assert f'l4lb_backend_health_transitions_total{{backend="{h1.address}",service="web"}} 1.0' in (
        metrics
    )
    status = subprocess.run(
        [sys.executable, "-m", "l4lb", "status", "--admin", lb.admin],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    ).stdout
    (row,) = [line for line in status.splitlines() if h1.address in line]
    assert "HTTP 500 (expected 200-399)" in row and row.endswith("DOWN")

    h1.status = 200
    doc = wait_up(lb, h1.address)
    assert doc["health"]["reason"] == "HTTP 200 (2/2)"
    assert doc["health"]["transitions"] == 2
    # New connections reach h1 again (bounded: a few rr rounds at most).
    wait_for(lambda: "h1" in {get_name(addr) for _ in range(4)}, 10, message="h1 picked again")
    log = lb.stderr_text()
    assert f"backend {h1.address} of web is DOWN: HTTP 500 (expected 200-399) (2/2)" in log
    assert f"backend {h1.address} of web is UP: HTTP 200 (2/2)" in log
    assert log.count(f"backend {h1.address} of web is DOWN") == 1  # logged once


def test_slow_start_ramps_the_share_of_a_returning_backend(l4lb, named_backends, processes):
    (b0,) = named_backends(1)
    b1 = BackendProcess("b1")
    processes.append(b1)
    health = {**FAST, "rise": 1, "fall": 1, "slowstart": 4}
    cfg = lb_config([b0.address, b1.address], service={"scheduler": "wrr", "health": health})
    for b in cfg["services"][0]["backends"]:
        b["weight"] = 20
    lb = l4lb(cfg)
    addr = lb.service_address("web")
    b1.kill()
    wait_down(lb, b1.address)
    b1 = BackendProcess("b1", b1.port)
    processes.append(b1)
    wait_up(lb, b1.address)
    early = Counter(connect_name(addr) for _ in range(60))
    weights = []
    for _ in range(2000):
        weights.append(backend_doc(lb, b1.address)["effective_weight"])
        if weights[-1] == 20:
            break
        time.sleep(0.02)
    late = Counter(connect_name(addr) for _ in range(60))
    assert weights[-1] == 20
    assert weights == sorted(weights)  # it only grows
    assert any(0 < w < 20 for w in weights)  # through intermediate weights
    assert early["b1"] < late["b1"], (early, late)
    assert late == {"b0": 30, "b1": 30}


# --------------------------------------------------------------------------- all down


@pytest.mark.parametrize("policy", ["reject", "all"])
def test_all_backends_down(l4lb, http_backends, policy):
    h0, h1 = http_backends
    health = {**HTTP_CHECK, "rise": 1, "fall": 1, "all_down": policy}
    lb = l4lb(lb_config([h0.address, h1.address], service={"health": health}))
    addr = lb.service_address("web")
    wait_for(lambda: h0.health_requests and h1.health_requests, 20, message="first checks")
    h0.status = h1.status = 503
    wait_for(
        lambda: not any(b["up"] for b in lb.service("web")["backends"]), 20, message="all down"
    )
    if policy == "reject":
        wait_for(lambda: all(b["effective_weight"] == 0 for b in lb.service("web")["backends"]), 20)
        rejected = lb.service("web")["rejected"]
        # The reset can arrive before connect() even returns on loopback.
        with pytest.raises((ConnectionResetError, BrokenPipeError)), connect(addr) as s:
            s.settimeout(10)
            s.sendall(b"GET /name HTTP/1.0\r\n\r\n")
            while s.recv(1024):
                pass
        assert lb.service("web")["rejected"] == rejected + 1
    else:
        wait_for(lambda: all(b["effective_weight"] == 1 for b in lb.service("web")["backends"]), 20)
        assert {get_name(addr) for _ in range(6)} == {"h0", "h1"}
    h0.status = h1.status = 200
    wait_up(lb, h0.address)
    wait_up(lb, h1.address)
    assert {get_name(addr) for _ in range(6)} == {"h0", "h1"}


# --------------------------------------------------------------------------- passive


def test_passive_detection_comes_first_and_recovery_is_active(l4lb, named_backends, processes):
    (b0,) = named_backends(1)
    b1 = BackendProcess("b1")
    processes.append(b1)
    # Five active failures two seconds apart would take 8 s or more; passive needs 5 refused
    # connects, which the client traffic produces in a fraction of that.
    health = {"interval": 2, "timeout": 1, "fall": 5, "rise": 1}
    lb = l4lb(lb_config([b0.address, b1.address], service={"health": health}))
    addr = lb.service_address("web")
    with Clients(addr) as clients:
        wait_for(lambda: clients.names["b1"] >= 3, 20, message="traffic on b1")
        b1.kill()
        dead = time.monotonic()
        doc = wait_down(lb, b1.address)
    assert re.fullmatch(r"passive: \d+ consecutive connect failures", doc["health"]["reason"])
    assert int(doc["health"]["reason"].split()[1]) >= 5
    assert clients.failed_since(dead) == [] and len(clients.failures) <= IN_FLIGHT
    # Back on the same port: only an active check can tell, the data plane sends it nothing.
    b1 = BackendProcess("b1", b1.port)
    processes.append(b1)
    doc = wait_up(lb, b1.address)
    assert doc["health"]["reason"] == "connect ok (1/1)"
    assert doc["health"]["last_check"]["ok"] is True
    assert "b1" in {connect_name(addr) for _ in range(4)}


# --------------------------------------------------------------------------- on_down


@pytest.mark.parametrize("on_down", ["reset", "keep"])
def test_on_down_and_open_connections(l4lb, http_backends, on_down):
    h0, h1 = http_backends
    health = {**HTTP_CHECK, "rise": 1, "fall": 1, "on_down": on_down}
    lb = l4lb(lb_config([h0.address, h1.address], service={"health": health}))
    host, port = parse_address(lb.service_address("web"))
    held: list[tuple[str, http.client.HTTPConnection]] = []
    try:
        while len(held) < 10 and not any(n == "h1" for n, _ in held):
            conn = http.client.HTTPConnection(host, port, timeout=5)
            held.append((ask_name(conn), conn))
        conn = next(c for n, c in held if n == "h1")
        assert backend_doc(lb, h1.address)["active"] == 1
        h1.status = 500
        wait_down(lb, h1.address)
        if on_down == "reset":
            wait_for(lambda: backend_doc(lb, h1.address)["active"] == 0, 10)
            with pytest.raises((ConnectionResetError, BrokenPipeError, http.client.HTTPException)):
                ask_name(conn)
            assert "open connections reset (on_down = reset)" in lb.stderr_text()
        else:
            assert ask_name(conn) == "h1"  # the open connection still works
            assert backend_doc(lb, h1.address)["active"] == 1
    finally:
        for _, c in held:
            c.close()


# --------------------------------------------------------------------------- reload


def test_reload_keeps_health_of_backends_that_stay(l4lb, http_backends, named_backends):
    h0, h1 = http_backends
    (b2,) = named_backends(1)
    health = {**HTTP_CHECK, "rise": 1, "fall": 1}
    cfg = lb_config([h0.address, h1.address], service={"health": health})
    lb = l4lb(cfg)
    h1.status = 500
    wait_down(lb, h1.address)
    # b2 answers no HTTP: with initial = "down" it stays down, proving it starts in initial.
    cfg2 = lb_config(
        [h0.address, h1.address, b2.address], service={"health": {**health, "initial": "down"}}
    )
    lb.reload(cfg2)
    h1_doc, b2_doc = backend_doc(lb, h1.address), backend_doc(lb, b2.address)
    assert (h1_doc["up"], h1_doc["health"]["transitions"]) == (False, 1)
    assert (b2_doc["up"], b2_doc["health"]["transitions"]) == (False, 0)
    assert b2_doc["health"]["reason"] == "initial state down"
    assert backend_doc(lb, h0.address)["up"]
