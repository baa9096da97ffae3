"""Measurements of one run and the l4lb/peer ratios derived from them.

Each benchmark test measures one (workload, peer, round) and stores its metrics in
pytest-benchmark's ``extra_info``, so they end up in the ``--benchmark-json`` file. Ratios
are medians over rounds, ``l4lb / peer`` for every metric: above 1 is better for l4lb when
``higher_is_better`` (throughput, rates), below 1 when not (latency, memory). They are
recomputed into every entry's ``extra_info`` after each measurement, because the peers of a
workload are measured one after another and pytest-benchmark writes the file only at the end.

Stability: each round is a pass over all peers, so the ratio is also taken within every
round; when those per-round ratios lie more than :data:`UNSTABLE` apart, the report flags
the ratio (and likewise when two result files are compared).
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["L4LB", "UNSTABLE", "Measurement", "Metric", "Results", "Summary", "summarize"]

L4LB = "l4lb"
#: Ratios whose rounds (or two runs) differ by more than this are flagged unstable.
UNSTABLE = 0.10


@dataclass(frozen=True)
class Metric:
    """One measured number."""

    name: str
    value: float
    unit: str
    higher_is_better: bool


@dataclass
class Measurement:
    """What a workload function returns: its metrics plus free-form details."""

    metrics: list[Metric]
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Summary:
    """Medians per workload, metric and peer, and the l4lb/peer ratios of those medians."""

    medians: dict[str, dict[str, dict[str, float]]]
    units: dict[tuple[str, str], str]
    higher_is_better: dict[tuple[str, str], bool]
    ratios: dict[str, dict[str, dict[str, float]]]
    rounds: dict[str, dict[str, int]]
    #: l4lb / peer within each round that measured both, in round order.
    round_ratios: dict[str, dict[str, dict[str, list[float]]]] = field(default_factory=dict)

    def spread(self, workload: str, metric: str, peer: str) -> float | None:
        """How far the per-round ratios lie apart (max / min - 1); None with under 2 rounds."""
        values = self.round_ratios.get(workload, {}).get(metric, {}).get(peer, [])
        if len(values) < 2 or min(values) <= 0:
            return None
        return max(values) / min(values) - 1.0


def summarize(entries: Iterable[Mapping[str, Any]]) -> Summary:
    """Aggregate ``extra_info`` dicts carrying ``workload``, ``peer`` and ``metrics``."""
    values: dict[str, dict[str, dict[str, list[float]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(list))
    )
    units: dict[tuple[str, str], str] = {}
    better: dict[tuple[str, str], bool] = {}
    rounds: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    by_round: dict[tuple[str, str], dict[int, dict[str, float]]] = defaultdict(
        lambda: defaultdict(dict)
    )
    for info in entries:
        workload, peer = info.get("workload"), info.get("peer")
        if not workload or not peer:
            continue
        rounds[workload][peer] += 1
        for name, metric in info.get("metrics", {}).items():
            values[workload][name][peer].append(float(metric["value"]))
            by_round[(workload, name)][int(info.get("round", 0))][peer] = float(metric["value"])
            units[(workload, name)] = metric["unit"]
            better[(workload, name)] = bool(metric["higher_is_better"])
    medians = {
        w: {m: {p: statistics.median(v) for p, v in peers.items()} for m, peers in metrics.items()}
        for w, metrics in values.items()
    }
    ratios: dict[str, dict[str, dict[str, float]]] = {}
    for workload, metrics in medians.items():
        for name, by_peer in metrics.items():
            ours = by_peer.get(L4LB)
            if ours is None:
                continue
            for peer, theirs in by_peer.items():
                if peer != L4LB and theirs > 0:
                    ratios.setdefault(workload, {}).setdefault(name, {})[peer] = ours / theirs
    round_ratios: dict[str, dict[str, dict[str, list[float]]]] = {}
    for (workload, name), per_round in by_round.items():
        for _, by_peer in sorted(per_round.items()):
            ours = by_peer.get(L4LB)
            for peer, theirs in by_peer.items():
                if ours is not None and peer != L4LB and theirs > 0:
                    per_metric = round_ratios.setdefault(workload, {}).setdefault(name, {})
                    per_metric.setdefault(peer, []).append(ours / theirs)
    return Summary(
        medians,
        units,
        better,
        ratios,
        {w: dict(p) for w, p in rounds.items()},
        round_ratios,
    )


class Results:
    """Collects the ``extra_info`` dicts of a run and keeps their ratio fields current."""

    def __init__(self) -> None:
        self._entries: dict[str, list[dict[str, Any]]] = defaultdict(list)

    def record(
        self,
        extra_info: dict[str, Any],
        *,
        workload: str,
        peer: str,
        round_: int,
        measurement: Measurement,
    ) -> None:
        """Store ``measurement`` into ``extra_info`` and refresh the workload's ratios."""
        extra_info.update(
            workload=workload,
            peer=peer,
            round=round_,
            metrics={
                m.name: {"value": m.value, "unit": m.unit, "higher_is_better": m.higher_is_better}
                for m in measurement.metrics
            },
            **{f"info_{k}": v for k, v in measurement.info.items()},
        )
        entries = self._entries[workload]
        entries.append(extra_info)
        summary = summarize(entries)
        ratios = summary.ratios.get(workload, {})
        for info in entries:
            if info["peer"] == L4LB:
                info["l4lb_over"] = {
                    peer: {m: r[peer] for m, r in ratios.items() if peer in r}
                    for peer in sorted({p for r in ratios.values() for p in r})
                }
            else:
                info["l4lb_over_this_peer"] = {
                    m: r[info["peer"]] for m, r in ratios.items() if info["peer"] in r
                }

    def summary(self) -> Summary:
        """Summary over everything recorded so far."""
        return summarize(e for entries in self._entries.values() for e in entries)
