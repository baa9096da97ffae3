"""Datagrams of any size and content through a UDP service.

The data plane parses nothing from payloads (no protocol is inspected; PROXY protocol is
only ever written, towards backends), so the only input it takes from clients is the
datagram itself and its size. Empty datagrams, the largest IPv4 UDP payload (65,507 bytes)
and random bytes in between must each come back intact, and a TCP service in the same
process must not notice.
"""

from __future__ import annotations

import os
import random
import socket
import threading
from collections.abc import Callable, Iterator

import pytest

from l4lb._testbase import L4lbProcess, NamedServer

from .record import FaultResult
from .traffic import run_exchanges

MAX_UDP4 = 65507

Fault = Callable[..., FaultResult]
Start = Callable[..., L4lbProcess]


class UdpEcho:
    """Send every datagram back to where it came from."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self.sock.recvfrom(65536)
            except TimeoutError:
                continue
            self.sock.sendto(data, peer)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


@pytest.fixture
def udp_echo() -> Iterator[UdpEcho]:
    echo = UdpEcho()
    yield echo
    echo.close()


def test_any_datagram_size_and_content(l4lb: Start, fault: Fault, udp_echo: UdpEcho) -> None:
    r = fault(
        "garbage datagrams",
        "UDP datagrams of 0 to 65,507 random bytes, 400 of them, through a UDP service",
        "each comes back intact; a TCP service in the same process is unaffected",
    )
    with NamedServer("t") as tcp_backend:
        cfg = {
            "admin": {"listen": "127.0.0.1:0"},
            "dataplane": {"workers": 2},
            "services": [
                {
                    "name": "dgram",
                    "protocol": "udp",
                    "listen": "127.0.0.1:0",
                    "backends": [{"address": udp_echo.address}],
                },
                {
                    "name": "web",
                    "listen": "127.0.0.1:0",
                    "backends": [{"address": tcp_backend.address}],
                },
            ],
        }
        lb = l4lb(cfg)
        host, port = lb.service_address("dgram").rsplit(":", 1)
        rng = random.Random(9)
        sizes = [0, 1, MAX_UDP4, MAX_UDP4 - 1, 1472, 1473, 9000, 65535 - 28 - 1]
        sizes += [rng.randrange(0, MAX_UDP4 + 1) for _ in range(392)]
        wrong: list[str] = []
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            sock.settimeout(2.0)
            for size in sizes:
                data = os.urandom(size)
                r.attempted += 1
                sock.sendto(data, (host, int(port)))
                try:
                    reply = sock.recv(65536)
                except TimeoutError:
                    r.lost += 1
                    wrong.append(f"{size}: no reply")
                    continue
                if reply == data:
                    r.completed += 1
                    r.bytes_verified += 2 * size
                else:
                    r.lost += 1
                    r.corrupt += 1
                    wrong.append(f"{size}: got {len(reply)} bytes back")
        tcp = run_exchanges(lb.service_address("web"), 50, concurrency=5)
        r.count(tcp.outcomes)
        assert lb.service("web")["failed"] == 0
    r.notes.extend(wrong[:5])
    r.check(min_completed=len(sizes) + 50)
