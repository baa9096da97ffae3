"""Offload mode's programming speed against ``ipvsadm-restore``, inside the kernel VM.

Three figures for N virtual services with 10 real servers each (N = 10,000 by default):

- ``program_ratio``: the time :class:`l4lb.ipvs.IpvsSink` takes to program them into an
  empty IPVS table, over the time ``ipvsadm-restore`` takes for the same rules in the same
  boot (both start from ``ipvsadm -C``; the sink's VIP addresses are already on its
  interface, since ipvsadm-restore adds none). ``program_total_s`` is the sink's first
  apply from nothing, VIP addresses and masquerade rules included.
- ``endpoint_change_ms``: one real server's weight changed, applied (median of 21);
  ``ipvsadm_edit_ms`` is the same edit by ``ipvsadm -e`` (median of 5), for scale.
- ``noop_reconcile_ms``: an apply with nothing to change (median of 11), as after every
  health pass; ``full_reconcile_s`` is the periodic full pass that dumps the kernel.

The host kernel has no IPVS: with ``L4LB_BENCH_VM=1`` one VM boot runs this file as a
script in the guest (``bench_offload.py OUTDIR N``), and the test records its figures.
Emulated CPUs make absolute times large; the ratio against ``ipvsadm-restore`` in the
same run is what counts. ``tests/kernel`` runs the same measurement at a small N in its
own boot, checking that the sink programs exactly what ipvsadm-restore does.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
RESULTS = "bench_offload.json"
ENABLED = os.environ.get("L4LB_BENCH_VM") == "1"
SERVICES = int(os.environ.get("L4LB_BENCH_OFFLOAD_SERVICES", "10000"))
DESTS = 10


def _vip(i: int) -> str:
    return f"10.{100 + i // 65536}.{i // 256 % 256}.{i % 256}"


def _rules(n: int, dests: int) -> str:
    lines = []
    for i in range(n):
        vip = f"{_vip(i)}:80"
        lines.append(f"-A -t {vip} -s rr")
        lines += [f"-a -t {vip} -r 10.200.0.{d + 1}:8080 -m -w 1" for d in range(dests)]
    return "\n".join(lines) + "\n"


def _specs(n: int, dests: int, weight_of: dict[tuple[int, int], int] | None = None) -> Any:
    from l4lb.config import Address
    from l4lb.state import DestSpec, ServiceSpec

    weight_of = weight_of or {}
    specs = {}
    for i in range(n):
        specs[f"s{i}"] = ServiceSpec(
            name=f"s{i}",
            listen=Address(_vip(i), 80, 2),
            protocol="tcp",
            scheduler="rr",
            flags=0,
            persist_timeout=0.0,
            persist_netmask=32,
            persist_netmask6=128,
            expire_quiescent=False,
            connect_timeout=5.0,
            idle_timeout=300.0,
            drain_timeout=0.0,
            retries=-1,
            dests=tuple(
                DestSpec(Address(f"10.200.0.{d + 1}", 8080, 2), weight_of.get((i, d), 1), 0, 0)
                for d in range(dests)
            ),
            mode="offload",
        )
    return specs


def _save() -> list[str]:
    out = subprocess.run(["ipvsadm", "-Sn"], capture_output=True, text=True, check=True).stdout
    return sorted(out.splitlines())


def _clear() -> None:
    subprocess.run(["ipvsadm", "-C"], check=True)
    # The kernel frees flushed services after an RCU grace period: let that work finish
    # before the next measurement instead of inside it.
    time.sleep(2)


def guest_measure(n: int, dests: int = DESTS) -> dict[str, Any]:
    """Run in the VM (root, IPVS): every figure of the module docstring, plus checks."""
    from l4lb.ipvs import IpvsSink

    subprocess.run(["modprobe", "-a", "ip_vs", "ip_vs_rr"], check=True)
    _clear()
    rules = _rules(n, dests)
    t = time.perf_counter()
    subprocess.run(["ipvsadm-restore"], input=rules, text=True, check=True)
    restore_s = time.perf_counter() - t
    restored = _save()
    _clear()

    specs = _specs(n, dests)
    sink = IpvsSink()
    try:
        sink.check_available()
        t = time.perf_counter()
        errors = sink.apply(specs)
        total_s = time.perf_counter() - t
        same_rules = _save() == restored
        # Again from an empty table, with the addresses and rules in place.
        _clear()
        t = time.perf_counter()
        errors2 = sink.apply(specs)
        program_s = time.perf_counter() - t

        changes = []
        name = f"s{n // 2}"
        for k in range(21):
            old = specs[name]
            moved = replace(old.dests[3], weight=2 + k % 2)
            changed = {**specs, name: replace(old, dests=(*old.dests[:3], moved, *old.dests[4:]))}
            t = time.perf_counter()
            sink.apply(changed, trust_cache=True)
            changes.append(time.perf_counter() - t)
        vip = f"{_vip(n // 2)}:80"
        change_seen = f"-a -t {vip} -r 10.200.0.4:8080 -m -w 2" in _save()
        # The same change by hand, for scale (process start included).
        edits = []
        for k in range(5):
            argv = ["ipvsadm", "-e", "-t", vip, "-r", "10.200.0.4:8080", "-m", "-w", str(3 + k)]
            t = time.perf_counter()
            subprocess.run(argv, check=True)
            edits.append(time.perf_counter() - t)
        sink.apply(specs, trust_cache=True)
        noops = []
        for _ in range(11):
            t = time.perf_counter()
            sink.apply(specs, trust_cache=True)
            noops.append(time.perf_counter() - t)
        t = time.perf_counter()
        sink.apply(specs)
        full_s = time.perf_counter() - t
        sink.cleanup()
    finally:
        sink.close()
    return {
        "services": n,
        "dests_per_service": dests,
        "ipvsadm_restore_s": restore_s,
        "program_s": program_s,
        "program_total_s": total_s,
        "program_ratio": program_s / restore_s,
        "program_total_ratio": total_s / restore_s,
        "endpoint_change_ms": statistics.median(changes) * 1000,
        "ipvsadm_edit_ms": statistics.median(edits) * 1000,
        "noop_reconcile_ms": statistics.median(noops) * 1000,
        "full_reconcile_s": full_s,
        "errors": {**errors, **errors2},
        "same_rules_as_restore": same_rules,
        "rules": len(restored),
        "endpoint_change_applied": change_seen,
    }


def main(outdir: str, n: int) -> None:
    out = Path(outdir)
    try:
        result = guest_measure(n)
    except Exception as e:
        import traceback

        result = {"error": f"{e!r}\n{traceback.format_exc()}"}
    (out / RESULTS).write_text(json.dumps(result, indent=2))
    (out / "done").write_text("ok")


@pytest.mark.kernel_vm
@pytest.mark.skipif(not ENABLED, reason="not run: needs L4LB_BENCH_VM=1 (kernel VM)")
def test_offload_programming(benchmark: Any) -> None:
    from benchmarks import _vm

    missing = _vm.unavailable_reason()
    if missing:
        pytest.skip(missing)
    outdir = Path(tempfile.mkdtemp(prefix="l4lb-bench-offload-"))
    try:
        command = [sys.executable, "benchmarks/bench_offload.py", str(outdir), str(SERVICES)]
        # Booted outside pedantic: a failed boot then fails the test with its console
        # instead of leaving the benchmark without data.
        boot = _vm.boot(command, outdir)
        if not (outdir / "done").exists():
            pytest.fail(f"the VM did not finish (vng rc={boot.returncode}):\n{boot.console}")
        result = json.loads((outdir / RESULTS).read_text())
    finally:
        shutil.rmtree(outdir, ignore_errors=True)
    if "error" in result:
        pytest.fail(f"in the VM: {result['error']}")
    benchmark.group = "offload-programming"
    # pytest-benchmark wants one timed call; the figures that count are in extra_info.
    benchmark.pedantic(lambda: result["program_s"], rounds=1, iterations=1)
    benchmark.extra_info.update(result, where="kernel VM (software emulation)")
    assert result["errors"] == {} and result["same_rules_as_restore"]
    assert result["endpoint_change_applied"]


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else SERVICES)
