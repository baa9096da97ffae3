"""The real ``l4lb kube-proxy`` end to end, inside namespaces the test creates.

The API-server double runs as a process in ``node`` on node-local loopback (driven through
its stdin, see tests/k8s/apiserver_main.py); ``l4lb kube-proxy`` runs in ``node`` with a
generated kubeconfig, two backend namespaces behind it (see conftest.py), and clients dial
from ``client``. Objects are shaped like ``kubectl get -o json`` output.
"""

from __future__ import annotations

import json
import select
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "k8s"))

from k8s_objects import endpoint_slice, node, service

if TYPE_CHECKING:
    from conftest import Backend, Topology

pytestmark = pytest.mark.root

ROOT = Path(__file__).resolve().parents[2]
DOUBLE = ROOT / "tests" / "k8s" / "apiserver_main.py"
NODE_NAME = "node-a"
WEB_IP = "10.96.40.10"
EXTERNAL_IP = "10.96.41.7"
NODE_PORT = 30080

# argv: host port count; prints, per connection, what it read or "error: ..." if it failed.
TCP_CLIENT = r"""
import json, socket, sys
host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
out = []
for _ in range(count):
    try:
        with socket.create_connection((host, port), timeout=2) as s:
            data = b""
            while chunk := s.recv(256):
                data += chunk
            out.append(data.decode() or "error: empty")
    except OSError as e:
        out.append(f"error: {type(e).__name__}")
print(json.dumps(out))
"""

HTTP_GET = r"""
import json, sys, urllib.error, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1], timeout=5) as r:
        print(json.dumps([r.status, r.read().decode()]))
except urllib.error.HTTPError as e:
    print(json.dumps([e.code, e.read().decode()]))
"""


def wait_until(cond: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


class Cluster:
    """The API-server double inside ``node``, plus the kube-proxy that watches it."""

    def __init__(self, topology: Topology, workdir: Path) -> None:
        self.topology = topology
        self.kubeconfig = workdir / "kubeconfig"
        self.stderr = workdir / "kube-proxy.log"
        self.api = topology.node.popen(
            [sys.executable, str(DOUBLE), str(self.kubeconfig)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=ROOT,
        )
        topology.procs.append(self.api)
        self._reply()
        self.proxy: subprocess.Popen[str] | None = None

    def _reply(self) -> dict[str, Any]:
        assert self.api.stdout is not None
        ready, _, _ = select.select([self.api.stdout], [], [], 10)
        line = self.api.stdout.readline() if ready else ""
        assert line, "the API-server double did not answer"
        reply: dict[str, Any] = json.loads(line)
        assert "error" not in reply, reply["error"]
        return reply

    def _send(self, **cmd: Any) -> None:
        assert self.api.stdin is not None
        self.api.stdin.write(json.dumps(cmd) + "\n")
        self.api.stdin.flush()
        self._reply()

    def add(self, kind: str, obj: dict[str, Any]) -> None:
        self._send(op="add", kind=kind, object=obj)

    def delete(self, kind: str, key: str) -> None:
        self._send(op="delete", kind=kind, key=key)

    def start_proxy(self, *args: str) -> None:
        argv = [
            sys.executable,
            "-m",
            "l4lb",
            "kube-proxy",
            f"--kubeconfig={self.kubeconfig}",
            f"--hostname-override={NODE_NAME}",
            "--workers=2",
            *args,
        ]
        with self.stderr.open("w") as err:
            self.proxy = self.topology.node.popen(argv, stdout=err, stderr=err, cwd=ROOT)
        self.topology.procs.append(self.proxy)
        wait_until(lambda: self.get("http://127.0.0.1:10256/livez")[0] == 200, "livez")

    def stop_proxy(self) -> int:
        assert self.proxy is not None
        self.proxy.send_signal(signal.SIGTERM)
        return self.proxy.wait(timeout=30)

    def log(self) -> str:
        return self.stderr.read_text()

    def get(self, url: str) -> tuple[int, str]:
        r = self.topology.node.run([sys.executable, "-c", HTTP_GET, url], check=False)
        if r.returncode != 0:
            return (0, r.stderr)
        status, body = json.loads(r.stdout)
        return status, body

    def tcp(self, host: str, port: int, count: int) -> list[str]:
        names: list[str] = self.topology.python(
            self.topology.client, TCP_CLIENT, host, str(port), str(count), timeout=60
        )
        return names


@pytest.fixture
def cluster(topology: Topology, backends: list[Backend], tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(topology, tmp_path)
    c._send(op="node", name=NODE_NAME, object=node(NODE_NAME, ["10.231.0.2"], zone="z1"))
    yield c
    if c.proxy is not None and c.proxy.poll() is None:
        assert c.stop_proxy() == 0, c.log()
    assert "Traceback" not in (c.log() if c.stderr.exists() else ""), c.log()


def web(backends: list[Backend], **kw: Any) -> dict[str, Any]:
    return service(
        "web", WEB_IP, [{"name": "http", "port": 80, "targetPort": backends[0].tcp}], **kw
    )


def web_slice(backends: list[Backend], *conditions: dict[str, Any]) -> dict[str, Any]:
    eps = [{"ip": b.address, **c} for b, c in zip(backends, conditions, strict=False)]
    return endpoint_slice("web", eps, [{"name": "http", "port": backends[0].tcp}])


def test_cluster_ip_follows_the_endpoint_slice(cluster: Cluster, backends: list[Backend]) -> None:
    b0, b1 = (b.name for b in backends)
    cluster.add("Service", web(backends))
    cluster.add("EndpointSlice", web_slice(backends, {}))
    cluster.start_proxy()
    wait_until(lambda: cluster.tcp(WEB_IP, 80, 1) == [b0], "the ClusterIP answers")
    assert set(cluster.tcp(WEB_IP, 80, 6)) == {b0}

    # Scale up: rr spreads over both.
    cluster.add("EndpointSlice", web_slice(backends, {}, {}))
    wait_until(lambda: set(cluster.tcp(WEB_IP, 80, 4)) == {b0, b1}, "scale up")
    assert Counter(cluster.tcp(WEB_IP, 80, 8)) == {b0: 4, b1: 4}

    # b0 not ready: only b1.
    cluster.add("EndpointSlice", web_slice(backends, {"ready": False}, {}))
    wait_until(lambda: set(cluster.tcp(WEB_IP, 80, 4)) == {b1}, "not ready")

    # Both terminating, b1 still serving: kube-proxy's fallback keeps b1.
    terminating = {"ready": False, "terminating": True}
    cluster.add(
        "EndpointSlice",
        web_slice(backends, {**terminating, "serving": False}, {**terminating, "serving": True}),
    )
    time.sleep(0.5)
    assert set(cluster.tcp(WEB_IP, 80, 4)) == {b1}

    # Metrics and proxy mode on the metrics address, healthz healthy.
    status, text = cluster.get("http://127.0.0.1:10249/metrics")
    assert status == 200 and "kubeproxy_network_programming_duration_seconds_count" in text
    assert cluster.get("http://127.0.0.1:10249/proxyMode") == (200, "userspace")
    status, body = cluster.get("http://127.0.0.1:10256/healthz")
    assert status == 200 and json.loads(body)["nodeEligible"] is True

    # Deleting the Service takes its VIP away.
    cluster.delete("Service", "default/web")
    wait_until(lambda: cluster.tcp(WEB_IP, 80, 1)[0].startswith("error"), "service deleted")
    assert cluster.stop_proxy() == 0


def test_node_port_external_ip_and_affinity(cluster: Cluster, backends: list[Backend]) -> None:
    names = {b.name for b in backends}
    svc = web(
        backends,
        type_="NodePort",
        external_ips=[EXTERNAL_IP],
        affinity_timeout=600,
    )
    svc["spec"]["ports"][0]["nodePort"] = NODE_PORT
    cluster.add("Service", svc)
    cluster.add("EndpointSlice", web_slice(backends, {}, {}))
    cluster.start_proxy()
    node_ip = cluster.topology.NODE[4]
    for host, port in ((WEB_IP, 80), (EXTERNAL_IP, 80), (node_ip, NODE_PORT)):
        wait_until(lambda h=host, p=port: cluster.tcp(h, p, 1)[0] in names, f"{host}:{port}")
        # ClientIP affinity: one client, one backend, whatever the address it dials.
        got = cluster.tcp(host, port, 6)
        assert len(set(got)) == 1 and got[0] in names, got
    # The node port is held by a real listening socket in the node.
    ss = cluster.topology.node.run(["ss", "-Htln", f"sport = :{NODE_PORT}"]).stdout
    assert f":{NODE_PORT}" in ss

    # Without affinity the same client is spread over both backends.
    plain = web(backends, type_="NodePort", external_ips=[EXTERNAL_IP])
    plain["spec"]["ports"][0]["nodePort"] = NODE_PORT
    cluster.add("Service", plain)
    wait_until(lambda: set(cluster.tcp(node_ip, NODE_PORT, 4)) == names, "affinity off")


def test_cleanup_removes_what_a_killed_proxy_left(
    cluster: Cluster, backends: list[Backend]
) -> None:
    cluster.add("Service", web(backends))
    cluster.add("EndpointSlice", web_slice(backends, {}))
    cluster.start_proxy()
    wait_until(lambda: cluster.tcp(WEB_IP, 80, 1) == [backends[0].name], "serving")
    assert cluster.proxy is not None
    cluster.proxy.kill()  # no chance to remove its rules
    cluster.proxy.wait(timeout=10)

    def owned() -> list[str]:
        out = cluster.topology.node.run(["iptables-save", "-t", "nat"]).stdout
        return [ln for ln in out.splitlines() if "L4LB" in ln]

    assert owned()
    r = cluster.topology.node.run(
        [sys.executable, "-m", "l4lb", "kube-proxy", "--cleanup"], check=False, timeout=30
    )
    assert r.returncode == 0, r.stderr
    assert "removed" in r.stdout
    assert owned() == []
