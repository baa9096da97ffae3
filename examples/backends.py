"""Tiny HTTP backends for the demo: each answers with its own name.

Usage: python examples/backends.py PORT [PORT ...]
"""

from __future__ import annotations

import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def serve(port: int, name: str) -> ThreadingHTTPServer:
    """Start one backend on 127.0.0.1:port in a thread."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = f"hello from {name} (port {port})\n".encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def main() -> None:
    servers = [serve(int(p), f"backend-{i + 1}") for i, p in enumerate(sys.argv[1:])]
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    for s in servers:
        s.shutdown()


if __name__ == "__main__":
    main()
