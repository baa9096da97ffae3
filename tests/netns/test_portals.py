"""Portal rules in real iptables, inside namespaces the tests create.

A plain listener in ``node`` stands in for the splicer: it reports, for every accepted
connection, the original destination from SO_ORIGINAL_DST / IP6T_SO_ORIGINAL_DST, and echoes
UDP datagrams. Traffic comes from ``client`` (CONTAINER chain) or from ``node`` itself (HOST).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from l4lb.config import Address
from l4lb.portals import (
    CONTAINER_CHAIN,
    HOST_CHAIN,
    Portal,
    PortalError,
    container_rule,
    host_rule,
    node_address,
    render_restore,
)

pytestmark = pytest.mark.root

if TYPE_CHECKING:
    from conftest import Topology

ROOT = Path(__file__).resolve().parents[2]
VIP4, VIP6 = "10.96.231.10", "fd00:96::10"
VIP = {4: VIP4, 6: VIP6}
HOOKS = [
    '-A PREROUTING -m comment --comment "l4lb portals" -j L4LB-PORTALS-CONTAINER',
    '-A OUTPUT -m comment --comment "l4lb portals" -j L4LB-PORTALS-HOST',
]

# One wildcard TCP listener and one UDP socket per family, each on its own ephemeral port.
SERVER = r"""
import json, select, socket, struct

SO_ORIGINAL_DST = 80  # IP6T_SO_ORIGINAL_DST has the same value


def original_dst(conn, family):
    if family == socket.AF_INET:
        raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
        return [socket.inet_ntop(family, raw[4:8]), struct.unpack_from("!H", raw, 2)[0]]
    raw = conn.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28)
    return [socket.inet_ntop(family, raw[8:24]), struct.unpack_from("!H", raw, 2)[0]]


socks = {}
for name in ("tcp4", "tcp6", "udp4", "udp6"):
    family = socket.AF_INET6 if name.endswith("6") else socket.AF_INET
    kind = socket.SOCK_STREAM if name.startswith("tcp") else socket.SOCK_DGRAM
    s = socket.socket(family, kind)
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
    if kind == socket.SOCK_STREAM:
        s.listen(16)
    socks[s.fileno()] = (name, s)
print(json.dumps({n: s.getsockname()[1] for n, s in socks.values()}), flush=True)
for _ in range(500):
    ready, _, _ = select.select(list(socks), [], [], 60)
    if not ready:
        break
    for fd in ready:
        name, s = socks[fd]
        if name.startswith("tcp"):
            conn, peer = s.accept()
            with conn:
                info = {
                    "orig": original_dst(conn, s.family),
                    "local": list(conn.getsockname()[:2]),
                    "peer": list(peer[:2]),
                }
                conn.sendall(json.dumps(info).encode())
        else:
            data, peer = s.recvfrom(2048)
            s.sendto(b"echo:" + data, peer)
"""

# argv: tcp|udp host port timeout. A connected UDP socket only accepts replies from host:port, so a
# reply proves the NAT was undone on the way back.
CLIENT = r"""
import json, socket, sys

proto, host, port, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
family = socket.AF_INET6 if ":" in host else socket.AF_INET
try:
    if proto == "tcp":
        with socket.create_connection((host, port), timeout=timeout) as s:
            chunks = []
            while chunk := s.recv(4096):
                chunks.append(chunk)
        print(b"".join(chunks).decode())
    else:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.settimeout(timeout)
            s.connect((host, port))
            s.send(b"ping")
            data, source = s.recvfrom(2048)
        print(json.dumps({"reply": data.decode(), "from": list(source[:2])}))
except OSError as e:
    print(json.dumps({"error": type(e).__name__}))
"""


@pytest.fixture
def server(topology: Topology) -> dict[str, int]:
    """Start the stand-in splicer in ``node``; return its ports by name (tcp4, udp6, ...)."""
    _, ports = topology.spawn_json(topology.node, SERVER)
    return ports


def portals_for(
    topology: Topology, ports: dict[str, int], *, node_addresses: bool = True
) -> list[Portal]:
    """TCP and UDP portals for both VIPs, DNATing host traffic to the node's addresses."""
    out = []
    for fam, vip in VIP.items():
        for proto in ("tcp", "udp"):
            host = topology.NODE[fam] if node_addresses or proto == "udp" else None
            out.append(
                Portal(
                    vip=Address.parse(f"[{vip}]:80" if fam == 6 else f"{vip}:80"),
                    protocol=proto,
                    proxy_port=ports[f"{proto}{fam}"],
                    proxy_host_v4=host if fam == 4 else None,
                    proxy_host_v6=host if fam == 6 else None,
                    comment="web",
                )
            )
    return out


def dial(topology: Topology, where: str, proto: str, fam: int) -> dict[str, Any]:
    """Connect (or send) to the VIP from ``where``; the listener's report or the reply."""
    ns = topology.client if where == "client" else topology.node
    result: dict[str, Any] = topology.python(ns, CLIENT, proto, VIP[fam], "80", "5")
    return result


def unreachable(topology: Topology, where: str, proto: str, fam: int) -> bool:
    """Whether the VIP stays silent. Without NAT nobody owns it and the namespaces do not
    forward, so packets are dropped; a short wait keeps the test quick."""
    ns = topology.client if where == "client" else topology.node
    result = topology.python(ns, CLIENT, proto, VIP[fam], "80", "0.5")
    return "error" in result


def l4lb_lines(topology: Topology, fam: int) -> list[str]:
    save = "ip6tables-save" if fam == 6 else "iptables-save"
    out = topology.node.run([save, "-t", "nat"]).stdout
    return [ln for ln in out.splitlines() if "L4LB" in ln and not ln.startswith("#")]


def nat_rules(topology: Topology, fam: int, chain: str) -> list[str]:
    ipt = "ip6tables" if fam == 6 else "iptables"
    out = topology.node.run([ipt, "-w", "5", "-t", "nat", "-S", chain]).stdout
    return [ln for ln in out.splitlines() if ln.startswith("-A ")]


# --------------------------------------------------------------------------- traffic


@pytest.mark.parametrize("fam", [4, 6])
def test_container_chain_redirects_vip_traffic_from_another_host(
    topology: Topology, server: dict[str, int], fam: int
):
    topology.manager().sync(portals_for(topology, server))
    info = dial(topology, "client", "tcp", fam)
    assert info["orig"] == [VIP[fam], 80]
    assert info["local"][1] == server[f"tcp{fam}"]
    assert info["peer"][0] == topology.CLIENT[fam]


@pytest.mark.parametrize("fam", [4, 6])
def test_host_chain_dnats_vip_traffic_from_the_node_to_its_address(
    topology: Topology, server: dict[str, int], fam: int
):
    topology.manager().sync(portals_for(topology, server))
    info = dial(topology, "node", "tcp", fam)
    assert info["orig"] == [VIP[fam], 80]
    assert info["local"] == [topology.NODE[fam], server[f"tcp{fam}"]]


@pytest.mark.parametrize("fam", [4, 6])
@pytest.mark.parametrize("where", ["client", "node"])
def test_udp_replies_come_back_from_the_vip(
    topology: Topology, server: dict[str, int], fam: int, where: str
):
    topology.manager().sync(portals_for(topology, server))
    assert dial(topology, where, "udp", fam) == {"reply": "echo:ping", "from": [VIP[fam], 80]}


@pytest.mark.parametrize("fam", [4, 6])
def test_tcp_portal_without_node_address_redirects_host_traffic(
    topology: Topology, server: dict[str, int], fam: int
):
    topology.manager().sync(portals_for(topology, server, node_addresses=False))
    info = dial(topology, "node", "tcp", fam)
    assert info["orig"] == [VIP[fam], 80]
    assert info["local"] == ["::1" if fam == 6 else "127.0.0.1", server[f"tcp{fam}"]]
    assert "REDIRECT" in nat_rules(topology, fam, HOST_CHAIN)[0]


def test_vip_is_unreachable_before_sync_and_after_cleanup(
    topology: Topology, server: dict[str, int]
):
    mgr = topology.manager()
    assert unreachable(topology, "client", "tcp", 4)
    mgr.sync(portals_for(topology, server))
    assert dial(topology, "client", "tcp", 4)["orig"] == [VIP4, 80]
    mgr.cleanup()
    assert unreachable(topology, "client", "tcp", 4)
    assert unreachable(topology, "node", "udp", 6)


# --------------------------------------------------------------------------- rules


@pytest.mark.parametrize("fam", [4, 6])
def test_iptables_save_shows_exactly_the_rendered_rules(
    topology: Topology, server: dict[str, int], fam: int
):
    ps = portals_for(topology, server)
    topology.manager().sync(ps)
    mine = sorted((p for p in ps if p.family == fam), key=lambda p: p.protocol)
    expected = [
        ":L4LB-PORTALS-CONTAINER - [0:0]",
        ":L4LB-PORTALS-HOST - [0:0]",
        *HOOKS,
        *(container_rule(p) for p in mine),
        *(host_rule(p) for p in mine),
    ]
    assert l4lb_lines(topology, fam) == expected
    # The rendered input and what the kernel holds agree line for line.
    body = [ln for ln in render_restore(ps, fam).splitlines() if ln.startswith("-A ")]
    assert body == expected[4:]


def test_sync_repairs_deleted_hooks_once(topology: Topology, server: dict[str, int]):
    mgr = topology.manager()
    foreign = "-A PREROUTING -p tcp -m tcp --dport 9 -j ACCEPT"
    topology.node.run(["iptables", "-w", "5", "-t", "nat", *foreign.split()])
    ps = portals_for(topology, server)
    mgr.sync(ps)
    hook = ["PREROUTING", "-m", "comment", "--comment", "l4lb portals"]
    for ipt in ("iptables", "ip6tables"):
        topology.node.run([ipt, "-w", "5", "-t", "nat", "-D", *hook, "-j", CONTAINER_CHAIN])
    assert unreachable(topology, "client", "tcp", 4)
    mgr.sync(ps)
    mgr.sync(ps)
    assert nat_rules(topology, 4, "PREROUTING") == [HOOKS[0], foreign]
    assert nat_rules(topology, 6, "PREROUTING") == [HOOKS[0]]
    assert nat_rules(topology, 4, "OUTPUT") == [HOOKS[1]]
    assert dial(topology, "client", "tcp", 4)["orig"] == [VIP4, 80]


def test_stale_rules_of_an_earlier_run_are_replaced(topology: Topology, server: dict[str, int]):
    # An earlier run that crashed left its rules, pointing at a port nobody listens on.
    stale = [
        Portal(Address.parse(f"{VIP4}:80"), "tcp", 9, topology.NODE[4], None, "web"),
        Portal(Address.parse("10.96.231.99:80"), "tcp", 9, topology.NODE[4], None, "gone"),
    ]
    topology.manager().sync(stale)
    topology.manager().sync(portals_for(topology, server))
    assert dial(topology, "client", "tcp", 4)["orig"] == [VIP4, 80]
    assert not [ln for ln in l4lb_lines(topology, 4) if "10.96.231.99" in ln or "ports 9" in ln]
    assert nat_rules(topology, 4, "PREROUTING") == [HOOKS[0]]


def test_foreign_rules_survive_sync_and_cleanup(topology: Topology, server: dict[str, int]):
    node = topology.node
    foreign = [
        "-N FOREIGN-TEST",
        "-A PREROUTING -p tcp -m tcp --dport 9 -m comment --comment foreign -j ACCEPT",
        "-A OUTPUT -d 192.0.2.1/32 -j FOREIGN-TEST",
        "-A FOREIGN-TEST -j RETURN",
    ]
    for rule in foreign:
        node.run(["iptables", "-w", "5", "-t", "nat", *rule.split()])
    node.run(["ip6tables", "-w", "5", "-t", "nat", *foreign[1].split()])

    def foreign_lines() -> tuple[list[str], list[str]]:
        out = []
        for ipt in ("iptables", "ip6tables"):
            lines = node.run([ipt, "-w", "5", "-t", "nat", "-S"]).stdout.splitlines()
            out.append([ln for ln in lines if "L4LB" not in ln and not ln.startswith("-P ")])
        return out[0], out[1]

    before = foreign_lines()
    assert before == (foreign, [foreign[1]])
    mgr = topology.manager()
    mgr.sync(portals_for(topology, server))
    assert foreign_lines() == before
    result = mgr.cleanup()
    assert foreign_lines() == before
    assert result.skipped == []
    assert sorted(result.removed) == sorted(
        [f"IPv{fam}: removed rule {hook}" for fam in (4, 6) for hook in HOOKS]
        + [
            f"IPv{fam}: removed chain {chain} (2 rule(s))"
            for fam in (4, 6)
            for chain in ("L4LB-PORTALS-CONTAINER", "L4LB-PORTALS-HOST")
        ]
    )
    for fam in (4, 6):
        assert l4lb_lines(topology, fam) == []
    assert mgr.cleanup().removed == []


def test_main_cleanup_inside_the_namespace_prints_and_removes_everything(
    topology: Topology, server: dict[str, int]
):
    topology.manager().sync(portals_for(topology, server))
    code = (
        f"import sys; sys.path.insert(0, {str(ROOT)!r}); "
        "from l4lb.portals import main_cleanup; sys.exit(main_cleanup())"
    )
    r = topology.node.run([sys.executable, "-c", code])
    lines = r.stdout.splitlines()
    assert len(lines) == 8
    assert f"IPv4: removed rule {HOOKS[0]}" in lines
    assert "IPv6: removed chain L4LB-PORTALS-HOST (2 rule(s))" in lines
    assert l4lb_lines(topology, 4) == l4lb_lines(topology, 6) == []
    again = topology.node.run([sys.executable, "-c", code])
    assert again.stdout == "nothing to remove\n"


# --------------------------------------------------------------------------- environment


def test_check_available_without_root_says_so(topology: Topology):
    with pytest.raises(PortalError, match=r"IPv4 VIPs need root \(CAP_NET_ADMIN\)"):
        topology.manager(as_user="nobody").check_available()
    topology.manager().check_available()


def test_node_address_finds_the_node_addresses(topology: Topology):
    run = topology.node_runner()
    assert node_address(4, runner=run) == topology.NODE[4]
    assert node_address(6, runner=run) == topology.NODE[6]
