"""Control-plane sync time: from a new config with N services to all of them serving.

- ``l4lb``: a fresh ``l4lb run --workers 1`` with one service gets a config with N services
  (one loopback address each, 127.77.x.y:8080) and a SIGHUP; the time runs from the signal
  until the ready file, rewritten once the reload is applied, lists all N. A sample of the
  services is then checked to proxy to the backend (not timed). One listener per service
  keeps the process within the 20,000-descriptor hard limit at N = 10,000.
- ``iptables-dnat``: the kernel-NAT counterpart, ``iptables-restore`` of one DNAT rule per
  service into the nat table of a fresh network namespace (what kube-proxy's iptables mode
  does, with fewer rules per service than it writes, so a lower bound for it).

Lower is better for both. Smoke mode uses 50 and 200 services.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from benchmarks._procs import PeerUnavailable
from benchmarks._results import Measurement, Metric
from benchmarks.conftest import Measure, Settings
from l4lb._netns import Netns, NetnsError, unavailable_reason
from l4lb._testbase import L4lbProcess, L4lbStartError, NamedServer, dumps_toml, open_name

PEER_NAMES = ("l4lb", "iptables-dnat")
SIZES = (1000, 10_000)
QUICK_SIZES = (50, 200)
SAMPLE = 50
SYNC_NET = 77  # services listen on 127.77.0.0/16, which loopback routes without setup
SYNC_PORT = 8080
TIMEOUT = 120.0


def _sizes(settings: Settings) -> tuple[int, ...]:
    return QUICK_SIZES if settings.quick else SIZES


def _config(backend: str, count: int) -> dict[str, Any]:
    return {
        "admin": {"listen": "127.0.0.1:0"},
        "dataplane": {"workers": 1},
        "services": [
            {
                "name": f"s{i}",
                # One loopback address per service, like one VIP each: binding port 0
                # ten thousand times would time the kernel's free-port search instead.
                "listen": f"127.{SYNC_NET}.{(i + 1) >> 8}.{(i + 1) & 0xFF}:{SYNC_PORT}",
                "backends": [{"address": backend, "weight": 1}],
            }
            for i in range(count)
        ],
    }


def _listed(ready: Path) -> int:
    try:
        return len(json.loads(ready.read_text())["services"])
    except (OSError, ValueError, KeyError):
        return -1  # mid-rewrite or not there yet


def _l4lb_sync(workdir: Path, count: int) -> Measurement:
    with NamedServer("sync") as backend:
        proc = L4lbProcess(
            _config(backend.address, 1), workers=1, workdir=workdir, log_level="warning"
        )
        try:
            proc.start()
        except L4lbStartError as exc:
            raise PeerUnavailable(f"l4lb: {exc}") from exc
        try:
            text = dumps_toml(_config(backend.address, count))
            tmp = proc.config_path.with_suffix(".new")
            tmp.write_text(text)
            os.replace(tmp, proc.config_path)
            before = proc.ready_path.stat().st_mtime_ns
            started = time.monotonic()
            os.kill(proc.pid, signal.SIGHUP)
            deadline = started + TIMEOUT
            while True:
                changed = proc.ready_path.stat().st_mtime_ns != before
                if changed and _listed(proc.ready_path) == count:
                    break
                assert proc.running, f"l4lb exited during the reload: {proc.stderr_text()[-800:]}"
                assert time.monotonic() < deadline, f"{count} services not listed in {TIMEOUT}s"
                time.sleep(0.005)
            elapsed = time.monotonic() - started
            for i in random.Random(count).sample(range(count), min(SAMPLE, count)):
                sock, name = open_name(proc.service_address(f"s{i}"), timeout=10)
                sock.close()
                assert name == "sync", f"service s{i} did not reach the backend"
        finally:
            code = proc.stop()
        assert code == 0, f"l4lb exited with {code}: {proc.stderr_text()[-800:]}"
    return Measurement(
        [Metric("sync_time", elapsed * 1e3, "ms", higher_is_better=False)],
        {"services": count, "checked": min(SAMPLE, count), "how": "SIGHUP to ready file"},
    )


def _iptables_sync(count: int) -> Measurement:
    reason = unavailable_reason()
    if reason:
        raise PeerUnavailable(reason)
    lines = ["*nat", ":PREROUTING ACCEPT [0:0]"]
    for i in range(count):
        vip = f"10.96.{i >> 8}.{i & 0xFF}"
        lines.append(
            f"-A PREROUTING -d {vip}/32 -p tcp -m tcp --dport 80 "
            f"-j DNAT --to-destination 10.231.2.2:8080"
        )
    lines += ["COMMIT", ""]
    rules = "\n".join(lines)
    ns = Netns.create("sync")
    try:
        started = time.monotonic()
        try:
            ns.run(["iptables-restore"], stdin=rules, timeout=TIMEOUT)
        except NetnsError as exc:
            raise PeerUnavailable(f"iptables-restore: {exc}") from exc
        elapsed = time.monotonic() - started
        shown = ns.run(["iptables", "-t", "nat", "-S", "PREROUTING"], timeout=TIMEOUT).stdout
        assert shown.count("-j DNAT") == count, "not every rule was programmed"
    finally:
        ns.delete()
    return Measurement(
        [Metric("sync_time", elapsed * 1e3, "ms", higher_is_better=False)],
        {"services": count, "how": "iptables-restore, one DNAT rule per service"},
    )


@pytest.mark.parametrize("size_index", [0, 1], ids=["small", "large"])
def test_sync_time(
    size_index: int,
    peer_name: str,
    bench_round: int,
    settings: Settings,
    bench_dir: Path,
    measure: Measure,
) -> None:
    count = _sizes(settings)[size_index]
    workdir = bench_dir / f"sync-{count}-{peer_name}-{bench_round}"

    def run() -> Measurement:
        if peer_name == "l4lb":
            return _l4lb_sync(workdir, count)
        return _iptables_sync(count)

    try:
        measure(f"sync-{count}-services", run)
    except PeerUnavailable as exc:
        pytest.skip(str(exc))
