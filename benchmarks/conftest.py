"""Benchmark harness: settings, backends, peers and result recording.

Run from the repository root::

    python3 -m pytest benchmarks -p no:cacheprovider --benchmark-only --benchmark-json=r.json

Every test is one (workload, round, peer) measurement. Tests are generated round-major with
the peer varying fastest, so peers are measured alternately (direct, l4lb, haproxy, ...,
direct, l4lb, ...) and slow drifts of the machine hit them all alike. Peers stay up across
the rounds of a workload and are stopped when the next backend is needed.

``--benchmark-disable`` (or ``L4LB_BENCH_QUICK=1``) turns the run into a quick smoke test:
one round, tiny durations. Other knobs, all environment variables:
``L4LB_BENCH_ROUNDS``, ``L4LB_BENCH_SECONDS`` (per iperf3/wrk/rrgen run),
``L4LB_BENCH_IDLE_CONNS``, ``L4LB_BENCH_PEERS`` (comma-separated subset of the peer names)
and ``L4LB_BENCH_VM=1`` (boot the kernel VM for the IPVS comparisons).

A module whose workloads only some peers can take part in (UDP, the routed namespace
topology, the VM) names them in ``PEER_NAMES``; skipped tests and their reasons are saved
into the JSON file (``l4lb_bench_skipped``) for the report.
"""

from __future__ import annotations

import os
import platform
import resource
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pytest

from benchmarks._peers import PEERS, Front, start_peer
from benchmarks._procs import PeerUnavailable, tool_version
from benchmarks._results import Measurement, Results
from benchmarks._rrgen import build_rrgen, echo_backend
from benchmarks._workloads import iperf3_backend, nginx_http_backend


@dataclass(frozen=True)
class Settings:
    """Knobs of one benchmark run."""

    quick: bool
    rounds: int
    seconds: int
    iperf_omit: int
    idle_conns: int
    idle_conns_requested: int
    peers: tuple[str, ...]
    wanted: tuple[str, ...]
    vm: bool

    def wants(self, peer: str) -> bool:
        """True unless ``L4LB_BENCH_PEERS`` names a subset without ``peer``."""
        return not self.wanted or peer in self.wanted


_SETTINGS: Settings | None = None


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value else default


def _raise_nofile() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (inherited by every peer); return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard if hard != resource.RLIM_INFINITY else 1 << 20


def _settings(config: pytest.Config) -> Settings:
    quick = bool(config.getoption("benchmark_disable", False)) or bool(
        os.environ.get("L4LB_BENCH_QUICK")
    )
    nofile = _raise_nofile()
    requested = _env_int("L4LB_BENCH_IDLE_CONNS", 200 if quick else 10_000)
    # A proxy holds two descriptors per proxied connection under the same hard limit, and
    # haproxy also reserves two per splice pipe (maxpipes) before it starts.
    idle = max(1, min(requested, (nofile - 1024) // 2))
    wanted = tuple(p for p in os.environ.get("L4LB_BENCH_PEERS", "").split(",") if p)
    peers = tuple(p for p in PEERS if not wanted or p in wanted)
    return Settings(
        quick=quick,
        rounds=_env_int("L4LB_BENCH_ROUNDS", 1 if quick else 3),
        seconds=_env_int("L4LB_BENCH_SECONDS", 1 if quick else 3),
        iperf_omit=0 if quick else 1,
        idle_conns=idle,
        idle_conns_requested=requested,
        peers=peers,
        wanted=wanted,
        vm=os.environ.get("L4LB_BENCH_VM") == "1",
    )


def pytest_configure(config: pytest.Config) -> None:
    global _SETTINGS
    _SETTINGS = _settings(config)


def _get_settings() -> Settings:
    assert _SETTINGS is not None, "pytest_configure has not run"
    return _SETTINGS


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Module | None:
    """Collect ``bench_*.py`` here only, so the regular test run never picks them up."""
    if file_path.suffix != ".py" or not file_path.name.startswith("bench_"):
        return None
    if parent.session.isinitpath(file_path):
        return None  # named on the command line: pytest's own collector takes it
    return pytest.Module.from_parent(parent, path=file_path)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "peer_name" not in metafunc.fixturenames:
        return
    settings = _get_settings()
    rounds = getattr(metafunc.module, "BENCH_ROUNDS", None) or settings.rounds
    metafunc.parametrize("bench_round", range(rounds), ids=[f"r{i}" for i in range(rounds)])
    excluded = getattr(metafunc.module, "EXCLUDE_PEERS", ())
    # A module measuring a topology or protocol only some peers support lists them.
    names = getattr(metafunc.module, "PEER_NAMES", PEERS)
    peers = [p for p in names if p not in excluded and settings.wants(p)]
    metafunc.parametrize("peer_name", peers)


def pytest_benchmark_update_machine_info(
    config: pytest.Config, machine_info: dict[str, Any]
) -> None:
    """Add what the report needs to describe the machine and the peers' versions."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from l4lb._version import __version__

    machine_info["l4lb_bench"] = {
        "cpu_model": cpu,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "versions": {
            "l4lb": __version__,
            "haproxy": tool_version(["haproxy", "-v"]),
            "nginx": tool_version(["nginx", "-v"]),
            "iperf3": tool_version(["iperf3", "--version"]),
            "wrk": tool_version(["wrk", "-v"]),
            "iptables": tool_version(["iptables", "-V"]),
            "gcc (builds rrgen)": tool_version(["gcc", "--version"]),
        },
        "loadavg_at_start": list(os.getloadavg()),
        "settings": asdict(_get_settings()),
    }


#: Skipped benchmark tests of this run: (test id, reason), for the report.
_SKIPPED: list[tuple[str, str]] = []
#: pytest-benchmark's own reason for the non-benchmark tests under --benchmark-only.
_NOT_A_BENCHMARK = "Skipping non-benchmark"


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and isinstance(report.longrepr, tuple):
        reason = str(report.longrepr[2]).removeprefix("Skipped: ")
        if not reason.startswith(_NOT_A_BENCHMARK):
            _SKIPPED.append((report.nodeid, reason))


def pytest_benchmark_update_json(
    config: pytest.Config, benchmarks: list[Any], output_json: dict[str, Any]
) -> None:
    """Record what was skipped and why, so the report can list it next to what ran."""
    output_json["l4lb_bench_skipped"] = [{"test": t, "reason": r} for t, r in _SKIPPED]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def settings() -> Settings:
    """This run's knobs."""
    return _get_settings()


@pytest.fixture(scope="session")
def bench_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Scratch directory for configs and logs of everything the benchmarks start."""
    return tmp_path_factory.mktemp("bench")


@pytest.fixture(scope="session")
def results() -> Results:
    """Measurements of this run, with ratios kept current in each ``extra_info``."""
    return Results()


#: ``start(peer, backend, workdir, protocol=...)``: how a pool starts its peers.
Starter = Callable[..., Front]


def _start_loopback(peer: str, backend: str, workdir: Path, *, protocol: str) -> Front:
    return start_peer(peer, backend, workdir, protocol=protocol)


class PeerPool:
    """Started peers keyed by (peer, backend); only one backend's peers are up at a time."""

    def __init__(self, workdir: Path, start: Starter = _start_loopback) -> None:
        self.workdir = workdir
        self._start = start
        self._fronts: dict[tuple[str, str], Front] = {}
        self._failed: dict[tuple[str, str], str] = {}
        self._backend: str | None = None

    def get(self, peer: str, backend: str, *, protocol: str = "tcp") -> Front:
        """The running peer in front of ``backend``; skips the test if it cannot start."""
        if backend != self._backend:
            self.close()
            self._backend = backend
        key = (peer, backend)
        if key in self._failed:
            pytest.skip(self._failed[key])
        if key not in self._fronts:
            try:
                workdir = self.workdir / f"{peer}-{len(self._fronts) + len(self._failed)}"
                self._fronts[key] = self._start(peer, backend, workdir, protocol=protocol)
            except PeerUnavailable as exc:
                self._failed[key] = str(exc)
                pytest.skip(str(exc))
        return self._fronts[key]

    def close(self) -> None:
        """Stop every running peer."""
        for front in self._fronts.values():
            front.stop()
        self._fronts.clear()


@pytest.fixture(scope="session")
def peer_pool(bench_dir: Path) -> Iterator[PeerPool]:
    """Peers shared by the rounds of a workload."""
    pool = PeerPool(bench_dir / "peers")
    yield pool
    pool.close()


@pytest.fixture(scope="module")
def iperf3_server(bench_dir: Path) -> Iterator[str]:
    """``iperf3 -s`` on loopback (skips if iperf3 is missing)."""
    try:
        with iperf3_backend(bench_dir) as address:
            yield address
    except PeerUnavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def nginx_backend(bench_dir: Path) -> Iterator[str]:
    """nginx HTTP server with a tiny static file (skips if nginx is missing)."""
    try:
        with nginx_http_backend(bench_dir) as address:
            yield address
    except PeerUnavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def rrgen(bench_dir: Path) -> Path:
    """The request/response load generator, compiled for this run (skips without gcc)."""
    try:
        return build_rrgen(bench_dir / "rrgen")
    except PeerUnavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def tcp_echo(rrgen: Path, bench_dir: Path) -> Iterator[str]:
    """``rrgen echo tcp`` on loopback."""
    with echo_backend(rrgen, bench_dir / "echo-tcp", "tcp") as address:
        yield address


@pytest.fixture(scope="module")
def udp_echo(rrgen: Path, bench_dir: Path) -> Iterator[str]:
    """``rrgen echo udp`` on loopback."""
    with echo_backend(rrgen, bench_dir / "echo-udp", "udp") as address:
        yield address


Measure = Callable[[str, Callable[[], Measurement]], Measurement]


@pytest.fixture
def measure(benchmark: Any, results: Results, bench_round: int, peer_name: str) -> Measure:
    """``measure(workload, fn)``: run ``fn`` once under pytest-benchmark and record it."""

    def run(workload: str, fn: Callable[[], Measurement]) -> Measurement:
        benchmark.group = workload
        measurement: Measurement = benchmark.pedantic(fn, rounds=1, iterations=1)
        results.record(
            benchmark.extra_info,
            workload=workload,
            peer=peer_name,
            round_=bench_round,
            measurement=measurement,
        )
        return measurement

    return run


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Smoke runs (``--benchmark-disable``) leave out the kernel-VM benchmarks unless
    L4LB_BENCH_VM=1: without the VM they could only say that they did not run, and
    ``tests/kernel`` already runs their guest side in its own boot. Full runs keep them,
    so the report lists them as not run, with the reason."""
    if not config.getoption("benchmark_disable", False) or os.environ.get("L4LB_BENCH_VM"):
        return
    dropped = [item for item in items if item.get_closest_marker("kernel_vm")]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = [item for item in items if not item.get_closest_marker("kernel_vm")]
