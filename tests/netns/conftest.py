"""Root fixtures: two throwaway namespaces, ``client`` and ``node``, joined by a veth pair.

    client eth0 10.231.0.1/24 fd00:231::1/64  <-veth->  node eth0 10.231.0.2/24 fd00:231::2/64

The client routes the VIP ranges (10.96.0.0/16, fd00:96::/64) to the node, as a cluster
routes its service range; the node's default route points back at the client, so traffic the
node itself sends to a VIP has a route before the OUTPUT hook rewrites it. The addresses exist
only inside these namespaces, which are deleted (and every process started in them killed)
even when a test fails. Tests skip when not root or when namespaces cannot be created.
The ``backends`` fixture adds two backend namespaces behind ``node`` (see below).
"""

from __future__ import annotations

import json
import select
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pytest

from l4lb._netns import Netns, add_address, add_route, unavailable_reason, veth_pair
from l4lb.portals import PortalError, PortalManager, SubprocessRunner

ROOT = Path(__file__).resolve().parents[2]
CLIENT4, NODE4 = "10.231.0.1", "10.231.0.2"
CLIENT6, NODE6 = "fd00:231::1", "fd00:231::2"


@dataclass
class Topology:
    """The two namespaces plus the processes started in them (stopped at teardown)."""

    client: Netns
    node: Netns
    procs: list[subprocess.Popen[str]] = field(default_factory=list)
    CLIENT: ClassVar[dict[int, str]] = {4: CLIENT4, 6: CLIENT6}
    NODE: ClassVar[dict[int, str]] = {4: NODE4, 6: NODE6}

    def python(self, ns: Netns, code: str, *args: str, timeout: float = 10.0) -> Any:
        """Run ``python -c code args`` in ``ns`` and return its stdout parsed as JSON."""
        r = ns.run([sys.executable, "-c", code, *args], timeout=timeout, check=False)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    def spawn_json(self, ns: Netns, code: str, *args: str) -> tuple[subprocess.Popen[str], Any]:
        """Start ``python -c code args`` in ``ns``; return it and its first line as JSON."""
        proc = ns.popen(
            [sys.executable, "-c", code, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=ROOT,
        )
        self.procs.append(proc)
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 10)
        line = proc.stdout.readline() if ready else ""
        assert line, f"no output from the process in {ns.name}"
        return proc, json.loads(line)

    def node_runner(self, *, as_user: str | None = None) -> SubprocessRunner:
        """A portal Runner executing commands inside ``node`` (optionally as ``as_user``)."""
        prefix = self.node.exec_prefix
        if as_user is not None:
            prefix += ("runuser", "-u", as_user, "--")
        return SubprocessRunner(prefix=prefix)

    def manager(self, *, as_user: str | None = None) -> PortalManager:
        """A PortalManager whose iptables commands run inside ``node``."""
        return PortalManager(runner=self.node_runner(as_user=as_user))


@pytest.fixture(scope="session")
def netns_available() -> None:
    """Skip unless network namespaces can be created here."""
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)


@pytest.fixture
def topology(netns_available: None) -> Iterator[Topology]:
    """A fresh client/node pair; everything is torn down afterwards, whatever happens."""
    made: list[Netns] = []
    topo: Topology | None = None
    try:
        client = Netns.create("client")
        made.append(client)
        node = Netns.create("node")
        made.append(node)
        veth_pair(client, "eth0", node, "eth0")
        for ns, v4, v6 in ((client, CLIENT4, CLIENT6), (node, NODE4, NODE6)):
            add_address(ns, "eth0", f"{v4}/24")
            add_address(ns, "eth0", f"{v6}/64")
        add_route(client, "10.96.0.0/16", NODE4)
        add_route(client, "fd00:96::/64", NODE6)
        add_route(node, "default", CLIENT4)
        add_route(node, "default", CLIENT6)
        topo = Topology(client, node)
        try:
            topo.manager().check_available()
        except PortalError as e:
            pytest.skip(f"iptables is not usable in a namespace: {e}")
        yield topo
    finally:
        for proc in topo.procs if topo else []:
            if proc.poll() is None:
                proc.kill()
            proc.communicate(timeout=10)
        for ns in reversed(made):
            ns.delete()


# --------------------------------------------------------------------------- backends

# Each backend namespace hangs off its own veth from ``node``:
#     node eth<i+1> 10.232.<i>.1/24  <-veth->  b<i> eth0 10.232.<i>.2/24
# A backend answers TCP with its name (then closes) and UDP with "<name>:<datagram>".
BACKEND_SERVER = r"""
import json, select, socket, sys, time
name = sys.argv[1].encode()
t = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
t.bind(("0.0.0.0", int(sys.argv[2])))
t.listen(1024)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.bind(("0.0.0.0", int(sys.argv[3])))
print(json.dumps({"tcp": t.getsockname()[1], "udp": u.getsockname()[1]}), flush=True)
deadline = time.monotonic() + 600
while time.monotonic() < deadline:
    ready, _, _ = select.select([t, u], [], [], 1.0)
    if t in ready:
        c, _ = t.accept()
        try:
            c.sendall(name)
        except OSError:  # a health check that resets at once
            pass
        c.close()
    if u in ready:
        data, peer = u.recvfrom(2048)
        u.sendto(name + b":" + data, peer)
"""


@dataclass
class Backend:
    """One backend namespace and its echo server (restartable on the same ports)."""

    name: str
    ns: Netns
    address: str
    tcp: int = 0
    udp: int = 0
    proc: subprocess.Popen[str] | None = None

    def start(self, topology: Topology) -> None:
        """Start the echo server (on the ports it had before, if it ran already)."""
        self.proc, ports = topology.spawn_json(
            self.ns, BACKEND_SERVER, self.name, str(self.tcp), str(self.udp)
        )
        self.tcp, self.udp = ports["tcp"], ports["udp"]

    def stop(self) -> None:
        """Kill the echo server: its ports then answer RST / ICMP port unreachable."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate(timeout=10)
        self.proc = None


@pytest.fixture
def backends(topology: Topology) -> Iterator[list[Backend]]:
    """Two backend namespaces, b0 and b1, reachable from ``node`` and listening on the same
    ports; torn down afterwards."""
    made: list[Backend] = []
    try:
        for i in range(2):
            ns = Netns.create(f"b{i}")
            b = Backend(f"b{i}", ns, f"10.232.{i}.2")
            made.append(b)
            veth_pair(topology.node, f"eth{i + 1}", ns, "eth0")
            add_address(topology.node, f"eth{i + 1}", f"10.232.{i}.1/24")
            add_address(ns, "eth0", f"{b.address}/24")
            if made[0] is not b:
                # Each backend has a namespace of its own, so b0's ports are free in b1:
                # one health-check port then fits all backends.
                b.tcp, b.udp = made[0].tcp, made[0].udp
            b.start(topology)
        yield made
    finally:
        for b in made:
            b.stop()
            b.ns.delete()
