"""What health checking costs: checker CPU for 10,000 backends, and proxy throughput.

``test_check_cost``: one ``l4lb run`` (one worker) with 100 services of 100 backends each,
all checked over TCP every second (passive polling on, the default), against 100 loopback
listeners in a separate process that accept and close. After a warm-up of two intervals,
the l4lb process's CPU time (user + system, every thread, from ``/proc``) is read over the
measurement window, and the listeners count the checks that arrived. The same is measured
with the ``[services.health]`` tables removed, so the checker's own share is the
difference. ``extra_info``: ``backends``, ``wanted_checks_per_second`` (backends / interval),
``checks_per_second`` (what arrived: an overloaded checker checks less often rather than
stalling the loop), ``cpu_percent`` (of one core, checks on), ``idle_cpu_percent`` (checks
off), ``checker_cpu_percent`` (the difference), ``cpu_us_per_check``, ``seconds``, and
``admin_ms_median`` / ``admin_ms_max`` (``GET /healthz`` round trips during the window, the
event loop's responsiveness; ``idle_admin_ms_median`` without checks). On loopback the kernel
handles both ends of every handshake in the checker's system calls, so the system part of
the CPU time is about twice what checking remote backends costs.

``test_throughput_with_checks``: one bulk download (``bulk_client`` from
:class:`~l4lb._testbase.SinkSourceServer`) through ``l4lb run`` with one worker, with and
without a TCP check of the backend every 0.1 s, alternating; ``extra_info``:
``gbit_per_s_off``, ``gbit_per_s_on`` (medians), ``on_over_off`` (their ratio),
``bytes``, ``rounds``.

Under ``--benchmark-disable`` (quick mode) everything is small: 1,000 backends, a
one-second window, 32 MiB transfers, one round.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from benchmarks.conftest import Settings
from l4lb._testbase import L4lbProcess, SinkSourceServer, bulk_client, pattern_sha256

MiB = 1 << 20
INTERVAL = 1.0

# Listeners on loopback that accept and close every connection, counting them; a line on
# stdin asks for the count. Standard library only, in its own process so that its CPU is
# not the checker's.
_LISTENERS = r"""
import json, selectors, socket, sys, threading
sel = selectors.DefaultSelector()
ports = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", 0))
    s.listen(4096)
    s.setblocking(False)
    sel.register(s, selectors.EVENT_READ)
    ports.append(s.getsockname()[1])
print(json.dumps(ports), flush=True)
count = 0

def control():
    for _ in sys.stdin:
        print(count, flush=True)

threading.Thread(target=control, daemon=True).start()
while True:
    for key, _ in sel.select():
        for _ in range(256):
            try:
                c, _ = key.fileobj.accept()
            except OSError:
                break
            c.close()
            count += 1
"""


class Listeners:
    """The listener process: ``ports`` and the number of connections seen so far."""

    def __init__(self, count: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _LISTENERS, str(count)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        self.ports: list[int] = json.loads(self.proc.stdout.readline())

    def accepted(self) -> int:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                f.close()


@pytest.fixture
def listeners(settings: Settings) -> Iterator[Listeners]:
    lst = Listeners(10 if settings.quick else 100)
    yield lst
    lst.close()


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of every thread of ``pid``."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _config(ports: list[int], services: int, health: bool) -> dict[str, Any]:
    svc_health = {"kind": "tcp", "interval": INTERVAL, "timeout": 0.5}
    return {
        "admin": {"listen": "127.0.0.1:0"},
        "dataplane": {"workers": 1},
        "services": [
            {
                "name": f"s{i}",
                "listen": "127.0.0.1:0",
                "backends": [{"address": f"127.0.0.1:{p}"} for p in ports],
                **({"health": svc_health} if health else {}),
            }
            for i in range(services)
        ],
    }


@dataclass
class Window:
    cpu_percent: float
    checks_per_second: float
    seconds: float
    admin_ms: list[float]  # GET /healthz round trips during the window: the loop's latency


def _window(config: dict[str, Any], listeners: Listeners, seconds: float, workdir: Path) -> Window:
    with L4lbProcess(config, workdir=workdir, log_level="warning", ready_timeout=120) as lb:
        time.sleep(2 * INTERVAL)  # the first checks are spread over the first interval
        cpu0, n0, t0 = _cpu_seconds(lb.pid), listeners.accepted(), time.monotonic()
        admin_ms = []
        while time.monotonic() - t0 < seconds:
            started = time.perf_counter()
            assert lb.http_get("/healthz")[0] == 200
            admin_ms.append((time.perf_counter() - started) * 1000)
            time.sleep(0.1)
        cpu1, n1, t1 = _cpu_seconds(lb.pid), listeners.accepted(), time.monotonic()
        assert lb.running, lb.stderr_text()
        assert "DOWN" not in lb.stderr_text(), lb.stderr_text()[-2000:]
    wall = t1 - t0
    return Window(100.0 * (cpu1 - cpu0) / wall, (n1 - n0) / wall, wall, admin_ms)


def test_check_cost(
    benchmark: Any, settings: Settings, listeners: Listeners, tmp_path: Path
) -> None:
    services = 100
    seconds = 1.0 if settings.quick else 5.0
    backends = services * len(listeners.ports)
    benchmark.group = "health-check-cost"

    def measure() -> dict[str, Any]:
        on = _window(_config(listeners.ports, services, True), listeners, seconds, tmp_path / "on")
        off = _window(
            _config(listeners.ports, services, False), listeners, seconds, tmp_path / "off"
        )
        checker = max(0.0, on.cpu_percent - off.cpu_percent)
        return {
            "backends": backends,
            "interval": INTERVAL,
            "checks_per_second": round(on.checks_per_second, 1),
            "cpu_percent": round(on.cpu_percent, 2),
            "idle_cpu_percent": round(off.cpu_percent, 2),
            "checker_cpu_percent": round(checker, 2),
            "cpu_us_per_check": round(checker / 100 / max(on.checks_per_second, 1.0) * 1e6, 2),
            "seconds": round(on.seconds, 2),
            "idle_checks_per_second": round(off.checks_per_second, 1),
            "wanted_checks_per_second": backends / INTERVAL,
            "admin_ms_median": round(statistics.median(on.admin_ms), 2),
            "admin_ms_max": round(max(on.admin_ms), 2),
            "idle_admin_ms_median": round(statistics.median(off.admin_ms), 2),
        }

    result = benchmark.pedantic(measure, rounds=1, iterations=1)
    benchmark.extra_info.update(result)
    # Checks ran (at whatever rate the machine allows), and none ran with checking off.
    assert result["checks_per_second"] > 0, result
    assert result["idle_checks_per_second"] == 0, result


@pytest.fixture
def sink() -> Iterator[SinkSourceServer]:
    with SinkSourceServer() as srv:
        yield srv


def _throughput(address: str, size: int) -> float:
    res = bulk_client(address, 0, size, timeout=300)
    assert res.complete and res.received_sha256 == pattern_sha256(size)
    return res.received * 8 / res.elapsed / 1e9


def test_throughput_with_checks(
    benchmark: Any,
    settings: Settings,
    sink: SinkSourceServer,
    l4lb_factory: Callable[..., L4lbProcess],
) -> None:
    size = (32 if settings.quick else 1024) * MiB
    rounds = 1 if settings.quick else 5
    base = {
        "admin": {"listen": "127.0.0.1:0"},
        "dataplane": {"workers": 1},
        "services": [
            {"name": "bench", "listen": "127.0.0.1:0", "backends": [{"address": sink.address}]}
        ],
    }
    checked = copy.deepcopy(base)
    checked["services"][0]["health"] = {"kind": "tcp", "interval": 0.1}
    benchmark.group = "health-throughput"

    def measure() -> dict[str, Any]:
        speeds: dict[str, list[float]] = {"off": [], "on": []}
        # The package's own pytest plugin starts both (and stops them at teardown).
        off = l4lb_factory(base, log_level="warning")
        on = l4lb_factory(checked, log_level="warning")
        time.sleep(0.3)  # let the checks start
        for _ in range(rounds):
            speeds["off"].append(_throughput(off.service_address("bench"), size))
            speeds["on"].append(_throughput(on.service_address("bench"), size))
        assert on.service("bench")["backends"][0]["up"]
        off_gbps, on_gbps = statistics.median(speeds["off"]), statistics.median(speeds["on"])
        return {
            "gbit_per_s_off": round(off_gbps, 3),
            "gbit_per_s_on": round(on_gbps, 3),
            "on_over_off": round(on_gbps / off_gbps, 3),
            "runs_off": [round(v, 3) for v in speeds["off"]],
            "runs_on": [round(v, 3) for v in speeds["on"]],
            "bytes": size,
            "rounds": rounds,
        }

    result = benchmark.pedantic(measure, rounds=1, iterations=1)
    benchmark.extra_info.update(result)
    assert sink.resets > 0  # the checks (which end with a reset) really ran against it
