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
import threading
from pathlib import Path

from l4lb._testbase import NamedServer


def main() -> None:
    """Serve until SIGTERM, after writing ``{"address": ...}`` to the ready file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ready-file", type=Path, required=True)
    args = parser.parse_args()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with NamedServer("hold", hold=True) as server:
        tmp = args.ready_file.with_name(args.ready_file.name + ".tmp")
        tmp.write_text(json.dumps({"pid": os.getpid(), "address": server.address}))
        os.replace(tmp, args.ready_file)
        # Polling, not signal.pause(): the kernel may deliver SIGTERM to the server thread,
        # and then pause() in the main thread would never return.
        while not stop.wait(0.1):
            pass


if __name__ == "__main__":
    main()
