"""Turn a pytest-benchmark JSON file into benchmarks/REPORT.md with PNG charts.

    python3 -m benchmarks.report results.json [-o benchmarks/REPORT.md] [--compare r2.json]

The report shows, per workload and metric, the median over rounds for every peer and the
ratio l4lb/peer, with a bar chart of those ratios per workload; which peers ran for each
workload and what was skipped and why; ratios whose rounds disagree by more than 10%
(or that moved that much against a compared run); the load generator's own overhead; and
the machine and the peers' versions (as recorded by the run, or probed now if the file
lacks them). Workloads it does not know are rendered the same way, from ``extra_info``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._procs import tool_version
from benchmarks._results import L4LB, UNSTABLE, Summary, summarize

__all__ = ["main", "render"]

PEER_ORDER = ("direct", "l4lb-affinity", "haproxy", "nginx", "asyncio", "iptables-dnat", "ipvs")
COMMAND = (
    "python3 -m pytest benchmarks -p no:cacheprovider --benchmark-only "
    "--benchmark-json=results.json && python3 -m benchmarks.report results.json"
)


def _machine(data: Mapping[str, Any]) -> dict[str, Any]:
    recorded = data.get("machine_info", {}).get("l4lb_bench")
    if recorded:
        return dict(recorded)
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return {
        "cpu_model": cpu,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "versions": {
            "haproxy": tool_version(["haproxy", "-v"]),
            "nginx": tool_version(["nginx", "-v"]),
            "iperf3": tool_version(["iperf3", "--version"]),
            "wrk": tool_version(["wrk", "-v"]),
        },
        "probed_at_report_time": True,
    }


def _peers(summary: Summary) -> list[str]:
    seen = {p for metrics in summary.medians.values() for by in metrics.values() for p in by}
    ordered = [p for p in (L4LB, *PEER_ORDER) if p in seen]
    return ordered + sorted(seen - set(ordered))


def _fmt(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def _chart(path: Path, title: str, rows: Sequence[tuple[str, float, bool]]) -> None:
    """Horizontal bars of l4lb/peer ratios; ``rows`` are (label, ratio, higher_is_better)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [label for label, _, _ in rows]
    values = [value for _, value, _ in rows]
    good = [(v >= 1) == up for _, v, up in rows]
    fig, ax = plt.subplots(figsize=(6.4, 0.8 + 0.4 * len(rows)))
    bars = ax.barh(labels, values, color=["#2a9d8f" if g else "#e76f51" for g in good])
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.invert_yaxis()
    ax.set_xlabel("l4lb / peer (green: l4lb better)")
    ax.set_title(title, fontsize=10)
    ax.bar_label(bars, labels=[f"{v:.2f}" for v in values], padding=3, fontsize=8)
    ax.set_xlim(0, max([*values, 1.0]) * 1.25)
    ax.tick_params(axis="y", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _ordered(peers: Iterable[str]) -> list[str]:
    """``peers`` without l4lb, in the report's peer order."""
    have = set(peers)
    return [p for p in dict.fromkeys((*PEER_ORDER, *sorted(have))) if p in have and p != L4LB]


def _unstable(summary: Summary, workload: str, metric: str) -> str:
    cells = []
    for peer in _ordered(summary.ratios[workload][metric]):
        spread = summary.spread(workload, metric, peer)
        if spread is not None and spread > UNSTABLE:
            # Rounds a factor apart read better as that factor than as thousands of percent.
            cells.append(f"{peer} ±{spread:.0%}" if spread < 1 else f"{peer} {spread + 1:.1f}x")
    return ", ".join(cells) or "-"


def _versus(summary: Summary, other: Summary | None, workload: str, metric: str) -> str:
    if other is None:
        return ""
    cells: list[str] = []
    theirs = other.ratios.get(workload, {}).get(metric, {})
    for peer, ratio in summary.ratios[workload][metric].items():
        if peer in theirs and theirs[peer] > 0:
            change = ratio / theirs[peer] - 1.0
            if abs(change) > UNSTABLE:
                cells.append(f"{peer} {change:+.0%}")
    return ", ".join(cells) or "-"


def _machine_lines(machine: Mapping[str, Any]) -> list[str]:
    lines = [
        "## Machine",
        "",
        f"- CPU: {machine.get('cpu_model')}, {machine.get('cores')} cores",
        f"- Kernel: {machine.get('kernel')}",
        f"- Python: {machine.get('python')}",
    ]
    load = machine.get("loadavg_at_start")
    if load:
        lines.append(
            "- Load average when the run started: "
            + ", ".join(f"{x:.2f}" for x in load)
            + " (1, 5, 15 min; other work on the machine competes with every peer alike)"
        )
    for tool, version in machine.get("versions", {}).items():
        lines.append(f"- {tool}: {version}")
    if machine.get("probed_at_report_time"):
        lines.append("- (machine details probed when the report was made, not during the run)")
    settings = machine.get("settings")
    if settings:
        idle = f"- idle connections: {settings.get('idle_conns')}"
        if settings.get("idle_conns") != settings.get("idle_conns_requested"):
            idle += f" (asked for {settings.get('idle_conns_requested')}, capped by RLIMIT_NOFILE)"
        lines += [
            "",
            "## Settings",
            "",
            f"- rounds per workload: {settings.get('rounds')}, "
            f"seconds per run: {settings.get('seconds')}, quick mode: {settings.get('quick')}",
            idle,
            f"- kernel VM peers (L4LB_BENCH_VM=1): {'on' if settings.get('vm') else 'off'}",
            "- peers are measured alternately within each round; values are medians over rounds",
        ]
    return lines


def _ran_lines(summary: Summary, skipped: Sequence[Mapping[str, str]]) -> list[str]:
    lines = ["## What ran", "", "| workload | peers (rounds) |", "|---|---|"]
    for workload, by_peer in summary.rounds.items():
        peers = [L4LB] * (L4LB in by_peer) + _ordered(by_peer)
        lines.append(f"| {workload} | " + ", ".join(f"{p} ({by_peer[p]})" for p in peers) + " |")
    lines += ["", "## Skipped", ""]
    if not skipped:
        lines.append("Nothing was skipped.")
        return lines
    reasons: dict[str, list[str]] = {}
    for entry in skipped:
        reasons.setdefault(str(entry.get("reason")), []).append(str(entry.get("test")))
    lines += ["| reason | tests |", "|---|---|"]
    for reason, tests in reasons.items():
        names = ", ".join(f"`{t.rsplit('::', 1)[-1]}`" for t in tests[:4])
        more = f" and {len(tests) - 4} more" if len(tests) > 4 else ""
        lines.append(f"| {reason.replace('|', '/')} | {names}{more} |")
    return lines


def _overhead_lines(entries: Sequence[Mapping[str, Any]]) -> list[str]:
    """The load generator's own CPU time per request, per workload and peer (medians)."""
    found: dict[tuple[str, str], list[float]] = {}
    for info in entries:
        for key, value in info.items():
            if key.startswith("info_gen_cpu_ns_per_req") and isinstance(value, int | float):
                name = str(info.get("workload")) + key.removeprefix("info_gen_cpu_ns_per_req")
                found.setdefault((name, str(info.get("peer"))), []).append(float(value))
    if not found:
        return []
    lines = [
        "## Load generator overhead",
        "",
        "CPU time rrgen itself spends per request (user + system, median over rounds). In",
        "the `direct` column nothing but the echo backend is in the path: that is the",
        "generator's own cost, which every proxied run carries as well.",
        "",
        "| workload | peer | generator CPU per request (us) |",
        "|---|---|---|",
    ]
    for (name, peer), values in sorted(found.items()):
        lines.append(f"| {name} | {peer} | {statistics.median(values) / 1e3:.2f} |")
    return lines


def _sched_lines(entries: Sequence[Mapping[str, Any]]) -> list[str]:
    picks = [e for e in entries if "ns_per_pick" in e and "scheduler" in e]
    if not picks:
        return []
    sizes = sorted({int(e["backends"]) for e in picks})
    table: dict[str, dict[int, float]] = {}
    for e in picks:
        table.setdefault(str(e["scheduler"]), {})[int(e["backends"])] = float(e["ns_per_pick"])
    lines = ["## Scheduler pick cost (ns per pick, in C)", ""]
    lines += ["| scheduler | " + " | ".join(f"{n} backends" for n in sizes) + " |"]
    lines += ["|" + "---|" * (len(sizes) + 1)]
    for sched, by_size in table.items():
        cells = [f"{by_size[n]:.1f}" if n in by_size else "n/a" for n in sizes]
        lines.append(f"| {sched} | " + " | ".join(cells) + " |")
    return lines


def render(
    data: Mapping[str, Any],
    out: Path,
    *,
    source: str = "results.json",
    compare: Mapping[str, Any] | None = None,
    compare_source: str = "",
) -> Path:
    """Write the report for pytest-benchmark ``data`` to ``out`` (charts beside it).

    With ``compare`` (a second run's data) every ratio that moved by more than 10% between
    the two runs is listed in an extra column.
    """
    entries = [b.get("extra_info", {}) for b in data.get("benchmarks", [])]
    summary = summarize(entries)
    other = None
    if compare is not None:
        other = summarize(b.get("extra_info", {}) for b in compare.get("benchmarks", []))
    machine = _machine(data)
    peers = _peers(summary)
    charts = out.parent / "report-charts"
    charts.mkdir(parents=True, exist_ok=True)
    for old in charts.glob("*.png"):
        old.unlink()  # charts of workloads this run did not measure would mislead

    lines = [
        "# l4lb benchmark report",
        "",
        f"Source: `{source}` ({data.get('datetime', 'unknown date')})"
        + (f", compared with `{compare_source}`" if compare is not None else "")
        + ".",
        "",
        *_machine_lines(machine),
        "",
        *_ran_lines(summary, data.get("l4lb_bench_skipped", [])),
        "",
        "## Results",
        "",
    ]
    header = "| workload | metric | " + " | ".join(peers) + " |"
    lines += [header, "|" + "---|" * (len(peers) + 2)]
    for workload, metrics in summary.medians.items():
        for metric, by_peer in metrics.items():
            unit = summary.units[(workload, metric)]
            cells = [_fmt(by_peer[p]) if p in by_peer else "n/a" for p in peers]
            lines.append(f"| {workload} | {metric} ({unit}) | " + " | ".join(cells) + " |")

    ratio_peers = [p for p in peers if p != L4LB]
    lines += ["", "## l4lb / peer", ""]
    if not summary.ratios:
        lines.append("No l4lb measurements in this file: no ratios.")
    else:
        extra = " vs other run |" if other is not None else ""
        lines += [
            "Ratios of medians. For rates and throughput above 1 means l4lb is better; for "
            "latency, time and memory below 1 means l4lb is better. *unstable* lists the "
            f"peers whose per-round ratios lie more than {UNSTABLE:.0%} apart"
            + (
                f"; *vs other run* those whose ratio moved more than {UNSTABLE:.0%} from the "
                "compared run."
                if other is not None
                else "."
            ),
            "",
            "| workload | metric | better | " + " | ".join(ratio_peers) + " | unstable |" + extra,
            "|" + "---|" * (len(ratio_peers) + 4 + (other is not None)),
        ]
        for workload, metrics in summary.ratios.items():
            for metric, ratios in metrics.items():
                better = "higher" if summary.higher_is_better[(workload, metric)] else "lower"
                cells = [f"{ratios[p]:.2f}" if p in ratios else "n/a" for p in ratio_peers]
                lines.append(
                    f"| {workload} | {metric} | {better} | "
                    + " | ".join(cells)
                    + f" | {_unstable(summary, workload, metric)} |"
                    + (f" {_versus(summary, other, workload, metric)} |" if other else "")
                )
        lines += ["", "## Charts", ""]
        for workload, metrics in summary.ratios.items():
            rows = [
                (f"{metric} / {peer}", ratios[peer], summary.higher_is_better[(workload, metric)])
                for metric, ratios in metrics.items()
                for peer in _ordered(ratios)
            ]
            png = charts / f"{_slug(workload)}.png"
            _chart(png, workload, rows)
            rel = png.relative_to(out.parent).as_posix()
            lines += [f"![{workload}]({rel})", ""]

    for section in (_overhead_lines(entries), _sched_lines(entries)):
        if section:
            lines += ["", *section]
    lines += [
        "",
        "## Reproduce",
        "",
        "```",
        COMMAND,
        "```",
        "",
        "RSS in the idle-memory workload counts userspace memory only (kernel socket buffers "
        "and pipe pages are not included); `info_fds_per_conn` in the JSON shows descriptors "
        "held per idle connection.",
        "",
    ]
    out.write_text("\n".join(lines))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description="Render a benchmark JSON file as Markdown.")
    parser.add_argument("results", type=Path, help="file written by --benchmark-json")
    parser.add_argument(
        "--compare",
        type=Path,
        help="a second run's file: flag ratios that moved more than 10%% between the runs",
    )
    parser.add_argument(
        "-o",
        "--output",
        type=Path,
        default=Path(__file__).resolve().parent / "REPORT.md",
        help="Markdown file to write (default: benchmarks/REPORT.md)",
    )
    args = parser.parse_args(argv)
    data = json.loads(args.results.read_text())
    compare = json.loads(args.compare.read_text()) if args.compare else None
    out = render(
        data,
        args.output,
        source=args.results.name,
        compare=compare,
        compare_source=args.compare.name if args.compare else "",
    )
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
