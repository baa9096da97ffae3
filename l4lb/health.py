"""Active and passive health checks, and the state that turns them into weights.

What the settings of a ``[services.health]`` table mean:

- **No table, no checking.** A service without ``[services.health]`` has every backend up,
  always. Passive detection exists only together with active checks, because a backend
  taken down passively receives no traffic and could never prove itself healthy again.
- **Active checks** probe each backend every ``interval`` seconds, start to start, spread by
  ``jitter`` (each interval is ``interval * (1 ± jitter)``); the first probe comes at a random
  offset within the first interval, so thousands of backends are not probed in lockstep.
  ``kind = "tcp"`` only connects. ``kind = "http"`` sends one HTTP/1.0 request
  (``http_method http_path``, ``Host: http_host``, default the backend's IP) and wants a
  status in ``expect_status`` and, if set, ``expect_body`` in the first
  :data:`HTTP_MAX_RESPONSE` bytes of the response. A probe slower than ``timeout`` fails.
  ``port`` checks another port than the one traffic goes to. Probes close with a reset, as
  HAProxy's do, so a checker probing thousands of backends leaves no TIME_WAIT behind.
- **Hysteresis**: ``fall`` consecutive failures take an up backend down, ``rise`` consecutive
  successes bring a down backend up. ``initial`` is the state before any probe has run.
- **Passive** (``passive = true``): the data plane counts each backend's consecutive failed or
  timed-out connects (reset by a successful one); this module polls that count every
  ``interval`` seconds, at most :data:`PASSIVE_POLL`, and ``fall`` such failures take an up
  backend down at once ("passive: 3 consecutive connect failures"). Only ``rise`` active
  successes bring it back.
- **Down means weight 0**, like keepalived's ``inhibit_on_failure``: the backend keeps its
  place in the scheduler, new connections skip it, and its established connections go on
  unless ``on_down = "reset"``, which resets them when it goes down.
- **Slow start**: a backend that comes back up (not one that is up from the start) gets a
  weight ramped linearly from 1 to its full weight over ``slowstart`` seconds, recomputed in
  :data:`SLOWSTART_STEPS` steps. Weights only matter to weighted schedulers (wrr, wlc, sed,
  sh, dh); rr, lc and nq see an up backend as up whatever its weight.
- **all_down** decides what a service does when every backend is down. The default,
  ``"reject"``, programs every backend with weight 0, so the data plane resets new clients
  at once (HAProxy and keepalived behave this way: nothing is served, no cascade of connect
  timeouts). ``"all"`` programs every backend with its configured weight as if nothing were
  checked, as kube-proxy falls back to terminating endpoints. Rejecting is the default
  because the checks are the operator's own, explicit statement of what a working backend
  is: when all of them fail, the backends are most likely really gone, and an immediate
  reset lets clients fail over or retry elsewhere instead of waiting out connect timeouts
  to dead hosts. kube-proxy's fallback exists because its readiness signal comes from
  another system and its terminating endpoints are known to still run; a service whose
  check may be stricter than its traffic needs opts in with ``all_down = "all"``.
- **Reload** keeps the state of every backend that stays (same service and address); new
  backends start in ``initial``. Admin overrides combine with health, drain winning.

Everything runs on the event loop and never blocks. HTTP probes are asyncio streams under
``asyncio.timeout``. TCP probes, the ones meant to scale to ten thousand backends, run in C
(:class:`~l4lb._dataplane.Prober`): non-blocking connects on an epoll set of their own, with
their timeouts, which the loop watches as one reader; the checks due in one :data:`TICK`
start in one call and their results come back in one list. Check starts sit on a
:class:`Wheel` of :data:`TICK` slots, so checks due together share one wake-up, and each
tick spends at most :data:`TICK_BUDGET` seconds starting them: a checker asked for more than
the machine can do checks less often instead of stalling the admin API and re-programming.
For the same reason a probe whose timeout falls due checks whether its connect did in fact
complete before failing, so a late loop never turns a healthy backend into a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import math
import os
import random
import re
import socket
import struct
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

from l4lb._dataplane import PROBE_TIMEOUT, Prober
from l4lb.config import Address, Config, HealthConfig
from l4lb.state import Health

__all__ = [
    "HTTP_MAX_RESPONSE",
    "PASSIVE_POLL",
    "SLOWSTART_STEPS",
    "TICK",
    "TICK_BUDGET",
    "BackendHealth",
    "CheckResult",
    "HealthMonitor",
    "TcpProbe",
    "TcpProber",
    "Transition",
    "Wheel",
    "first_delay",
    "http_probe",
    "http_request",
    "judge_http_response",
    "next_interval",
    "run_check",
    "slowstart_ramp",
    "tcp_probe",
]

log = logging.getLogger("l4lb.health")

#: Longest wait between two reads of the passive failure counters, in seconds.
PASSIVE_POLL = 1.0
#: Slow start reaches the full weight in this many steps ...
SLOWSTART_STEPS = 20
#: ... but re-programs no more often than this, in seconds.
SLOWSTART_MIN_STEP = 0.1
#: Bytes of an HTTP check response that are read at most (status line, headers, body).
HTTP_MAX_RESPONSE = 16384

#: Check starts and timeouts are rounded up to this many seconds, so that the checks due
#: around the same time share one event-loop wake-up instead of one each.
TICK = 0.01
#: Seconds of wheel callbacks (mostly starting checks) one loop iteration may run; what is
#: left waits for the next tick. Half a tick: the checker never takes the whole loop.
TICK_BUDGET = 0.005

_LINGER_RESET = struct.pack("ii", 1, 0)
_PASSIVE_SLICE = 256
_SUBMIT_BATCH = 32  # tcp checks per Prober.submit call, between budget checks
_COLLECT_BATCH = 256  # tcp results handled per loop iteration at most; the rest wait
_STATUS_LINE_RE = re.compile(rb"HTTP/\d\.\d (\d{3})(?: |\r?$)")


# --------------------------------------------------------------------------- pure parts


def first_delay(interval: float, rng: random.Random) -> float:
    """Delay before a backend's first probe: uniform within one interval."""
    return rng.uniform(0.0, interval)


def next_interval(interval: float, jitter: float, rng: random.Random) -> float:
    """Time from one probe's start to the next: ``interval * (1 ± jitter)``."""
    return interval * (1.0 + rng.uniform(-jitter, jitter))


def slowstart_ramp(elapsed: float, slowstart: float) -> float:
    """Fraction of its weight a backend up for ``elapsed`` seconds gets, in (0, 1]."""
    if slowstart <= 0 or elapsed >= slowstart:
        return 1.0
    return max(elapsed, 0.0) / slowstart or 1e-9


@dataclass(frozen=True, slots=True)
class CheckResult:
    """The outcome of one active probe; ``at`` is wall-clock time (Unix seconds)."""

    ok: bool
    detail: str
    duration: float
    at: float

    def as_dict(self) -> dict[str, Any]:
        """The JSON shape used by the admin API."""
        return {
            "ok": self.ok,
            "detail": self.detail,
            "duration": round(self.duration, 6),
            "at": round(self.at, 3),
        }


@dataclass(frozen=True, slots=True)
class Transition:
    """A backend changed state; ``reason`` is what the log line says after the colon."""

    service: str
    address: str
    up: bool
    reason: str

    def message(self) -> str:
        """The log line for this transition."""
        state = "UP" if self.up else "DOWN"
        return f"backend {self.address} of {self.service} is {state}: {self.reason}"


class BackendHealth:
    """One backend's health: hysteresis counters, slow start and what the API shows.

    Methods take the monotonic time ``now`` as an argument, so the logic is testable
    without clocks or sockets.
    """

    __slots__ = (
        "_last",
        "address",
        "config",
        "failures",
        "passive_base",
        "passive_seen",
        "reason",
        "service",
        "since",
        "successes",
        "transitions",
        "up",
        "up_at",
    )

    def __init__(self, service: str, address: str, config: HealthConfig) -> None:
        self.service = service
        self.address = address
        self.config = config
        self.up = config.initial == "up"
        self.successes = 0
        self.failures = 0
        self.transitions = 0
        # The last probe's result, or its fields until someone reads it: ten thousand
        # checks a second need not build a CheckResult each.
        self._last: CheckResult | tuple[bool, str, float, float] | None = None
        self.reason = f"initial state {config.initial}"
        self.since = time.time()
        self.up_at: float | None = None  # monotonic; set while slow start ramps
        self.passive_base: int | None = None  # counter value failures are counted from
        self.passive_seen = 0

    @property
    def last_check(self) -> CheckResult | None:
        """The result of the last active probe, if any."""
        last = self._last
        if isinstance(last, tuple):
            last = self._last = CheckResult(*last)
        return last

    def observe(self, result: CheckResult, now: float) -> Transition | None:
        """Record an active probe; return the transition it causes, if any."""
        self._last = result
        return self._judge(result.ok, result.detail, now)

    def observe_fields(
        self, ok: bool, detail: str, duration: float, at: float, now: float
    ) -> Transition | None:
        """:meth:`observe` for a result given as the fields of a :class:`CheckResult`."""
        self._last = (ok, detail, duration, at)
        if ok and self.up:  # the common case, kept short
            self.failures = 0
            return None
        return self._judge(ok, detail, now)

    def _judge(self, ok: bool, detail: str, now: float) -> Transition | None:
        if ok:
            self.failures = 0
            if self.up:
                return None
            self.successes += 1
            if self.successes < self.config.rise:
                return None
            return self._set(True, f"{detail} ({self.successes}/{self.config.rise})", now)
        self.successes = 0
        if not self.up:
            return None
        self.failures += 1
        if self.failures < self.config.fall:
            return None
        return self._set(False, f"{detail} ({self.failures}/{self.config.fall})", now)

    def observe_passive(self, consecutive: int, now: float) -> Transition | None:
        """Record the data plane's consecutive connect failure count for this backend.

        Failures are counted from the value seen when the backend last came up (or was
        first seen), so failures from before do not count twice; a count lower than the
        previous one means the data plane connected in between and starts from zero.
        """
        if self.passive_base is None:
            self.passive_base = consecutive
        elif consecutive < self.passive_seen:
            self.passive_base = 0
        self.passive_seen = consecutive
        failed = consecutive - self.passive_base
        if not self.up or failed < self.config.fall:
            return None
        return self._set(False, f"passive: {failed} consecutive connect failures", now)

    def _set(self, up: bool, reason: str, now: float) -> Transition:
        self.up = up
        self.successes = self.failures = 0
        self.transitions += 1
        self.reason = reason
        self.since = time.time()
        self.up_at = now if up and self.config.slowstart > 0 else None
        self.passive_base = None  # re-read the counter before trusting it again
        return Transition(self.service, self.address, up, reason)

    def ramp(self, now: float) -> float:
        """The slow-start fraction of the weight at ``now`` (1.0 once done)."""
        if self.up_at is None:
            return 1.0
        ramp = slowstart_ramp(now - self.up_at, self.config.slowstart)
        if ramp >= 1.0:
            self.up_at = None
        return ramp

    def ramp_delay(self, now: float) -> float | None:
        """Seconds until the ramped weight should be recomputed, or None if not ramping."""
        if self.up_at is None or not self.up:
            return None
        slowstart = self.config.slowstart
        left = self.up_at + slowstart - now
        return max(0.0, min(max(slowstart / SLOWSTART_STEPS, SLOWSTART_MIN_STEP), left))

    def as_dict(self) -> dict[str, Any]:
        """The ``health`` object of a backend in the admin API."""
        return {
            "state": "up" if self.up else "down",
            "reason": self.reason,
            "since": round(self.since, 3),
            "last_check": None if (last := self.last_check) is None else last.as_dict(),
            "transitions": self.transitions,
        }


# --------------------------------------------------------------------------- probes


def _reset_on_close(transport: asyncio.WriteTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    transport.abort()


def _errno_detail(err: int) -> str:
    if err == errno.ECONNREFUSED:
        return "connect refused"
    if err == errno.ECONNRESET:
        return "connection reset"
    return os.strerror(err).lower()


def _os_error(exc: OSError) -> str:
    if exc.errno:
        return _errno_detail(exc.errno)
    return (exc.strerror or str(exc) or type(exc).__name__).lower()


class Wheel:
    """Callbacks due within the same :data:`TICK` run from one event-loop timer.

    Ten thousand checks a second would otherwise be ten thousand timers, each waking the
    loop on its own. Nothing is cancelled: a callback that is no longer wanted finds out
    for itself when it runs.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._slots: dict[int, list[Callable[[], object]]] = {}
        self._timers: dict[int, asyncio.TimerHandle] = {}
        self._spent: float | None = None  # seconds used in this loop iteration

    def call_at(self, when: float, callback: Callable[[], object]) -> None:
        """Run ``callback`` at loop time ``when``, rounded up to the next tick."""
        slot = max(math.ceil(when / TICK), math.ceil(self._loop.time() / TICK))
        pending = self._slots.get(slot)
        if pending is None:
            pending = self._slots[slot] = []
            self._timers[slot] = self._loop.call_at(slot * TICK, self._run, slot)
        pending.append(callback)

    def _run(self, slot: int) -> None:
        del self._timers[slot]
        callbacks = self._slots.pop(slot, [])
        # One budget per loop iteration, however many ticks fell due in it: a call_soon
        # callback runs once the timers of this iteration are done and resets it.
        if self._spent is None:
            self._spent = 0.0
            self._loop.call_soon(self._new_iteration)
        start = time.perf_counter()
        deadline = start + TICK_BUDGET - self._spent
        done = 0
        while done < len(callbacks) and (done % 16 or time.perf_counter() < deadline):
            callbacks[done]()
            done += 1
        self._spent += time.perf_counter() - start
        if done < len(callbacks):
            # More due than the budget allows: the rest go first in the next tick, so the
            # loop stays responsive and an overloaded checker checks less often instead.
            self._defer(slot + 1, callbacks[done:])

    def _new_iteration(self) -> None:
        self._spent = None

    def _defer(self, slot: int, callbacks: list[Callable[[], object]]) -> None:
        slot = max(slot, math.ceil(self._loop.time() / TICK))
        pending = self._slots.get(slot)
        if pending is None:
            self._slots[slot] = callbacks
            self._timers[slot] = self._loop.call_at(slot * TICK, self._run, slot)
        else:
            pending[:0] = callbacks

    def close(self) -> None:
        """Drop every pending callback."""
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        self._slots.clear()


def _target(address: Address, port: int, timeout: float) -> tuple[int, bytes, int, int]:
    """What :meth:`Prober.submit` takes for one check, after the probe id."""
    packed = socket.inet_pton(address.family, address.host)
    return address.family, packed, port, max(1, math.ceil(timeout * 1000))


def _connect_detail(err: int, timeout: float) -> str:
    """What a probe's errno means (0: connected, PROBE_TIMEOUT: timed out)."""
    if err == 0:
        return "connect ok"
    if err == PROBE_TIMEOUT:
        return f"timeout after {timeout:g}s"
    return _errno_detail(err)


class TcpProbe:
    """One TCP connect check in flight (see :class:`TcpProber`)."""

    __slots__ = ("done", "id", "prober", "timeout")

    def __init__(
        self,
        prober: TcpProber,
        probe_id: int,
        timeout: float,
        done: Callable[[CheckResult], object],
    ) -> None:
        self.prober = prober
        self.id = probe_id
        self.timeout = timeout
        self.done: Callable[[CheckResult], object] | None = done

    def finish(self, err: int, duration: float) -> None:
        """Report the outcome, once."""
        done, self.done = self.done, None
        if done is not None:
            at = time.time() - duration
            done(CheckResult(err == 0, _connect_detail(err, self.timeout), duration, at))

    def cancel(self) -> None:
        """Abandon the check: it never reports (its socket closes at its outcome)."""
        self.done = None
        self.prober.forget(self.id)


class TcpProber:
    """TCP connect checks with a callback each, on the C :class:`Prober`.

    The connects, their polling and their timeouts run in C on an epoll set of their own,
    which the event loop watches as a single reader; sockets close with a reset, as
    HAProxy's checks do, so that no TIME_WAIT is left behind. Results always arrive from
    the loop, never from :meth:`probe` itself. (:class:`HealthMonitor` drives a
    :class:`Prober` directly, in batches.)
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._prober = Prober()
        self._next_id = 0
        self._pending: dict[int, TcpProbe] = {}
        loop.add_reader(self._prober.fileno(), self._ready)

    def probe(
        self, address: Address, port: int, timeout: float, done: Callable[[CheckResult], object]
    ) -> TcpProbe:
        """Start checking ``address.host:port``; ``done`` gets the result."""
        self._next_id += 1
        probe = self._pending[self._next_id] = TcpProbe(self, self._next_id, timeout, done)
        if self._prober.submit([(self._next_id, *_target(address, port, timeout))]):
            self._loop.call_soon(self._ready)
        return probe

    def forget(self, probe_id: int) -> None:
        """Stop tracking a probe: its result, when it comes, is dropped."""
        self._pending.pop(probe_id, None)

    def _ready(self) -> None:
        for probe_id, err, duration in self._prober.collect():
            probe = self._pending.pop(probe_id, None)
            if probe is not None:
                probe.finish(err, duration)

    def close(self) -> None:
        """Abandon every check in flight (unreported) and release the prober."""
        self._pending.clear()
        self._loop.remove_reader(self._prober.fileno())
        self._prober.close()


async def tcp_probe(address: Address, port: int, timeout: float) -> CheckResult:
    """Connect to ``address.host:port`` within ``timeout`` seconds, then reset."""
    loop = asyncio.get_running_loop()
    result: asyncio.Future[CheckResult] = loop.create_future()
    prober = TcpProber(loop)
    try:
        prober.probe(address, port, timeout, result.set_result)
        return await result
    finally:
        prober.close()


def http_request(address: Address, cfg: HealthConfig) -> bytes:
    """The request an http check sends (HTTP/1.0, so the reply is never chunked)."""
    host = cfg.http_host or (f"[{address.host}]" if ":" in address.host else address.host)
    return (
        f"{cfg.http_method} {cfg.http_path} HTTP/1.0\r\nHost: {host}\r\n"
        "User-Agent: l4lb-health-check\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    ).encode("ascii")


def judge_http_response(data: bytes, eof: bool, cfg: HealthConfig) -> tuple[bool, str] | None:
    """Decide on a (possibly partial) response; None while more data could still decide."""
    line_end = data.find(b"\n")
    if line_end < 0:
        if eof or len(data) >= HTTP_MAX_RESPONSE:
            return False, "no HTTP status line" if data else "closed without a response"
        return None
    m = _STATUS_LINE_RE.match(data[:line_end])
    if m is None:
        shown = data[:line_end].rstrip(b"\r")[:60].decode("ascii", "backslashreplace")
        return False, f"bad HTTP status line {shown!r}"
    status = int(m[1])
    low, high = cfg.expect_status
    if not low <= status <= high:
        return False, f"HTTP {status} (expected {low}-{high})"
    if cfg.expect_body is None:
        return True, f"HTTP {status}"
    head_end = data.find(b"\r\n\r\n")
    body = data[head_end + 4 :] if head_end >= 0 else b""
    if head_end >= 0 and cfg.expect_body.encode() in body:
        return True, f"HTTP {status}, body matches"
    if eof or len(data) >= HTTP_MAX_RESPONSE:
        return False, f"HTTP {status}, {cfg.expect_body!r} not in the body"
    return None


async def http_probe(address: Address, port: int, cfg: HealthConfig) -> tuple[bool, str]:
    """One HTTP check against ``address.host:port``; ``(ok, detail)``. No timeout of its own."""
    try:
        reader, writer = await asyncio.open_connection(address.host, port)
    except OSError as exc:
        return False, _os_error(exc)
    try:
        writer.write(http_request(address, cfg))
        data = b""
        while True:
            chunk = await reader.read(HTTP_MAX_RESPONSE - len(data))
            data += chunk
            verdict = judge_http_response(data, not chunk, cfg)
            if verdict is not None:
                return verdict
    except OSError as exc:
        return False, _os_error(exc)
    finally:
        _reset_on_close(writer.transport)


async def run_check(address: Address, cfg: HealthConfig) -> CheckResult:
    """Run one probe of ``cfg.kind`` under ``cfg.timeout`` and time it."""
    port = cfg.port or address.port
    if cfg.kind != "http":
        return await tcp_probe(address, port, cfg.timeout)
    at = time.time()
    start = time.perf_counter()
    try:
        async with asyncio.timeout(cfg.timeout):
            ok, detail = await http_probe(address, port, cfg)
    except TimeoutError:
        ok, detail = False, f"timeout after {cfg.timeout:g}s"
    return CheckResult(ok, detail, time.perf_counter() - start, at)


# --------------------------------------------------------------------------- the monitor

FailureReader = Callable[[str, str], int | None]
TransitionHandler = Callable[[Transition], None]


class _Entry:
    __slots__ = ("address", "due", "health", "probe", "probe_id", "started", "target")

    def __init__(self, address: Address, health: BackendHealth) -> None:
        self.address = address
        self.health = health
        self.due = -1  # the tick the next check waits for; -1: none (stopped or running)
        self.probe: asyncio.Task[CheckResult] | None = None  # the running http check
        self.probe_id = -1  # the tcp check in flight, -1 if none
        self.started = 0.0
        self.target: tuple[int, bytes, int, int] | None = None  # tcp: Prober.submit's fields


class HealthMonitor:
    """Checks the backends of every service with a ``[services.health]`` table.

    ``on_transition`` is called on the event loop for every state change (already logged).
    ``failures(service, address)`` returns the data plane's consecutive connect failure
    count of a backend, or None when it has none (the passive signal).

    Checks due in the same :data:`TICK` wait in one list on a :class:`Wheel`; when the tick
    comes, its tcp checks go to the C :class:`Prober` in one call, and the results come
    back in one list per loop wake-up, so ten thousand backends cost no task, timer or
    callback each, only their checks.
    """

    def __init__(
        self,
        on_transition: TransitionHandler,
        failures: FailureReader | None = None,
        *,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        budget: float = TICK_BUDGET,
    ) -> None:
        self._on_transition = on_transition
        self._budget = budget  # seconds one tick may spend starting checks
        self._failures = failures
        self._rng = rng or random.Random()
        self._clock = clock
        self._entries: dict[tuple[str, str], _Entry] = {}
        self._passive: dict[str, asyncio.Task[None]] = {}
        self._services: dict[str, tuple[HealthConfig, list[_Entry]]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wheel: Wheel | None = None
        self._prober: Prober | None = None
        self._due: dict[int, list[_Entry]] = {}  # tick -> the checks that start then
        self._inflight: dict[int, _Entry] = {}  # tcp probe id -> its backend
        self._next_id = 0

    # -- configuration

    def update(self, cfg: Config, changed: Collection[str] | None = None) -> None:
        """Follow ``cfg``: keep the state of backends that stay, start new ones in
        ``initial``, forget removed ones. Restarts probes whose settings changed.

        With ``changed``, only the services of those names are followed; the others stay
        as they are (their checks run on undisturbed)."""
        if changed is not None:
            self._update_some(cfg, changed)
            return
        wanted: dict[tuple[str, str], tuple[Address, HealthConfig]] = {}
        for svc in cfg.services:
            if svc.health is not None:
                for b in svc.backends:
                    wanted[(svc.name, str(b.address))] = (b.address, svc.health)
        for key in [k for k in self._entries if k not in wanted]:
            self._stop(self._entries.pop(key))
        for key, (address, hcfg) in wanted.items():
            entry = self._entries.get(key)
            if entry is None:
                entry = self._entries[key] = _Entry(address, BackendHealth(*key, hcfg))
                self._start(entry)
            elif entry.health.config != hcfg:
                entry.health.config = hcfg
                self._stop(entry)
                self._start(entry)
        self._services = {}
        for (service, _), entry in self._entries.items():
            self._services.setdefault(service, (entry.health.config, []))[1].append(entry)
        for task in self._passive.values():
            task.cancel()
        self._passive.clear()
        if self._loop is not None:
            self._start_passive()

    def _update_some(self, cfg: Config, names: Collection[str]) -> None:
        for name in names:
            svc = cfg.get(name)
            hcfg = None if svc is None else svc.health
            _, old = self._services.pop(name, (None, []))
            if hcfg is None and not old:
                continue
            stale = {e.health.address: e for e in old}
            entries: list[_Entry] = []
            for b in svc.backends if svc is not None else ():
                if hcfg is None:
                    break
                key = (name, str(b.address))
                entry = stale.pop(key[1], None)
                if entry is None:
                    entry = self._entries[key] = _Entry(b.address, BackendHealth(*key, hcfg))
                    self._start(entry)
                elif entry.health.config != hcfg:
                    entry.health.config = hcfg
                    self._stop(entry)
                    self._start(entry)
                entries.append(entry)
            for address, entry in stale.items():
                del self._entries[(name, address)]
                self._stop(entry)
            task = self._passive.pop(name, None)
            if task is not None:
                task.cancel()
            if hcfg is None or not entries:
                continue
            self._services[name] = (hcfg, entries)
            if hcfg.passive and self._failures is not None and self._loop is not None:
                period = min(hcfg.interval, PASSIVE_POLL)
                self._passive[name] = self._loop.create_task(self._passive_loop(entries, period))

    def start(self) -> None:
        """Start probing (call from the event loop)."""
        if self._loop is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._wheel = Wheel(self._loop)
        self._prober = Prober()
        self._loop.add_reader(self._prober.fileno(), self._collect)
        for entry in self._entries.values():
            self._start(entry)
        self._start_passive()

    async def close(self) -> None:
        """Stop every probe and wait for what runs as a task to end."""
        loop, self._loop = self._loop, None
        tasks: list[asyncio.Task[Any]] = list(self._passive.values())
        tasks += [e.probe for e in self._entries.values() if e.probe is not None]
        for entry in self._entries.values():
            self._stop(entry)
        for task in self._passive.values():
            task.cancel()
        self._passive.clear()
        if self._prober is not None and loop is not None:
            loop.remove_reader(self._prober.fileno())
            self._prober.close()
        if self._wheel is not None:
            self._wheel.close()
        self._prober = self._wheel = None
        self._due.clear()
        self._inflight.clear()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _start(self, entry: _Entry) -> None:
        cfg = entry.health.config
        if cfg.kind != "http":
            entry.target = _target(entry.address, cfg.port or entry.address.port, cfg.timeout)
        if self._loop is not None:
            self._schedule(entry, self._loop.time() + first_delay(cfg.interval, self._rng))

    def _schedule(self, entry: _Entry, when: float, earliest: int = 0) -> None:
        """Start ``entry``'s next check at loop time ``when`` (rounded up to a tick), or
        at the tick ``earliest`` if that is later; 0 means the next tick from now."""
        assert self._loop is not None and self._wheel is not None
        if earliest == 0:
            earliest = math.ceil(self._loop.time() / TICK)
        tick = math.ceil(when / TICK)
        if tick < earliest:
            tick = earliest
        entry.due = tick
        due = self._due.get(tick)
        if due is None:
            self._due[tick] = [entry]
            self._wheel.call_at(tick * TICK, functools.partial(self._fire, tick))
        else:
            due.append(entry)

    def _stop(self, entry: _Entry) -> None:
        entry.due = -1  # the check waiting on the wheel no longer runs
        if entry.probe_id >= 0:
            self._inflight.pop(entry.probe_id, None)  # its result is dropped
            entry.probe_id = -1
        if entry.probe is not None:
            entry.probe.cancel()
            entry.probe = None

    def _start_passive(self) -> None:
        if self._failures is None or self._loop is None:
            return
        for service, (hcfg, entries) in self._services.items():
            if hcfg.passive:
                period = min(hcfg.interval, PASSIVE_POLL)
                task = self._loop.create_task(self._passive_loop(entries, period))
                self._passive[service] = task

    # -- the checks

    def _fire(self, tick: int) -> None:
        entries = self._due.pop(tick, [])
        loop, prober = self._loop, self._prober
        if loop is None or prober is None:
            return
        now = loop.time()
        deadline = time.perf_counter() + self._budget
        inflight, next_id = self._inflight, self._next_id
        batch: list[tuple[int, int, bytes, int, int]] = []
        for start in range(0, len(entries), _SUBMIT_BATCH):
            if start and time.perf_counter() > deadline:
                # More due than the budget allows: the rest start first at the next tick,
                # so an overloaded checker checks less often instead of stalling the loop.
                self._defer(tick, entries[start:])
                break
            for entry in entries[start : start + _SUBMIT_BATCH]:
                if entry.due != tick:
                    continue  # stopped or rescheduled since
                entry.due = -1
                entry.started = now
                target = entry.target
                if target is None:
                    task = loop.create_task(run_check(entry.address, entry.health.config))
                    task.add_done_callback(functools.partial(self._http_done, entry))
                    entry.probe = task
                else:
                    next_id += 1
                    entry.probe_id = next_id
                    inflight[next_id] = entry
                    batch.append((next_id, *target))
            self._next_id = next_id
            self._submit(batch)
            batch = []

    def _defer(self, tick: int, entries: list[_Entry]) -> None:
        assert self._wheel is not None
        later = tick + 1
        waiting = [e for e in entries if e.due == tick]
        for entry in waiting:
            entry.due = later
        due = self._due.get(later)
        if due is None:
            self._due[later] = waiting
            self._wheel.call_at(later * TICK, functools.partial(self._fire, later))
        else:
            due[:0] = waiting

    def _submit(self, batch: list[tuple[int, int, bytes, int, int]]) -> None:
        if not batch or self._prober is None or self._loop is None:
            return
        if self._prober.submit(batch):  # some failed at once: report them from the loop
            self._loop.call_soon(self._collect)

    def _collect(self) -> None:
        if self._prober is None or self._loop is None:
            return
        results = self._prober.collect(_COLLECT_BATCH)
        if not results:
            return
        wall, now, inflight, uniform = time.time(), self._clock(), self._inflight, self._rng.uniform
        earliest = math.ceil(self._loop.time() / TICK)
        due, ceil = self._due, math.ceil
        # The per-result work of _schedule and next_interval, inlined: at ten thousand
        # results a second, the calls alone would be a good part of the checker's cost.
        for probe_id, err, duration in results:
            entry = inflight.pop(probe_id, None)
            if entry is None:
                continue  # stopped since
            entry.probe_id = -1
            health = entry.health
            cfg = health.config
            when = entry.started + cfg.interval * (1.0 + uniform(-cfg.jitter, cfg.jitter))
            tick = ceil(when / TICK)
            if tick < earliest:
                tick = earliest
            entry.due = tick
            waiting = due.get(tick)
            if waiting is None:
                self._schedule(entry, when, earliest)
            else:
                waiting.append(entry)
            detail = "connect ok" if err == 0 else _connect_detail(err, cfg.timeout)
            transition = health.observe_fields(err == 0, detail, duration, wall - duration, now)
            if transition is not None:
                self._emit(transition, entry)

    def _http_done(self, entry: _Entry, task: asyncio.Task[CheckResult]) -> None:
        if task.cancelled() or entry.probe is not task:
            return
        exc = task.exception()
        if exc is None:
            self._checked(entry, task.result())
            return
        # A bug must not silently stop the checks of this backend.
        log.error("health check of %s failed unexpectedly: %r", entry.health.address, exc)
        self._checked(entry, CheckResult(False, f"check error: {exc!r}", 0.0, time.time()))

    def _checked(self, entry: _Entry, result: CheckResult) -> None:
        entry.probe = None
        if self._loop is not None:
            cfg = entry.health.config
            self._schedule(
                entry, entry.started + next_interval(cfg.interval, cfg.jitter, self._rng)
            )
        self._emit(entry.health.observe(result, self._clock()), entry)

    async def _passive_loop(self, entries: list[_Entry], period: float) -> None:
        # Services poll at their own phase, in slices, so that no poll holds the loop long.
        await asyncio.sleep(self._rng.uniform(0.0, period))
        while True:
            for i in range(0, len(entries), _PASSIVE_SLICE):
                self.poll_passive(entries[i : i + _PASSIVE_SLICE])
                await asyncio.sleep(0)
            await asyncio.sleep(period)

    def poll_passive(self, entries: list[_Entry] | None = None) -> None:
        """Read the passive counters once (of ``entries``, default all) and act on them."""
        if self._failures is None:
            return
        now = self._clock()
        for entry in self._entries.values() if entries is None else entries:
            h = entry.health
            count = self._failures(h.service, h.address)
            if count is not None:
                self._emit(h.observe_passive(count, now), entry)

    def _emit(self, transition: Transition | None, entry: _Entry) -> None:
        if transition is None:
            return
        if transition.up:
            log.info("%s", transition.message())
            if self._failures is not None:  # count passive failures from here on
                count = self._failures(transition.service, transition.address)
                if count is not None:
                    entry.health.observe_passive(count, self._clock())
        else:
            log.warning("%s", transition.message())
        self._on_transition(transition)

    # -- reading

    def states(self) -> dict[tuple[str, str], Health]:
        """Health of every checked backend, the input :func:`l4lb.state.desired_state` takes."""
        now = self._clock()
        return {k: Health(e.health.up, e.health.ramp(now)) for k, e in self._entries.items()}

    def ramp_delay(self) -> float | None:
        """Seconds until some slow-starting weight changes, or None if none ramps."""
        now = self._clock()
        delays = [d for e in self._entries.values() if (d := e.health.ramp_delay(now)) is not None]
        return min(delays) if delays else None

    def get(self, service: str, address: str) -> BackendHealth | None:
        """The health of one backend, or None if it is not checked."""
        entry = self._entries.get((service, address))
        return None if entry is None else entry.health

    def is_up(self, service: str, address: str) -> bool:
        """Whether the backend is up (an unchecked backend always is)."""
        entry = self._entries.get((service, address))
        return entry is None or entry.health.up

    def config(self, service: str) -> HealthConfig | None:
        """The health settings of ``service``, or None if it is not checked."""
        found = self._services.get(service)
        return None if found is None else found[0]
