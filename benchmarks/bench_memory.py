"""Memory per idle proxied connection.

Opens ``L4LB_BENCH_IDLE_CONNS`` connections (10,000 by default, capped by RLIMIT_NOFILE)
through a freshly started peer to a backend that greets and then holds each connection, and
reports the growth of the peer's resident set (VmRSS, all its processes) per connection.
RSS counts userspace memory only: kernel socket buffers and pipe pages are not in it, so
the descriptor count per connection is reported alongside (it shows pipes kept per idle
connection, for instance).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from benchmarks._peers import Front, start_peer
from benchmarks._procs import PeerUnavailable, fd_count, rss_bytes
from benchmarks._results import Measurement, Metric
from benchmarks._workloads import hold_backend
from benchmarks.conftest import Measure, Settings
from l4lb._testbase import open_name

BENCH_ROUNDS = 1  # one fresh peer per measurement; a second round would add little


def _idle(front: Front, settings: Settings) -> Measurement:
    count = settings.idle_conns
    pids = front.pids()
    warm, name = open_name(front.address, timeout=10)  # let lazy first-use allocations happen
    warm.close()
    assert name == "hold"
    time.sleep(0.2)
    before, fds_before = rss_bytes(pids), fd_count(pids)
    socks = []
    try:
        for _ in range(count):
            # One at a time: every greeting read proves the whole path is up before the next.
            socks.append(open_name(front.address, timeout=10)[0])
        time.sleep(0.5)
        pids = front.pids()
        after, fds_after = rss_bytes(pids), fd_count(pids)
    finally:
        for sock in socks:
            sock.close()
    return Measurement(
        [Metric("rss_per_conn", (after - before) / count, "bytes", higher_is_better=False)],
        {
            "connections": count,
            "connections_requested": settings.idle_conns_requested,
            "rss_before": before,
            "rss_after": after,
            "fds_per_conn": (fds_after - fds_before) / count,
        },
    )


#: A direct connection has no proxy process whose memory could be measured.
EXCLUDE_PEERS = ("direct",)


def test_idle_connection_memory(
    peer_name: str, settings: Settings, bench_dir: Path, measure: Measure
) -> None:
    workdir = bench_dir / f"idle-{peer_name}"
    with hold_backend(workdir) as backend:
        try:
            front = start_peer(peer_name, backend, workdir, max_conns=settings.idle_conns)
        except PeerUnavailable as exc:
            pytest.skip(str(exc))
        try:
            measure("idle-memory", lambda: _idle(front, settings))
        finally:
            front.stop()
