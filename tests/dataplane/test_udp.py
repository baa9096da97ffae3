"""UDP flows in the data plane, driven through the facade (no config file involved)."""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import threading
from collections import Counter
from collections.abc import Iterator

import pytest

from l4lb._testbase import wait_for
from l4lb.config import parse_config
from l4lb.dataplane import Dataplane
from l4lb.state import desired_state, plan


class UdpNamed:
    """A UDP backend that answers every datagram with ``name:`` + the datagram."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.peers: Counter[tuple[str, int]] = Counter()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self.sock.recvfrom(65536)
            except TimeoutError:
                continue
            self.peers[peer] += 1
            self.sock.sendto(self.name.encode() + b":" + data, peer)

    def close(self) -> None:
        self._stop.set()
        self._t.join()
        self.sock.close()


@pytest.fixture
def udp_backends() -> Iterator[list[UdpNamed]]:
    bs = [UdpNamed(f"b{i}") for i in range(3)]
    yield bs
    for b in bs:
        b.close()


def _start(backends: list[UdpNamed], *, listen: str, idle: float, workers: int = 2):
    text = f"""
[[services]]
name = "dns"
listen = "{listen}"
scheduler = "rr"
idle_timeout = {idle}
""" + "".join(f'[[services.backends]]\naddress = "{b.address}"\n' for b in backends)
    import tomllib

    cfg = parse_config(tomllib.loads(text), source="test")
    specs = {n: dataclasses.replace(s, protocol="udp") for n, s in desired_state(cfg).items()}
    dp = Dataplane(workers=workers)
    dp.start()
    assert dp.apply(plan({}, specs)) == {}
    return dp


def _client(source: str = "127.0.0.1") -> socket.socket:
    c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    c.bind((source, 0))
    c.settimeout(5)
    return c


def _ask(
    addr: tuple[str, int],
    payload: bytes,
    *,
    source: str = "127.0.0.1",
    sock: socket.socket | None = None,
) -> bytes:
    with contextlib.ExitStack() as stack:
        c = sock if sock is not None else stack.enter_context(_client(source))
        c.sendto(payload, addr)
        data, peer = c.recvfrom(65536)
        assert peer == addr  # the reply comes from the address we sent to
        return data


def test_each_client_gets_its_own_flow_balanced_rr(udp_backends):
    dp = _start(udp_backends, listen="127.0.0.1:0", idle=5)
    try:
        la = dp.listen_address("dns")
        addr = (la.host, la.port)
        # Every client keeps its socket (its port) until the end: a closed port could be
        # handed out again and would then reuse the earlier client's flow.
        with contextlib.ExitStack() as stack:
            clients = [stack.enter_context(_client()) for _ in range(30)]
            names = [
                _ask(addr, f"q{i}".encode(), sock=c).split(b":")[0].decode()
                for i, c in enumerate(clients)
            ]
        assert Counter(names) == {"b0": 10, "b1": 10, "b2": 10}
        assert names[:3] == ["b2", "b1", "b0"]  # IPVS order: newest first
        assert dp.service_stats("dns").active == 30  # one flow per client port
        # UDP flows never count as active connections for the schedulers (IPVS §1).
        assert all(dp.slot_stats("dns", b.address).active == 0 for b in udp_backends)
    finally:
        dp.stop()


def test_a_flow_sticks_to_its_backend_and_replies_match(udp_backends):
    dp = _start(udp_backends, listen="127.0.0.1:0", idle=5)
    try:
        la = dp.listen_address("dns")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:
            c.settimeout(5)
            answers = []
            for i in range(20):
                c.sendto(f"m{i}".encode(), (la.host, la.port))
                answers.append(c.recvfrom(65536)[0])
        first = answers[0].split(b":")[0]
        assert all(a == first + f":m{i}".encode() for i, a in enumerate(answers))
        st = dp.slot_stats("dns", next(b.address for b in udp_backends if b.name == first.decode()))
        assert st.bytes_in >= 20 * 2 and st.bytes_out >= 20 * 5
    finally:
        dp.stop()


def test_wildcard_listener_replies_from_the_address_dialled(udp_backends):
    dp = _start(udp_backends, listen="0.0.0.0:0", idle=5)
    try:
        port = dp.listen_address("dns").port
        for dst in ("127.0.0.1", "127.3.0.7", "127.9.9.9"):
            assert _ask((dst, port), b"hi").endswith(b":hi")
    finally:
        dp.stop()


def test_flows_expire_after_the_idle_timeout(udp_backends):
    dp = _start(udp_backends, listen="127.0.0.1:0", idle=0.2)
    try:
        la = dp.listen_address("dns")
        for _i in range(5):
            _ask((la.host, la.port), b"x")
        wait_for(lambda: dp.service_stats("dns").active == 0, 10)
        assert dp.stats().connections == 0
    finally:
        dp.stop()


def test_a_vanished_backend_does_not_black_hole_new_flows(udp_backends):
    dp = _start(udp_backends, listen="127.0.0.1:0", idle=5, workers=1)
    try:
        la = dp.listen_address("dns")
        gone = udp_backends.pop(0)
        gone.close()  # its port now answers with ICMP port unreachable
        answered: Counter[bytes] = Counter()
        for i in range(1, 7):
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:
                c.bind((f"127.0.4.{i}", 0))
                c.settimeout(0.5)
                for _attempt in range(3):  # a resolver retries; each retry may move on
                    c.sendto(b"q", (la.host, la.port))
                    try:
                        answered[c.recvfrom(100)[0].split(b":")[0]] += 1
                        break
                    except TimeoutError:
                        continue
        assert sum(answered.values()) == 6 and b"b0" not in answered
        assert dp.slot_stats("dns", gone.address).connect_errors >= 1
    finally:
        dp.stop()
