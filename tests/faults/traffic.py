"""Traffic and backends for the fault cases.

- :func:`exchange` is one verified round trip through l4lb to a :class:`NamedServer`: read the
  backend's name, send a payload, half-close, read the echo to EOF and compare it byte for byte. It
  never raises: the :class:`Outcome` says what happened.
- :func:`run_exchanges` runs many of them on a thread pool; :class:`Load` keeps some running
  in the background while a fault is injected and remembers when each one ended, for
  :func:`recovery_time`.
- :class:`BackendProcess` is a backend in a process of its own, so it can really crash
  (SIGKILL), and so tens of thousands of descriptors are not all in the test process.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self

from l4lb._testbase import connect

__all__ = [
    "BackendProcess",
    "Load",
    "Outcome",
    "Session",
    "Tally",
    "exchange",
    "open_fds",
    "recovery_time",
    "run_exchanges",
    "thread_count",
]

_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True, slots=True)
class Outcome:
    """One exchange: which backend answered, and whether every byte came back intact."""

    ok: bool
    backend: str | None
    nbytes: int
    started: float
    ended: float
    corrupt: bool = False
    error: str | None = None


def _payload(size: int) -> bytes:
    return random.randbytes(size)


def _read_name(sock: socket.socket) -> str:
    line = bytearray()
    while not line.endswith(b"\n"):
        data = sock.recv(1)
        if not data:
            raise ConnectionError(f"closed before the backend's name ({bytes(line)!r})")
        line += data
        if len(line) > 256:
            raise ConnectionError("name line too long")
    return line[:-1].decode()


def _drain(sock: socket.socket) -> bytes:
    return b"".join(iter(lambda: sock.recv(65536), b""))


def _verify(payload: bytes, got: bytes, backend: str | None, started: float) -> Outcome:
    """A stream cut short (a crash's FIN) is a failure; different bytes are corruption."""
    ended = time.monotonic()
    if got == payload:
        return Outcome(True, backend, 2 * len(payload), started, ended)
    if payload.startswith(got):
        error = f"truncated at {len(got)} of {len(payload)} bytes"
        return Outcome(False, backend, 0, started, ended, error=error)
    return Outcome(False, backend, 0, started, ended, corrupt=True, error="bytes differ")


def exchange(address: str, size: int = 16384, *, timeout: float = 10.0) -> Outcome:
    """One verified round trip of ``size`` bytes through ``address``; never raises."""
    payload = _payload(size)
    name: str | None = None
    started = time.monotonic()
    try:
        with connect(address, timeout=timeout) as sock:
            name = _read_name(sock)
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            got = _drain(sock)
    except OSError as exc:
        error = f"{type(exc).__name__}: {exc}"
        return Outcome(False, name, 0, started, time.monotonic(), error=error)
    return _verify(payload, got, name, started)


@dataclass
class Tally:
    """Counts over many outcomes."""

    outcomes: list[Outcome] = field(default_factory=list)

    @property
    def attempted(self) -> int:
        return len(self.outcomes)

    @property
    def completed(self) -> int:
        return sum(o.ok for o in self.outcomes)

    @property
    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if not o.ok]

    @property
    def corrupt(self) -> int:
        return sum(o.corrupt for o in self.outcomes)

    @property
    def bytes_verified(self) -> int:
        return sum(o.nbytes for o in self.outcomes if o.ok)

    def by_backend(self) -> Counter[str | None]:
        return Counter(o.backend for o in self.outcomes if o.ok)

    def errors(self, limit: int = 5) -> list[str]:
        return [f"{o.backend}: {o.error}" for o in self.failures[:limit]]


def run_exchanges(
    address: str, count: int, *, size: int = 16384, concurrency: int = 16, timeout: float = 10.0
) -> Tally:
    """``count`` exchanges, ``concurrency`` at a time."""
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        outcomes = list(pool.map(lambda _: exchange(address, size, timeout=timeout), range(count)))
    return Tally(outcomes)


class Load:
    """Exchanges on ``threads`` threads until :meth:`stop`; bounded by ``limit`` seconds."""

    def __init__(
        self,
        address: str,
        *,
        threads: int = 4,
        size: int = 16384,
        timeout: float = 10.0,
        pause: float = 0.0,
        limit: float = 120.0,
    ) -> None:
        self.address = address
        self.size = size
        self.timeout = timeout
        self.pause = pause
        self.limit = limit
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.tally = Tally()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        deadline = time.monotonic() + self.limit
        while not self._stop.is_set() and time.monotonic() < deadline:
            outcome = exchange(self.address, self.size, timeout=self.timeout)
            with self._lock:
                self.tally.outcomes.append(outcome)
            if self.pause:
                self._stop.wait(self.pause)

    def count(self) -> int:
        with self._lock:
            return len(self.tally.outcomes)

    def wait_count(self, n: int, timeout: float = 30.0) -> None:
        """Wait until at least ``n`` more exchanges have ended."""
        target = self.count() + n
        deadline = time.monotonic() + timeout
        while self.count() < target:
            if time.monotonic() > deadline:
                raise TimeoutError(f"load made no progress: {self.count()} of {target}")
            time.sleep(0.01)

    def __enter__(self) -> Self:
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> Tally:
        self._stop.set()
        for t in self._threads:
            t.join(self.timeout + 5.0)
        with self._lock:
            self.tally.outcomes.sort(key=lambda o: o.ended)
            return self.tally

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def recovery_time(outcomes: Sequence[Outcome], since: float) -> float:
    """Seconds from ``since`` until the end of the last failure after it (0 if none)."""
    last_failure = max((o.ended for o in outcomes if not o.ok and o.ended >= since), default=None)
    return 0.0 if last_failure is None else last_failure - since


class Session:
    """A long exchange held open across a fault: greeting read and half the payload sent."""

    def __init__(self, address: str, size: int, *, timeout: float = 10.0) -> None:
        self.payload = _payload(size)
        self.started = time.monotonic()
        self.backend: str | None = None
        self.error: str | None = None
        self.sock: socket.socket | None = None
        try:
            self.sock = connect(address, timeout=timeout)
            self.backend = _read_name(self.sock)
            self.sock.sendall(self.payload[: size // 2])
        except OSError as exc:
            self.error = f"{type(exc).__name__}: {exc}"

    def finish(self) -> Outcome:
        """Send the rest, read the echo to EOF, verify; never raises."""
        size = len(self.payload)
        if self.sock is None or self.error is not None:
            self.close()
            return Outcome(False, self.backend, 0, self.started, time.monotonic(), error=self.error)
        try:
            with self.sock:
                self.sock.sendall(self.payload[size // 2 :])
                self.sock.shutdown(socket.SHUT_WR)
                got = _drain(self.sock)
        except OSError as exc:
            error = f"{type(exc).__name__}: {exc}"
            return Outcome(False, self.backend, 0, self.started, time.monotonic(), error=error)
        return _verify(self.payload, got, self.backend, self.started)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()


_BACKEND_SCRIPT = r"""
import socket, struct, sys, threading
from l4lb._testbase import NamedServer
kind, name = sys.argv[1], sys.argv[2]
if kind in ("named", "hold"):
    srv = NamedServer(name, hold=kind == "hold").start()
    print(srv.address, flush=True)
    sys.stdin.read()
    srv.stop()
    sys.exit(0)
ls = socket.socket()
ls.bind(("127.0.0.1", 0))
ls.listen(4096)
print(f"127.0.0.1:{ls.getsockname()[1]}", flush=True)
if kind == "silent":      # completes handshakes in the kernel, never accepts or answers
    sys.stdin.read()
elif kind == "reset":     # accepts and resets every connection at once
    def reset_all():
        linger = struct.pack("ii", 1, 0)
        while True:
            conn, _ = ls.accept()
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
            conn.close()
    threading.Thread(target=reset_all, daemon=True).start()
    sys.stdin.read()
"""


class BackendProcess:
    """A backend in its own process: ``named`` (a NamedServer), ``hold`` (NamedServer that
    discards input and keeps connections open), ``silent`` (listens, never accepts) or
    ``reset`` (accepts and resets). Stdin closing stops it; :meth:`kill` crashes it."""

    def __init__(self, name: str, kind: str = "named") -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_ROOT), env.get("PYTHONPATH")) if p)
        self.name = name
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _BACKEND_SCRIPT, kind, name],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if not line:
            self.kill()
            raise RuntimeError(f"backend {name} ({kind}) did not start")
        self.address = line

    def kill(self) -> None:
        """SIGKILL: the kernel closes (or resets) every connection it had."""
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            with contextlib.suppress(BrokenPipeError):
                self.proc.stdin.close()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.kill()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def open_fds(pid: int) -> int:
    """Descriptors the process holds now."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def thread_count(pid: int) -> int:
    """Threads of the process now."""
    return len(os.listdir(f"/proc/{pid}/task"))
