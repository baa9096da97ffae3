"""The real ``l4lb run`` serving VIPs through its own iptables rules, inside namespaces.

``l4lb`` runs in ``node`` with two backend namespaces behind it (see conftest.py); clients
dial the VIPs from ``client`` (PREROUTING -> REDIRECT) and from ``node`` itself (OUTPUT ->
DNAT to the node's address). Every admin query runs inside ``node``, where the admin API
listens on loopback.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import sys
from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest

from l4lb._testbase import L4lbProcess, wait_for

if TYPE_CHECKING:
    from conftest import Backend, Topology

pytestmark = pytest.mark.root

WEB4, WEB6 = "10.96.231.10", "fd00:96::10"
DNS4, DNS6 = "10.96.231.53", "fd00:96::53"
WEB = {4: WEB4, 6: WEB6}
DNS = {4: DNS4, 6: DNS6}
IDLE = 0.5  # udp_idle_timeout of the dns service, seconds

# argv: host port count; prints the names the connections read, in order.
TCP_CLIENT = r"""
import json, socket, sys
host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
family = socket.AF_INET6 if ":" in host else socket.AF_INET
names = []
for _ in range(count):
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect((host, port))
        data = b""
        while chunk := s.recv(256):
            data += chunk
        names.append(data.decode())
print(json.dumps(names))
"""

# argv: host port sockets tries wait mode; one query per socket, resent up to ``tries``
# times, ``wait`` seconds apart; mode "par" asks from all sockets at once, "seq" one socket
# after the other. Prints, per socket, [reply, source address] or null if it got none.
UDP_CLIENT = r"""
import json, select, socket, sys, time
host, port, n, tries = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
wait, mode = float(sys.argv[5]), sys.argv[6]
family = socket.AF_INET6 if ":" in host else socket.AF_INET
socks = [socket.socket(family, socket.SOCK_DGRAM) for _ in range(n)]
answers = [None] * n

def ask(indexes):
    waiting = {}
    for i in indexes:
        socks[i].sendto(f"q{i}".encode(), (host, port))
        waiting[socks[i]] = i
    deadline = time.monotonic() + wait
    while waiting and time.monotonic() < deadline:
        ready, _, _ = select.select(list(waiting), [], [], 0.1)
        for s in ready:
            data, source = s.recvfrom(2048)
            answers[waiting.pop(s)] = [data.decode(), list(source[:2])]

groups = [range(n)] if mode == "par" else [[i] for i in range(n)]
for group in groups:
    for attempt in range(tries):
        ask([i for i in group if answers[i] is None])
        if all(answers[i] is not None for i in group):
            break
print(json.dumps(answers))
"""

# argv: host port, then a list of "send" / "sleep:<seconds>" steps on ONE socket.
UDP_SESSION = r"""
import json, socket, sys, time
host, port = sys.argv[1], int(sys.argv[2])
family = socket.AF_INET6 if ":" in host else socket.AF_INET
s = socket.socket(family, socket.SOCK_DGRAM)
s.settimeout(2)
out = []
for i, step in enumerate(sys.argv[3:]):
    if step.startswith("sleep:"):
        time.sleep(float(step[6:]))
        continue
    s.sendto(f"s{i}".encode(), (host, port))
    out.append(s.recvfrom(2048)[0].decode().split(":")[0])
print(json.dumps({"names": out, "port": s.getsockname()[1]}))
"""

ADMIN_GET = r"""
import sys, urllib.request
with urllib.request.urlopen(f"http://{sys.argv[1]}{sys.argv[2]}", timeout=5) as r:
    sys.stdout.write(r.read().decode())
"""


def config(backends: list[Backend], **dns: Any) -> dict[str, Any]:
    """A TCP service and a UDP service, each on an IPv4 and an IPv6 VIP, both rr."""
    return {
        "admin": {"listen": "127.0.0.1:0"},
        "dataplane": {"workers": 2},
        "services": [
            {
                "name": "web",
                "vips": [f"{WEB4}:80", f"[{WEB6}]:80"],
                "scheduler": "rr",
                "backends": [{"address": f"{b.address}:{b.tcp}"} for b in backends],
            },
            {
                "name": "dns",
                "protocol": "udp",
                "vips": [f"{DNS4}:53", f"[{DNS6}]:53"],
                "scheduler": "rr",
                "udp_idle_timeout": IDLE,
                "backends": [{"address": f"{b.address}:{b.udp}"} for b in backends],
                **dns,
            },
        ],
    }


class Node:
    """Helpers bound to one topology: run l4lb and clients, read rules and the admin API."""

    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        self.procs: list[L4lbProcess] = []

    def l4lb(self, cfg: dict[str, Any], *, prefix: tuple[str, ...] = ()) -> L4lbProcess:
        """Start ``python -m l4lb run`` inside ``node`` (after ``prefix``, e.g. setpriv)."""
        cmd = [*self.topology.node.exec_prefix, *prefix, sys.executable, "-m", "l4lb"]
        p = L4lbProcess(cfg, command=cmd)
        self.procs.append(p)
        return p.start()

    def tcp(self, where: str, host: str, count: int, port: int = 80) -> list[str]:
        ns = self.topology.client if where == "client" else self.topology.node
        names: list[str] = self.topology.python(ns, TCP_CLIENT, host, str(port), str(count))
        return names

    def udp(
        self,
        where: str,
        host: str,
        sockets: int,
        *,
        tries: int = 1,
        wait: float = 1.0,
        sequential: bool = False,
    ) -> list[Any]:
        """Answers to one query from each of ``sockets`` client sockets (see UDP_CLIENT)."""
        ns = self.topology.client if where == "client" else self.topology.node
        mode = "seq" if sequential else "par"
        args = (host, "53", str(sockets), str(tries), str(wait), mode)
        answers: list[Any] = self.topology.python(ns, UDP_CLIENT, *args, timeout=30)
        return answers

    def session(self, host: str, *steps: str) -> dict[str, Any]:
        out: dict[str, Any] = self.topology.python(
            self.topology.client, UDP_SESSION, host, "53", *steps, timeout=30
        )
        return out

    def admin(self, p: L4lbProcess, path: str) -> Any:
        r = self.topology.node.run([sys.executable, "-c", ADMIN_GET, p.ready["admin"], path])
        return json.loads(r.stdout)

    def owned(self, fam: int) -> list[str]:
        """l4lb's lines of ``iptables-save -t nat``, in the order it prints them."""
        save = "ip6tables-save" if fam == 6 else "iptables-save"
        out = self.topology.node.run([save, "-t", "nat"]).stdout
        return [ln for ln in out.splitlines() if "L4LB-PORTALS" in ln]

    def rules(self, fam: int) -> list[str]:
        """Every rule of the nat table (``iptables -S``), l4lb's and foreign ones."""
        ipt = "ip6tables" if fam == 6 else "iptables"
        out = self.topology.node.run([ipt, "-w", "5", "-t", "nat", "-S"]).stdout
        return out.splitlines()


@pytest.fixture
def node(topology: Topology) -> Iterator[Node]:
    n = Node(topology)
    yield n
    for p in n.procs:
        p.close()
        assert "Traceback" not in p.stderr_text(), p.stderr_text()


def proxy_port(p: L4lbProcess, service: str, fam: int) -> int:
    """The port of ``service``'s wildcard listener of ``fam``, from the ready file."""
    wildcard = "[::]" if fam == 6 else "0.0.0.0"
    for addr in p.ready["listeners"][service]:
        host, _, port = addr.rpartition(":")
        if host == wildcard:
            return int(port)
    raise AssertionError(f"no {wildcard} listener for {service}: {p.ready['listeners']}")


def expected_rules(topology: Topology, p: L4lbProcess, fam: int) -> list[str]:
    """What ``iptables-save -t nat`` must show of l4lb's chains, written out by hand."""
    plen, node = (128, topology.NODE[6]) if fam == 6 else (32, topology.NODE[4])
    target = f"[{node}]" if fam == 6 else node
    rules = {
        chain: [
            f"-A L4LB-PORTALS-{chain} -d {vip}/{plen} -p {proto} -m {proto} --dport {port} "
            f'-m comment --comment "l4lb {name}" -j '
            + (
                f"REDIRECT --to-ports {proxy_port(p, name, fam)}"
                if chain == "CONTAINER"
                else f"DNAT --to-destination {target}:{proxy_port(p, name, fam)}"
            )
            # Sorted by VIP: web (.10) before dns (.53).
            for vip, proto, port, name in (
                (WEB[fam], "tcp", 80, "web"),
                (DNS[fam], "udp", 53, "dns"),
            )
        ]
        for chain in ("CONTAINER", "HOST")
    }
    return [
        ":L4LB-PORTALS-CONTAINER - [0:0]",
        ":L4LB-PORTALS-HOST - [0:0]",
        '-A PREROUTING -m comment --comment "l4lb portals" -j L4LB-PORTALS-CONTAINER',
        '-A OUTPUT -m comment --comment "l4lb portals" -j L4LB-PORTALS-HOST',
        *rules["CONTAINER"],
        *rules["HOST"],
    ]


# --------------------------------------------------------------------------- TCP


@pytest.mark.parametrize("fam", [4, 6])
def test_tcp_vip_from_the_client_is_balanced_round_robin(
    node: Node, backends: list[Backend], fam: int
):
    p = node.l4lb(config(backends))
    names = node.tcp("client", WEB[fam], 20)
    assert Counter(names) == {"b0": 10, "b1": 10}
    assert node.admin(p, "/api/v1/services/web")["total"] == 20


@pytest.mark.parametrize("fam", [4, 6])
def test_node_reaches_its_own_vips(node: Node, backends: list[Backend], fam: int):
    node.l4lb(config(backends))
    assert Counter(node.tcp("node", WEB[fam], 4)) == {"b0": 2, "b1": 2}
    answers = node.udp("node", DNS[fam], 4)
    assert [a[0].partition(":")[2] for a in answers] == ["q0", "q1", "q2", "q3"]
    assert Counter(a[0].partition(":")[0] for a in answers) == {"b0": 2, "b1": 2}
    assert all(a[1] == [DNS[fam], 53] for a in answers)


def test_service_doc_and_ready_file_show_vips_and_listeners(node: Node, backends: list[Backend]):
    p = node.l4lb(config(backends))
    doc = node.admin(p, "/api/v1/services/dns")
    assert doc["vips"] == [f"{DNS4}:53", f"[{DNS6}]:53"]
    assert doc["listeners"] == p.ready["listeners"]["dns"]
    assert [a.rpartition(":")[0] for a in doc["listeners"]] == ["0.0.0.0", "[::]"]
    assert doc["listen"] == doc["listeners"][0]
    assert p.ready["vips"]["web"] == [f"{WEB4}:80", f"[{WEB6}]:80"]


# --------------------------------------------------------------------------- UDP


@pytest.mark.parametrize("fam", [4, 6])
def test_udp_answers_from_200_client_ports_each_reach_their_client(
    node: Node, backends: list[Backend], fam: int
):
    node.l4lb(config(backends))
    answers = node.udp("client", DNS[fam], 200, tries=3)
    assert None not in answers
    for i, (reply, source) in enumerate(answers):
        query = reply.partition(":")[2]
        assert query == f"q{i}"  # this socket's own question came back to it
        assert source == [DNS[fam], 53]
    assert Counter(a[0].partition(":")[0] for a in answers) == {"b0": 100, "b1": 100}


def test_udp_flow_expires_after_the_idle_timeout(node: Node, backends: list[Backend]):
    p = node.l4lb(config(backends))
    # Within the timeout one client address keeps its backend.
    first = node.session(DNS4, "send", f"sleep:{IDLE / 4}", "send", f"sleep:{IDLE / 4}", "send")
    assert len(set(first["names"])) == 1
    # Wait until the data plane has expired that flow (bounded poll), then the same client
    # port starts a new flow, which rr gives to the other backend.
    wait_for(
        lambda: node.admin(p, "/api/v1/services/dns")["active"] == 0,
        IDLE + 5,
        interval=0.1,
        message="the UDP flow to expire",
    )
    second = node.session(DNS4, "send")
    assert second["names"] != first["names"][:1]
    assert set(first["names"]) | set(second["names"]) == {"b0", "b1"}


def test_udp_backend_going_away_new_flows_fail_over_on_icmp_refused(
    node: Node, topology: Topology, backends: list[Backend]
):
    # The kernel rate-limits the ICMP errors it sends to one host (a burst of 6, then 1/s);
    # lifted here so that every datagram to the dead backend draws its port unreachable.
    backends[1].ns.run(["sysctl", "-qw", "net.ipv4.icmp_ratelimit=0"])
    p = node.l4lb(config(backends))
    assert {a[0].partition(":")[0] for a in node.udp("client", DNS4, 4)} == {"b0", "b1"}
    backends[1].stop()
    # Every new flow that rr sends to b1 draws ICMP port unreachable, which ends the flow;
    # the client's retry is a new flow, which rr sends to b0: every client gets an answer.
    answers = node.udp("client", DNS4, 10, tries=2, wait=0.3, sequential=True)
    assert None not in answers
    assert {a[0].partition(":")[0] for a in answers} == {"b0"}
    doc = node.admin(p, "/api/v1/services/dns")
    b1 = next(b for b in doc["backends"] if b["address"].startswith(backends[1].address))
    assert b1["connect_errors"] >= 5


def test_udp_backend_going_away_is_taken_out_by_its_health_check(
    node: Node, backends: list[Backend]
):
    health = {"kind": "tcp", "port": backends[0].tcp, "interval": 0.2, "timeout": 0.1}
    health |= {"rise": 1, "fall": 2}
    p = node.l4lb(config(backends, health=health))
    backends[1].stop()
    b1 = backends[1].address

    def b1_down() -> bool:
        # Down as programmed (weight 0), not just as judged: programming follows a health
        # transition after a short coalescing delay.
        doc = node.admin(p, "/api/v1/services/dns")
        b = next(b for b in doc["backends"] if b["address"].startswith(b1))
        return not b["up"] and b["effective_weight"] == 0

    wait_for(b1_down, 10, interval=0.1, message="b1 to be down")
    # No new flow goes to the dead backend any more: one try each suffices.
    answers = node.udp("client", DNS4, 50)
    assert None not in answers, json.dumps(node.admin(p, "/api/v1/services/dns"))
    assert {a[0].partition(":")[0] for a in answers} == {"b0"}


# --------------------------------------------------------------------------- rules


FOREIGN = {
    4: [
        "-A PREROUTING -p tcp -m tcp --dport 9 -m comment --comment foreign -j ACCEPT",
        "-A OUTPUT -d 192.0.2.1/32 -p udp -j ACCEPT",
    ],
    6: ["-A PREROUTING -p tcp -m tcp --dport 9 -m comment --comment foreign -j ACCEPT"],
}


def foreign(node: Node, fam: int) -> list[str]:
    return [ln for ln in node.rules(fam) if "L4LB" not in ln and not ln.startswith("-P ")]


def test_rules_lifecycle_start_sigterm_kill_restart_cleanup(
    node: Node, topology: Topology, backends: list[Backend]
):
    for fam, rules in FOREIGN.items():
        ipt = "ip6tables" if fam == 6 else "iptables"
        for rule in rules:
            topology.node.run([ipt, "-w", "5", "-t", "nat", *rule.split()])
    # Start: exactly the expected rules, the foreign ones untouched.
    p = node.l4lb(config(backends))
    for fam in (4, 6):
        assert node.owned(fam) == expected_rules(topology, p, fam)
        assert foreign(node, fam) == FOREIGN[fam]
    # SIGTERM: l4lb's rules are gone, the foreign ones stay.
    assert p.stop() == 0
    for fam in (4, 6):
        assert node.owned(fam) == []
        assert foreign(node, fam) == FOREIGN[fam]
    # kill -9 leaves the rules behind; a restart rebuilds them once, for its new ports.
    p = node.l4lb(config(backends))
    os.kill(p.pid, signal.SIGKILL)
    p.stop()
    assert node.owned(4) == expected_rules(topology, p, 4)
    again = node.l4lb(config(backends))
    for fam in (4, 6):
        assert node.owned(fam) == expected_rules(topology, again, fam)
        assert foreign(node, fam) == FOREIGN[fam]
    assert Counter(node.tcp("client", WEB4, 2)) == {"b0": 1, "b1": 1}
    # `l4lb cleanup` removes everything l4lb installed, and nothing else.
    os.kill(again.pid, signal.SIGKILL)
    again.stop()
    r = topology.node.run([sys.executable, "-m", "l4lb", "cleanup"], check=False)
    assert r.returncode == 0, r.stderr
    assert "IPv4: removed chain L4LB-PORTALS-CONTAINER (2 rule(s))" in r.stdout
    assert "IPv6: removed rule " + expected_rules(topology, again, 6)[2] in r.stdout
    for fam in (4, 6):
        assert node.owned(fam) == []
        assert foreign(node, fam) == FOREIGN[fam]


def test_reload_resyncs_the_rules(node: Node, topology: Topology, backends: list[Backend]):
    cfg = config(backends)
    p = node.l4lb(cfg)
    port = proxy_port(p, "web", 4)
    cfg["services"][0]["vips"].append("10.96.231.11:80")
    del cfg["services"][1]  # dns goes, and its rules with it
    p.reload(cfg, wait=False)  # the admin API is only reachable inside node

    def shown() -> list[str]:
        return [ln for ln in node.owned(4) if " -d " in ln]

    def vips() -> list[str]:
        return [ln.split()[3] for ln in shown()]

    want = ["10.96.231.10/32", "10.96.231.11/32"] * 2
    wait_for(lambda: vips() == want, 10, interval=0.05, message="rules of the new VIP")
    assert Counter(node.tcp("client", "10.96.231.11", 2)) == {"b0": 1, "b1": 1}
    # The listener stayed: every rule still points at the same port.
    assert all(ln.endswith(f":{port}") or ln.endswith(f" {port}") for ln in shown())
    wait_for(lambda: "dns" not in p._current_ready()["services"], 5, message="ready file")
    assert p.ready["vips"] == {"web": [f"{WEB4}:80", f"[{WEB6}]:80", "10.96.231.11:80"]}


def test_deleted_hooks_and_chains_are_repaired(
    node: Node, topology: Topology, backends: list[Backend]
):
    cfg = config(backends)
    node.l4lb(cfg)
    before = node.owned(4)
    hook = shlex.split(before[2])[1:]  # -A PREROUTING ... -> PREROUTING ...
    topology.node.run(["iptables", "-w", "5", "-t", "nat", "-D", *hook])
    topology.node.run(["iptables", "-w", "5", "-t", "nat", "-F", "L4LB-PORTALS-HOST"])
    assert node.owned(4) != before
    # The repair check runs every 10 s.
    wait_for(lambda: node.owned(4) == before, 25, interval=0.2, message="rules repaired")
    assert Counter(node.tcp("client", WEB4, 2)) == {"b0": 1, "b1": 1}


# --------------------------------------------------------------------------- no iptables


# Root without CAP_NET_ADMIN: iptables refuses to touch the nat table.
NO_NET_ADMIN = ("setpriv", "--inh-caps=-net_admin", "--bounding-set=-net_admin", "--")
# A private mount namespace where /usr/sbin (and so /sbin) is empty: no iptables binaries.
NO_IPTABLES = ("unshare", "-m", "--", "sh", "-c", 'mount -t tmpfs none /usr/sbin && exec "$@"', "-")


@pytest.mark.parametrize(
    ("prefix", "why"),
    [
        (NO_NET_ADMIN, "IPv4 VIPs need root (CAP_NET_ADMIN)"),
        (NO_IPTABLES, "IPv4 VIPs need iptables, which was not found (install iptables)"),
    ],
    ids=["no-net-admin", "no-iptables"],
)
def test_vip_service_that_cannot_have_rules_fails_clearly_plain_service_runs(
    node: Node, backends: list[Backend], prefix: tuple[str, ...], why: str
):
    cfg = config(backends)
    cfg["services"].append(
        {
            "name": "plain",
            "listen": "10.231.0.2:0",
            "scheduler": "rr",
            "backends": [{"address": f"{b.address}:{b.tcp}"} for b in backends],
        }
    )
    p = node.l4lb(cfg, prefix=prefix)
    snap = node.admin(p, "/api/v1/services")
    assert [s["name"] for s in snap["services"]] == ["plain"]
    for name in ("web", "dns"):
        assert f"service {name}: VIPs cannot be served: {why}" in p.stderr_text()
    port = int(p.service_address("plain").rpartition(":")[2])
    assert Counter(node.tcp("client", "10.231.0.2", 2, port=port)) == {"b0": 1, "b1": 1}
    assert node.owned(4) == node.owned(6) == []
    # Clean shutdown with nothing installed is quiet.
    assert p.stop() == 0
    assert "portal rules:" not in p.stderr_text()
