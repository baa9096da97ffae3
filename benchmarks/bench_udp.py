"""UDP through the peers that proxy it (direct, l4lb, nginx stream), with rrgen.

- request rate: closed loop, 16 requests in flight on each of 8 source ports, one new
  request per response (64-byte datagrams, echoed back);
- latency percentiles at fixed offered loads (shares of the direct capacity), open loop.

nginx runs with ``proxy_responses 1``: a session ends with its one reply, as for DNS. The
generator's own CPU time per request (``info_gen_cpu_ns_per_req``) is recorded with every
run; in the direct run it is the generator's overhead, since nothing else is in the path
besides the echo backend.
"""

from __future__ import annotations

from pathlib import Path

from benchmarks._peers import UDP_PEERS
from benchmarks._results import Measurement, Metric
from benchmarks._rrgen import (
    FLOWS,
    LOAD_SHARES,
    QUICK_SECONDS,
    direct_capacity,
    latency_measurement,
    run_rrgen,
)
from benchmarks.conftest import Measure, PeerPool, Settings

PEER_NAMES = UDP_PEERS
OUTSTANDING = 16


def _rate(exe: Path, address: str, settings: Settings) -> Measurement:
    result = run_rrgen(
        exe, "rr", "udp", address, flows=FLOWS, load=OUTSTANDING, seconds=_seconds(settings)
    )
    assert result["responses"] > 0, "no UDP response came back"
    # Requests are only re-sent after a loss timeout, so heavy loss would cost the rate.
    assert result.lost_fraction < 0.05, f"{result['lost']} of the requests were lost"
    return Measurement(
        [Metric("request_rate", result.rate, "1/s", higher_is_better=True)],
        {
            "flows": FLOWS,
            "outstanding_per_flow": OUTSTANDING,
            "lost": result["lost"],
            "gen_cpu_ns_per_req": result["cpu_ns_per_req"],
        },
    )


def _seconds(settings: Settings) -> float:
    return QUICK_SECONDS if settings.quick else settings.seconds


def test_udp_request_rate(
    peer_pool: PeerPool,
    udp_echo: str,
    rrgen: Path,
    peer_name: str,
    settings: Settings,
    measure: Measure,
) -> None:
    front = peer_pool.get(peer_name, udp_echo, protocol="udp")
    measure("udp-rr", lambda: _rate(rrgen, front.address, settings))


def test_udp_latency(
    peer_pool: PeerPool,
    udp_echo: str,
    rrgen: Path,
    peer_name: str,
    settings: Settings,
    measure: Measure,
) -> None:
    front = peer_pool.get(peer_name, udp_echo, protocol="udp")
    capacity = direct_capacity(rrgen, "udp", udp_echo, seconds=_seconds(settings))
    # Three offered loads per round: a third of the usual duration each keeps the suite short.
    seconds = QUICK_SECONDS if settings.quick else max(1, settings.seconds // 3)
    shares = LOAD_SHARES[:1] if settings.quick else LOAD_SHARES
    measure(
        "udp-latency",
        lambda: latency_measurement(
            rrgen, "udp", front.address, capacity, seconds=seconds, shares=shares
        ),
    )
