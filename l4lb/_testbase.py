"""Test building blocks: loopback backends, traffic helpers and an l4lb process runner.

Everything here uses the standard library only, so the project's tests, the pytest plugin and
the benchmarks can share it without pulling in the control plane.

Backends run on their own threads over real sockets, bind port 0 and expose ``.address``
(``"127.0.0.1:PORT"`` or ``"[::1]:PORT"``) and ``.port``. They are context managers whose
``stop()`` joins every thread and closes every socket, and re-raises any unexpected error
from a server thread, so a broken backend fails the test instead of hiding in a log.

- :class:`EchoServer` and :class:`NamedServer` multiplex all connections on one selector
  thread, so holding thousands of idle connections costs no threads.
- :class:`SinkSourceServer` runs one thread per connection, because bulk transfers with
  deliberately slow reads are simplest as blocking code.

:class:`L4lbProcess` starts ``python -m l4lb run`` in a subprocess and speaks to it only
through its public contract: the config file, the ready file, the admin HTTP API and
signals.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import ipaddress
import json
import math
import os
import random
import re
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

__all__ = [
    "CLIENT_SEED",
    "SERVER_SEED",
    "BulkResult",
    "EchoServer",
    "L4lbProcess",
    "L4lbStartError",
    "NamedServer",
    "SinkSourceServer",
    "Transfer",
    "bulk_client",
    "connect",
    "connect_name",
    "dumps_toml",
    "format_address",
    "open_name",
    "parse_address",
    "pattern_sha256",
    "wait_for",
]

T = TypeVar("T")

#: Seeds of the deterministic payloads: different per direction, so a proxy that reflects
#: data back to its sender produces a hash mismatch instead of a false pass.
CLIENT_SEED = 1
SERVER_SEED = 2

_BLOCK = 1 << 20  # one pseudo-random block, repeated: generating 256 MiB must stay cheap
_HEADER = struct.Struct("!QQ")  # bulk request: bytes the client sends, bytes it wants back
_REPLY = struct.Struct("!Q")  # bulk reply header: bytes the server is about to send
_RECV = 65536
_ECHO_HIGH_WATER = 1 << 20  # stop reading from a client while this much echo is unsent
_JOIN_TIMEOUT = 10.0
_RESET_ERRNOS = frozenset({errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED, errno.ETIMEDOUT})


# --------------------------------------------------------------------------- addresses


def parse_address(address: str) -> tuple[str, int]:
    """Split ``"127.0.0.1:80"`` or ``"[::1]:80"`` into ``(host, port)``."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"not a HOST:PORT address: {address!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"IPv6 addresses need brackets: {address!r}")
    return host, int(port)


def format_address(host: str, port: int) -> str:
    """Join ``host`` and ``port``, bracketing IPv6 hosts."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET


def connect(
    address: str, *, source: str | None = None, timeout: float | None = 5.0
) -> socket.socket:
    """Open a TCP connection to ``address``, optionally from the local IP ``source``.

    Any address in 127.0.0.0/8 can be used as ``source`` without configuration, which is how
    tests present distinct client IPs to source-hashing schedulers.
    """
    host, port = parse_address(address)
    sock = socket.socket(_family(host), socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        if source is not None:
            sock.bind((source, 0))
        sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def wait_for(
    predicate: Callable[[], T], timeout: float, interval: float = 0.02, *, message: str = ""
) -> T:
    """Poll ``predicate`` until it returns something truthy and return that value.

    Raises :class:`TimeoutError` after ``timeout`` seconds, naming ``message`` and the last
    value seen, so a failed wait says what it was waiting for.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            what = message or getattr(predicate, "__name__", "condition")
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}; last: {value!r}")
        time.sleep(interval)


# --------------------------------------------------------------------------- payloads


@functools.lru_cache(maxsize=8)
def _pattern_block(seed: int) -> bytes:
    return random.Random(seed).randbytes(_BLOCK)


def _pattern(seed: int, size: int, chunk: int = _BLOCK) -> Iterator[memoryview]:
    """Yield ``size`` bytes of the repeating pseudo-random pattern for ``seed``."""
    block = memoryview(_pattern_block(seed))
    chunk = max(1, min(chunk, _BLOCK))
    offset = 0
    while size > 0:
        n = min(size, chunk, _BLOCK - offset)
        yield block[offset : offset + n]
        size -= n
        offset = (offset + n) % _BLOCK


def pattern_sha256(size: int, seed: int = SERVER_SEED) -> str:
    """Return the sha256 hex digest of the first ``size`` bytes of ``seed``'s pattern."""
    digest = hashlib.sha256()
    for piece in _pattern(seed, size):
        digest.update(piece)
    return digest.hexdigest()


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    buf = bytearray()
    while len(buf) < size:
        data = sock.recv(size - len(buf))
        if not data:
            raise ConnectionError(f"connection closed after {len(buf)} of {size} bytes")
        buf += data
    return bytes(buf)


# --------------------------------------------------------------------------- servers


class _ServerBase:
    """Listening socket, lifecycle and error capture shared by all backends."""

    def __init__(self, host: str, backlog: int) -> None:
        self.host = host
        self._listener = socket.socket(_family(host), socket.SOCK_STREAM)
        try:
            self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._listener.bind((host, 0))
            self._listener.listen(backlog)
        except BaseException:
            self._listener.close()
            raise
        self.port: int = self._listener.getsockname()[1]
        self.address = format_address(host, self.port)
        self._lock = threading.Lock()
        self._accepted = 0
        self._resets = 0
        self._peers: list[str] = []
        self._errors: list[BaseException] = []
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._closed = False

    @property
    def accepted(self) -> int:
        """Connections accepted so far."""
        return self._accepted

    @property
    def resets(self) -> int:
        """Connections that ended with a reset or broken pipe instead of an orderly close."""
        return self._resets

    @property
    def peers(self) -> list[str]:
        """``HOST:PORT`` of every accepted connection's remote end, in accept order."""
        with self._lock:
            return list(self._peers)

    def _note_accept(self, peer: Any) -> None:
        with self._lock:
            self._accepted += 1
            self._peers.append(format_address(peer[0], peer[1]))

    def _note_reset(self) -> None:
        with self._lock:
            self._resets += 1

    def _note_error(self, exc: BaseException) -> None:
        with self._lock:
            self._errors.append(exc)

    def start(self) -> Self:
        """Start serving (idempotent) and return ``self``."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run_guarded, name=f"{type(self).__name__}:{self.port}", daemon=True
            )
            self._thread.start()
        return self

    def _run_guarded(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # stop() re-raises it in the test
            self._note_error(exc)

    def _run(self) -> None:
        raise NotImplementedError

    def _shutdown(self) -> None:
        """Wake the serving thread so it notices ``_stopping``."""

    def _cleanup(self) -> None:
        """Close what the serving thread left open."""

    def stop(self) -> None:
        """Stop serving, close every connection, join threads; re-raise a server error."""
        if self._closed:
            return
        self._closed = True
        self._stopping.set()
        self._shutdown()
        if self._thread is not None:
            self._thread.join(_JOIN_TIMEOUT)
            if self._thread.is_alive():
                self._note_error(RuntimeError(f"{self._thread.name} did not stop"))
        self._cleanup()
        self._listener.close()
        if self._errors:
            first = self._errors[0]
            raise RuntimeError(f"{type(self).__name__} {self.address} failed: {first!r}") from first

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


@dataclass(eq=False)
class _Conn:
    sock: socket.socket
    out: bytearray = field(default_factory=bytearray)
    eof: bool = False
    received: int = 0


class _SelectorServer(_ServerBase):
    """All connections on one selector thread; subclasses decide what to send and echo."""

    _echo = True

    def __init__(self, host: str, backlog: int = 4096) -> None:
        super().__init__(host, backlog)
        self._listener.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._conns: dict[socket.socket, _Conn] = {}
        self._active = 0
        self._bytes_received = 0

    @property
    def active(self) -> int:
        """Connections currently open."""
        return self._active

    @property
    def bytes_received(self) -> int:
        """Total bytes received on all connections."""
        return self._bytes_received

    def _greeting(self) -> bytes:
        return b""

    def _shutdown(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    def _cleanup(self) -> None:
        for conn in list(self._conns.values()):
            conn.sock.close()
        self._conns.clear()
        self._active = 0
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    def _run(self) -> None:
        sel = self._selector
        sel.register(self._listener, selectors.EVENT_READ, None)
        sel.register(self._wake_r, selectors.EVENT_READ, None)
        while not self._stopping.is_set():
            for key, events in sel.select():
                sock = key.fileobj
                if sock is self._listener:
                    self._accept()
                elif sock is self._wake_r:
                    with contextlib.suppress(BlockingIOError):
                        self._wake_r.recv(64)
                else:
                    conn = self._conns.get(sock)  # type: ignore[call-overload]
                    if conn is not None:
                        self._service(conn, events)

    def _accept(self) -> None:
        for _ in range(256):  # bounded batch: keep serving existing connections under a flood
            try:
                sock, peer = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    raise
                return  # the client gave up before we accepted: nothing to serve
            sock.setblocking(False)
            self._note_accept(peer)
            conn = _Conn(sock, bytearray(self._greeting()))
            self._conns[sock] = conn
            self._active += 1
            self._sel_update(conn, new=True)

    def _sel_update(self, conn: _Conn, *, new: bool = False) -> None:
        events = 0
        if not conn.eof and len(conn.out) < _ECHO_HIGH_WATER:
            events |= selectors.EVENT_READ
        if conn.out:
            events |= selectors.EVENT_WRITE
        if new:
            self._selector.register(conn.sock, events)
        else:
            self._selector.modify(conn.sock, events)

    def _close(self, conn: _Conn, *, orderly: bool) -> None:
        if orderly:
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_WR)
        self._selector.unregister(conn.sock)
        del self._conns[conn.sock]
        conn.sock.close()
        self._active -= 1

    def _service(self, conn: _Conn, events: int) -> None:
        try:
            if events & selectors.EVENT_WRITE and conn.out:
                sent = conn.sock.send(conn.out)
                del conn.out[:sent]
            if events & selectors.EVENT_READ:
                data = conn.sock.recv(_RECV)
                if data:
                    conn.received += len(data)
                    self._bytes_received += len(data)
                    if self._echo:
                        conn.out += data
                else:
                    conn.eof = True
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as exc:
            if exc.errno not in _RESET_ERRNOS:
                raise
            self._note_reset()
            self._close(conn, orderly=False)
            return
        if conn.eof and not conn.out:
            self._close(conn, orderly=True)
        else:
            self._sel_update(conn)


class EchoServer(_SelectorServer):
    """Echo every byte back; at the client's EOF finish echoing, then send FIN and close.

    Sending FIN only after the client's makes a proxy's half-close handling observable: the
    client shuts down its write side and must still receive all echoed bytes, then EOF.
    """

    def __init__(self, host: str = "127.0.0.1", *, backlog: int = 4096) -> None:
        super().__init__(host, backlog)


class NamedServer(_SelectorServer):
    """Send ``name + "\\n"`` on accept, then echo like :class:`EchoServer`.

    Used to see which backend a connection landed on (:func:`connect_name`). With
    ``hold=True`` the server does not echo: it discards what it receives and keeps each
    connection open until the client closes it, so idle connections can pile up without
    any risk of the test blocking on unread echo data.
    """

    def __init__(
        self, name: str, host: str = "127.0.0.1", *, hold: bool = False, backlog: int = 4096
    ) -> None:
        if "\n" in name:
            raise ValueError("name must not contain a newline")
        super().__init__(host, backlog)
        self.name = name
        self.hold = hold
        self._echo = not hold
        self._line = (name + "\n").encode()

    def _greeting(self) -> bytes:
        return self._line


@dataclass(frozen=True, slots=True)
class Transfer:
    """What :class:`SinkSourceServer` saw on one connection (payload bytes, headers excluded)."""

    peer: str
    received: int
    received_sha256: str
    sent: int
    sent_sha256: str
    error: str | None = None


class SinkSourceServer(_ServerBase):
    """Bulk-transfer backend, one thread per connection.

    Protocol: the client sends a 16-byte big-endian header ``(N, M)`` and then N bytes. The
    server reads and hashes all N, replies with an 8-byte header ``M`` and M bytes of the
    :data:`SERVER_SEED` pattern, then closes. Each connection is recorded as a
    :class:`Transfer` in :attr:`transfers`, in completion order.

    ``read_delay`` seconds are slept after each read of at most ``chunk`` bytes, to build
    backpressure through a proxy.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        *,
        read_delay: float = 0.0,
        chunk: int = 256 * 1024,
        timeout: float = 60.0,
        backlog: int = 128,
    ) -> None:
        super().__init__(host, backlog)
        self.read_delay = read_delay
        self.chunk = chunk
        self.timeout = timeout
        self._listener.settimeout(0.1)  # lets the accept loop notice stop() without a wakeup
        self._transfers: list[Transfer] = []
        self._probes = 0
        self._handlers: dict[threading.Thread, socket.socket] = {}

    @property
    def transfers(self) -> list[Transfer]:
        """Finished transfers, in completion order."""
        with self._lock:
            return list(self._transfers)

    @property
    def probes(self) -> int:
        """Connections closed by the client before sending anything (not transfers)."""
        return self._probes

    def wait_transfers(self, count: int, timeout: float = 30.0) -> list[Transfer]:
        """Wait until ``count`` transfers have finished and return them all."""
        wait_for(
            lambda: len(self._transfers) >= count,
            timeout,
            message=f"{count} transfers on {self.address}",
        )
        return self.transfers

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                sock, peer = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stopping.is_set():
                    return
                raise
            self._note_accept(peer)
            thread = threading.Thread(
                target=self._handle, args=(sock, peer), name=f"sink:{self.port}", daemon=True
            )
            with self._lock:
                self._handlers = {t: s for t, s in self._handlers.items() if t.is_alive()}
                self._handlers[thread] = sock
            thread.start()

    def _handle(self, sock: socket.socket, peer: Any) -> None:
        received = sent = 0
        rx, tx = hashlib.sha256(), hashlib.sha256()
        error: str | None = None
        try:
            with sock:
                sock.settimeout(self.timeout)
                first = sock.recv(_HEADER.size)
                if not first:
                    self._probes += 1  # connect-and-close, e.g. a TCP health check
                    return
                header = first + _recv_exactly(sock, _HEADER.size - len(first))
                want_in, want_out = _HEADER.unpack(header)
                buf = bytearray(max(1, self.chunk))
                view = memoryview(buf)
                while received < want_in:
                    n = sock.recv_into(view, min(len(buf), want_in - received))
                    if not n:
                        raise ConnectionError(f"EOF after {received} of {want_in} bytes")
                    rx.update(view[:n])
                    received += n
                    if self.read_delay:
                        time.sleep(self.read_delay)
                sock.sendall(_REPLY.pack(want_out))
                for piece in _pattern(SERVER_SEED, want_out):
                    sock.sendall(piece)
                    tx.update(piece)
                    sent += len(piece)
                sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            if exc.errno in _RESET_ERRNOS:
                self._note_reset()
            error = f"{type(exc).__name__}: {exc}"
        except Exception as exc:  # stop() re-raises it in the test
            self._note_error(exc)
            error = f"{type(exc).__name__}: {exc}"
        record = Transfer(
            format_address(peer[0], peer[1]),
            received,
            rx.hexdigest(),
            sent,
            tx.hexdigest(),
            error,
        )
        with self._lock:
            self._transfers.append(record)

    def _cleanup(self) -> None:
        with self._lock:
            handlers = dict(self._handlers)
        for sock in handlers.values():
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # unblocks recv/send in the handler
        for thread in handlers:
            thread.join(_JOIN_TIMEOUT)
            if thread.is_alive():
                self._note_error(RuntimeError(f"{thread.name} did not stop"))


# --------------------------------------------------------------------------- clients


def open_name(
    address: str, *, source: str | None = None, timeout: float = 5.0
) -> tuple[socket.socket, str]:
    """Connect to a :class:`NamedServer` (directly or through a proxy); return socket and name.

    The caller owns the socket; keeping it open keeps the connection active in the proxy.
    """
    sock = connect(address, source=source, timeout=timeout)
    try:
        line = bytearray()
        while not line.endswith(b"\n"):
            data = sock.recv(256)
            if not data:
                raise ConnectionError(f"{address}: closed before sending a name: {bytes(line)!r}")
            line += data
            if len(line) > 4096:
                raise ConnectionError(f"{address}: name line too long")
    except BaseException:
        sock.close()
        raise
    name, _, rest = bytes(line).partition(b"\n")
    if rest:
        raise ConnectionError(f"{address}: unexpected bytes after the name: {rest!r}")
    return sock, name.decode()


def connect_name(address: str, *, source: str | None = None, timeout: float = 5.0) -> str:
    """Connect, read the first line a :class:`NamedServer` sends, close, return the name."""
    sock, name = open_name(address, source=source, timeout=timeout)
    sock.close()
    return name


@dataclass(frozen=True, slots=True)
class BulkResult:
    """Client side of one :func:`bulk_client` exchange (payload bytes, headers excluded)."""

    sent: int
    sent_sha256: str
    announced: int
    received: int
    received_sha256: str
    elapsed: float

    @property
    def complete(self) -> bool:
        """True when exactly the announced number of bytes arrived before EOF."""
        return self.received == self.announced


def bulk_client(
    address: str,
    send_bytes: int,
    recv_bytes: int,
    *,
    slow_read: float | None = None,
    chunk: int = _RECV,
    source: str | None = None,
    timeout: float = 60.0,
) -> BulkResult:
    """Run one :class:`SinkSourceServer` exchange: send ``send_bytes``, ask for ``recv_bytes``.

    Sends the :data:`CLIENT_SEED` pattern, then reads the reply until EOF (so extra bytes are
    counted, not ignored). ``slow_read`` seconds are slept after each read of at most
    ``chunk`` bytes. Compare the hashes with the server's :class:`Transfer` or with
    :func:`pattern_sha256`.
    """
    start = time.monotonic()
    tx, rx = hashlib.sha256(), hashlib.sha256()
    sent = received = 0
    with connect(address, source=source, timeout=timeout) as sock:
        sock.sendall(_HEADER.pack(send_bytes, recv_bytes))
        for piece in _pattern(CLIENT_SEED, send_bytes):
            sock.sendall(piece)
            tx.update(piece)
            sent += len(piece)
        (announced,) = _REPLY.unpack(_recv_exactly(sock, _REPLY.size))
        buf = bytearray(max(1, chunk))
        view = memoryview(buf)
        while True:
            n = sock.recv_into(view)
            if not n:
                break
            rx.update(view[:n])
            received += n
            if slow_read:
                time.sleep(slow_read)
    return BulkResult(
        sent, tx.hexdigest(), announced, received, rx.hexdigest(), time.monotonic() - start
    )


# --------------------------------------------------------------------------- TOML


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else _toml_str(key)


def _toml_str(value: str) -> str:
    out = []
    for ch in value:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return _toml_str(value)
    if isinstance(value, Mapping):
        inner = ", ".join(f"{_toml_key(str(k))} = {_toml_value(v)}" for k, v in value.items())
        return "{" + inner + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML: {value!r}")


def _is_table_array(value: Any) -> bool:
    return (
        isinstance(value, list | tuple)
        and len(value) > 0
        and all(isinstance(v, Mapping) for v in value)
    )


def _toml_table(table: Mapping[str, Any], path: list[str], out: list[str]) -> None:
    # Plain keys must come before any sub-table header, or they would land in that sub-table.
    for key, value in table.items():
        if not isinstance(value, Mapping) and not _is_table_array(value):
            out.append(f"{_toml_key(key)} = {_toml_value(value)}")
    for key, value in table.items():
        sub = [*path, _toml_key(key)]
        if isinstance(value, Mapping):
            out.append(f"\n[{'.'.join(sub)}]")
            _toml_table(value, sub, out)
        elif _is_table_array(value):
            for item in value:
                out.append(f"\n[[{'.'.join(sub)}]]")
                _toml_table(item, sub, out)


def dumps_toml(config: Mapping[str, Any]) -> str:
    """Serialise nested dicts/lists of str, int, float and bool as TOML text.

    Dicts become tables and non-empty lists of dicts arrays of tables; other lists are
    written inline. Enough for l4lb configs; the result round-trips through :mod:`tomllib`.
    """
    out: list[str] = []
    _toml_table(config, [], out)
    return "\n".join(out).lstrip("\n") + "\n"


# --------------------------------------------------------------------------- l4lb process


class L4lbStartError(RuntimeError):
    """l4lb exited or failed to become ready; the message ends with its stderr tail."""


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


class L4lbProcess:
    """``python -m l4lb run`` as a subprocess, driven through config file, ready file and signals.

    ``config`` is a dict (written with :func:`dumps_toml`) or TOML text. Files go to
    ``workdir`` (a private temporary directory by default, removed by :meth:`close`).
    ``command`` replaces the ``[sys.executable, "-m", "l4lb"]`` prefix, e.g. to run the
    installed ``l4lb`` console script. Use as a context manager or call :meth:`start` and
    :meth:`close`.
    """

    def __init__(
        self,
        config: Mapping[str, Any] | str,
        *,
        workers: int | None = None,
        log_level: str | None = None,
        extra_args: Sequence[str] = (),
        workdir: str | os.PathLike[str] | None = None,
        ready_timeout: float = 30.0,
        command: Sequence[str] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self._own_dir = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix="l4lb-") if workdir is None else workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.workdir / "l4lb.toml"
        self.ready_path = self.workdir / "ready.json"
        self.stderr_path = self.workdir / "stderr.log"
        self.stdout_path = self.workdir / "stdout.log"
        self.workers = workers
        self.log_level = log_level
        self.extra_args = list(extra_args)
        self.ready_timeout = ready_timeout
        self.command = list(command) if command is not None else [sys.executable, "-m", "l4lb"]
        self.env = dict(env) if env is not None else None
        self.config: dict[str, Any] = {}
        self.ready: dict[str, Any] = {}
        self.returncode: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr_cache = ""
        self._write_config(config)

    # -- lifecycle

    def argv(self) -> list[str]:
        """The command line :meth:`start` runs."""
        argv = [*self.command, "run", "--config", str(self.config_path)]
        argv += ["--ready-file", str(self.ready_path)]
        if self.workers is not None:
            argv += ["--workers", str(self.workers)]
        if self.log_level is not None:
            argv += ["--log-level", self.log_level]
        return argv + self.extra_args

    def _child_env(self) -> dict[str, str]:
        env = dict(os.environ if self.env is None else self.env)
        # The child must import the same l4lb as this process, wherever the cwd is.
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        return env

    def start(self) -> Self:
        """Start the process and wait for its ready file; raise :class:`L4lbStartError`."""
        if self._proc is not None:
            raise RuntimeError("already started")
        self.ready_path.unlink(missing_ok=True)
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self._proc = subprocess.Popen(
                self.argv(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=self._child_env(),
                start_new_session=True,  # a ^C meant for pytest must not reach it first
            )
        try:
            self.ready = self._wait_ready()
        except BaseException:
            self.stop(timeout=5.0)
            raise
        return self

    def _read_ready(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self.ready_path.read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return data if isinstance(data, dict) else None

    def _wait_ready(self) -> dict[str, Any]:
        assert self._proc is not None
        deadline = time.monotonic() + self.ready_timeout
        while True:
            data = self._read_ready()
            if data is not None:
                return data
            code = self._proc.poll()
            if code is not None:
                raise L4lbStartError(
                    f"l4lb exited with {code} before it was ready:\n{_tail(self.stderr_text())}"
                )
            if time.monotonic() >= deadline:
                raise L4lbStartError(
                    f"l4lb not ready after {self.ready_timeout:g}s:\n{_tail(self.stderr_text())}"
                )
            time.sleep(0.02)

    def stop(self, timeout: float = 10.0) -> int:
        """Send SIGTERM (drain, then exit), wait up to ``timeout``, SIGKILL as a last resort.

        Returns the exit code (negative for a signal, as in :mod:`subprocess`). Idempotent.
        """
        if self._proc is None:
            raise RuntimeError("not started")
        if self.returncode is None:
            if self._proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self.returncode = self._proc.returncode
        return self.returncode

    def close(self) -> None:
        """Stop the process if needed and remove the private working directory."""
        if self._proc is not None and self.returncode is None:
            self.stop()
        self._stderr_cache = self.stderr_text()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- introspection

    @property
    def pid(self) -> int:
        """Process id of the running l4lb."""
        if self._proc is None:
            raise RuntimeError("not started")
        return self._proc.pid

    @property
    def started(self) -> bool:
        """True once :meth:`start` has launched the process (even if it has exited since)."""
        return self._proc is not None

    @property
    def running(self) -> bool:
        """True while the process has not exited."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def admin(self) -> str:
        """``HOST:PORT`` of the admin HTTP API, from the ready file."""
        return str(self._current_ready()["admin"])

    def _current_ready(self) -> dict[str, Any]:
        # The ready file is rewritten when a reload adds listeners: prefer the newest copy.
        data = self._read_ready()
        if data is not None:
            self.ready = data
        return self.ready

    def service_address(self, name: str) -> str:
        """``HOST:PORT`` that service ``name`` listens on, from the ready file."""
        services = self._current_ready().get("services", {})
        if name not in services:
            raise KeyError(f"no service {name!r} in the ready file: {sorted(services)}")
        return str(services[name])

    def stderr_text(self) -> str:
        """Everything the process wrote to stderr so far."""
        try:
            return self.stderr_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return self._stderr_cache

    # -- admin API

    def http_get(self, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
        """GET ``path`` on the admin API; return status and body (errors too, not raised)."""
        url = f"http://{self.admin}{path}"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def services_json(self, timeout: float = 5.0) -> dict[str, Any]:
        """``GET /api/v1/services`` as parsed JSON."""
        status, body = self.http_get("/api/v1/services", timeout)
        if status != 200:
            raise RuntimeError(f"/api/v1/services returned {status}: {body[:200]!r}")
        data = json.loads(body)
        if not isinstance(data, dict):
            raise TypeError(f"/api/v1/services returned {type(data).__name__}")
        return data

    def service(self, name: str) -> dict[str, Any]:
        """One service's entry from :meth:`services_json`."""
        for svc in self.services_json().get("services", []):
            if svc.get("name") == name:
                return dict(svc)
        raise KeyError(f"no service {name!r} in /api/v1/services")

    # -- reload

    def _write_config(self, config: Mapping[str, Any] | str) -> None:
        text = config if isinstance(config, str) else dumps_toml(config)
        self.config = tomllib.loads(text)  # fail here, not in l4lb, on a malformed test config
        _atomic_write(self.config_path, text)

    def _matches(self, config: Mapping[str, Any]) -> bool:
        """True when the admin API shows ``config``'s services, backends and weights."""

        def backends(svc: Mapping[str, Any]) -> dict[tuple[str, int], Any]:
            out = {}
            for b in svc.get("backends", []):
                host, port = parse_address(str(b["address"]))
                out[(ipaddress.ip_address(host).compressed, port)] = b.get("weight")
            return out

        try:
            shown = self.services_json().get("services", [])
        except (OSError, RuntimeError, TypeError, ValueError):
            return False  # not answering mid-reload counts as "not yet"
        have = {str(svc["name"]): backends(svc) for svc in shown}
        want = {str(svc["name"]): backends(svc) for svc in config.get("services", [])}
        if set(want) != set(have):
            return False
        if not set(want) <= set(self._current_ready().get("services", {})):
            return False  # the ready file is rewritten after the reload: wait for it too
        for name, wanted in want.items():
            if set(wanted) != set(have[name]):
                return False
            if any(w is not None and have[name][k] != w for k, w in wanted.items()):
                return False
        return True

    def reload(
        self, new_config: Mapping[str, Any] | str, *, wait: bool = True, timeout: float = 10.0
    ) -> None:
        """Rewrite the config file and send SIGHUP.

        With ``wait`` (the default), poll until the admin API shows ``new_config``'s services
        with their backend addresses and weights, and the ready file lists those services.
        Changes the API does not show (a scheduler, a timeout) cannot be waited for this way.
        """
        self._write_config(new_config)
        if self._proc is None or self._proc.poll() is not None:
            raise RuntimeError("l4lb is not running")
        self._proc.send_signal(signal.SIGHUP)
        if wait:
            wait_for(
                lambda: self._matches(self.config),
                timeout,
                interval=0.05,
                message="the admin API to show the reloaded config",
            )
