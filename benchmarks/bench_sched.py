"""Cost of one scheduling decision in C, for every scheduler and list size.

Each case programs one service of a data plane without worker threads and times, in C,
``l4_service_schedule`` followed by the unbind of the connection it bound (the extension's
``_bench_pick``), so a pick sees the same counters every round. sh hashes a different client
address and port each round, the others one fixed client. The time is read from
``CLOCK_MONOTONIC`` around the whole loop inside C: no Python call per pick is measured.
As every connection is unbound again, all dests stay idle: lc, wlc and sed scan the whole
list each time, while nq stops at the first idle dest (its best case).

``extra_info`` of each entry: ``ns_per_pick`` (median of the runs), ``ns_per_pick_runs``,
``picks_per_run``, ``scheduler`` and ``backends``. Under ``--benchmark-disable`` (quick
mode) every case makes a few hundred picks only.
"""

from __future__ import annotations

import statistics
from typing import Any

import pytest

from benchmarks.conftest import Settings
from l4lb import _dataplane

SCHEDULERS = ("rr", "wrr", "lc", "wlc", "sed", "nq", "sh", "dh")
SIZES = (10, 100, 1000)
SERVICE = 1
TARGET_NS = 100_000_000  # each run lasts about 0.1 s
RUNS = 5
QUICK_PICKS = 200


def _service(scheduler: str, backends: int) -> _dataplane.Dataplane:
    """A data plane with one service of ``backends`` dests, weights 1 to 5."""
    dp = _dataplane.Dataplane(1)
    dp.service_configure(SERVICE, scheduler)
    for slot in range(backends):
        # Distinct addresses (the slot keeps its own); weights vary so wrr has rounds.
        host = f"10.9.{slot >> 8}.{slot & 0xFF}"
        dp.dest_add(SERVICE, slot, host, 8080, 1 + slot % 5)
    return dp


def _measure(dp: _dataplane.Dataplane, vary_client: bool, quick: bool) -> dict[str, Any]:
    if quick:
        ns = _dataplane._bench_pick(dp, SERVICE, QUICK_PICKS, vary_client)
        return {"ns_per_pick": ns, "ns_per_pick_runs": [ns], "picks_per_run": QUICK_PICKS}
    warm = _dataplane._bench_pick(dp, SERVICE, 10_000, vary_client)
    picks = int(min(5_000_000, max(10_000, TARGET_NS / max(warm, 1.0))))
    runs = [_dataplane._bench_pick(dp, SERVICE, picks, vary_client) for _ in range(RUNS)]
    return {
        "ns_per_pick": statistics.median(runs),
        "ns_per_pick_runs": runs,
        "picks_per_run": picks,
    }


@pytest.mark.parametrize("backends", SIZES)
@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_pick(benchmark: Any, settings: Settings, scheduler: str, backends: int) -> None:
    dp = _service(scheduler, backends)
    assert list(dp.dest_order(SERVICE)) == list(reversed(range(backends)))
    benchmark.group = f"sched-pick-{backends}"
    result = benchmark.pedantic(
        _measure, args=(dp, scheduler == "sh", settings.quick), rounds=1, iterations=1
    )
    assert result["ns_per_pick"] > 0
    benchmark.extra_info.update(scheduler=scheduler, backends=backends, **result)
