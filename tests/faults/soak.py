"""Soak: minutes of steady mixed load with SIGHUP reloads and backend churn, then leak checks.

    python -m tests.faults.soak --seconds 300      # scripts/soak runs this (default 5 min)

While verified echo traffic runs (small and 1 MiB exchanges), l4lb is reloaded every few
seconds (weights change) and every so often one backend process is killed and replaced by a
new one at another port (a reload swaps the address). At the end, once the load has stopped
and l4lb shows no open connections, it must hold as many descriptors and threads as at the
baseline taken after warm-up, every open pipe must be in the free pools, its RSS must not
have grown by more than :data:`RSS_BOUND`, every completed transfer must have been
byte-exact, and no connection may have failed except those on a killed backend: in flight
on it, or begun between the kill and the reload that replaced it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from l4lb._testbase import L4lbProcess, wait_for

from .record import FaultResult
from .traffic import BackendProcess, Load, open_fds, thread_count

#: Allowed RSS growth from the warmed-up baseline to the end (allocator arenas settle in the
#: first seconds; a leak of even 100 bytes per connection exceeds this within minutes).
RSS_BOUND = 32 << 20
#: Descriptors that may come and go without being a leak (admin keep-alive, health probes).
FD_SLACK = 4


@dataclass
class Resources:
    """What l4lb holds at one moment."""

    fds: int
    #: Descriptors that are pipes: two per pipe, in use or cached in the free pools.
    pipes: int
    threads: int
    rss: int

    @classmethod
    def of(cls, pid: int) -> Resources:
        pipes = 0
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                pipes += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("pipe:")
        rss = 0
        for line in Path(f"/proc/{pid}/status").read_text(encoding="ascii").splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
        return cls(open_fds(pid), pipes, thread_count(pid), rss)


@dataclass
class SoakReport:
    """Everything a soak measured; :attr:`problems` is empty when it passed."""

    seconds: float
    reloads: int = 0
    churned: int = 0
    result: FaultResult = field(
        default_factory=lambda: FaultResult("soak", "reloads and backend churn", "no leaks")
    )
    baseline: Resources | None = None
    final: Resources | None = None
    pool: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _config(backends: list[BackendProcess], step: int, listen: str) -> dict[str, Any]:
    return {
        "admin": {"listen": "127.0.0.1:0"},
        "dataplane": {"workers": 2},
        "services": [
            {
                "name": "web",
                "listen": listen,
                "retries": 2,
                "health": {"interval": 0.2, "timeout": 0.2, "fall": 2, "rise": 2},
                "backends": [
                    {"address": b.address, "weight": 1 + (step + i) % 3}
                    for i, b in enumerate(backends)
                ],
            }
        ],
    }


def _pipe_pool(lb: L4lbProcess) -> dict[str, int]:
    """``l4lb_pipes_used`` and ``l4lb_pipes_free`` from the metrics."""
    status, body = lb.http_get("/metrics")
    if status != 200:
        raise RuntimeError(f"/metrics answered {status}")
    out = {}
    for line in body.decode().splitlines():
        name, _, value = line.partition(" ")
        if name in ("l4lb_pipes_used", "l4lb_pipes_free"):
            out[name.removeprefix("l4lb_")] = int(float(value))
    return out


@contextlib.contextmanager
def _backends(n: int) -> Iterator[list[BackendProcess]]:
    live = [BackendProcess(f"b{i}") for i in range(n)]
    try:
        yield live
    finally:
        for b in live:
            b.stop()


def soak(
    seconds: float, *, reload_every: float = 2.0, churn_every: float = 7.0, warmup: float = 3.0
) -> SoakReport:
    """Run the soak for ``seconds`` (after ``warmup``) and return what it measured."""
    report = SoakReport(seconds)
    r = report.result
    with _backends(3) as live:
        lb = L4lbProcess(_config(live, 0, "127.0.0.1:0")).start()
        try:
            listen = lb.service_address("web")
            # Name the bound port in the file before the load: a listen address that changes
            # (port 0 to the port it got) re-binds the listener, resetting what is queued.
            lb.reload(_config(live, 0, listen))
            small = Load(listen, threads=6, size=4096, limit=seconds + warmup + 60)
            large = Load(listen, threads=2, size=1 << 20, limit=seconds + warmup + 60)
            killed: set[str] = set()
            kills: list[tuple[float, float]] = []
            with small, large:
                small.wait_count(50)
                time.sleep(warmup)
                report.baseline = Resources.of(lb.pid)
                start = time.monotonic()
                next_reload, next_churn, step = start, start + churn_every, 0
                while (now := time.monotonic()) < start + seconds:
                    churn = now >= next_churn
                    if churn:
                        victim = live.pop(0)
                        killed.add(victim.name)
                        began = time.monotonic()
                        victim.kill()
                        victim.stop()
                        live.append(BackendProcess(f"b{3 + report.churned}"))
                        report.churned += 1
                        next_churn = now + churn_every
                    if churn or now >= next_reload:
                        step += 1
                        lb.reload(_config(live, step, listen))
                        report.reloads += 1
                        next_reload = now + reload_every
                    if churn:
                        # Until this reload, the dead backend was still configured.
                        kills.append((began, time.monotonic()))
                    time.sleep(0.05)
            wait_for(lambda: lb.service("web")["active"] == 0, 30, message="connections closed")
            wait_for(
                lambda: open_fds(lb.pid) <= report.baseline.fds + FD_SLACK,  # type: ignore[union-attr]
                15,
                message="descriptors back to the baseline",
            )
            report.final = Resources.of(lb.pid)
            pool = report.pool = _pipe_pool(lb)
            for load in (small, large):
                r.count(load.tally.outcomes, broken=frozenset(killed), fault_at=kills)
            code = lb.stop()
        finally:
            lb.close()
    base, final = report.baseline, report.final
    assert base is not None and final is not None
    if final.fds > base.fds + FD_SLACK:
        report.problems.append(f"descriptors: {base.fds} at the baseline, {final.fds} at the end")
    # The free pools keep pipes (and copy buffers, counted with them) for reuse, so their
    # number may grow; every pipe still open must be one of them.
    if pool["pipes_used"] != 0 or final.pipes > 2 * pool["pipes_free"]:
        report.problems.append(
            f"pipes: {final.pipes // 2} open at the end, {pool['pipes_used']} in use and "
            f"{pool['pipes_free']} pipes and buffers in the free pools"
        )
    if final.threads != base.threads:
        report.problems.append(f"threads: {base.threads} at the baseline, {final.threads} now")
    if final.rss - base.rss > RSS_BOUND:
        growth = (final.rss - base.rss) / (1 << 20)
        report.problems.append(f"RSS grew by {growth:.1f} MiB (bound {RSS_BOUND >> 20} MiB)")
    if r.corrupt:
        report.problems.append(f"{r.corrupt} transfer(s) not byte-exact")
    if r.lost:
        report.problems.append(f"{r.lost} connection(s) lost: {r.notes}")
    if code != 0:
        report.problems.append(f"l4lb exited with {code}")
    if "Traceback" in lb.stderr_text():
        report.problems.append("traceback in l4lb's stderr")
    return report


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``scripts/soak``."""
    parser = argparse.ArgumentParser(prog="scripts/soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=300.0, help="duration (default 300)")
    parser.add_argument("--json", action="store_true", help="print the whole report as JSON")
    args = parser.parse_args(argv)
    if not 1 <= args.seconds <= 24 * 3600:
        parser.error("--seconds must be from 1 to 86400")
    report = soak(args.seconds)
    if args.json:
        print(json.dumps(report.as_dict(), indent=1))
    else:
        r, base, final = report.result, report.baseline, report.final
        assert base is not None and final is not None
        print(
            f"soak {report.seconds:g} s: {report.reloads} reloads, {report.churned} backends "
            f"replaced; {r.attempted} exchanges, {r.completed} completed, {r.failed} failed "
            f"on killed backends, {r.lost} lost; {r.bytes_verified / (1 << 20):,.0f} MiB "
            "verified"
        )
        print(
            f"baseline -> end: fds {base.fds} -> {final.fds}, pipes {base.pipes} -> "
            f"{final.pipes}, threads {base.threads} -> {final.threads}, RSS "
            f"{base.rss / (1 << 20):.1f} -> {final.rss / (1 << 20):.1f} MiB"
        )
    for problem in report.problems:
        print(f"FAIL: {problem}", file=sys.stderr)
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
