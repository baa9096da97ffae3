"""What a VIP costs: l4lb reached through its iptables REDIRECT portal vs a plain listen address.

One ``l4lb run --workers 1`` in the router namespace of :mod:`benchmarks._topology` serves
each backend twice: once behind a VIP (``vips = ["10.96.0.10:PORT"]``, captured by the
REDIRECT rule l4lb installs in the router's PREROUTING chain and accepted on its automatic
wildcard listener) and once on ``listen = "10.231.1.1:0"``. Both services share the process,
the worker and the backends, so the only difference between them is the portal: the NAT
binding of every connection, the rewrite of its packets and the ``SO_ORIGINAL_DST`` read
on accept. The client's default route leads to the router, as a cluster routes its service
range to its nodes.

The two paths are measured alternately within every round, as peers are elsewhere:
``l4lb`` is the VIP path, ``l4lb-listen`` the plain one, so the report's ratio
``l4lb / l4lb-listen`` is vip / plain (target: at least 0.9). Every entry also carries that
ratio as ``extra_info["ratio"]``. After each run the admin API must show the connections on
the service just measured (and, for the VIP, all of them counted against the VIP), so a
smoke run proves traffic took both paths. Besides the rates, each run records l4lb's own CPU
time per GB or per connection (from ``/proc/PID/stat``), which a busy machine disturbs less.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from benchmarks._procs import PeerUnavailable
from benchmarks._results import Measurement, Metric
from benchmarks._topology import BACKEND_IP, ROUTER_FRONT_IP, Topology
from benchmarks._workloads import iperf3_backend, nginx_http_backend, run_iperf3, run_wrk
from benchmarks.conftest import Measure, PeerPool, Settings
from l4lb._netns import NetnsError
from l4lb._testbase import L4lbProcess, L4lbStartError, wait_for

VIP = "10.96.0.10"
#: ``l4lb`` goes through the VIP, ``l4lb-listen`` to the plain listener; plain first per round.
PLAIN, THROUGH_VIP = "l4lb-listen", "l4lb"
PEER_NAMES = (PLAIN, THROUGH_VIP)
#: VIP port per backend kind.
VIP_PORTS = {"iperf3": 5201, "http": 80}
CONNECTIONS = 32

# Runs inside the router namespace, where the admin API listens on loopback.
_ADMIN_GET = r"""
import sys, urllib.request
with urllib.request.urlopen(f"http://{sys.argv[1]}{sys.argv[2]}", timeout=5) as r:
    sys.stdout.write(r.read().decode())
"""


@dataclass(frozen=True)
class Counts:
    """A service's totals from the admin API."""

    total: int
    vip: int
    active: int
    bytes: int


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` (all its threads) so far."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat.rpartition(")")[2].split()  # fields 3.. of proc(5): utime is field 14
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class VipNode:
    """The l4lb process in the router namespace and where each path of each backend is."""

    def __init__(self, topology: Topology, proc: L4lbProcess) -> None:
        self.topology = topology
        self.proc = proc

    @staticmethod
    def service(kind: str, peer: str) -> str:
        """The service name of backend ``kind`` on path ``peer``."""
        return f"{kind}-vip" if peer == THROUGH_VIP else f"{kind}-listen"

    def address(self, kind: str, peer: str) -> str:
        """Where the client connects for backend ``kind`` on path ``peer``."""
        if peer == THROUGH_VIP:
            return f"{VIP}:{VIP_PORTS[kind]}"
        return self.proc.service_address(self.service(kind, peer))

    def counts(self, kind: str, peer: str) -> Counts:
        """Connections the service of (``kind``, ``peer``) accepted so far, in total and
        through its VIP."""
        argv = [sys.executable, "-c", _ADMIN_GET, self.proc.admin]
        argv.append(f"/api/v1/services/{self.service(kind, peer)}")
        doc: dict[str, Any] = json.loads(self.topology.router.run(argv).stdout)
        vip = int(doc.get("vip_connections", {}).get(f"{VIP}:{VIP_PORTS[kind]}", 0))
        moved = int(doc["bytes_in"]) + int(doc["bytes_out"])
        return Counts(int(doc["total"]), vip, int(doc["active"]), moved)

    def settled(self, kind: str, peer: str) -> Counts:
        """:meth:`counts` once the service has no open connection left (bounded wait)."""

        def closed() -> Counts | None:
            counts = self.counts(kind, peer)
            return counts if counts.active == 0 else None

        what = f"the connections of {self.service(kind, peer)} to close"
        counts = wait_for(closed, 10.0, interval=0.05, message=what)
        assert counts is not None  # wait_for returns only a truthy value
        return counts


def _config(backends: dict[str, str]) -> dict[str, Any]:
    services: list[dict[str, Any]] = []
    for kind, backend in backends.items():
        common = {"scheduler": "rr", "backends": [{"address": backend, "weight": 1}]}
        services.append({"name": f"{kind}-vip", "vips": [f"{VIP}:{VIP_PORTS[kind]}"], **common})
        services.append({"name": f"{kind}-listen", "listen": f"{ROUTER_FRONT_IP}:0", **common})
    return {
        "admin": {"listen": "127.0.0.1:0"},
        "dataplane": {"workers": 1},
        "services": services,
    }


@pytest.fixture(scope="module")
def vip_node(peer_pool: PeerPool, bench_dir: Path) -> Iterator[VipNode]:
    """Namespaces, both backends, and l4lb serving each on a VIP and on a plain listener;
    all stopped and deleted after the module (skips with the reason if any cannot run)."""
    peer_pool.close()  # loopback peers of earlier modules would only compete for the CPUs
    try:
        topology = Topology.create()
    except PeerUnavailable as exc:
        pytest.skip(str(exc))
    try:
        with ExitStack() as stack:
            try:
                prefix = topology.backend.exec_prefix
                work = bench_dir / "vip"
                backends = {
                    "iperf3": stack.enter_context(iperf3_backend(work, BACKEND_IP, prefix)),
                    "http": stack.enter_context(nginx_http_backend(work, BACKEND_IP, prefix)),
                }
                proc = L4lbProcess(
                    _config(backends),
                    workers=1,
                    workdir=work / "l4lb",
                    log_level="warning",
                    command=[*topology.router.exec_prefix, sys.executable, "-m", "l4lb"],
                )
                proc.start()
            except (PeerUnavailable, NetnsError, L4lbStartError) as exc:
                pytest.skip(f"VIP benchmark setup: {exc}")
            stack.callback(proc.stop)
            # A VIP service whose rules cannot be installed is held back with the reason.
            missing = [f"{k}-vip" for k in backends if f"{k}-vip" not in proc.ready["services"]]
            if missing:
                pytest.skip(f"l4lb could not serve {missing}: {proc.stderr_text()[-500:]}")
            yield VipNode(topology, proc)
    finally:
        topology.delete()


@pytest.fixture(scope="module")
def ratio_entries() -> dict[str, list[dict[str, Any]]]:
    """The ``extra_info`` dicts of this module per workload, to keep their ``ratio`` current."""
    return {}


#: ``measure_path(kind, workload, fn)``: measure ``fn`` on this test's path to ``kind``.
MeasurePath = Callable[[str, str, Callable[[], Measurement]], Measurement]


@pytest.fixture
def measure_path(
    vip_node: VipNode,
    peer_name: str,
    measure: Measure,
    benchmark: Any,
    ratio_entries: dict[str, list[dict[str, Any]]],
) -> MeasurePath:
    """Like ``measure``, and then check that the connections took this test's path and
    refresh ``extra_info["ratio"]`` (vip / plain) in every entry of the workload."""

    def run(kind: str, workload: str, fn: Callable[[], Measurement]) -> Measurement:
        service = vip_node.service(kind, peer_name)

        def timed() -> Measurement:
            before = vip_node.settled(kind, peer_name)
            cpu = _cpu_seconds(vip_node.proc.pid)
            measurement = fn()
            after = vip_node.settled(kind, peer_name)
            cpu = _cpu_seconds(vip_node.proc.pid) - cpu
            conns, moved = after.total - before.total, after.bytes - before.bytes
            assert conns > 0 and moved > 0, f"no traffic through {service}: {before} -> {after}"
            if peer_name == THROUGH_VIP:
                assert after.vip - before.vip == conns, (
                    f"connections of {service} not all through {VIP}: {before} -> {after}"
                )
            # l4lb's own CPU per unit of work: steadier than the rates on a busy machine.
            # The kernel's NAT work is mostly done in the sender's context, not counted here.
            cost = (
                Metric("l4lb_cpu_per_gb", cpu / moved * 1e12, "ms/GB", higher_is_better=False)
                if kind == "iperf3"
                else Metric("l4lb_cpu_per_conn", cpu / conns * 1e6, "us", higher_is_better=False)
            )
            measurement.metrics.append(cost)
            measurement.info |= {"connections_seen": conns, "bytes_seen": moved, "cpu_s": cpu}
            return measurement

        measurement = measure(workload, timed)
        # Results keeps l4lb / l4lb-listen current in every entry: that is vip / plain.
        entries = ratio_entries.setdefault(workload, [])
        entries.append(benchmark.extra_info)
        for info in entries:
            over = info.get("l4lb_over", {}).get(PLAIN) or info.get("l4lb_over_this_peer")
            if over:
                info["ratio"] = dict(over)
        return measurement

    return run


def _iperf3(node: VipNode, address: str, settings: Settings) -> Measurement:
    result = run_iperf3(
        address,
        streams=1,
        seconds=settings.seconds,
        omit=settings.iperf_omit,
        ns_prefix=node.topology.client.exec_prefix,
    )
    assert result.bytes > 0, "iperf3 moved no data"
    return Measurement(
        [Metric("throughput", result.bits_per_second / 1e9, "Gbit/s", higher_is_better=True)],
        {"retransmits": result.retransmits, "streams": 1, "address": address},
    )


def _conn_rate(node: VipNode, address: str, settings: Settings) -> Measurement:
    result = run_wrk(
        address,
        seconds=settings.seconds,
        connections=CONNECTIONS,
        close=True,
        ns_prefix=node.topology.client.exec_prefix,
    )
    assert result.requests > 0, "wrk completed no request"
    assert result.non_2xx == 0, f"{result.non_2xx} failed responses"
    assert result.errors <= result.requests // 100, f"wrk errors: {result.socket_errors}"
    return Measurement(
        [
            Metric("conn_rate", result.requests_per_second, "1/s", higher_is_better=True),
            Metric("p99_latency", result.latency["p99"] * 1e3, "ms", higher_is_better=False),
        ],
        {"requests": result.requests, "connections": CONNECTIONS, "address": address},
    )


def test_vip_iperf3_1_stream(
    vip_node: VipNode, peer_name: str, settings: Settings, measure_path: MeasurePath
) -> None:
    address = vip_node.address("iperf3", peer_name)
    measure_path("iperf3", "vip-iperf3-1-stream", lambda: _iperf3(vip_node, address, settings))


def test_vip_http_conn_rate(
    vip_node: VipNode, peer_name: str, settings: Settings, measure_path: MeasurePath
) -> None:
    address = vip_node.address("http", peer_name)
    measure_path("http", "vip-http-conn-rate", lambda: _conn_rate(vip_node, address, settings))
