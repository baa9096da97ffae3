"""What each fault case measured, and the Markdown table made from all of them.

A case fills one :class:`FaultResult`. ``lost`` counts connections that failed although a
healthy path existed for them; :meth:`FaultResult.check` fails the case when any were lost,
when a completed transfer was not byte-exact, or when fewer connections completed than the
case requires. ``failed`` counts the connections the fault itself was expected to break (the
ones in flight on a backend that crashed, say); they are reported, not hidden.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .traffic import Outcome

__all__ = ["RESULTS_JSON", "RESULTS_MD", "FaultResult", "load", "render_table", "save"]

_ROOT = Path(__file__).resolve().parents[2]
RESULTS_JSON = Path(os.environ.get("L4LB_FAULTS_JSON", _ROOT / "build" / "faults.json"))
RESULTS_MD = RESULTS_JSON.with_suffix(".md")


@dataclass
class FaultResult:
    """One fault case: what was injected, what should happen, and what did."""

    case: str
    injected: str
    expected: str
    attempted: int = 0
    completed: int = 0
    #: Broken by the fault itself, where no healthy path existed (reported, allowed).
    failed: int = 0
    #: Failed although a healthy path existed: must stay 0.
    lost: int = 0
    bytes_verified: int = 0
    corrupt: int = 0
    recover_s: float | None = None
    #: What ``recover_s`` measures, e.g. "until marked down".
    recovery: str = ""
    notes: list[str] = field(default_factory=list)
    #: Set by a passing :meth:`check`; only checked results go into the table.
    checked: bool = False

    def count(
        self,
        outcomes: Sequence[Outcome],
        *,
        broken: frozenset[str] = frozenset(),
        fault_at: float | Sequence[tuple[float, float]] = (),
    ) -> None:
        """Add outcomes: a failure is ``failed`` when it was on a ``broken`` backend, or had
        not reached a backend yet and was under way during a fault (``fault_at``: an
        instant, or ``(start, end)`` intervals); any other failure is ``lost``."""
        faults = [(fault_at, fault_at)] if isinstance(fault_at, float) else list(fault_at)
        for o in outcomes:
            self.attempted += 1
            if o.ok:
                self.completed += 1
                self.bytes_verified += o.nbytes
                continue
            self.corrupt += o.corrupt
            in_flight = any(o.started <= end and start <= o.ended for start, end in faults)
            if o.backend in broken or (o.backend is None and in_flight):
                self.failed += 1
            else:
                self.lost += 1
                if len(self.notes) < 5:
                    self.notes.append(f"{o.backend}: {o.error}")

    def check(self, *, min_completed: int = 1, max_failed: int | None = None) -> None:
        """Fail the case if anything was lost or corrupted, or too little completed."""
        assert self.corrupt == 0, f"{self.case}: {self.corrupt} transfer(s) not byte-exact"
        assert self.lost == 0, f"{self.case}: {self.lost} connection(s) lost: {self.notes}"
        assert self.completed >= min_completed, (
            f"{self.case}: {self.completed} completed, expected at least {min_completed}"
        )
        if max_failed is not None:
            assert self.failed <= max_failed, (
                f"{self.case}: {self.failed} failed, expected at most {max_failed}"
            )
        unaccounted = self.attempted - self.completed - self.failed - self.lost
        assert unaccounted == 0, f"{self.case}: {unaccounted} connection(s) unaccounted for"
        self.checked = True


def _mib(n: int) -> str:
    return f"{n / (1 << 20):,.1f} MiB" if n >= 1 << 20 else f"{n / 1024:,.0f} KiB"


def render_table(results: list[dict[str, Any]]) -> str:
    """The Markdown table of ``results`` (as saved in :data:`RESULTS_JSON`)."""
    lines = [
        "| fault | injected | expected | attempted | completed | failed | lost "
        "| bytes verified | recovery |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        recover = "—" if r["recover_s"] is None else f"{r['recover_s']:.2f} s"
        if r["recover_s"] is not None and r.get("recovery"):
            recover += f" ({r['recovery']})"
        lines.append(
            f"| {r['case']} | {r['injected']} | {r['expected']} | {r['attempted']:,} "
            f"| {r['completed']:,} | {r['failed']:,} | {r['lost']:,} "
            f"| {_mib(r['bytes_verified'])} | {recover} |"
        )
    return "\n".join(lines) + "\n"


def load() -> list[dict[str, Any]]:
    """The saved results, or an empty list."""
    try:
        docs = json.loads(RESULTS_JSON.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return []
    return docs if isinstance(docs, list) else []


def save(results: list[FaultResult]) -> None:
    """Merge ``results`` into the saved ones (a partial run updates only its cases)."""
    docs = {str(d["case"]): d for d in load()}
    for r in results:
        if r.checked:
            docs[r.case] = asdict(r)
    RESULTS_JSON.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_JSON.write_text(json.dumps(list(docs.values()), indent=1) + "\n")
    RESULTS_MD.write_text(render_table(list(docs.values())))
