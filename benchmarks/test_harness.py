"""Checks of the benchmark harness itself: parsers, ratios, report and reference proxy.

These run in the ``--benchmark-disable`` smoke pass (``--benchmark-only`` skips them).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from benchmarks import report
from benchmarks._peers import Front, start_peer
from benchmarks._procs import free_port, is_listening
from benchmarks._results import Measurement, Metric, Results
from benchmarks._rrgen import build_rrgen, echo_backend, run_rrgen
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
    assert charts == ["http.png", "idle.png"]
    assert (tmp_path / "report-charts" / "http.png").read_bytes()[:4] == b"\x89PNG"
    assert "| http | direct (1), nginx (1) |" not in text  # l4lb is listed first
    assert "| http | l4lb (1), direct (1), nginx (1) |" in text
    assert "Nothing was skipped." in text


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
        assert not is_listening(port, udp=True)


def test_is_listening_udp_in_a_process_namespace() -> None:
    port = free_port(udp=True)
    assert not is_listening(port, udp=True)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", port))
        assert is_listening(port, udp=True)
        assert is_listening(port, pid=os.getpid(), udp=True)


def _two_rounds(l4lb: tuple[float, float], peer: tuple[float, float]) -> list[dict[str, object]]:
    results = Results()
    out: list[dict[str, object]] = []
    for round_ in range(2):
        for name, values in (("l4lb", l4lb), ("haproxy", peer)):
            info: dict[str, object] = {}
            results.record(
                info, workload="w", peer=name, round_=round_, measurement=_measure(values[round_])
            )
            out.append({"name": f"t[r{round_}-{name}]", "extra_info": info})
    return out


def test_report_flags_ratios_whose_rounds_disagree(tmp_path: Path) -> None:
    steady = report.render({"benchmarks": _two_rounds((100, 104), (100, 100))}, tmp_path / "a.md")
    assert "| w | rate | higher | 1.02 | - |" in steady.read_text()
    # round ratios 1.0 and 1.3: 30% apart
    shaky = report.render({"benchmarks": _two_rounds((100, 130), (100, 100))}, tmp_path / "b.md")
    assert "| w | rate | higher | 1.15 | haproxy ±30% |" in shaky.read_text()


def test_report_compares_two_runs_and_lists_skips(tmp_path: Path) -> None:
    data = {
        "benchmarks": _two_rounds((150, 150), (100, 100)),
        "l4lb_bench_skipped": [
            {"test": "benchmarks/bench_ipvs.py::test_vm_peer", "reason": "ipvs not run: x"}
        ],
    }
    other = {"benchmarks": _two_rounds((100, 100), (100, 100))}
    text = report.render(
        data, tmp_path / "R.md", compare=other, compare_source="o.json"
    ).read_text()
    assert "| w | rate | higher | 1.50 | - | haproxy +50% |" in text
    assert "| ipvs not run: x | `test_vm_peer` |" in text
    assert "compared with `o.json`" in text


def test_report_shows_load_generator_overhead(tmp_path: Path) -> None:
    results = Results()
    entries = []
    for peer in ("direct", "l4lb"):
        info: dict[str, object] = {}
        m = Measurement([Metric("rate", 1.0, "1/s", True)], {"gen_cpu_ns_per_req": 2500.0})
        results.record(info, workload="udp-rr", peer=peer, round_=0, measurement=m)
        entries.append({"extra_info": info})
    text = report.render({"benchmarks": entries}, tmp_path / "R.md").read_text()
    assert "| udp-rr | direct | 2.50 |" in text


# --------------------------------------------------------------------------- rrgen


@pytest.fixture(scope="module")
def rrgen_exe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_rrgen(tmp_path_factory.mktemp("rrgen"))


@pytest.mark.parametrize("protocol", ["tcp", "udp"])
def test_rrgen_closed_and_open_loop(rrgen_exe: Path, tmp_path: Path, protocol: str) -> None:
    with echo_backend(rrgen_exe, tmp_path, protocol) as address:
        rr = run_rrgen(rrgen_exe, "rr", protocol, address, flows=2, load=2, seconds=0.2)
        assert rr["responses"] > 0 and rr.rate > 0
        assert rr["lost"] == 0
        opened = run_rrgen(rrgen_exe, "open", protocol, address, flows=2, load=2000, seconds=0.3)
    assert opened["sent"] == 600  # 2000/s for 0.3 s after warm-up
    assert opened["responses"] == opened["sent"]
    assert 0 < opened["p50_us"] <= opened["p99_us"] <= opened["p99_9_us"] <= opened["max_us"]


def test_rrgen_counts_unanswered_requests_as_lost(rrgen_exe: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))  # receives, never answers
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        opened = run_rrgen(rrgen_exe, "open", "udp", address, flows=1, load=1000, seconds=0.2)
    assert opened["responses"] == 0
    assert opened["lost"] == opened["sent"] == 200
    assert opened["p50_us"] >= 400_000  # waited for until the 0.5 s drain ended


def test_rrgen_rejects_bad_arguments(rrgen_exe: Path) -> None:
    bad = subprocess.run(
        [str(rrgen_exe), "rr", "udp", "127.0.0.1", "9", "0", "1", "1", "64"],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    assert bad.returncode == 2
    assert "FLOWS must be an integer" in bad.stderr
    with pytest.raises(RuntimeError, match="HOST must be an IPv4 address"):
        run_rrgen(rrgen_exe, "rr", "udp", "localhost:9", flows=1, load=1, seconds=0.1)


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
