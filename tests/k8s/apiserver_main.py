"""Run the API-server double as a process, driven by JSON lines on stdin.

Used where the test process cannot listen itself, e.g. inside a network namespace:
``python apiserver_main.py KUBECONFIG [HOST]`` serves on HOST (127.0.0.1) with a free port,
writes a kubeconfig pointing at it, prints ``{"port": N}`` and then answers each command
line with one ``{"ok": true}`` (or ``{"error": "..."}``) line:

    {"op": "add", "kind": "Service", "object": {...}}
    {"op": "delete", "kind": "EndpointSlice", "key": "ns/name"}
    {"op": "node", "name": "node-a", "object": {...}}

It exits when stdin closes.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from k8s_apiserver import FakeApiServer


async def main(kubeconfig: str, host: str) -> None:
    server = FakeApiServer()
    await server.start(host)
    server.write_kubeconfig(Path(kubeconfig))
    print(json.dumps({"port": server.port}), flush=True)
    try:
        while line := await asyncio.to_thread(sys.stdin.readline):
            try:
                cmd = json.loads(line)
                if cmd["op"] == "add":
                    server.add(cmd["kind"], cmd["object"])
                elif cmd["op"] == "delete":
                    server.delete(cmd["kind"], cmd["key"])
                elif cmd["op"] == "node":
                    server.nodes[cmd["name"]] = cmd["object"]
                else:
                    raise ValueError(f"unknown op {cmd['op']!r}")
                reply: dict[str, object] = {"ok": True}
            except Exception as e:
                reply = {"error": f"{type(e).__name__}: {e}"}
            print(json.dumps(reply), flush=True)
    finally:
        await server.stop()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "127.0.0.1"))
