"""Copy the fault table into README.md's "Fault tolerance" section.

    python -m tests.faults.table          # run the fault suite, then update README.md
    python -m tests.faults.table --no-run # only copy the saved results (build/faults.json)

The table sits between two HTML comments in README.md; everything else is left alone.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from .record import RESULTS_JSON, load, render_table

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
BEGIN = "<!-- fault-table:begin (python -m tests.faults.table) -->"
END = "<!-- fault-table:end -->"


def update_readme(readme: Path, table: str) -> bool:
    """Replace the table between the markers; return False when the markers are missing."""
    text = readme.read_text(encoding="utf-8")
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        return False
    new = text[: start + len(BEGIN)] + "\n" + table + text[end:]
    if new != text:
        readme.write_text(new, encoding="utf-8")
    return True


def main(argv: list[str] | None = None) -> int:
    """Entry point: optionally run the suite, then rewrite the README table."""
    parser = argparse.ArgumentParser(prog="python -m tests.faults.table", description=__doc__)
    parser.add_argument("--no-run", action="store_true", help="do not run the suite first")
    parser.add_argument("--readme", type=Path, default=README)
    args = parser.parse_args(argv)
    if not args.no_run:
        suite = [sys.executable, "-m", "pytest", "tests/faults", "-q"]
        code = subprocess.run(suite, cwd=ROOT, check=False).returncode
        if code != 0:
            print("fault suite failed: README.md left as it was", file=sys.stderr)
            return code
    results = load()
    if not results:
        print(f"no results in {RESULTS_JSON}: run the fault suite first", file=sys.stderr)
        return 1
    if not update_readme(args.readme, render_table(results)):
        print(f"{args.readme}: markers {BEGIN!r} ... {END!r} not found", file=sys.stderr)
        return 1
    print(f"{args.readme}: fault table updated ({len(results)} cases)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
