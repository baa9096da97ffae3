"""Run every case_*.py of this folder inside the VM; results into OUTDIR, then a sentinel.

Each case gets OUTDIR/<case>.json (its observations), <case>.log (stdout and stderr) and
<case>.rc. The file OUTDIR/done and the printed sentinel mark the end of the batch.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SENTINEL = "L4LB-KERNEL-TESTS-DONE"


def main(outdir: str) -> None:
    out = Path(outdir)
    here = Path(__file__).resolve().parent
    cases = sorted(here.glob("case_*.py"))
    only = sys.argv[2:]  # optional case names, for debugging
    for case in cases:
        if only and case.stem not in only:
            continue
        with open(out / f"{case.stem}.log", "w") as log:
            try:
                r = subprocess.run(
                    [sys.executable, str(case), str(out / f"{case.stem}.json")],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    timeout=1800,
                )
                rc = r.returncode
            except subprocess.TimeoutExpired:
                rc = -1
        (out / f"{case.stem}.rc").write_text(str(rc))
        # Each case builds its own namespaces; clear them for the next one.
        for ns in subprocess.run(
            ["ip", "netns", "list"], capture_output=True, text=True
        ).stdout.split("\n"):
            if ns.strip():
                subprocess.run(["ip", "netns", "del", ns.split()[0]])
    (out / "done").write_text("ok")
    print(SENTINEL, flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
