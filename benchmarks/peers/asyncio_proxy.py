"""Reference TCP proxy written the obvious way: uvloop, asyncio protocols, flow control.

It is the baseline that says what a straightforward Python proxy achieves, so l4lb's data
plane has to beat it by a wide margin to justify itself. Each accepted connection opens one
connection to the backend; bytes are copied through userspace with the transports' own
write-buffer limits providing backpressure (pause_writing on one side pauses reading on the
other) and half-closes forwarded with write_eof.

    python3 benchmarks/peers/asyncio_proxy.py --listen 127.0.0.1:0 --backend 127.0.0.1:80 \\
        --ready-file ready.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
from pathlib import Path
from typing import cast


class _Side(asyncio.Protocol):
    """One TCP connection of a proxied pair; ``peer`` is the other."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: _Side | None = None
        self.eof = False
        self.early: list[bytes] = []  # received before the other side existed

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.peer is None or self.peer.transport is None:
            self.early.append(data)
            assert self.transport is not None
            self.transport.pause_reading()
            return
        self.peer.transport.write(data)

    def flush_early(self) -> None:
        """Forward what arrived before the pair was linked, then resume reading."""
        assert self.transport is not None and self.peer is not None
        assert self.peer.transport is not None
        for data in self.early:
            self.peer.transport.write(data)
        self.early.clear()
        if self.eof:
            self.peer.transport.write_eof()
        else:
            self.transport.resume_reading()

    def eof_received(self) -> bool:
        self.eof = True
        peer = self.peer
        if peer is None or peer.transport is None:
            return True  # forwarded by flush_early()
        if peer.eof:  # both directions finished
            peer.transport.close()
            return False
        if peer.transport.can_write_eof():
            peer.transport.write_eof()
        return True  # keep the other direction open: half-close

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            if exc is None:
                self.peer.transport.close()
            else:
                self.peer.transport.abort()


class _ClientSide(_Side):
    def __init__(self, backend: tuple[str, int]) -> None:
        super().__init__()
        self.backend = backend

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        try:
            transport, backend = await loop.create_connection(_Side, *self.backend)
        except OSError:
            self.transport.abort()
            return
        # uvloop may resolve create_connection before calling connection_made.
        backend.transport = transport
        if self.transport.is_closing():
            transport.close()
            return
        backend.peer, self.peer = self, backend
        self.flush_early()
        backend.flush_early()
        if self.eof and backend.eof:  # both finished before the link: nothing left to do
            self.transport.close()
            transport.close()


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


async def _serve(listen: str, backend: str, ready_file: Path | None, loop_name: str) -> None:
    loop = asyncio.get_running_loop()
    target = _split(backend)
    host, port = _split(listen)
    server = await loop.create_server(lambda: _ClientSide(target), host, port, backlog=4096)
    sock: socket.socket = server.sockets[0]
    bound = sock.getsockname()
    address = f"[{bound[0]}]:{bound[1]}" if ":" in bound[0] else f"{bound[0]}:{bound[1]}"
    if ready_file is not None:
        tmp = ready_file.with_name(ready_file.name + ".tmp")
        tmp.write_text(json.dumps({"pid": os.getpid(), "address": address, "loop": loop_name}))
        os.replace(tmp, ready_file)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()


def main() -> None:
    """Parse arguments and run the proxy until SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:0")
    parser.add_argument("--backend", required=True)
    parser.add_argument("--ready-file", type=Path)
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:
        asyncio.run(_serve(args.listen, args.backend, args.ready_file, "asyncio"))
    else:
        uvloop.run(_serve(args.listen, args.backend, args.ready_file, "uvloop"))


if __name__ == "__main__":
    main()
