"""Inside the kernel VM: l4lb, IPVS, iptables DNAT and the direct path, side by side.

    python benchmarks/vm_guest.py OUTDIR ROUNDS SECONDS

Builds the routed topology of :mod:`benchmarks._topology` in the guest (IPVS, kernel NAT
and l4lb all in the router namespace), runs each workload for every peer alternately in
each round, and writes OUTDIR/vm-results.json: a list of measurements, or per-peer errors.
OUTDIR/done marks the end. Run by bench_ipvs.py through :func:`benchmarks._vm.boot`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import traceback
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._peers import Front
from benchmarks._results import Measurement, Metric
from benchmarks._topology import BACKEND_IP, VM_PEERS, Topology
from benchmarks._workloads import iperf3_backend, nginx_http_backend, run_iperf3, run_wrk

#: Workloads measured in the VM, by the names the host records them under.
VM_WORKLOADS = ("vm-iperf3-1-stream", "vm-http-conn-rate")
RESULTS = "vm-results.json"
CONNECTIONS = 16
#: Commands and start-ups take many times longer under software emulation.
VM_TIMEOUT = 120.0


def _iperf3(topo: Topology, address: str, seconds: int) -> Measurement:
    result = run_iperf3(
        address, streams=1, seconds=seconds, omit=1, ns_prefix=topo.client.exec_prefix
    )
    if result.bytes <= 0:
        raise RuntimeError("iperf3 moved no data")
    return Measurement(
        [Metric("throughput", result.bits_per_second / 1e9, "Gbit/s", higher_is_better=True)],
        {"retransmits": result.retransmits},
    )


def _conn_rate(topo: Topology, address: str, seconds: int) -> Measurement:
    result = run_wrk(
        address,
        seconds=seconds,
        connections=CONNECTIONS,
        close=True,
        ns_prefix=topo.client.exec_prefix,
    )
    if result.requests <= 0 or result.errors > result.requests // 100:
        raise RuntimeError(f"wrk: {result.requests} requests, errors {result.socket_errors}")
    return Measurement(
        [
            Metric("conn_rate", result.requests_per_second, "1/s", higher_is_better=True),
            Metric("p99_latency", result.latency["p99"] * 1e3, "ms", higher_is_better=False),
        ],
        {"requests": result.requests},
    )


def _run(out: Path, rounds: int, seconds: int) -> list[dict[str, Any]]:
    subprocess.run(["modprobe", "-a", "ip_vs", "ip_vs_rr"], check=True, timeout=60)
    records: list[dict[str, Any]] = []
    topo = Topology.create(timeout=VM_TIMEOUT)
    try:
        plans: list[tuple[str, Callable[[ExitStack], str], Callable[..., Measurement]]] = [
            (
                VM_WORKLOADS[0],
                lambda st: st.enter_context(
                    iperf3_backend(out / "work", BACKEND_IP, topo.backend.exec_prefix)
                ),
                _iperf3,
            ),
            (
                VM_WORKLOADS[1],
                lambda st: st.enter_context(
                    nginx_http_backend(out / "work", BACKEND_IP, topo.backend.exec_prefix)
                ),
                _conn_rate,
            ),
        ]
        for workload, backend_of, run in plans:
            with ExitStack() as stack:
                backend = backend_of(stack)
                fronts: dict[str, Front | str] = {}
                for peer in VM_PEERS:
                    try:
                        started = topo.start_peer(
                            peer, backend, out / "work" / f"{workload}-{peer}"
                        )
                        stack.callback(started.stop)
                        fronts[peer] = started
                    except Exception as exc:  # reported per peer; the others still run
                        fronts[peer] = f"{type(exc).__name__}: {exc}"
                for round_ in range(rounds):
                    for peer, front in fronts.items():
                        record: dict[str, Any] = {
                            "workload": workload,
                            "peer": peer,
                            "round": round_,
                        }
                        if isinstance(front, str):
                            record["error"] = front
                        else:
                            try:
                                m = run(topo, front.address, seconds)
                                record["metrics"] = [asdict(x) for x in m.metrics]
                                record["info"] = {**m.info, **front.info}
                            except Exception as exc:
                                record["error"] = f"{type(exc).__name__}: {exc}"
                        records.append(record)
                        (out / RESULTS).write_text(json.dumps(records))
    finally:
        topo.delete()
    return records


def main(argv: list[str]) -> int:
    """Entry point inside the guest."""
    out, rounds, seconds = Path(argv[1]), int(argv[2]), int(argv[3])
    try:
        records = _run(out, rounds, seconds)
        (out / RESULTS).write_text(json.dumps(records))
    except Exception:
        (out / "error.txt").write_text(traceback.format_exc())
    (out / "done").write_text("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
