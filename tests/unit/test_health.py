"""Tests for l4lb.health: hysteresis, jitter, slow start, passive signal, probes, monitor."""

from __future__ import annotations

import asyncio
import functools
import random
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
import uvloop

from l4lb.config import Address, Config, HealthConfig, parse_config
from l4lb.health import (
    HTTP_MAX_RESPONSE,
    SLOWSTART_MIN_STEP,
    SLOWSTART_STEPS,
    BackendHealth,
    CheckResult,
    HealthMonitor,
    TcpProber,
    Transition,
    Wheel,
    first_delay,
    http_request,
    judge_http_response,
    next_interval,
    run_check,
    slowstart_ramp,
    tcp_probe,
)
from l4lb.state import Health, desired_state

OK = CheckResult(True, "connect ok", 0.001, 0.0)


REFUSED = CheckResult(False, "connect refused", 0.001, 0.0)


def health(**kw: Any) -> BackendHealth:
    return BackendHealth("web", "127.0.0.1:9001", HealthConfig(**kw))


def feed(h: BackendHealth, results: str, now: float = 0.0) -> list[Transition]:
    """Feed 'o' (success) and 'x' (failure) results; return the transitions."""
    out = []
    for r in results:
        t = h.observe(OK if r == "o" else REFUSED, now)
        if t is not None:
            out.append(t)
    return out


# ----------------------------------------------------------------------------- hysteresis


def test_fall_consecutive_failures_take_it_down() -> None:
    h = health(fall=3)
    assert feed(h, "xx") == [] and h.up
    [t] = feed(h, "x")
    assert t == Transition("web", "127.0.0.1:9001", False, "connect refused (3/3)")
    assert t.message() == "backend 127.0.0.1:9001 of web is DOWN: connect refused (3/3)"
    assert not h.up and h.transitions == 1


def test_a_success_resets_the_failure_count() -> None:
    h = health(fall=3)
    assert feed(h, "xxoxxoxx") == []
    assert h.up


def test_rise_consecutive_successes_bring_it_back() -> None:
    h = health(rise=2, fall=1)
    assert [t.up for t in feed(h, "x")] == [False]
    assert feed(h, "oxo") == []  # interrupted: starts over
    [t] = feed(h, "o")
    assert t.up and t.reason == "connect ok (2/2)"
    assert t.message() == "backend 127.0.0.1:9001 of web is UP: connect ok (2/2)"
    assert h.transitions == 2


def test_failures_while_down_and_successes_while_up_change_nothing() -> None:
    h = health(rise=1, fall=1)
    assert feed(h, "oooo") == []
    assert len(feed(h, "xxxx")) == 1
    assert h.transitions == 1 and not h.up


def test_initial_down_needs_rise_successes() -> None:
    h = health(initial="down", rise=3)
    assert not h.up and h.reason == "initial state down"
    assert feed(h, "oo") == []
    assert [t.up for t in feed(h, "o")] == [True]


def test_rise_and_fall_of_one_flip_on_every_change() -> None:
    h = health(rise=1, fall=1)
    assert [t.up for t in feed(h, "xoxo")] == [False, True, False, True]


def test_last_check_and_document() -> None:
    h = health(fall=1)
    assert h.as_dict()["last_check"] is None
    h.observe(CheckResult(False, "timeout after 1s", 1.0000004, 1700000000.1234), 0.0)
    doc = h.as_dict()
    assert doc["state"] == "down" and doc["transitions"] == 1
    assert doc["reason"] == "timeout after 1s (1/1)"
    assert doc["last_check"] == {
        "ok": False,
        "detail": "timeout after 1s",
        "duration": 1.0,
        "at": 1700000000.123,
    }


# ----------------------------------------------------------------------------- passive


def test_passive_counts_from_the_first_reading() -> None:
    h = health(fall=3)
    assert h.observe_passive(10, 0.0) is None  # old failures, before we looked
    assert h.observe_passive(12, 0.0) is None
    t = h.observe_passive(13, 0.0)
    assert t is not None and not t.up
    assert t.reason == "passive: 3 consecutive connect failures"


def test_passive_restarts_after_a_data_plane_success() -> None:
    h = health(fall=3)
    h.observe_passive(0, 0.0)
    h.observe_passive(2, 0.0)
    assert h.observe_passive(1, 0.0) is None  # the counter was reset in between
    assert h.observe_passive(2, 0.0) is None
    assert h.observe_passive(3, 0.0) is not None


def test_passive_down_comes_back_only_through_active_checks() -> None:
    h = health(fall=2, rise=2)
    h.observe_passive(0, 0.0)
    assert h.observe_passive(2, 0.0) is not None and not h.up
    for count in (0, 0, 5, 0):  # whatever the counter does, passive never brings it up
        assert h.observe_passive(count, 0.0) is None
    assert not h.up
    assert [t.up for t in feed(h, "oo")] == [True]


def test_passive_rebaselines_when_it_comes_back() -> None:
    h = health(fall=2, rise=1)
    h.observe_passive(0, 0.0)
    assert h.observe_passive(2, 0.0) is not None
    feed(h, "o")
    # The counter still says 2 (no connection since): that must not count again.
    assert h.observe_passive(2, 0.0) is None and h.up
    assert h.observe_passive(3, 0.0) is None
    assert h.observe_passive(4, 0.0) is not None


def test_active_failures_and_passive_share_nothing_but_the_state() -> None:
    h = health(fall=3)
    h.observe_passive(0, 0.0)
    feed(h, "xx")
    assert h.observe_passive(2, 0.0) is None and h.up


# ----------------------------------------------------------------------------- jitter


def test_first_delay_is_within_one_interval() -> None:
    rng = random.Random(1)
    delays = [first_delay(2.0, rng) for _ in range(2000)]
    assert all(0.0 <= d <= 2.0 for d in delays)
    # Spread out over the interval, not bunched at one end.
    assert min(delays) < 0.1 and max(delays) > 1.9


@pytest.mark.parametrize(("interval", "jitter"), [(2.0, 0.1), (0.2, 0.5), (1.0, 0.0)])
def test_next_interval_stays_within_the_jitter(interval: float, jitter: float) -> None:
    rng = random.Random(2)
    values = [next_interval(interval, jitter, rng) for _ in range(2000)]
    low, high = interval * (1 - jitter), interval * (1 + jitter)
    assert all(low <= v <= high for v in values)
    if jitter:
        span = high - low
        assert min(values) < low + span * 0.05 and max(values) > high - span * 0.05
    else:
        assert set(values) == {interval}


# ----------------------------------------------------------------------------- slow start


@pytest.mark.parametrize(
    ("elapsed", "slowstart", "ramp"),
    [(5.0, 10.0, 0.5), (2.5, 10.0, 0.25), (10.0, 10.0, 1.0), (11.0, 10.0, 1.0), (3.0, 0.0, 1.0)],
)
def test_slowstart_ramp_values(elapsed: float, slowstart: float, ramp: float) -> None:
    assert slowstart_ramp(elapsed, slowstart) == pytest.approx(ramp)


def test_slowstart_ramp_is_never_zero() -> None:
    assert 0 < slowstart_ramp(0.0, 10.0) < 0.01
    assert 0 < slowstart_ramp(-1.0, 10.0) < 0.01


def test_slow_start_applies_only_after_coming_back_up() -> None:
    h = health(slowstart=10, rise=1, fall=1)
    assert h.ramp(0.0) == 1.0 and h.ramp_delay(0.0) is None  # up from the start: no ramp
    feed(h, "x", now=100.0)
    assert h.ramp_delay(100.0) is None
    feed(h, "o", now=200.0)
    ramps = [h.ramp(200.0 + t) for t in (0.0, 2.5, 5.0, 7.5)]
    assert ramps[0] < 0.01
    assert ramps[1:] == pytest.approx([0.25, 0.5, 0.75])
    assert h.ramp_delay(205.0) == pytest.approx(10 / SLOWSTART_STEPS)
    assert h.ramp_delay(209.99) == pytest.approx(0.01)
    assert h.ramp(210.0) == 1.0
    assert h.ramp_delay(210.0) is None  # done: no more steps


def test_ramped_weights_grow_with_time() -> None:
    cfg = config_with(health={"slowstart": 10, "rise": 1, "fall": 1}, weights=[100, 100])
    h = BackendHealth("web", "127.0.0.1:1", cfg.services[0].health)  # type: ignore[arg-type]
    feed(h, "x", now=0.0)
    feed(h, "o", now=0.0)
    seen = []
    for t in (0.0, 1.0, 2.5, 5.0, 9.0, 10.0):
        states = {("web", "127.0.0.1:1"): Health(h.up, h.ramp(t))}
        seen.append(desired_state(cfg, health=states)["web"].dests[0].weight)
    assert seen == [1, 10, 25, 50, 90, 100]


def test_slow_start_step_has_a_floor() -> None:
    h = health(slowstart=0.5, rise=1, fall=1)
    feed(h, "xo", now=0.0)
    assert h.ramp_delay(0.0) == pytest.approx(SLOWSTART_MIN_STEP)


def test_going_down_stops_the_ramp() -> None:
    h = health(slowstart=10, rise=1, fall=1)
    feed(h, "xo", now=0.0)
    feed(h, "x", now=1.0)
    assert h.ramp_delay(1.0) is None
    feed(h, "o", now=5.0)
    assert h.ramp(5.0) < 0.01  # ramps again from the start


# ----------------------------------------------------------------------------- http parsing

HTTP = HealthConfig(kind="http")


def test_http_request_defaults_to_the_backend_ip_as_host() -> None:
    req = http_request(Address("127.0.0.1", 80, socket.AF_INET), HTTP)
    assert req.startswith(b"GET / HTTP/1.0\r\nHost: 127.0.0.1\r\n")
    assert req.endswith(b"\r\n\r\n")
    v6 = http_request(Address("::1", 80, socket.AF_INET6), HTTP)
    assert b"\r\nHost: [::1]\r\n" in v6


def test_http_request_custom_method_path_host() -> None:
    cfg = HealthConfig(kind="http", http_method="HEAD", http_path="/ready?x=1", http_host="a.b")
    req = http_request(Address("127.0.0.1", 80, socket.AF_INET), cfg)
    assert req.startswith(b"HEAD /ready?x=1 HTTP/1.0\r\nHost: a.b\r\n")


@pytest.mark.parametrize(
    ("data", "eof", "cfg", "verdict"),
    [
        (b"HTTP/1.1 200 OK\r\n", False, HTTP, (True, "HTTP 200")),
        (b"HTTP/1.0 399 X\r\n", False, HTTP, (True, "HTTP 399")),
        (b"HTTP/1.1 500 Oops\r\n", False, HTTP, (False, "HTTP 500 (expected 200-399)")),
        (b"HTTP/1.1 404\r\n", False, HTTP, (False, "HTTP 404 (expected 200-399)")),
        (b"HTTP/1.1 20", False, HTTP, None),  # wait for the rest of the line
        (b"HTTP/1.1 20", True, HTTP, (False, "no HTTP status line")),
        (b"", True, HTTP, (False, "closed without a response")),
        (b"SSH-2.0-OpenSSH\r\n", False, HTTP, (False, "bad HTTP status line 'SSH-2.0-OpenSSH'")),
        (
            b"HTTP/1.1 204 OK\r\n",
            False,
            HealthConfig(kind="http", expect_status=(204, 204)),
            (True, "HTTP 204"),
        ),
    ],
)
def test_judge_http_response(
    data: bytes, eof: bool, cfg: HealthConfig, verdict: tuple[bool, str] | None
) -> None:
    assert judge_http_response(data, eof, cfg) == verdict


def test_judge_http_response_body() -> None:
    cfg = HealthConfig(kind="http", expect_body="ready")
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n"
    assert judge_http_response(head + b"all ready", False, cfg) == (True, "HTTP 200, body matches")
    assert judge_http_response(head + b"not yet", False, cfg) is None
    assert judge_http_response(head + b"not yet", True, cfg) == (
        False,
        "HTTP 200, 'ready' not in the body",
    )
    # The header is not the body.
    header_only = judge_http_response(b"HTTP/1.1 200 OK\r\nX: ready\r\n\r\n", True, cfg)
    assert header_only == (False, "HTTP 200, 'ready' not in the body")
    big = head + b"x" * HTTP_MAX_RESPONSE
    assert judge_http_response(big[:HTTP_MAX_RESPONSE], False, cfg) == (
        False,
        "HTTP 200, 'ready' not in the body",
    )


# ----------------------------------------------------------------------------- real probes


@pytest.fixture
def refused_port() -> Iterator[int]:
    """Bound, never listening: connects are refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


@pytest.fixture
def blackhole_port() -> Iterator[int]:
    """A listener with a full accept queue: SYNs are dropped, connects hang."""
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(0)
    port = ls.getsockname()[1]
    filler = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        yield port
    finally:
        filler.close()
        ls.close()


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Handler], Awaitable[int]]]:
    servers: list[asyncio.Server] = []

    async def start(handler: Handler) -> int:
        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


def http_reply(status: int, body: bytes = b"", seen: list[bytes] | None = None) -> Handler:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await reader.readuntil(b"\r\n\r\n")
            if seen is not None:
                seen.append(request)
            writer.write(b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n\r\n" % (status, len(body)))
            writer.write(body)
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    return handle


def local(port: int) -> Address:
    return Address("127.0.0.1", port, socket.AF_INET)


async def test_tcp_probe_against_a_listener(serve: Any) -> None:
    port = await serve(http_reply(200))
    result = await tcp_probe(local(port), port, 1.0)
    assert (result.ok, result.detail) == (True, "connect ok")
    assert result.duration > 0


async def test_tcp_probe_refused(refused_port: int) -> None:
    result = await tcp_probe(local(refused_port), refused_port, 1.0)
    assert (result.ok, result.detail) == (False, "connect refused")


async def test_tcp_probe_ends_with_a_reset(serve: Any) -> None:
    ended: list[bytes | str] = []

    async def watch(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            ended.append(await reader.read(10))
        except ConnectionResetError:
            ended.append("reset")
        writer.close()

    port = await serve(watch)
    assert (await tcp_probe(local(port), port, 1.0)).ok
    await wait_until(lambda: ended)
    assert ended == ["reset"]  # no FIN, so no TIME_WAIT on the checker's side


async def test_tcp_probe_cancel_never_reports(blackhole_port: int) -> None:
    prober = TcpProber(asyncio.get_running_loop())
    got: list[CheckResult] = []
    try:
        probe = prober.probe(local(blackhole_port), blackhole_port, 0.05, got.append)
        probe.cancel()
        await asyncio.sleep(0.15)
    finally:
        prober.close()
    assert got == []


async def test_tcp_prober_reports_from_the_loop_not_the_call(refused_port: int) -> None:
    prober = TcpProber(asyncio.get_running_loop())
    got: list[CheckResult] = []
    try:
        prober.probe(local(refused_port), refused_port, 1.0, got.append)
        assert got == []
        await wait_until(lambda: got)
    finally:
        prober.close()
    assert [(r.ok, r.detail) for r in got] == [(False, "connect refused")]


async def test_tcp_prober_many_at_once(serve: Any, refused_port: int, blackhole_port: int) -> None:
    port = await serve(http_reply(200))
    prober = TcpProber(asyncio.get_running_loop())
    got: dict[int, list[str]] = {port: [], refused_port: [], blackhole_port: []}
    try:
        for _ in range(50):
            for p in got:
                prober.probe(local(p), p, 0.3, lambda r, p=p: got[p].append(r.detail))
        await wait_until(lambda: all(len(v) == 50 for v in got.values()))
    finally:
        prober.close()
    assert set(got[port]) == {"connect ok"}
    assert set(got[refused_port]) == {"connect refused"}
    assert set(got[blackhole_port]) == {"timeout after 0.3s"}


async def test_wheel_runs_callbacks_in_time_order() -> None:
    loop = asyncio.get_running_loop()
    wheel = Wheel(loop)
    ran: list[str] = []
    now = loop.time()
    wheel.call_at(now + 0.06, lambda: ran.append("late"))
    wheel.call_at(now + 0.06, lambda: ran.append("late too"))  # same tick: in order
    wheel.call_at(now + 0.03, lambda: ran.append("mid"))
    wheel.call_at(now - 1.0, lambda: ran.append("past"))  # runs at the next tick
    await wait_until(lambda: len(ran) == 4)
    assert ran == ["past", "mid", "late", "late too"]
    wheel.call_at(loop.time() + 0.02, lambda: ran.append("dropped"))
    wheel.close()
    await asyncio.sleep(0.05)
    assert ran[-1] == "late too"


async def test_run_check_times_out_on_a_blackhole(blackhole_port: int) -> None:
    result = await run_check(local(blackhole_port), HealthConfig(timeout=0.2, interval=0.2))
    assert (result.ok, result.detail) == (False, "timeout after 0.2s")


async def test_run_check_uses_the_port_override(serve: Any, refused_port: int) -> None:
    port = await serve(http_reply(200))
    result = await run_check(local(refused_port), HealthConfig(port=port))
    assert (result.ok, result.detail) == (True, "connect ok")


async def test_http_check_statuses(serve: Any) -> None:
    seen: list[bytes] = []
    ok = await serve(http_reply(200, seen=seen))
    bad = await serve(http_reply(500))
    cfg = HealthConfig(kind="http", http_path="/health", timeout=2)
    good = await run_check(local(ok), cfg)
    assert (good.ok, good.detail) == (True, "HTTP 200")
    assert seen[0].startswith(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n")
    failed = await run_check(local(bad), cfg)
    assert (failed.ok, failed.detail) == (False, "HTTP 500 (expected 200-399)")


async def test_http_check_body(serve: Any) -> None:
    ready = await serve(http_reply(200, b"status: ready\n"))
    starting = await serve(http_reply(200, b"status: starting\n"))
    cfg = HealthConfig(kind="http", expect_body="ready", timeout=2)
    assert (await run_check(local(ready), cfg)).ok
    result = await run_check(local(starting), cfg)
    assert (result.ok, result.detail) == (False, "HTTP 200, 'ready' not in the body")


async def test_http_check_reads_a_bounded_amount(serve: Any) -> None:
    sent = 0

    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal sent
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\n\r\n")
        try:
            for _ in range(2000):  # up to 128 MiB, far more than the checker reads
                writer.write(b"y" * 65536)
                await writer.drain()
                sent += 65536
        except ConnectionError:
            pass
        finally:
            writer.close()

    port = await serve(endless)
    cfg = HealthConfig(kind="http", expect_body="ready", timeout=5, interval=5)
    result = await run_check(local(port), cfg)
    assert (result.ok, result.detail) == (False, "HTTP 200, 'ready' not in the body")
    await asyncio.sleep(0.05)
    assert sent < 2000 * 65536  # the checker reset the connection instead of reading on


async def test_http_check_silent_server_times_out(serve: Any) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # until the checker gives up
        writer.close()

    port = await serve(silent)
    result = await run_check(local(port), HealthConfig(kind="http", timeout=0.2, interval=1))
    assert (result.ok, result.detail) == (False, "timeout after 0.2s")


async def test_http_check_refused(refused_port: int) -> None:
    result = await run_check(local(refused_port), HealthConfig(kind="http"))
    assert (result.ok, result.detail) == (False, "connect refused")


# ----------------------------------------------------------------------------- monitor


def config_with(
    ports: list[int] | None = None,
    *,
    health: dict[str, Any] | None = None,
    weights: list[int] | None = None,
    name: str = "web",
) -> Config:
    ports = ports or [1]
    backends = [{"address": f"127.0.0.1:{p}"} for p in ports]
    for b, w in zip(backends, weights or [], strict=False):
        b["weight"] = w
    svc: dict[str, Any] = {"name": name, "listen": "127.0.0.1:0", "backends": backends}
    if health is not None:
        svc["health"] = health
    return parse_config({"services": [svc]}, source="t.toml")


async def wait_until(predicate: Callable[[], object], timeout: float = 10.0) -> None:
    for _ in range(int(timeout / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


async def test_monitor_detects_down_and_up(serve: Any, refused_port: int) -> None:
    port = await serve(http_reply(200))
    seen: list[Transition] = []
    mon = HealthMonitor(seen.append, rng=random.Random(0))
    fast = {"interval": 0.05, "rise": 2, "fall": 2}
    mon.update(config_with([port, refused_port], health=fast))
    mon.start()
    try:
        await wait_until(lambda: seen)
        assert seen == [
            Transition("web", f"127.0.0.1:{refused_port}", False, "connect refused (2/2)")
        ]
        assert mon.is_up("web", f"127.0.0.1:{port}")
        assert not mon.is_up("web", f"127.0.0.1:{refused_port}")
        assert mon.is_up("web", "127.0.0.1:12345")  # unchecked: always up
        states = mon.states()
        assert states[("web", f"127.0.0.1:{refused_port}")] == Health(up=False, ramp=1.0)
        h = mon.get("web", f"127.0.0.1:{port}")
        assert h is not None and h.last_check is not None and h.last_check.ok
    finally:
        await mon.close()


async def test_monitor_without_health_table_checks_nothing(refused_port: int) -> None:
    seen: list[Transition] = []
    mon = HealthMonitor(seen.append)
    mon.update(config_with([refused_port]))
    mon.start()
    await asyncio.sleep(0.1)
    await mon.close()
    assert seen == [] and mon.states() == {} and mon.get("web", f"127.0.0.1:{refused_port}") is None


async def test_monitor_update_keeps_state_of_backends_that_stay(refused_port: int) -> None:
    seen: list[Transition] = []
    mon = HealthMonitor(seen.append)
    fast = {"interval": 0.05, "fall": 1, "initial": "up"}
    mon.update(config_with([refused_port, 1], health=fast))
    mon.start()
    try:
        await wait_until(lambda: len(seen) >= 2)
        stays = mon.get("web", f"127.0.0.1:{refused_port}")
        assert stays is not None and not stays.up
        # Same address stays (its state with it), one goes, one is new and starts in initial.
        mon.update(config_with([refused_port, 2], health={**fast, "initial": "down"}))
        assert mon.get("web", f"127.0.0.1:{refused_port}") is stays
        assert not stays.up and stays.transitions == 1
        assert mon.get("web", "127.0.0.1:1") is None
        new = mon.get("web", "127.0.0.1:2")
        assert new is not None and not new.up and new.transitions == 0
        # Removing the health table forgets everything: back to always up.
        mon.update(config_with([refused_port, 2]))
        assert mon.states() == {} and mon.is_up("web", f"127.0.0.1:{refused_port}")
    finally:
        await mon.close()


async def test_monitor_passive_signal(serve: Any) -> None:
    port = await serve(http_reply(200))
    address = f"127.0.0.1:{port}"
    counter = {"n": 0}
    seen: list[Transition] = []
    mon = HealthMonitor(seen.append, lambda s, a: counter["n"] if a == address else None)
    # A long active interval: whatever happens within the test is passive.
    mon.update(config_with([port], health={"interval": 600, "timeout": 1, "fall": 3}))
    mon.poll_passive()
    counter["n"] = 2
    mon.poll_passive()
    assert seen == []
    counter["n"] = 3
    mon.poll_passive()
    assert seen == [Transition("web", address, False, "passive: 3 consecutive connect failures")]
    counter["n"] = 0
    mon.poll_passive()
    assert not mon.is_up("web", address)  # only active checks bring it back


async def test_monitor_passive_off(serve: Any) -> None:
    port = await serve(http_reply(200))
    seen: list[Transition] = []
    mon = HealthMonitor(seen.append, lambda s, a: 100)
    mon.update(config_with([port], health={"interval": 0.05, "passive": False}))
    mon.start()
    await asyncio.sleep(0.2)
    await mon.close()
    assert seen == []


async def test_monitor_over_budget_defers_checks_instead_of_dropping_them(
    serve: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no time budget at all, every tick starts one submit batch and leaves the rest
    for the next tick: every backend is still checked."""
    import l4lb.health as health

    monkeypatch.setattr(health, "_SUBMIT_BATCH", 2)
    port = await serve(http_reply(200))
    results: dict[str, list[CheckResult]] = {}
    mon = HealthMonitor(lambda t: None, rng=random.Random(2), budget=0.0)
    # Twenty services on one backend each, all first due within the same few ticks.
    cfg = parse_config(
        {
            "services": [
                {
                    "name": f"s{i}",
                    "listen": "127.0.0.1:0",
                    "backends": [{"address": f"127.0.0.1:{port}"}],
                    "health": {"interval": 0.02, "timeout": 0.02},
                }
                for i in range(20)
            ]
        },
        source="t.toml",
    )
    mon.update(cfg)
    mon.start()
    try:

        def checked() -> bool:
            for i in range(20):
                h = mon.get(f"s{i}", f"127.0.0.1:{port}")
                assert h is not None
                if h.last_check is not None:
                    results.setdefault(f"s{i}", []).append(h.last_check)
            return len(results) == 20

        await wait_until(checked)
    finally:
        await mon.close()
    assert all(r[-1].ok and r[-1].detail == "connect ok" for r in results.values())


async def test_monitor_ramp_delay_with_a_clock(refused_port: int) -> None:
    now = [1000.0]
    mon = HealthMonitor(lambda t: None, clock=lambda: now[0])
    mon.update(config_with([refused_port], health={"slowstart": 4, "rise": 1, "fall": 1}))
    h = mon.get("web", f"127.0.0.1:{refused_port}")
    assert h is not None
    assert mon.ramp_delay() is None
    h.observe(REFUSED, now[0])
    h.observe(OK, now[0])
    assert mon.ramp_delay() == pytest.approx(0.2)
    now[0] += 1.0
    assert mon.states()[("web", f"127.0.0.1:{refused_port}")].ramp == pytest.approx(0.25)
    now[0] += 3.0
    assert mon.states()[("web", f"127.0.0.1:{refused_port}")].ramp == 1.0
    assert mon.ramp_delay() is None


# ----------------------------------------------------------------------------- on uvloop


def test_prober_and_monitor_on_uvloop(refused_port: int, blackhole_port: int) -> None:
    """The tests above run on asyncio's loop; l4lb runs on uvloop, so the same again there."""

    async def scenario() -> tuple[dict[int, set[str]], list[Transition]]:
        loop = asyncio.get_running_loop()
        assert isinstance(loop, uvloop.Loop)
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
        port = int(server.sockets[0].getsockname()[1])
        prober = TcpProber(loop)
        got: dict[int, set[str]] = {port: set(), refused_port: set(), blackhole_port: set()}
        count = 0

        def note(p: int, r: CheckResult) -> None:
            nonlocal count
            got[p].add(r.detail)
            count += 1

        try:
            for _ in range(20):
                for p in got:
                    prober.probe(local(p), p, 0.2, functools.partial(note, p))
            await wait_until(lambda: count == 60)
        finally:
            prober.close()
        seen: list[Transition] = []
        mon = HealthMonitor(seen.append, rng=random.Random(1))
        mon.update(config_with([port, refused_port], health={"interval": 0.05, "fall": 2}))
        mon.start()
        try:
            await wait_until(lambda: seen)
        finally:
            await mon.close()
            server.close()
            await server.wait_closed()
        return {port: got[port], 0: got[refused_port], 1: got[blackhole_port]}, seen

    got, seen = uvloop.run(scenario())
    assert list(got.values()) == [{"connect ok"}, {"connect refused"}, {"timeout after 0.2s"}]
    assert [(t.address, t.up, t.reason) for t in seen] == [
        (f"127.0.0.1:{refused_port}", False, "connect refused (2/2)")
    ]
