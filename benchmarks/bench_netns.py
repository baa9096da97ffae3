"""Kernel NAT against l4lb on forwarded traffic, in a client/router/backend namespace chain.

iptables DNAT only rewrites packets that pass through a host, so this comparison runs in
the routed topology of :mod:`benchmarks._topology` (veth links, MTU 1500), with l4lb in the
router namespace and the direct path routed through the same router. Its workloads are
named ``netns-*`` and are not comparable with the loopback ones.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks._procs import PeerUnavailable
from benchmarks._results import Measurement, Metric
from benchmarks._topology import BACKEND_IP, NETNS_PEERS, Topology
from benchmarks._workloads import iperf3_backend, nginx_http_backend, run_iperf3, run_wrk
from benchmarks.conftest import Measure, PeerPool, Settings

PEER_NAMES = NETNS_PEERS
CONNECTIONS = 32


@pytest.fixture(scope="module")
def topology(peer_pool: PeerPool) -> Iterator[Topology]:
    """The namespaces, deleted after the module (skips if they cannot be made)."""
    peer_pool.close()  # loopback peers of earlier modules would only compete for the CPUs
    try:
        topo = Topology.create()
    except PeerUnavailable as exc:
        pytest.skip(str(exc))
    try:
        yield topo
    finally:
        topo.delete()


@pytest.fixture(scope="module")
def netns_pool(topology: Topology, bench_dir: Path) -> Iterator[PeerPool]:
    """Peers of the topology, shared by the rounds of a workload."""
    pool = PeerPool(bench_dir / "netns-peers", start=topology.start_peer)
    yield pool
    pool.close()


@pytest.fixture(scope="module")
def netns_iperf3(topology: Topology, bench_dir: Path, netns_pool: PeerPool) -> Iterator[str]:
    """``iperf3 -s`` in the backend namespace."""
    prefix = topology.backend.exec_prefix
    try:
        with iperf3_backend(bench_dir / "netns", BACKEND_IP, prefix) as address:
            yield address
            netns_pool.close()  # before the backend goes
    except PeerUnavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def netns_nginx(topology: Topology, bench_dir: Path, netns_pool: PeerPool) -> Iterator[str]:
    """nginx serving a 3-byte file in the backend namespace."""
    prefix = topology.backend.exec_prefix
    try:
        with nginx_http_backend(bench_dir / "netns", BACKEND_IP, prefix) as address:
            yield address
            netns_pool.close()
    except PeerUnavailable as exc:
        pytest.skip(str(exc))


def _iperf3(topology: Topology, address: str, streams: int, settings: Settings) -> Measurement:
    result = run_iperf3(
        address,
        streams=streams,
        seconds=settings.seconds,
        omit=settings.iperf_omit,
        ns_prefix=topology.client.exec_prefix,
    )
    assert result.bytes > 0, "iperf3 moved no data"
    return Measurement(
        [Metric("throughput", result.bits_per_second / 1e9, "Gbit/s", higher_is_better=True)],
        {"retransmits": result.retransmits, "streams": streams},
    )


def test_netns_iperf3_1_stream(
    topology: Topology,
    netns_pool: PeerPool,
    netns_iperf3: str,
    peer_name: str,
    settings: Settings,
    measure: Measure,
) -> None:
    front = netns_pool.get(peer_name, netns_iperf3)
    measure("netns-iperf3-1-stream", lambda: _iperf3(topology, front.address, 1, settings))


def _conn_rate(topology: Topology, address: str, settings: Settings) -> Measurement:
    result = run_wrk(
        address,
        seconds=settings.seconds,
        connections=CONNECTIONS,
        close=True,
        ns_prefix=topology.client.exec_prefix,
    )
    assert result.requests > 0, "wrk completed no request"
    assert result.non_2xx == 0, f"{result.non_2xx} failed responses"
    assert result.errors <= result.requests // 100, f"wrk errors: {result.socket_errors}"
    return Measurement(
        [
            Metric("conn_rate", result.requests_per_second, "1/s", higher_is_better=True),
            Metric("p99_latency", result.latency["p99"] * 1e3, "ms", higher_is_better=False),
        ],
        {"requests": result.requests, "connections": CONNECTIONS},
    )


def test_netns_http_conn_rate(
    topology: Topology,
    netns_pool: PeerPool,
    netns_nginx: str,
    peer_name: str,
    settings: Settings,
    measure: Measure,
) -> None:
    front = netns_pool.get(peer_name, netns_nginx)
    measure("netns-http-conn-rate", lambda: _conn_rate(topology, front.address, settings))
