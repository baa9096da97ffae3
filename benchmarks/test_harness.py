"""Checks of the benchmark harness itself: parsers, ratios, report and reference proxy.

These run in the ``--benchmark-disable`` smoke pass (``--benchmark-only`` skips them).
"""

from __future__ import annotations

import json
import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from benchmarks import report
from benchmarks._peers import Front, start_peer
from benchmarks._procs import free_port, is_listening
from benchmarks._results import Measurement, Metric, Results
from benchmarks._workloads import parse_iperf3, parse_wrk
from l4lb._testbase import (
    EchoServer,
    NamedServer,
    SinkSourceServer,
    bulk_client,
    connect,
    open_name,
)

WRK_OUTPUT = """\
Running 3s test @ http://127.0.0.1:8080/
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.30ms  670.52us   5.39ms   68.63%
    Req/Sec    11.04k   332.61    11.61k    70.00%
  Latency Distribution
     50%  850.00us
     75%    1.74ms
     90%    2.24ms
     99%    1.20s
  32969 requests in 3.00s, 2.43MB read
  Socket errors: connect 1, read 2, write 0, timeout 4
  Non-2xx or 3xx responses: 5
Requests/sec:  10989.43
Transfer/sec:      2.42MB
"""


def test_parse_wrk() -> None:
    result = parse_wrk(WRK_OUTPUT)
    assert (result.requests, result.seconds, result.requests_per_second) == (32969, 3.0, 10989.43)
    assert result.latency == pytest.approx(
        {"p50": 850e-6, "p75": 1.74e-3, "p90": 2.24e-3, "p99": 1.2}
    )
    assert result.socket_errors == {"connect": 1, "read": 2, "write": 0, "timeout": 4}
    assert (result.non_2xx, result.errors) == (5, 12)


def test_parse_wrk_rejects_garbage() -> None:
    with pytest.raises(RuntimeError, match="not understood"):
        parse_wrk("unable to connect to 127.0.0.1:1 Connection refused")


def test_parse_iperf3() -> None:
    doc = {
        "end": {
            "streams": [{}, {}],
            "sum_sent": {"retransmits": 3},
            "sum_received": {"bits_per_second": 4.5e10, "bytes": 16875000000, "seconds": 3.0},
        }
    }
    result = parse_iperf3(json.dumps(doc))
    assert (result.bits_per_second, result.streams, result.retransmits) == (4.5e10, 2, 3)
    with pytest.raises(RuntimeError, match="busy"):
        parse_iperf3(json.dumps({"error": "the server is busy running a test"}))


def _measure(value: float, higher: bool = True) -> Measurement:
    return Measurement([Metric("rate", value, "1/s", higher)], {"note": "x"})


def test_results_keep_ratios_current_in_every_entry() -> None:
    results = Results()
    infos: list[dict[str, object]] = [{} for _ in range(6)]
    order = [("direct", 100.0), ("l4lb", 80.0), ("haproxy", 40.0)] * 2
    for i, (peer, value) in enumerate(order):
        # second round: l4lb 90, haproxy 60 -> medians 85 and 50
        value = {("l4lb", 1): 90.0, ("haproxy", 1): 60.0}.get((peer, i // 3), value)
        results.record(
            infos[i], workload="w", peer=peer, round_=i // 3, measurement=_measure(value)
        )
    assert infos[1]["l4lb_over"] == {"direct": {"rate": 0.85}, "haproxy": {"rate": 1.7}}
    assert infos[0]["l4lb_over_this_peer"] == {"rate": 0.85}
    assert infos[2]["l4lb_over_this_peer"] == {"rate": 1.7}
    assert infos[2]["info_note"] == "x"
    summary = results.summary()
    assert summary.rounds == {"w": {"direct": 2, "l4lb": 2, "haproxy": 2}}
    assert summary.medians["w"]["rate"] == {"direct": 100.0, "l4lb": 85.0, "haproxy": 50.0}


def test_report_renders_tables_and_charts(tmp_path: Path) -> None:
    results = Results()
    benchmarks = []
    for peer, rate, rss in [("direct", 100.0, None), ("l4lb", 90.0, 500.0), ("nginx", 45.0, 2e4)]:
        info: dict[str, object] = {}
        results.record(info, workload="http", peer=peer, round_=0, measurement=_measure(rate))
        benchmarks.append({"name": f"t[{peer}]", "extra_info": info})
        if rss is not None:
            info = {}
            m = Measurement([Metric("rss_per_conn", rss, "bytes", False)])
            results.record(info, workload="idle", peer=peer, round_=0, measurement=m)
            benchmarks.append({"name": f"m[{peer}]", "extra_info": info})
    data = {"datetime": "2026-01-01T00:00:00", "machine_info": {}, "benchmarks": benchmarks}
    out = report.render(data, tmp_path / "REPORT.md")
    text = out.read_text()
    assert "| http | rate | higher | 0.90 | 2.00 |" in text
    assert "| idle | rss_per_conn | lower | n/a | 0.03 |" in text
    assert "CPU:" in text and "haproxy:" in text
    charts = sorted(p.name for p in (tmp_path / "report-charts").iterdir())
    assert charts == ["http-rate.png", "idle-rss-per-conn.png"]
    assert (tmp_path / "report-charts" / "http-rate.png").read_bytes()[:4] == b"\x89PNG"


def test_report_command_line(tmp_path: Path) -> None:
    src = tmp_path / "r.json"
    src.write_text(json.dumps({"benchmarks": []}))
    assert report.main([str(src), "-o", str(tmp_path / "R.md")]) == 0
    assert "No l4lb measurements" in (tmp_path / "R.md").read_text()


def test_is_listening_and_free_port() -> None:
    port = free_port()
    assert not is_listening(port)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
        sock.listen()
        assert is_listening(port)


# --------------------------------------------------------------------------- reference proxy


@pytest.fixture
def asyncio_front(tmp_path: Path) -> Iterator[Callable[[str], str]]:
    """Start the reference proxy in front of a backend; returns its address."""
    fronts: list[Front] = []

    def start(backend: str) -> str:
        front = start_peer("asyncio", backend, tmp_path / f"p{len(fronts)}")
        fronts.append(front)
        return front.address

    yield start
    for front in fronts:
        front.stop()


def test_asyncio_proxy_transfers_byte_exact_both_ways(asyncio_front: Callable[[str], str]) -> None:
    with SinkSourceServer() as srv:
        result = bulk_client(asyncio_front(srv.address), 8 << 20, 8 << 20)
        (transfer,) = srv.wait_transfers(1)
    assert result.complete
    assert result.sent_sha256 == transfer.received_sha256
    assert result.received_sha256 == transfer.sent_sha256


def test_asyncio_proxy_forwards_half_close(asyncio_front: Callable[[str], str]) -> None:
    with EchoServer() as srv, connect(asyncio_front(srv.address)) as sock:
        sock.sendall(b"abc")
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(100):
            data += chunk
    assert data == b"abc"


def test_asyncio_proxy_forwards_a_backend_greeting(asyncio_front: Callable[[str], str]) -> None:
    with NamedServer("first") as srv:
        sock, name = open_name(asyncio_front(srv.address))
        sock.close()
    assert name == "first"


def test_report_runs_as_a_script(tmp_path: Path) -> None:
    import subprocess

    src = tmp_path / "r.json"
    src.write_text(json.dumps({"benchmarks": []}))
    script = Path(report.__file__)
    out = subprocess.run(
        [sys.executable, str(script), str(src), "-o", str(tmp_path / "R.md")],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
