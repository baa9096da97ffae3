"""10,000+ concurrent proxied connections held open at once, each verified byte-exact.

The machines that run the suite cap RLIMIT_NOFILE at 20,000 and no process there may raise
it, which is below what 10,000 proxied connections need (two sockets each in l4lb alone).
Root in the test VM may raise it, so the case runs here: a real ``l4lb run`` on loopback,
an echo backend process and this process as the client, each with a 65,536 fd limit.

Usage (inside the test VM): case_concurrency.py RESULT.json.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import selectors
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import netlab

ROOT = Path(__file__).resolve().parents[3]

CONNECTIONS = int(os.environ.get("L4LB_CONNECTIONS", "10240"))  # smaller for a dry run
FD_LIMIT = int(os.environ.get("L4LB_FD_LIMIT", "65536"))
DEADLINE = 600.0  # seconds for the whole exchange: bounded even if something hangs

# One selector loop, no thread per connection: 10,000 threads would not fit in the VM.
ECHO = r"""
import selectors, socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 0)); s.listen(4096); s.setblocking(False)
sel = selectors.DefaultSelector(); sel.register(s, selectors.EVENT_READ)
print(s.getsockname()[1], flush=True)
while True:
    for key, _ in sel.select():
        if key.fileobj is s:
            while True:
                try:
                    c, _ = s.accept()
                except BlockingIOError:
                    break
                c.setblocking(False)
                sel.register(c, selectors.EVENT_READ)
            continue
        c = key.fileobj
        try:
            data = c.recv(65536)
        except BlockingIOError:
            continue
        except ConnectionError:
            data = b""
        if not data:
            sel.unregister(c); c.close(); continue
        c.sendall(data)  # 64-byte messages: the socket buffer always has room
"""


def admin_get(admin: str, path: str) -> Any:
    with urllib.request.urlopen(f"http://{admin}{path}", timeout=30) as r:
        return json.load(r)


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def message(i: int) -> bytes:
    return hashlib.sha256(str(i).encode()).hexdigest().encode()  # 64 bytes, unique


def exchange(
    addr: tuple[str, int], n: int, note: netlab.Observations, admin: str, pid: int
) -> None:
    """Open n connections, hold them all, then send one message on each and check the echo."""
    sel = selectors.DefaultSelector()
    socks: list[socket.socket] = []
    started = time.monotonic()
    failed_connect = 0
    for _ in range(n):
        s = socket.socket()
        s.setblocking(False)
        err = s.connect_ex(addr)
        if err not in (0, 115):  # EINPROGRESS
            failed_connect += 1
            s.close()
            continue
        socks.append(s)
        sel.register(s, selectors.EVENT_WRITE)
    by_fd = {s.fileno(): i for i, s in enumerate(socks)}
    connected: set[int] = set()
    while len(connected) + failed_connect < n and time.monotonic() - started < DEADLINE:
        for key, _ in sel.select(1.0):
            i = by_fd[key.fd]
            if socks[i].getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                failed_connect += 1
            else:
                connected.add(i)
            sel.unregister(socks[i])

    # Every connection is now open at the same time: the proxy holds all of them.
    def all_active() -> bool:
        active: int = admin_get(admin, "/api/v1/services/held")["active"]
        return active >= len(connected)

    netlab.wait_for(all_active, 120)
    svc = admin_get(admin, "/api/v1/services/held")
    note("active_held", svc["active"])
    note("l4lb_fds_held", fd_count(pid))
    note("connect_seconds", round(time.monotonic() - started, 1))
    buffers: dict[int, bytes] = {}
    for i in connected:
        socks[i].send(message(i))
        buffers[i] = b""
        sel.register(socks[i], selectors.EVENT_READ)
    verified = 0
    corrupt = 0
    while buffers and time.monotonic() - started < DEADLINE:
        for key, _ in sel.select(1.0):
            i = by_fd[key.fd]
            data = socks[i].recv(128)
            buffers[i] += data
            if len(buffers[i]) >= 64 or not data:
                sel.unregister(socks[i])
                if buffers.pop(i) == message(i):
                    verified += 1
                else:
                    corrupt += 1
    for s in socks:
        s.close()
    note("attempted", n)
    note("connected", len(connected))
    note("failed_connect", failed_connect)
    note("verified", verified)
    note("corrupt", corrupt)
    note("unanswered", len(buffers))
    note("seconds", round(time.monotonic() - started, 1))


def main(out: str) -> None:
    note = netlab.Observations(out)
    resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))
    procs: list[subprocess.Popen[str]] = []
    work = Path(tempfile.mkdtemp(prefix="l4lb-concurrency-"))
    log = open(work / "l4lb.log", "w")  # noqa: SIM115 (outlives the with-less Popen below)
    try:
        echo = subprocess.Popen([sys.executable, "-c", ECHO], stdout=subprocess.PIPE, text=True)
        procs.append(echo)
        assert echo.stdout is not None
        port = int(echo.stdout.readline())
        cfg = work / "l4lb.toml"
        cfg.write_text(
            '[admin]\nlisten = "127.0.0.1:0"\n[dataplane]\nworkers = 2\n'
            '[[services]]\nname = "held"\nlisten = "127.0.0.1:0"\n'
            f'[[services.backends]]\naddress = "127.0.0.1:{port}"\n'
        )
        ready = work / "ready.json"
        lb = subprocess.Popen(
            [sys.executable, "-m", "l4lb", "run", "--config", str(cfg), "--ready-file", str(ready)],
            cwd=ROOT,
            stderr=log,
            text=True,
        )
        procs.append(lb)
        netlab.wait_for(ready.exists, 120)
        doc = json.loads(ready.read_text())
        host, _, lport = doc["services"]["held"].rpartition(":")
        limits = Path(f"/proc/{lb.pid}/limits").read_text().splitlines()
        note("l4lb_fd_limit", int(next(ln for ln in limits if "open files" in ln).split()[3]))
        exchange((host, int(lport)), CONNECTIONS, note, doc["admin"], lb.pid)
        netlab.wait_for(
            lambda: admin_get(doc["admin"], "/api/v1/services/held")["active"] == 0, 120
        )
        # Active ends at the first FIN; the sockets close once both sides have finished.
        netlab.wait_for(lambda: fd_count(lb.pid) < 200, 120)
        note("l4lb_fds_after", fd_count(lb.pid))
        lb.terminate()
        note("l4lb_exit", lb.wait(60))
        note("l4lb_log_tail", (work / "l4lb.log").read_text()[-2000:])
    except Exception:
        note("error", traceback.format_exc())
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        log.close()
    note("done", True)


if __name__ == "__main__":
    main(sys.argv[1])
