"""A backend process for the idle-connection workload: holds every connection it accepts.

It runs apart from the benchmark process so that the file-descriptor budget of each process
covers only one side of the 10,000 connections.

    python3 benchmarks/peers/hold_backend.py --ready-file ready.json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
from pathlib import Path

from l4lb._testbase import NamedServer


def main() -> None:
    """Serve until SIGTERM, after writing ``{"address": ...}`` to the ready file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ready-file", type=Path, required=True)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: None)  # only to interrupt pause()
    with NamedServer("hold", hold=True) as server:
        tmp = args.ready_file.with_name(args.ready_file.name + ".tmp")
        tmp.write_text(json.dumps({"pid": os.getpid(), "address": server.address}))
        os.replace(tmp, args.ready_file)
        signal.pause()


if __name__ == "__main__":
    main()
