"""Guest-side helpers: namespaces, veths, tiny TCP backends and clients, ipvsadm parsing.

Runs inside the test VM only (root, a kernel with IPVS); imported by the case scripts.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# A thread per connection: a connection whose close never arrives must not block others.
BACKEND = r"""
import socket, sys, threading
name, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
s = socket.socket(fam, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((host, port)); s.listen(64)
def serve(c):
    c.sendall(name.encode() + b"\n")
    while True:
        data = c.recv(4096)
        if not data:
            break
        c.sendall(data)
    c.close()
print("ready", flush=True)
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""

# Opens n sequential connections and prints the backend names; with "hold", keeps one
# connection open, prints its backend, then pings it once per line read from stdin.
CLIENT = r"""
import socket, sys
host, port, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
def conn():
    c = socket.create_connection((host, port), timeout=10)
    f = c.makefile("rb")
    return c, f, f.readline().decode().strip()
if mode == "hold":
    c, f, name = conn()
    print(name, flush=True)
    for line in sys.stdin:
        c.sendall(b"ping\n")
        print(f.readline().decode().strip(), flush=True)
    c.close()
else:
    names = []
    for _ in range(int(mode)):
        c, f, name = conn()
        names.append(name)
        c.close()
    print(" ".join(names))
"""


def sh(*cmd: str, check: bool = True) -> str:
    """Run a command, return stdout; raise with stderr on failure when ``check``."""
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: rc={r.returncode} {r.stderr.strip()}")
    return r.stdout


class Lab:
    """A client namespace and backend namespaces wired to the guest's root namespace.

    Backends get no default route: replies only come back because the balancer
    masquerades, which is what the masquerade chain is for.
    """

    def __init__(self, backends: int, *, v6: bool = False) -> None:
        self.v6 = v6
        self.procs: list[subprocess.Popen[str]] = []
        self.backends: dict[str, str] = {}
        sh("sysctl", "-qw", "net.ipv4.ip_forward=1")
        sh("sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
        self._ns("cli", "vcli", 1, default=True)
        for i in range(1, backends + 1):
            addr = self._ns(f"b{i}", f"vb{i}", 10 + i, default=False)
            self.backends[f"b{i}"] = addr

    def _addr(self, net: int, host: int) -> tuple[str, str, int]:
        if self.v6:
            return f"fd10:{net}::{host}", f"fd10:{net}::1", 64
        return f"10.10.{net}.{host}", f"10.10.{net}.1", 24

    def _ns(self, ns: str, veth: str, net: int, *, default: bool) -> str:
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        inside, outside, plen = self._addr(net, 2)
        extra = ["nodad"] if self.v6 else []
        sh("ip", "addr", "add", f"{outside}/{plen}", "dev", veth, *extra)
        sh("ip", "link", "set", veth, "up")
        sh("ip", "-n", ns, "addr", "add", f"{inside}/{plen}", "dev", "eth0", *extra)
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        if default:
            sh("ip", "-n", ns, "route", "add", "default", "via", outside)
        return inside

    def start_backends(self, port: int) -> None:
        for name, addr in self.backends.items():
            p = subprocess.Popen(
                ["ip", "netns", "exec", name, sys.executable, "-c", BACKEND, name, addr, str(port)],
                stdout=subprocess.PIPE,
                text=True,
            )
            assert p.stdout is not None
            assert p.stdout.readline().strip() == "ready"
            self.procs.append(p)

    def connect(self, host: str, port: int, n: int) -> list[str]:
        """``n`` sequential connections from the client namespace; backend names."""
        out = sh(
            "ip", "netns", "exec", "cli", sys.executable, "-c", CLIENT, host, str(port), str(n)
        )
        return out.split()

    def hold(self, host: str, port: int) -> Held:
        """One connection kept open from the client namespace."""
        p = subprocess.Popen(
            ["ip", "netns", "exec", "cli", sys.executable, "-c", CLIENT, host, str(port), "hold"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        return Held(p)

    def close(self) -> None:
        for p in self.procs:
            p.kill()
            p.wait()


class Held:
    """A held client connection: ``backend`` it reached, ``ping()`` to prove it lives."""

    def __init__(self, p: subprocess.Popen[str]) -> None:
        assert p.stdout is not None and p.stdin is not None
        self.p = p
        self.backend = p.stdout.readline().strip()

    def ping(self) -> str:
        assert self.p.stdin is not None and self.p.stdout is not None
        self.p.stdin.write("x\n")
        self.p.stdin.flush()
        return self.p.stdout.readline().strip()

    def close(self) -> int:
        assert self.p.stdin is not None
        self.p.stdin.close()
        return self.p.wait(timeout=20)


def ipvsadm_list() -> list[dict[str, Any]]:
    """``ipvsadm -Ln`` parsed: services with their real servers (counters left out)."""
    services: list[dict[str, Any]] = []
    for line in sh("ipvsadm", "-Ln").splitlines()[3:]:
        parts = line.split()
        if line.startswith("  ->"):
            services[-1]["dests"].append(
                {"addr": parts[1], "fwd": parts[2], "weight": int(parts[3])}
            )
        elif parts:
            services.append(
                {
                    "proto": parts[0],
                    "vip": parts[1],
                    "sched": parts[2],
                    "rest": parts[3:],
                    "dests": [],
                }
            )
    return services


def ipvsadm_save() -> list[str]:
    return sh("ipvsadm", "-Sn").splitlines()


def dest_active(addr: str) -> int:
    """The ActiveConn column of ``ipvsadm -Ln`` for real server ``addr`` (first match)."""
    for line in sh("ipvsadm", "-Ln").splitlines():
        parts = line.split()
        if line.startswith("  ->") and parts[1] == addr:
            return int(parts[4])
    return -1


def wait_for(pred: Any, timeout: float = 20.0) -> bool:
    """Poll ``pred`` (bounded) until true."""
    for _ in range(int(timeout / 0.2)):
        if pred():
            return True
        time.sleep(0.2)
    return bool(pred())


def write(path: str, data: dict[str, Any]) -> None:
    Path(path).write_text(json.dumps(data, indent=2, default=str))


def service_spec(name: str, listen: str, dests: Any, **kw: Any) -> Any:
    """A ServiceSpec with the defaults every case uses, ``kw`` overriding any field."""
    from l4lb.config import Address
    from l4lb.state import ServiceSpec

    fields: dict[str, Any] = {
        "name": name,
        "listen": Address.parse(listen),
        "protocol": "tcp",
        "scheduler": "rr",
        "flags": 0,
        "persist_timeout": 0.0,
        "persist_netmask": 32,
        "persist_netmask6": 128,
        "expire_quiescent": False,
        "connect_timeout": 5.0,
        "idle_timeout": 300.0,
        "drain_timeout": 60.0,
        "retries": -1,
        "dests": tuple(dests),
    }
    fields.update(kw)
    return ServiceSpec(**fields)


class Observations:
    """What a case saw, written to its JSON file after every note (a crash keeps the rest)."""

    def __init__(self, out: str) -> None:
        self.out = out
        self.data: dict[str, Any] = {"steps": []}

    def __call__(self, key: str, value: Any) -> None:
        self.data[key] = value
        self.data["steps"].append(key)
        write(self.out, self.data)
