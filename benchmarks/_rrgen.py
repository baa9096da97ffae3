"""The request/response load generator (loadgen/rrgen.c): build, echo backend, runs.

No packaged tool fits: wrk has no rate control and no UDP, iperf3's UDP mode is one-way.
``rrgen`` is compiled here with gcc at first use, into the benchmark's scratch directory,
with the project's warning flags. It serves as the echo backend too, so a request costs
the same on every peer's far side.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks._procs import ManagedProcess, PeerUnavailable
from benchmarks._results import Measurement, Metric

__all__ = [
    "FLOWS",
    "LOAD_SHARES",
    "QUICK_SECONDS",
    "RrgenResult",
    "build_rrgen",
    "direct_capacity",
    "echo_backend",
    "latency_measurement",
    "run_rrgen",
]

SOURCE = Path(__file__).resolve().parent / "loadgen" / "rrgen.c"
CFLAGS = ("-O2", "-Wall", "-Wextra", "-Wconversion", "-Wshadow", "-Werror")


def build_rrgen(workdir: Path) -> Path:
    """Compile rrgen into ``workdir`` (once); raise :class:`PeerUnavailable` without gcc."""
    exe = workdir / "rrgen"
    if exe.exists() and exe.stat().st_mtime >= SOURCE.stat().st_mtime:
        return exe
    gcc = shutil.which("gcc")
    if gcc is None:
        raise PeerUnavailable("gcc is not installed (needed to build the rrgen load generator)")
    workdir.mkdir(parents=True, exist_ok=True)
    argv = [gcc, *CFLAGS, "-o", str(exe), str(SOURCE)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"building rrgen failed: {proc.stderr[-2000:]}")
    return exe


def _port_from(proc: ManagedProcess) -> int | None:
    try:
        text = proc.log_path.read_text()
    except FileNotFoundError:
        return None
    for line in text.splitlines():
        if line.startswith("port "):
            return int(line.split()[1])
    return None


@contextmanager
def echo_backend(
    exe: Path, workdir: Path, protocol: str, host: str = "127.0.0.1", ns_prefix: Sequence[str] = ()
) -> Iterator[str]:
    """Run ``rrgen echo`` (inside a namespace when ``ns_prefix`` is an ``ip netns exec``)."""
    argv = [*ns_prefix, str(exe), "echo", protocol, host, "0"]
    with ManagedProcess(f"rrgen-echo-{protocol}", argv, workdir) as proc:
        proc.wait_until(lambda: _port_from(proc) is not None)
        yield f"{host}:{_port_from(proc)}"


@dataclass(frozen=True)
class RrgenResult:
    """One load run: ``rr`` (closed loop) or ``open`` (fixed rate, latency in microseconds)."""

    raw: dict[str, Any]

    @property
    def rate(self) -> float:
        """Responses per second (rr), or the offered rate (open)."""
        return float(self.raw["rate"])

    @property
    def lost_fraction(self) -> float:
        """Requests without a response, over all requests sent."""
        sent = self.raw.get("sent") or (self.raw["responses"] + self.raw["lost"])
        return float(self.raw["lost"]) / sent if sent else 1.0

    def __getitem__(self, key: str) -> Any:
        return self.raw[key]


def run_rrgen(
    exe: Path,
    mode: str,
    protocol: str,
    address: str,
    *,
    flows: int,
    load: int,
    seconds: float,
    size: int = 64,
    ns_prefix: Sequence[str] = (),
) -> RrgenResult:
    """Run ``rrgen rr|open``; ``load`` is the requests in flight per flow, or the rate."""
    host, _, port = address.rpartition(":")
    argv = [*ns_prefix, str(exe), mode, protocol, host, port]
    argv += [str(flows), str(load), f"{seconds:g}", str(size)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"rrgen exited with {proc.returncode}: {proc.stderr[-500:]}")
    try:
        return RrgenResult(json.loads(proc.stdout))
    except json.JSONDecodeError as exc:
        raise RuntimeError(f"rrgen output not understood: {proc.stdout[-500:]}") from exc


# --------------------------------------------------------------------------- workloads

#: Connections (TCP) or source ports (UDP) the generator spreads its requests over.
FLOWS = 8
#: Seconds per rrgen run in smoke mode: enough for a few thousand requests.
QUICK_SECONDS = 0.3
#: Offered loads of the latency workloads, as shares of the direct capacity: operating
#: points below saturation, where percentiles compare the proxies rather than their limits.
LOAD_SHARES = (0.10, 0.25, 0.50)

_capacity: dict[tuple[str, str], float] = {}


def direct_capacity(exe: Path, protocol: str, backend: str, *, seconds: float) -> float:
    """Closed-loop request rate straight to ``backend``, measured once per run and backend."""
    key = (protocol, backend)
    if key not in _capacity:
        outstanding = 16 if protocol == "udp" else 4
        result = run_rrgen(
            exe, "rr", protocol, backend, flows=FLOWS, load=outstanding, seconds=seconds
        )
        if result["responses"] <= 0:
            raise RuntimeError(f"no response from the {protocol} echo backend {backend}")
        _capacity[key] = result.rate
    return _capacity[key]


def latency_measurement(
    exe: Path,
    protocol: str,
    address: str,
    capacity: float,
    *,
    seconds: float,
    shares: Sequence[float] = LOAD_SHARES,
) -> Measurement:
    """p50/p99/p99.9 (microseconds) at each of ``shares`` of ``capacity``."""
    metrics: list[Metric] = []
    info: dict[str, Any] = {"direct_capacity": capacity, "flows": FLOWS}
    for share in shares:
        rate = max(100, int(capacity * share))
        result = run_rrgen(exe, "open", protocol, address, flows=FLOWS, load=rate, seconds=seconds)
        tag = f"{share:.0%}"
        for key, name in (("p50_us", "p50"), ("p99_us", "p99"), ("p99_9_us", "p99.9")):
            metrics.append(Metric(f"{name}@{tag}", float(result[key]), "us", False))
        info[f"rate@{tag}"] = rate
        info[f"lost@{tag}"] = result["lost"]
        info[f"send_lag_p99_us@{tag}"] = result["send_lag_p99_us"]
        info[f"gen_cpu_ns_per_req@{tag}"] = result["cpu_ns_per_req"]
    return Measurement(metrics, info)
