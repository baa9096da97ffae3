"""Subprocess plumbing for the benchmark peers: start, wait until listening, measure, stop.

Readiness is read from /proc/<pid>/net/{tcp,udp}{,6} instead of by connecting, because a
probe connection would be proxied to the backend and could disturb it (iperf3 treats any
connection as the start of a test); reading the process's own table also works for a
process started inside another network namespace.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

__all__ = [
    "ManagedProcess",
    "PeerUnavailable",
    "fd_count",
    "free_port",
    "is_listening",
    "process_tree",
    "rss_bytes",
    "tool_version",
]

_TCP_LISTEN = "0A"
_UDP_UNCONNECTED = "07"  # TCP_CLOSE, the state /proc shows for a bound UDP socket


class PeerUnavailable(Exception):
    """A peer or backend cannot run here; the message is the skip reason."""


def free_port(host: str = "127.0.0.1", *, udp: bool = False) -> int:
    """Return a port that was free a moment ago, for programs that cannot bind port 0."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM if udp else socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def is_listening(port: int, *, pid: int | None = None, udp: bool = False) -> bool:
    """True when a socket listens on ``port`` (TCP LISTEN, or a bound unconnected UDP socket).

    With ``pid`` the tables of that process's network namespace are read, so a process
    started inside another namespace can be waited for from here.
    """
    want = f"{port:04X}"
    base = f"/proc/{pid}/net" if pid is not None else "/proc/net"
    kind = "udp" if udp else "tcp"
    state = _UDP_UNCONNECTED if udp else _TCP_LISTEN
    for table in (f"{base}/{kind}", f"{base}/{kind}6"):
        try:
            lines = Path(table).read_text(encoding="ascii").splitlines()[1:]
        except OSError:  # no IPv6, or the process is gone
            continue
        for line in lines:
            fields = line.split()
            if fields[1].rsplit(":", 1)[1] == want and fields[3] == state:
                return True
    return False


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (e.g. an nginx master and its workers)."""
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            for task in Path(f"/proc/{current}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
    return out


def rss_bytes(pids: Sequence[int]) -> int:
    """Sum of VmRSS over ``pids``, in bytes."""
    total = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) * 1024
    return total


def fd_count(pids: Sequence[int]) -> int:
    """Open file descriptors over ``pids``."""
    return sum(len(os.listdir(f"/proc/{pid}/fd")) for pid in pids)


def tool_version(argv: Sequence[str]) -> str:
    """First line a ``--version``-style command prints (stdout or stderr), or ``"absent"``."""
    if shutil.which(argv[0]) is None:
        return "absent"
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    for line in (proc.stdout + "\n" + proc.stderr).splitlines():
        if line.strip():
            return line.strip()
    return "unknown"


class ManagedProcess:
    """A foreground subprocess with its output in files under ``workdir``."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        workdir: Path,
        *,
        env: Mapping[str, str] | None = None,
        stop_signal: signal.Signals = signal.SIGTERM,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.workdir = workdir
        self.log_path = workdir / f"{name}.log"
        self.stop_signal = stop_signal
        workdir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            try:
                self.proc = subprocess.Popen(
                    self.argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=dict(env) if env is not None else None,
                    start_new_session=True,
                )
            except OSError as exc:
                raise PeerUnavailable(f"{name}: cannot run {self.argv[0]}: {exc}") from exc

    @property
    def pid(self) -> int:
        """Process id of the (top-level) process."""
        return self.proc.pid

    def tail(self, lines: int = 15) -> str:
        """The last lines of the process's output."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def wait_until(self, ready: Callable[[], bool], timeout: float = 15.0) -> None:
        """Poll ``ready``; raise :class:`PeerUnavailable` if the process exits or times out."""
        deadline = time.monotonic() + timeout
        while not ready():
            code = self.proc.poll()
            if code is not None:
                raise PeerUnavailable(f"{self.name} exited with {code}: {self.tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise PeerUnavailable(f"{self.name} not ready after {timeout:g}s: {self.tail()}")
            time.sleep(0.02)

    def wait_listening(self, port: int, timeout: float = 15.0, *, udp: bool = False) -> None:
        """Wait until ``port`` is listening in the process's own network namespace."""
        self.wait_until(lambda: is_listening(port, pid=self.pid, udp=udp), timeout)

    def stop(self, timeout: float = 10.0) -> int:
        """Signal, wait, SIGKILL as a last resort; return the exit code."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(self.stop_signal)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: workers too
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
