"""PROXY protocol and per-VIP counters behind an iptables REDIRECT, in namespaces.

The node namespace runs the data plane (through the facade) with one service that answers for
an IPv4 and an IPv6 VIP and sends PROXY headers to a recording backend on the node's loopback.
The test installs its own REDIRECT rules in the node (PREROUTING for the client namespace,
OUTPUT for the node itself), so the header's destination must be the VIP the client dialled,
read back with SO_ORIGINAL_DST / IP6T_SO_ORIGINAL_DST, not the listener's address.
"""

from __future__ import annotations

import json
import select
import socket
import struct
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

pytestmark = pytest.mark.root

if TYPE_CHECKING:
    from conftest import Topology

ROOT = Path(__file__).resolve().parents[2]
VIP = {4: "10.96.231.20", 6: "fd00:96::20"}
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"

# argv: send_proxy. Prints {"ports": {family: port}} once serving; on "done" from stdin prints
# {"received": [hex of every backend connection's bytes], "vips": {...}} and exits.
NODE = r"""
import json, socket, sys, threading, tomllib

from l4lb.config import parse_config
from l4lb.dataplane import Dataplane
from l4lb.state import desired_state, plan

backend = socket.socket()
backend.bind(("127.0.0.1", 0))
backend.listen(16)
received = []


def serve():
    while True:
        conn, _ = backend.accept()
        with conn:
            conn.settimeout(10)
            chunks = []
            while data := conn.recv(65536):
                chunks.append(data)
            received.append(b"".join(chunks).hex())
            conn.sendall(b"ok")


threading.Thread(target=serve, daemon=True).start()
text = f'''
[[services]]
name = "web"
vips = ["{sys.argv[2]}:80", "[{sys.argv[3]}]:80"]
send_proxy = "{sys.argv[1]}"
[[services.backends]]
address = "127.0.0.1:{backend.getsockname()[1]}"
'''
dp = Dataplane(workers=2)
dp.start()
try:
    errors = dp.apply(plan({}, desired_state(parse_config(tomllib.loads(text), source="t"))))
    assert errors == {}, errors
    ports = {str(a.family == socket.AF_INET6 and 6 or 4): a.port
             for a in dp.listen_addresses("web")}
    print(json.dumps({"ports": ports}), flush=True)
    sys.stdin.readline()
    print(json.dumps({"received": received, "vips": dp.vip_connections("web")}), flush=True)
finally:
    dp.stop()
"""

# argv: host port payload. Prints the client's own address and what it dialled.
CLIENT = r"""
import json, socket, sys

host, port, payload = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode()
with socket.create_connection((host, port), timeout=10) as s:
    me, peer = s.getsockname()[:2], s.getpeername()[:2]
    s.sendall(payload)
    s.shutdown(socket.SHUT_WR)
    reply = b""
    while data := s.recv(16):
        reply += data
print(json.dumps({"me": list(me), "peer": list(peer), "reply": reply.decode()}))
"""


def _expected(version: str, fam: int, client: tuple[str, int], vip: tuple[str, int]) -> bytes:
    if version == "v1":
        proto = "TCP6" if fam == 6 else "TCP4"
        return f"PROXY {proto} {client[0]} {vip[0]} {client[1]} {vip[1]}\r\n".encode()
    af = socket.AF_INET6 if fam == 6 else socket.AF_INET
    body = socket.inet_pton(af, client[0]) + socket.inet_pton(af, vip[0])
    body += struct.pack("!HH", client[1], vip[1])
    return V2_SIGNATURE + bytes([0x21, 0x21 if fam == 6 else 0x11, 0, len(body)]) + body


def _redirect(topology: Topology, ports: dict[str, int]) -> None:
    for fam, tool in ((4, "iptables"), (6, "ip6tables")):
        match = ["-p", "tcp", "-d", VIP[fam], "--dport", "80"]
        target = ["-j", "REDIRECT", "--to-ports", str(ports[str(fam)])]
        for chain in ("PREROUTING", "OUTPUT"):
            topology.node.run([tool, "-w", "-t", "nat", "-A", chain, *match, *target])


def _start_node(topology: Topology, version: str) -> tuple[subprocess.Popen[str], Any]:
    proc = topology.node.popen(
        [sys.executable, "-c", NODE, version, VIP[4], VIP[6]],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )
    topology.procs.append(proc)
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 20)
    line = proc.stdout.readline() if ready else ""
    assert line, "the data plane in the node did not start"
    return proc, json.loads(line)


def _finish(proc: subprocess.Popen[str]) -> Any:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write("done\n")
    proc.stdin.flush()
    ready, _, _ = select.select([proc.stdout], [], [], 20)
    line = proc.stdout.readline() if ready else ""
    assert line, "no result from the node"
    return json.loads(line)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_header_destination_is_the_vip_behind_redirect(topology: Topology, version: str):
    proc, hello = _start_node(topology, version)
    _redirect(topology, hello["ports"])
    sent = []
    for fam, ns in ((4, topology.client), (6, topology.client), (4, topology.node)):
        payload = f"hello over IPv{fam} from {ns.name}"
        out = topology.python(ns, CLIENT, VIP[fam], "80", payload, timeout=20)
        assert out["reply"] == "ok"
        assert out["peer"] == [VIP[fam], 80]
        sent.append((fam, (out["me"][0], out["me"][1]), payload))
    result = _finish(proc)
    received = sorted(bytes.fromhex(r) for r in result["received"])
    expected = sorted(
        _expected(version, fam, me, (VIP[fam], 80)) + payload.encode() for fam, me, payload in sent
    )
    assert received == expected
    # Clients in the client namespace are seen with their own addresses, not the node's.
    assert sent[0][1][0] == topology.CLIENT[4] and sent[1][1][0] == topology.CLIENT[6]
    assert result["vips"] == {f"{VIP[4]}:80": 2, f"[{VIP[6]}]:80": 1, "other": 0}
