"""HTTP through each peer with wrk against nginx serving a 3-byte file.

- new connections per second: every request on a fresh connection (``Connection: close``);
- keep-alive: request rate and tail latency over persistent connections.
"""

from __future__ import annotations

from benchmarks._results import Measurement, Metric
from benchmarks._workloads import run_wrk
from benchmarks.conftest import Measure, PeerPool, Settings

CONNECTIONS = 32


def _wrk(address: str, settings: Settings, *, close: bool) -> Measurement:
    result = run_wrk(address, seconds=settings.seconds, connections=CONNECTIONS, close=close)
    assert result.requests > 0, "wrk completed no request"
    assert result.non_2xx == 0, f"{result.non_2xx} failed responses"
    # A proxy that sheds connections must not look fast: allow only stray errors.
    assert result.errors <= result.requests // 100, f"wrk errors: {result.socket_errors}"
    rate = "conn_rate" if close else "request_rate"
    return Measurement(
        [
            Metric(rate, result.requests_per_second, "1/s", higher_is_better=True),
            Metric("p99_latency", result.latency["p99"] * 1e3, "ms", higher_is_better=False),
        ],
        {
            "requests": result.requests,
            "p50_ms": result.latency["p50"] * 1e3,
            "errors": result.socket_errors,
            "connections": CONNECTIONS,
        },
    )


def test_wrk_new_connections(
    peer_pool: PeerPool, nginx_backend: str, peer_name: str, settings: Settings, measure: Measure
) -> None:
    front = peer_pool.get(peer_name, nginx_backend)
    measure("http-conn-rate", lambda: _wrk(front.address, settings, close=True))


def test_wrk_keepalive(
    peer_pool: PeerPool, nginx_backend: str, peer_name: str, settings: Settings, measure: Measure
) -> None:
    front = peer_pool.get(peer_name, nginx_backend)
    measure("http-keepalive", lambda: _wrk(front.address, settings, close=False))
