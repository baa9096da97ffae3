"""TCP latency percentiles at fixed offered loads, open loop, through every TCP peer.

rrgen sends 64-byte requests over 8 connections at 10%, 25% and 50% of the rate the echo
backend sustains directly (measured once per run, closed loop), and times each response from
the request's scheduled send time, so queueing in a stalled proxy is not hidden (wrk has no
rate control; a closed-loop tool would send less when the proxy is slow). Requests still
unanswered at the end count as waited for until then.
"""

from __future__ import annotations

from pathlib import Path

from benchmarks._rrgen import LOAD_SHARES, QUICK_SECONDS, direct_capacity, latency_measurement
from benchmarks.conftest import Measure, PeerPool, Settings


def _seconds(settings: Settings) -> float:
    return QUICK_SECONDS if settings.quick else settings.seconds


def test_tcp_latency(
    peer_pool: PeerPool,
    tcp_echo: str,
    rrgen: Path,
    peer_name: str,
    settings: Settings,
    measure: Measure,
) -> None:
    front = peer_pool.get(peer_name, tcp_echo)
    capacity = direct_capacity(rrgen, "tcp", tcp_echo, seconds=_seconds(settings))
    # Three offered loads per round: a third of the usual duration each keeps the suite short.
    seconds = QUICK_SECONDS if settings.quick else max(1, settings.seconds // 3)
    shares = LOAD_SHARES[:1] if settings.quick else LOAD_SHARES
    measure(
        "tcp-latency",
        lambda: latency_measurement(
            rrgen, "tcp", front.address, capacity, seconds=seconds, shares=shares
        ),
    )
