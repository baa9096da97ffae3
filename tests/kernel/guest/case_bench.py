"""benchmarks/bench_offload.py at a small size: the sink programs what ipvsadm-restore does.

Usage (inside the test VM): case_bench.py RESULT.json. The figures are recorded, never
asserted on (speed is the benchmark's business); the rules must be identical.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from benchmarks.bench_offload import guest_measure

SERVICES = 300


def main(out: str) -> None:
    try:
        result = guest_measure(SERVICES)
    except Exception:
        result = {"error": traceback.format_exc()}
    result["done"] = True
    Path(out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main(sys.argv[1])
    os._exit(0)
