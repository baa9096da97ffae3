"""Bulk TCP throughput with iperf3, one stream and eight, through each peer."""

from __future__ import annotations

from benchmarks._results import Measurement, Metric
from benchmarks._workloads import run_iperf3
from benchmarks.conftest import Measure, PeerPool, Settings


def _iperf3(address: str, streams: int, settings: Settings) -> Measurement:
    result = run_iperf3(
        address, streams=streams, seconds=settings.seconds, omit=settings.iperf_omit
    )
    assert result.bytes > 0, "iperf3 moved no data"
    return Measurement(
        [Metric("throughput", result.bits_per_second / 1e9, "Gbit/s", higher_is_better=True)],
        {"retransmits": result.retransmits, "seconds": result.seconds, "streams": streams},
    )


def test_iperf3_1_stream(
    peer_pool: PeerPool, iperf3_server: str, peer_name: str, settings: Settings, measure: Measure
) -> None:
    front = peer_pool.get(peer_name, iperf3_server)
    measure("iperf3-1-stream", lambda: _iperf3(front.address, 1, settings))


def test_iperf3_8_streams(
    peer_pool: PeerPool, iperf3_server: str, peer_name: str, settings: Settings, measure: Measure
) -> None:
    front = peer_pool.get(peer_name, iperf3_server)
    measure("iperf3-8-streams", lambda: _iperf3(front.address, 8, settings))
