"""Turn a pytest-benchmark JSON file into benchmarks/REPORT.md with PNG charts.

    python3 -m benchmarks.report results.json [-o benchmarks/REPORT.md]

The report shows, per workload and metric, the median over rounds for every peer and the
ratio l4lb/peer, with a bar chart of those ratios, and describes the machine and the peers'
versions (as recorded by the benchmark run, or probed now if the file lacks them).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._procs import tool_version
from benchmarks._results import L4LB, Summary, summarize

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


def _chart(path: Path, title: str, ratios: Mapping[str, float], *, higher_is_better: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    peers = [p for p in (*PEER_ORDER, *sorted(ratios)) if p in ratios]
    peers = list(dict.fromkeys(peers))
    values = [ratios[p] for p in peers]
    good = [(v >= 1) == higher_is_better for v in values]
    fig, ax = plt.subplots(figsize=(6.4, 0.6 + 0.55 * len(peers)))
    bars = ax.barh(peers, values, color=["#2a9d8f" if g else "#e76f51" for g in good])
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.invert_yaxis()
    ax.set_xlabel("l4lb / peer (" + ("higher" if higher_is_better else "lower") + " is better)")
    ax.set_title(title, fontsize=10)
    ax.bar_label(bars, labels=[f"{v:.2f}" for v in values], padding=3, fontsize=8)
    ax.set_xlim(0, max([*values, 1.0]) * 1.25)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render(data: Mapping[str, Any], out: Path, *, source: str = "results.json") -> Path:
    """Write the report for pytest-benchmark ``data`` to ``out`` (charts beside it)."""
    entries = [b.get("extra_info", {}) for b in data.get("benchmarks", [])]
    summary = summarize(entries)
    machine = _machine(data)
    peers = _peers(summary)
    charts = out.parent / "report-charts"
    charts.mkdir(parents=True, exist_ok=True)

    lines = [
        "# l4lb benchmark report",
        "",
        f"Source: `{source}` ({data.get('datetime', 'unknown date')}).",
        "",
        "## Machine",
        "",
        f"- CPU: {machine.get('cpu_model')}, {machine.get('cores')} cores",
        f"- Kernel: {machine.get('kernel')}",
        f"- Python: {machine.get('python')}",
    ]
    for tool, version in machine.get("versions", {}).items():
        lines.append(f"- {tool}: {version}")
    if machine.get("probed_at_report_time"):
        lines.append("- (machine details probed when the report was made, not during the run)")
    settings = machine.get("settings")
    if settings:
        lines += [
            "",
            "## Settings",
            "",
            f"- rounds per workload: {settings.get('rounds')}, "
            f"seconds per run: {settings.get('seconds')}, quick mode: {settings.get('quick')}",
            f"- idle connections: {settings.get('idle_conns')}"
            + (
                f" (asked for {settings.get('idle_conns_requested')}, capped by RLIMIT_NOFILE)"
                if settings.get("idle_conns") != settings.get("idle_conns_requested")
                else ""
            ),
            "- peers are measured alternately within each round; values are medians over rounds",
        ]

    lines += ["", "## Results", ""]
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
        lines += [
            "Ratios of medians. For rates and throughput above 1 means l4lb is better; for "
            "latency and memory below 1 means l4lb is better.",
            "",
            "| workload | metric | better | " + " | ".join(ratio_peers) + " |",
            "|" + "---|" * (len(ratio_peers) + 3),
        ]
        for workload, metrics in summary.ratios.items():
            for metric, ratios in metrics.items():
                better = "higher" if summary.higher_is_better[(workload, metric)] else "lower"
                cells = [f"{ratios[p]:.2f}" if p in ratios else "n/a" for p in ratio_peers]
                lines.append(f"| {workload} | {metric} | {better} | " + " | ".join(cells) + " |")
        lines += ["", "## Charts", ""]
        for workload, metrics in summary.ratios.items():
            for metric, ratios in metrics.items():
                png = charts / f"{_slug(workload)}-{_slug(metric)}.png"
                up = summary.higher_is_better[(workload, metric)]
                _chart(png, f"{workload}: {metric}", ratios, higher_is_better=up)
                rel = png.relative_to(out.parent).as_posix()
                lines.append(f"![{workload} {metric}]({rel})")
                lines.append("")

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
        "-o",
        "--output",
        type=Path,
        default=Path(__file__).resolve().parent / "REPORT.md",
        help="Markdown file to write (default: benchmarks/REPORT.md)",
    )
    args = parser.parse_args(argv)
    data = json.loads(args.results.read_text())
    out = render(data, args.output, source=args.results.name)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
