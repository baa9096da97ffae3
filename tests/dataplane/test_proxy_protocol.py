"""PROXY protocol v1/v2 towards backends, driven through the facade on loopback.

The backend records every byte it receives on a connection until the client's EOF, then
answers with their count; the test parses the header it got and compares it, field by field
and byte for byte, with what HAProxy's doc/proxy-protocol.txt prescribes.
"""

from __future__ import annotations

import hashlib
import socket
import struct
import threading
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from l4lb.config import parse_config
from l4lb.dataplane import Dataplane
from l4lb.state import desired_state, plan

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


@dataclass(frozen=True)
class ProxyHeader:
    """One parsed PROXY protocol header."""

    version: int
    command: str  # "PROXY" or "LOCAL"
    family: int | None  # None: UNKNOWN / AF_UNSPEC
    source: tuple[str, int] | None
    destination: tuple[str, int] | None


def parse_proxy(raw: bytes) -> tuple[ProxyHeader, bytes]:
    """Split ``raw`` into its leading PROXY header and what follows it."""
    if raw.startswith(V2_SIGNATURE):
        ver_cmd, fam, length = struct.unpack_from("!BBH", raw, 12)
        assert ver_cmd >> 4 == 2, f"version nibble {ver_cmd >> 4}"
        command = {0: "LOCAL", 1: "PROXY"}[ver_cmd & 0xF]
        body, rest = raw[16 : 16 + length], raw[16 + length :]
        assert len(body) == length, "truncated v2 header"
        if fam == 0x00:
            return ProxyHeader(2, command, None, None, None), rest
        family, alen = {0x11: (socket.AF_INET, 4), 0x21: (socket.AF_INET6, 16)}[fam]
        assert length == 2 * alen + 4
        src = socket.inet_ntop(family, body[:alen])
        dst = socket.inet_ntop(family, body[alen : 2 * alen])
        sport, dport = struct.unpack_from("!HH", body, 2 * alen)
        return ProxyHeader(2, command, family, (src, sport), (dst, dport)), rest
    line, sep, rest = raw.partition(b"\r\n")
    assert sep and line.startswith(b"PROXY ") and len(line) + 2 <= 107, line
    fields = line.decode("ascii").split(" ")
    if fields[1] == "UNKNOWN":
        return ProxyHeader(1, "PROXY", None, None, None), rest
    assert len(fields) == 6, fields
    family = {"TCP4": socket.AF_INET, "TCP6": socket.AF_INET6}[fields[1]]
    for addr in fields[2:4]:
        socket.inet_pton(family, addr)  # a valid address of that family
    return ProxyHeader(
        1, "PROXY", family, (fields[2], int(fields[4])), (fields[3], int(fields[5]))
    ), rest


class RecordingBackend:
    """Accepts connections; for each, keeps all bytes until EOF and replies with their
    SHA-256, so the client can check what the backend saw without a second channel."""

    def __init__(self, host: str) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.bind((host, 0))
        self.sock.listen(64)
        self.sock.settimeout(0.1)
        port = self.sock.getsockname()[1]
        self.address = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
        self.received: list[bytes] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            threading.Thread(target=self._serve, args=(conn,)).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(10)
            chunks = []
            while data := conn.recv(65536):
                chunks.append(data)
            raw = b"".join(chunks)
            with self._lock:
                self.received.append(raw)
            conn.sendall(hashlib.sha256(raw).digest())

    def close(self) -> None:
        self._stop.set()
        self._t.join()
        self.sock.close()


def _refused_address(host: str) -> str:
    """An address on which nothing listens: connects to it are refused at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port = s.getsockname()[1]
    return f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"


def _start(backends: list[str], *, listen: str, send_proxy: str, workers: int = 2) -> Dataplane:
    text = f"""
[[services]]
name = "web"
listen = "{listen}"
scheduler = "rr"
send_proxy = "{send_proxy}"
""" + "".join(f'[[services.backends]]\naddress = "{b}"\n' for b in backends)
    cfg = parse_config(tomllib.loads(text), source="test")
    dp = Dataplane(workers=workers)
    dp.start()
    assert dp.apply(plan({}, desired_state(cfg))) == {}
    return dp


def _exchange(dp: Dataplane, payload: bytes) -> tuple[tuple[str, int], tuple[str, int], bytes]:
    """Send ``payload`` through the service; returns (client address, dialled address,
    SHA-256 the backend reported)."""
    la = dp.listen_address("web")
    with socket.create_connection((la.host, la.port), timeout=10) as c:
        client = c.getsockname()[:2]
        dialled = c.getpeername()[:2]
        c.sendall(payload)
        c.shutdown(socket.SHUT_WR)
        digest = b""
        while len(digest) < 32 and (data := c.recv(64)):
            digest += data
    return client, dialled, digest


def _expected_header(version: str, client: tuple[str, int], dialled: tuple[str, int]) -> bytes:
    family = socket.AF_INET6 if ":" in client[0] else socket.AF_INET
    if version == "v1":
        proto = "TCP6" if family == socket.AF_INET6 else "TCP4"
        return f"PROXY {proto} {client[0]} {dialled[0]} {client[1]} {dialled[1]}\r\n".encode()
    fam = 0x21 if family == socket.AF_INET6 else 0x11
    addrs = socket.inet_pton(family, client[0]) + socket.inet_pton(family, dialled[0])
    body = addrs + struct.pack("!HH", client[1], dialled[1])
    return V2_SIGNATURE + bytes([0x21, fam]) + struct.pack("!H", len(body)) + body


@pytest.fixture
def backend_factory() -> Iterator[type[RecordingBackend]]:
    made: list[RecordingBackend] = []

    class Tracked(RecordingBackend):
        def __init__(self, host: str) -> None:
            super().__init__(host)
            made.append(self)

    yield Tracked
    for b in made:
        b.close()


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_header_names_the_client_and_the_dialled_address(backend_factory, version, host):
    backend = backend_factory(host)
    dp = _start(
        [backend.address], listen=f"[{host}]:0" if ":" in host else f"{host}:0", send_proxy=version
    )
    try:
        # Large enough to move on from the copy buffer to splicing.
        payload = bytes(range(256)) * 4096 + b"tail"
        client, dialled, digest = _exchange(dp, payload)
    finally:
        dp.stop()
    (raw,) = backend.received
    header, rest = parse_proxy(raw)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    assert header == ProxyHeader(int(version[1]), "PROXY", family, client, dialled)
    assert raw[: len(raw) - len(rest)] == _expected_header(version, client, dialled)
    assert rest == payload  # the client's bytes follow the header, byte-exact
    assert digest == hashlib.sha256(raw).digest()


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_no_data_from_the_client_still_gets_a_header(backend_factory, version):
    backend = backend_factory("127.0.0.1")
    dp = _start([backend.address], listen="127.0.0.1:0", send_proxy=version)
    try:
        client, dialled, _ = _exchange(dp, b"")
    finally:
        dp.stop()
    (raw,) = backend.received
    assert raw == _expected_header(version, client, dialled)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_retry_after_a_refused_backend_sends_exactly_one_header(backend_factory, version):
    backend = backend_factory("127.0.0.1")
    dead = _refused_address("127.0.0.1")
    dp = _start([dead, backend.address], listen="127.0.0.1:0", send_proxy=version, workers=1)
    try:
        sent = [_exchange(dp, f"request {i}".encode()) for i in range(4)]
        dead_stats = dp.slot_stats("web", dead)
    finally:
        dp.stop()
    assert dead_stats.connect_errors >= 1  # some connections did try the dead one first
    assert len(backend.received) == 4
    by_client = {}
    for raw in backend.received:
        header, rest = parse_proxy(raw)
        assert header.source is not None
        by_client[header.source] = (raw, rest)
    for i, (client, dialled, digest) in enumerate(sent):
        raw, rest = by_client[client]
        assert raw == _expected_header(version, client, dialled) + f"request {i}".encode()
        assert not rest.startswith((b"PROXY", V2_SIGNATURE))
        assert digest == hashlib.sha256(raw).digest()


def test_without_send_proxy_the_stream_is_untouched(backend_factory):
    backend = backend_factory("127.0.0.1")
    text = f"""
[[services]]
name = "web"
listen = "127.0.0.1:0"
[[services.backends]]
address = "{backend.address}"
"""
    cfg = parse_config(tomllib.loads(text), source="test")
    dp = Dataplane(workers=1)
    dp.start()
    try:
        assert dp.apply(plan({}, desired_state(cfg))) == {}
        _exchange(dp, b"plain")
    finally:
        dp.stop()
    assert backend.received == [b"plain"]


def test_send_proxy_is_validated_at_the_seam():
    from l4lb import _dataplane

    dp = _dataplane.Dataplane(1)
    with pytest.raises(ValueError, match="send_proxy"):
        dp.service_configure(0, "rr", send_proxy="v3")
    with pytest.raises(ValueError, match="max_connections"):
        dp.service_configure(0, "rr", max_connections=-1)


LONGEST = ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe")


@pytest.mark.parametrize(
    ("client", "dest"),
    [
        (("192.0.2.1", 1), ("198.51.100.7", 65535)),
        (("2001:db8::1", 40000), ("2001:db8::10", 443)),
        ((LONGEST[0], 65535), (LONGEST[1], 65535)),
    ],
)
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_header_builder_matches_the_spec(version, client, dest):
    from l4lb import _dataplane

    raw = _dataplane._testhelper_proxy_header(int(version[1]), *client, *dest)
    assert raw == _expected_header(version, client, dest)
    family = socket.AF_INET6 if ":" in client[0] else socket.AF_INET
    assert parse_proxy(raw) == (ProxyHeader(int(version[1]), "PROXY", family, client, dest), b"")
    assert len(raw) <= 107  # the spec's bound for v1; v2 with IPv6 is 52


@pytest.mark.parametrize("dest", [("", 0), ("::1", 80)])
def test_unknown_or_mixed_destination_is_sent_as_unknown(dest):
    from l4lb import _dataplane

    # No readable destination, or one of another family than the client: HAProxy sends
    # "UNKNOWN" (v1) and a LOCAL command without addresses (v2); receivers then use the
    # connection's own endpoints.
    assert _dataplane._testhelper_proxy_header(1, "192.0.2.1", 5, *dest) == b"PROXY UNKNOWN\r\n"
    v2 = _dataplane._testhelper_proxy_header(2, "192.0.2.1", 5, *dest)
    assert v2 == V2_SIGNATURE + b"\x20\x00\x00\x00"
    assert parse_proxy(v2) == (ProxyHeader(2, "LOCAL", None, None, None), b"")
