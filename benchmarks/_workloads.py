"""Backends and load generators of the macro workloads, and parsers for their output.

- bulk throughput: ``iperf3 -s`` as the backend, ``iperf3 -c -J`` through the peer;
- connection rate and keep-alive request rate/latency: nginx serving a tiny static file as
  the backend, ``wrk --latency`` through the peer;
- idle connections: a process that holds every connection it accepts (peers/hold_backend.py).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks._procs import ManagedProcess, PeerUnavailable, free_port

__all__ = [
    "IperfResult",
    "WrkResult",
    "hold_backend",
    "iperf3_backend",
    "nginx_http_backend",
    "parse_iperf3",
    "parse_wrk",
    "run_iperf3",
    "run_wrk",
]

_HERE = Path(__file__).resolve().parent
STATIC_BODY = b"ok\n"


# --------------------------------------------------------------------------- backends


@contextmanager
def iperf3_backend(
    workdir: Path, host: str = "127.0.0.1", ns_prefix: Sequence[str] = ()
) -> Iterator[str]:
    """Run ``iperf3 -s`` on ``host`` (in a namespace when ``ns_prefix`` is an ``ip netns exec``)."""
    exe = shutil.which("iperf3")
    if exe is None:
        raise PeerUnavailable("iperf3 is not installed")
    port = free_port()
    argv = [*ns_prefix, exe, "-s", "-B", host, "-p", str(port)]
    with ManagedProcess("iperf3-server", argv, workdir / "iperf3") as proc:
        proc.wait_listening(port)
        yield f"{host}:{port}"


@contextmanager
def nginx_http_backend(
    workdir: Path, host: str = "127.0.0.1", ns_prefix: Sequence[str] = ()
) -> Iterator[str]:
    """Run nginx (``worker_processes 1``) serving a 3-byte file on ``host``; yield its address."""
    exe = shutil.which("nginx")
    if exe is None:
        raise PeerUnavailable("nginx is not installed")
    port = free_port()
    prefix = workdir / "nginx-http"
    (prefix / "html").mkdir(parents=True, exist_ok=True)
    (prefix / "html" / "index.html").write_bytes(STATIC_BODY)
    # As root nginx workers would switch to "nobody", who cannot read a private tmp dir.
    user = "user root;" if os.geteuid() == 0 else ""
    temp = "\n".join(
        f"    {kind}_temp_path {prefix}/tmp_{kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    conf = prefix / "nginx.conf"
    conf.write_text(
        textwrap.dedent(
            """\
            {user}
            worker_processes 1;
            daemon off;
            pid {prefix}/nginx.pid;
            error_log {prefix}/error.log warn;
            worker_rlimit_nofile 16384;
            events {{ worker_connections 8192; }}
            http {{
                access_log off;
                keepalive_requests 10000000;
                default_type text/plain;
            {temp}
                server {{
                    listen {host}:{port} backlog=4096;
                    root {prefix}/html;
                }}
            }}
            """
        ).format(user=user, prefix=prefix, temp=temp, host=host, port=port)
    )
    argv = [*ns_prefix, exe, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")]
    with ManagedProcess("nginx-http", argv, prefix) as proc:
        proc.wait_listening(port)
        yield f"{host}:{port}"


@contextmanager
def hold_backend(workdir: Path) -> Iterator[str]:
    """Run a separate process that holds every accepted connection; yield its address."""
    ready = workdir / "ready.json"
    ready.unlink(missing_ok=True)  # a stale file would pass for readiness
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_HERE.parent), env.get("PYTHONPATH")) if p)
    argv = [sys.executable, str(_HERE / "peers" / "hold_backend.py"), "--ready-file", str(ready)]
    with ManagedProcess("hold-backend", argv, workdir, env=env) as proc:
        proc.wait_until(ready.exists)
        yield str(json.loads(ready.read_text())["address"])


# --------------------------------------------------------------------------- iperf3


@dataclass(frozen=True)
class IperfResult:
    """Receiver-side throughput of one iperf3 run."""

    bits_per_second: float
    bytes: int
    seconds: float
    retransmits: int
    streams: int


def parse_iperf3(text: str) -> IperfResult:
    """Parse ``iperf3 -J`` output; raise RuntimeError on an iperf3-reported error."""
    data: dict[str, Any] = json.loads(text)
    if data.get("error"):
        raise RuntimeError(f"iperf3: {data['error']}")
    end = data["end"]
    received = end["sum_received"]
    return IperfResult(
        bits_per_second=float(received["bits_per_second"]),
        bytes=int(received["bytes"]),
        seconds=float(received["seconds"]),
        retransmits=int(end.get("sum_sent", {}).get("retransmits", 0)),
        streams=len(end.get("streams", [])),
    )


def run_iperf3(
    address: str, *, streams: int, seconds: int, omit: int = 1, ns_prefix: Sequence[str] = ()
) -> IperfResult:
    """Run an iperf3 client through ``address`` for ``seconds``, the first ``omit`` not counted.

    Always time-based: with ``-n`` the sender stops as soon as its socket buffers hold the
    data, and the receiver's total then depends on how much a proxy had in flight.
    """
    host, _, port = address.rpartition(":")
    argv = [*ns_prefix, "iperf3", "-c", host, "-p", port, "-P", str(streams), "-J"]
    argv += ["-t", str(seconds), "-O", str(omit)]
    budget = seconds + omit + 30
    last = ""
    for _ in range(10):  # the server needs a moment between tests: "busy" is retried
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=budget, check=False)
        last = proc.stdout or proc.stderr
        try:
            return parse_iperf3(proc.stdout)
        except RuntimeError as exc:
            if "busy" not in str(exc):
                raise
        except (json.JSONDecodeError, KeyError) as exc:
            raise RuntimeError(f"iperf3 output not understood ({exc}): {last[-500:]}") from exc
        time.sleep(0.5)
    raise RuntimeError(f"iperf3 server stayed busy: {last[-500:]}")


# --------------------------------------------------------------------------- wrk


@dataclass(frozen=True)
class WrkResult:
    """Totals and latency percentiles (seconds) of one wrk run."""

    requests: int
    seconds: float
    requests_per_second: float
    latency: dict[str, float]
    socket_errors: dict[str, int]
    non_2xx: int

    @property
    def errors(self) -> int:
        """All socket errors plus non-2xx/3xx responses."""
        return sum(self.socket_errors.values()) + self.non_2xx


_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_TOTAL = re.compile(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m|h)", re.M)
_RPS = re.compile(r"^Requests/sec:\s+([\d.]+)", re.M)
_PCT = re.compile(r"^\s+(\d+(?:\.\d+)?)%\s+([\d.]+)(us|ms|s|m|h)\s*$", re.M)
_SOCK = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
_NON2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")


def parse_wrk(text: str) -> WrkResult:
    """Parse wrk's text report (with ``--latency``)."""
    total, rps = _TOTAL.search(text), _RPS.search(text)
    if total is None or rps is None:
        raise RuntimeError(f"wrk output not understood: {text[-500:]}")
    latency = {f"p{float(pct):g}": float(v) * _UNITS[u] for pct, v, u in _PCT.findall(text)}
    sock = _SOCK.search(text)
    errors = (
        dict(zip(("connect", "read", "write", "timeout"), map(int, sock.groups()), strict=True))
        if sock
        else {}
    )
    non = _NON2XX.search(text)
    return WrkResult(
        requests=int(total.group(1)),
        seconds=float(total.group(2)) * _UNITS[total.group(3)],
        requests_per_second=float(rps.group(1)),
        latency=latency,
        socket_errors=errors,
        non_2xx=int(non.group(1)) if non else 0,
    )


def run_wrk(
    address: str,
    *,
    seconds: int,
    connections: int,
    close: bool,
    threads: int = 1,
    ns_prefix: Sequence[str] = (),
) -> WrkResult:
    """Run ``wrk --latency`` against ``http://address/``, optionally with Connection: close."""
    exe = shutil.which("wrk")
    if exe is None:
        raise PeerUnavailable("wrk is not installed")
    argv = [*ns_prefix, exe, f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency"]
    if close:
        argv += ["-H", "Connection: close"]
    argv.append(f"http://{address}/")
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"wrk exited with {proc.returncode}: {proc.stderr[-500:]}")
    return parse_wrk(proc.stdout)
