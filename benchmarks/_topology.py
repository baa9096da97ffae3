"""A routed three-namespace topology, for the peers that only work on forwarded traffic.

Kernel NAT (iptables DNAT) applies to packets that pass through a host, not to loopback
traffic a host sends itself, so it is compared in its own topology::

    client ns  10.231.1.2 --veth-- 10.231.1.1  router ns  10.231.2.1 --veth-- 10.231.2.2  backend ns

The load generator runs in the client namespace and the backend in the backend namespace;
every peer of the comparison uses the same path, so the ratios are fair:

- ``direct``: the client connects to the backend's address, routed (no NAT) by the router;
- ``l4lb``: l4lb runs in the router namespace and listens on 10.231.1.1;
- ``iptables-dnat``: a DNAT rule in the router's PREROUTING chain maps 10.231.1.1:PORT to
  the backend; conntrack undoes it on the replies;
- ``ipvs`` (kernel VM only): an IPVS virtual service 10.231.1.1:PORT in the router
  namespace, rr, the backend as a masquerading (NAT) real server.

The namespaces (and with them the veths and the rule) are deleted afterwards.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks._peers import Front
from benchmarks._procs import PeerUnavailable, tool_version
from l4lb._netns import Netns, NetnsError, add_address, add_route, unavailable_reason, veth_pair
from l4lb._testbase import L4lbProcess, L4lbStartError

__all__ = ["NETNS_PEERS", "VM_PEERS", "Topology"]

CLIENT_IP = "10.231.1.2"
ROUTER_FRONT_IP = "10.231.1.1"
ROUTER_BACK_IP = "10.231.2.1"
BACKEND_IP = "10.231.2.2"

#: Peers of the routed topology, in measurement order.
NETNS_PEERS = ("direct", "l4lb", "iptables-dnat")
#: The same inside the kernel VM, where IPVS exists.
VM_PEERS = (*NETNS_PEERS, "ipvs")


@dataclass
class Topology:
    """The three namespaces; :meth:`start_peer` puts a peer in front of a backend."""

    client: Netns
    router: Netns
    backend: Netns
    #: Seconds allowed for a command or for l4lb to get ready; the emulated VM needs more.
    timeout: float = 10.0
    _next_port: list[int] = field(default_factory=lambda: [20000])

    @classmethod
    def create(cls, *, timeout: float = 10.0) -> Topology:
        """Build the namespaces, links, addresses and routes; PeerUnavailable if impossible."""
        reason = unavailable_reason()
        if reason:
            raise PeerUnavailable(reason)
        if shutil.which("iptables") is None:
            raise PeerUnavailable("iptables is not installed")
        made: list[Netns] = []
        try:
            for role in ("client", "router", "backend"):
                made.append(Netns.create(role))
            client, router, backend = made
            veth_pair(client, "eth0", router, "front")
            veth_pair(router, "back", backend, "eth0")
            add_address(client, "eth0", f"{CLIENT_IP}/24")
            add_address(router, "front", f"{ROUTER_FRONT_IP}/24")
            add_address(router, "back", f"{ROUTER_BACK_IP}/24")
            add_address(backend, "eth0", f"{BACKEND_IP}/24")
            add_route(client, "default", ROUTER_FRONT_IP)
            add_route(backend, "default", ROUTER_BACK_IP)
            router.run(["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"], timeout=timeout)
        except NetnsError as exc:
            for ns in reversed(made):
                ns.delete()
            raise PeerUnavailable(f"cannot build the namespace topology: {exc}") from exc
        return cls(client, router, backend, timeout)

    def delete(self) -> None:
        """Delete the namespaces (processes in them must have been stopped)."""
        for ns in (self.client, self.router, self.backend):
            ns.delete()

    def start_peer(self, name: str, backend: str, workdir: Path, *, protocol: str = "tcp") -> Front:
        """Start peer ``name`` (one of :data:`NETNS_PEERS`) in front of ``backend``."""
        starters: dict[str, Callable[[str, Path], Front]] = {
            "direct": lambda b, w: Front("direct", b, pids=lambda: [], stop=lambda: None),
            "l4lb": self._l4lb,
            "iptables-dnat": self._dnat,
            "ipvs": self._ipvs,
        }
        if protocol != "tcp":
            raise PeerUnavailable(f"the namespace topology measures tcp, not {protocol}")
        return starters[name](backend, workdir)

    def _l4lb(self, backend: str, workdir: Path) -> Front:
        config = {
            "admin": {"listen": "127.0.0.1:0"},
            "dataplane": {"workers": 1},
            "services": [
                {
                    "name": "bench",
                    "listen": f"{ROUTER_FRONT_IP}:0",
                    "scheduler": "rr",
                    "backends": [{"address": backend, "weight": 1}],
                }
            ],
        }
        proc = L4lbProcess(
            config,
            workers=1,
            workdir=workdir / "l4lb",
            log_level="warning",
            command=[*self.router.exec_prefix, sys.executable, "-m", "l4lb"],
            ready_timeout=max(30.0, 3 * self.timeout),
        )
        try:
            proc.start()
        except L4lbStartError as exc:
            raise PeerUnavailable(f"l4lb in the router namespace: {exc}") from exc
        return Front(
            "l4lb",
            proc.service_address("bench"),
            pids=lambda: [proc.pid],
            stop=proc.stop,
            info={"mode": "splice", "workers": "1", "netns": "router"},
        )

    def _dnat(self, backend: str, workdir: Path) -> Front:
        port = self._next_port[0]
        self._next_port[0] += 1
        rule = ["-d", ROUTER_FRONT_IP, "-p", "tcp", "--dport", str(port)]
        rule += ["-j", "DNAT", "--to-destination", backend]
        try:
            self.router.run(
                ["iptables", "-t", "nat", "-A", "PREROUTING", *rule], timeout=self.timeout
            )
        except NetnsError as exc:
            raise PeerUnavailable(f"iptables DNAT rule: {exc}") from exc

        def stop() -> None:
            cmd = ["iptables", "-t", "nat", "-D", "PREROUTING", *rule]
            self.router.run(cmd, check=False, timeout=self.timeout)

        return Front(
            "iptables-dnat",
            f"{ROUTER_FRONT_IP}:{port}",
            pids=lambda: [],
            stop=stop,
            info={"iptables": tool_version(["iptables", "-V"]), "chain": "nat PREROUTING"},
        )

    def _ipvs(self, backend: str, workdir: Path) -> Front:
        port = self._next_port[0]
        self._next_port[0] += 1
        vip = f"{ROUTER_FRONT_IP}:{port}"
        try:
            self.router.run(["ipvsadm", "-A", "-t", vip, "-s", "rr"], timeout=self.timeout)
            self.router.run(["ipvsadm", "-a", "-t", vip, "-r", backend, "-m"], timeout=self.timeout)
        except NetnsError as exc:
            raise PeerUnavailable(f"ipvsadm: {exc}") from exc

        def stop() -> None:
            self.router.run(["ipvsadm", "-D", "-t", vip], check=False, timeout=self.timeout)

        return Front(
            "ipvs",
            vip,
            pids=lambda: [],
            stop=stop,
            info={"ipvsadm": tool_version(["ipvsadm", "--version"]), "forwarding": "masq"},
        )
