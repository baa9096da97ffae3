"""The proxies l4lb is compared with, each started on loopback in front of one backend.

Every peer turns a backend address into a front address and owns the processes behind it.
Tunings are chosen to make the comparison like-for-like: one thread or worker each, splicing
where the proxy supports it, no logging on the data path, limits high enough for the idle
connection workload.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks._procs import ManagedProcess, PeerUnavailable, free_port, process_tree
from l4lb._testbase import L4lbProcess, L4lbStartError

__all__ = ["PEERS", "UDP_PEERS", "Front", "start_peer"]

NGINX_STREAM_MODULE = Path("/usr/lib/nginx/modules/ngx_stream_module.so")
_HERE = Path(__file__).resolve().parent
_ROOT = _HERE.parent


@dataclass
class Front:
    """A running peer: where clients connect, which processes to measure, how to stop."""

    peer: str
    address: str
    pids: Callable[[], list[int]]
    stop: Callable[[], object]
    info: dict[str, str] = field(default_factory=dict)


def _root_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_ROOT), env.get("PYTHONPATH")) if p)
    return env


def _direct(backend: str, workdir: Path, max_conns: int, protocol: str) -> Front:
    return Front("direct", backend, pids=lambda: [], stop=lambda: None)


def _l4lb(
    backend: str, workdir: Path, max_conns: int, protocol: str, *, affinity: float = 0.0
) -> Front:
    config = {
        "admin": {"listen": "127.0.0.1:0"},
        "dataplane": {"workers": 1},
        "services": [
            {
                "name": "bench",
                "listen": "127.0.0.1:0",
                "protocol": protocol,
                "scheduler": "rr",
                "affinity_timeout": affinity,
                "backends": [{"address": backend, "weight": 1}],
            }
        ],
    }
    proc = L4lbProcess(config, workers=1, workdir=workdir / "l4lb", log_level="warning")
    try:
        proc.start()
    except L4lbStartError as exc:
        raise PeerUnavailable(f"l4lb: {exc}") from exc
    return Front(
        "l4lb-affinity" if affinity else "l4lb",
        proc.service_address("bench"),
        pids=lambda: [proc.pid],
        stop=proc.stop,
        info={
            "mode": "splice" if protocol == "tcp" else "udp",
            "workers": "1",
            "affinity_timeout": f"{affinity:g}",
        },
    )


def _l4lb_affinity(backend: str, workdir: Path, max_conns: int, protocol: str) -> Front:
    """l4lb with client-IP affinity on: the cost of a template per client."""
    return _l4lb(backend, workdir, max_conns, protocol, affinity=300.0)


def _tcp_only(peer: str, protocol: str) -> None:
    if protocol != "tcp":
        raise PeerUnavailable(f"{peer} does not proxy {protocol}")


def _haproxy(backend: str, workdir: Path, max_conns: int, protocol: str) -> Front:
    _tcp_only("haproxy", protocol)
    exe = shutil.which("haproxy")
    if exe is None:
        raise PeerUnavailable("haproxy is not installed")
    port = free_port()
    cfg = workdir / "haproxy" / "haproxy.cfg"
    cfg.parent.mkdir(parents=True, exist_ok=True)
    cfg.write_text(
        textwrap.dedent(
            f"""\
            global
                nbthread 1
                maxconn {max_conns + 64}
                # its default (maxconn / 4) would push the FD budget past RLIMIT_NOFILE
                maxpipes 256

            defaults
                mode tcp
                option splice-auto
                timeout connect 5s
                timeout client 10m
                timeout server 10m

            frontend bench
                bind 127.0.0.1:{port}
                default_backend bench

            backend bench
                server s1 {backend}
            """
        )
    )
    proc = ManagedProcess("haproxy", [exe, "-f", str(cfg), "-db"], cfg.parent)
    proc.wait_listening(port)
    return Front(
        "haproxy",
        f"127.0.0.1:{port}",
        pids=lambda: [proc.pid],
        stop=proc.stop,
        info={"threads": "1", "splice": "auto"},
    )


def _nginx(backend: str, workdir: Path, max_conns: int, protocol: str) -> Front:
    exe = shutil.which("nginx")
    if exe is None:
        raise PeerUnavailable("nginx is not installed")
    if not NGINX_STREAM_MODULE.exists():
        raise PeerUnavailable(f"{NGINX_STREAM_MODULE} missing (install libnginx-mod-stream)")
    port = free_port(udp=protocol == "udp")
    prefix = workdir / "nginx-stream"
    prefix.mkdir(parents=True, exist_ok=True)
    nofile = 2 * max_conns + 256
    if protocol == "udp":
        # One reply per datagram, as DNS-like request/response traffic expects.
        server = f"listen 127.0.0.1:{port} udp; proxy_pass {backend}; proxy_responses 1;"
        server += " proxy_timeout 10s;"
    else:
        server = f"listen 127.0.0.1:{port} backlog=4096; proxy_pass {backend};"
    conf = prefix / "nginx.conf"
    conf.write_text(
        textwrap.dedent(
            f"""\
            load_module {NGINX_STREAM_MODULE};
            worker_processes 1;
            daemon off;
            pid {prefix}/nginx.pid;
            error_log {prefix}/error.log warn;
            worker_rlimit_nofile {nofile};
            events {{ worker_connections {nofile}; }}
            stream {{
                server {{
                    {server}
                }}
            }}
            """
        )
    )
    argv = [exe, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")]
    proc = ManagedProcess("nginx-stream", argv, prefix)
    proc.wait_listening(port, udp=protocol == "udp")
    return Front(
        "nginx",
        f"127.0.0.1:{port}",
        pids=lambda: process_tree(proc.pid),
        stop=proc.stop,
        info={"worker_processes": "1", "protocol": protocol},
    )


def _asyncio(backend: str, workdir: Path, max_conns: int, protocol: str) -> Front:
    _tcp_only("asyncio", protocol)
    ready = workdir / "asyncio-proxy" / "ready.json"
    ready.parent.mkdir(parents=True, exist_ok=True)
    ready.unlink(missing_ok=True)  # a stale file would pass for readiness
    argv = [
        sys.executable,
        str(_HERE / "peers" / "asyncio_proxy.py"),
        "--listen",
        "127.0.0.1:0",
        "--backend",
        backend,
        "--ready-file",
        str(ready),
    ]
    proc = ManagedProcess("asyncio-proxy", argv, ready.parent, env=_root_env())
    proc.wait_until(ready.exists)
    data = json.loads(ready.read_text())
    return Front(
        "asyncio",
        data["address"],
        pids=lambda: [proc.pid],
        stop=proc.stop,
        info={"loop": data.get("loop", "?")},
    )


#: Measurement order within each round: the references first, then l4lb, then the others.
PEERS: dict[str, Callable[[str, Path, int, str], Front]] = {
    "direct": _direct,
    "l4lb": _l4lb,
    "l4lb-affinity": _l4lb_affinity,
    "haproxy": _haproxy,
    "nginx": _nginx,
    "asyncio": _asyncio,
}


#: The peers that proxy UDP (request/response with one reply per datagram).
UDP_PEERS = ("direct", "l4lb", "nginx")


def start_peer(
    name: str, backend: str, workdir: Path, *, max_conns: int = 1024, protocol: str = "tcp"
) -> Front:
    """Start peer ``name`` in front of ``backend``; raise :class:`PeerUnavailable` if it can't."""
    started = time.monotonic()
    front = PEERS[name](backend, workdir, max_conns, protocol)
    front.info["startup_s"] = f"{time.monotonic() - started:.3f}"
    return front
