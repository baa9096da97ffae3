"""IPVS (NAT) against l4lb, kernel DNAT and the direct path, inside the kernel VM.

The host kernel has no IPVS, so with ``L4LB_BENCH_VM=1`` one VM boot (minutes here:
software emulation) runs ``benchmarks/vm_guest.py``, which measures every peer in the
routed topology of :mod:`benchmarks._topology` in the guest, all rounds; the tests here
then record the guest's measurements one (workload, round, peer) at a time. Workloads are
named ``vm-*``: emulated CPUs make their absolute numbers small, the ratios are what
counts. Without ``L4LB_BENCH_VM=1`` the single test is skipped and the report lists the
peer as not run.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from benchmarks import _vm
from benchmarks._results import Measurement, Metric
from benchmarks._topology import VM_PEERS
from benchmarks.conftest import Measure, Settings
from benchmarks.vm_guest import RESULTS, VM_WORKLOADS

NOT_RUN = "not run: needs L4LB_BENCH_VM=1 (kernel VM)"
ENABLED = os.environ.get("L4LB_BENCH_VM") == "1"


@pytest.fixture(scope="module")
def vm_results(settings: Settings) -> Iterator[list[dict[str, Any]]]:
    """Boot once, measure everything in the guest, hand back its records."""
    missing = _vm.unavailable_reason()
    if missing:
        pytest.skip(missing)
    # Not under pytest's basetemp: the guest writes here through 9p.
    outdir = Path(tempfile.mkdtemp(prefix="l4lb-bench-vm-"))
    try:
        seconds = 1 if settings.quick else settings.seconds
        command = [sys.executable, "benchmarks/vm_guest.py", str(outdir)]
        command += [str(settings.rounds), str(seconds)]
        boot = _vm.boot(command, outdir)
        if not (outdir / "done").exists():
            pytest.fail(f"the VM did not finish (vng rc={boot.returncode}):\n{boot.console}")
        if (outdir / "error.txt").exists():
            pytest.fail(f"the guest failed:\n{(outdir / 'error.txt').read_text()}")
        yield json.loads((outdir / RESULTS).read_text())
    finally:
        shutil.rmtree(outdir, ignore_errors=True)


if ENABLED:
    PEER_NAMES = VM_PEERS

    @pytest.mark.parametrize("workload", VM_WORKLOADS)
    def test_vm_peer(
        vm_results: list[dict[str, Any]],
        workload: str,
        bench_round: int,
        peer_name: str,
        measure: Measure,
    ) -> None:
        found = [
            r
            for r in vm_results
            if (r["workload"], r["peer"], r["round"]) == (workload, peer_name, bench_round)
        ]
        assert found, f"the guest recorded nothing for {workload} {peer_name} r{bench_round}"
        record = found[0]
        if "error" in record:
            pytest.fail(f"in the VM, {peer_name} on {workload}: {record['error']}")
        metrics = [Metric(**m) for m in record["metrics"]]
        info = {**record.get("info", {}), "where": "kernel VM (software emulation)"}
        measure(workload, lambda: Measurement(metrics, info))

else:

    @pytest.mark.kernel_vm
    def test_vm_peer(benchmark: Any) -> None:
        pytest.skip(f"ipvs {NOT_RUN}")
