"""The kube-proxy control loop against the API-server double over real HTTP: the official
client with a generated kubeconfig, Discovery, node facts from the Node object, and the
Reconciler producing Configs; the data plane is replaced by a recorder of applied Configs."""

from __future__ import annotations

import asyncio
import copy
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from k8s_apiserver import FakeApiServer
from k8s_objects import endpoint_slice, node, service

from l4lb.config import Config
from l4lb.k8s.client import KubeClient, load_api_client
from l4lb.k8s.healthz import ProxyHealth, ProxyMetrics
from l4lb.k8s.options import KubeProxyOptions
from l4lb.k8s.proxy import NodeFacts, Reconciler, TimedSignal, make_api_client
from l4lb.k8s.reconcile import BuildSettings
from l4lb.k8s.watcher import Backoff, Discovery

FAST = Backoff(initial=0.02, factor=2.0, cap=0.2, jitter=0.5)
PORTS = [{"name": "http", "port": 80, "targetPort": 8080}]
SLICE_PORTS = [{"name": "http", "port": 8080}]


async def eventually(cond: Callable[[], bool], what: str, *, timeout: float = 15.0) -> None:
    for _ in range(int(timeout / 0.01)):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


class Proxy:
    """Discovery + NodeFacts + Reconciler on the test's loop, recording applied Configs."""

    def __init__(self, server: FakeApiServer, kubeconfig: Path, node_name: str = "node-a") -> None:
        self.api = make_api_client(KubeProxyOptions(kubeconfig=str(kubeconfig)))
        self.applied: list[Config] = []
        self.health = ProxyHealth(30.0)
        self.metrics = ProxyMetrics()
        self.signal = TimedSignal(on_notify=self.health.queued)
        client = KubeClient(self.api, connect_timeout=2.0, read_timeout=10.0)
        self.discovery = Discovery(
            client, backoff=copy.copy(FAST), watch_timeout=30, changed=self.signal
        )
        self.facts = NodeFacts(
            self.api, node_name, "0.0.0.0", self.signal, refresh=0.2, backoff=copy.copy(FAST)
        )
        self.reconciler = Reconciler(
            self.discovery,
            self.signal,
            self.applied.append,
            node=lambda: self.facts.info,
            settings=BuildSettings(),
            health=self.health,
            metrics=self.metrics,
        )
        self.tasks: list[asyncio.Task[None]] = []

    def services(self) -> dict[str, Any]:
        if not self.applied:
            return {}
        return {s.name: s for s in self.applied[-1].services}

    def backends(self, name: str) -> list[str]:
        svc = self.services().get(name)
        return [] if svc is None else sorted(str(b.address) for b in svc.backends)

    async def __aenter__(self) -> Proxy:
        for coro in (self.discovery.run(), self.facts.run(), self.reconciler.run()):
            self.tasks.append(asyncio.create_task(coro))
        return self

    async def __aexit__(self, *exc: object) -> None:
        for t in self.tasks:
            t.cancel()
        for t in self.tasks:
            with pytest.raises(asyncio.CancelledError):
                await t
        self.api.close()


@pytest.fixture
async def server() -> AsyncIterator[FakeApiServer]:
    srv = FakeApiServer()
    srv.nodes["node-a"] = node("node-a", ["10.0.0.5"], zone="zone-a")
    await srv.start()
    yield srv
    await srv.stop()


@pytest.fixture
def kubeconfig(server: FakeApiServer, tmp_path: Path) -> Path:
    return server.write_kubeconfig(tmp_path / "kubeconfig")


def sample(metrics: ProxyMetrics, name: str) -> float:
    value = metrics.registry.get_sample_value(name)
    return 0.0 if value is None else value


async def test_changes_flow_into_configs(server: FakeApiServer, kubeconfig: Path) -> None:
    server.add("Service", service("web", "10.96.0.10", PORTS))
    sl = endpoint_slice("web", [{"ip": "10.244.1.2"}, {"ip": "10.244.1.3"}], SLICE_PORTS)
    server.add("EndpointSlice", sl)
    name = "default_web_http_tcp"
    async with Proxy(server, kubeconfig) as p:
        await eventually(lambda: p.backends(name) == ["10.244.1.2:8080", "10.244.1.3:8080"], "sync")
        assert p.health.healthy() and p.health.last_updated is not None
        # A change that alters no l4lb setting is not programmed; a periodic pass is.
        applied, syncs = len(p.applied), p.reconciler.syncs
        labelled = service("web", "10.96.0.10", PORTS)
        labelled["metadata"]["labels"] = {"team": "a"}
        server.add("Service", labelled)
        await eventually(lambda: p.reconciler.syncs > syncs, "label sync")
        assert len(p.applied) == applied
        p.reconciler.sync(None)
        assert len(p.applied) == applied + 1
        # Scale up.
        sl["endpoints"].append(endpoint_slice("web", [{"ip": "10.244.1.4"}], [])["endpoints"][0])
        server.add("EndpointSlice", sl)
        await eventually(lambda: len(p.backends(name)) == 3, "scale up")
        # Not ready: dropped.
        sl["endpoints"][0]["conditions"] = {"ready": False, "serving": False, "terminating": False}
        server.add("EndpointSlice", sl)
        await eventually(lambda: "10.244.1.2:8080" not in p.backends(name), "not ready")
        # All terminating but serving: kube-proxy's fallback keeps them.
        for ep in sl["endpoints"]:
            ep["conditions"] = {"ready": False, "serving": True, "terminating": True}
        server.add("EndpointSlice", sl)
        await eventually(lambda: len(p.backends(name)) == 3, "terminating fallback")
        # Delete the service.
        server.delete("Service", "default/web")
        await eventually(lambda: name not in p.services(), "delete")
        assert p.applied[-1].services == ()
    assert sample(p.metrics, "kubeproxy_network_programming_duration_seconds_count") >= 5
    assert sample(p.metrics, "kubeproxy_sync_proxy_rules_duration_seconds_count") >= 5
    # Requests were authenticated with the kubeconfig's token; the Node was read by name.
    assert {r.kind for r in server.requests} == {"Service", "EndpointSlice", "Node"}
    assert all(r.authorization == "Bearer l4lb-test-token" for r in server.requests)


async def test_node_facts_drive_local_policy_and_zone(
    server: FakeApiServer, kubeconfig: Path
) -> None:
    server.add(
        "Service",
        service(
            "web",
            "10.96.0.10",
            [{**PORTS[0], "nodePort": 30080}],
            type_="NodePort",
            internalTrafficPolicy="Local",
        ),
    )
    server.add(
        "EndpointSlice",
        endpoint_slice(
            "web",
            [{"ip": "10.244.1.2", "node": "node-a"}, {"ip": "10.244.2.2", "node": "node-b"}],
            SLICE_PORTS,
        ),
    )
    async with Proxy(server, kubeconfig) as p:
        await eventually(lambda: p.facts.info.zone == "zone-a", "node facts")
        assert "10.0.0.5" in p.facts.info.addresses
        await eventually(lambda: p.backends("default_web_http_tcp") == ["10.244.1.2:8080"], "local")
        ext = p.services()["default_web_http_tcp_external"]
        assert ext.listen is not None and ext.listen.port == 30080
        assert len(ext.backends) == 2


async def test_missing_node_is_retried(
    server: FakeApiServer, kubeconfig: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server.add("Service", service("web", "10.96.0.10", PORTS))
    caplog.set_level(logging.WARNING, "l4lb.kube-proxy")
    async with Proxy(server, kubeconfig, node_name="node-z") as p:
        # The proxy serves without node facts meanwhile.
        await eventually(lambda: "default_web_http_tcp" in p.services(), "sync without node")
        await eventually(
            lambda: sum(r.kind == "Node" for r in server.requests) >= 2, "node retried"
        )
        assert "cannot get Node node-z: HTTP 404 Not Found; retrying" in caplog.text
        server.nodes["node-z"] = node("node-z", ["10.0.0.9"], zone="zone-z")
        await eventually(lambda: p.facts.info.zone == "zone-z", "node appears")


async def test_bad_objects_are_logged_once_and_do_not_stop_others(
    server: FakeApiServer, kubeconfig: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bad = service("sctp", "10.96.0.11", [{"port": 80, "protocol": "SCTP"}])
    server.add("Service", bad)
    server.add("Service", service("web", "10.96.0.10", PORTS))
    server.add("Service", service("badip", "10.96.0.300", PORTS))
    caplog.set_level(logging.WARNING)
    async with Proxy(server, kubeconfig) as p:
        await eventually(lambda: "default_web_http_tcp" in p.services(), "sync")
        for i in range(3):  # more syncs: the errors are not logged again
            server.add("Service", service("web", "10.96.0.10", PORTS, foo=i))
        await eventually(lambda: p.reconciler.syncs >= 3, "more syncs")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping")]
    assert len(lines) == 2, lines
    assert any("SCTP is not supported" in line for line in lines)
    assert any("10.96.0.300" in line for line in lines)
    assert sample(p.metrics, "l4lb_kube_object_errors_total") == 2


async def test_last_state_keeps_serving_while_the_api_server_is_down(
    server: FakeApiServer, kubeconfig: Path
) -> None:
    server.add("Service", service("web", "10.96.0.10", PORTS))
    async with Proxy(server, kubeconfig) as p:
        await eventually(lambda: "default_web_http_tcp" in p.services(), "sync")
        applied = len(p.applied)
        await server.stop()
        await eventually(lambda: p.discovery.services.failures >= 2, "failures seen")
        # Whatever was programmed meanwhile still has the service: a broken view of the
        # cluster never replaces the last known one.
        assert all(
            "default_web_http_tcp" in {s.name for s in cfg.services}
            for cfg in p.applied[applied - 1 :]
        )
        await server.start()
        server.add("Service", service("api", "10.96.0.12", PORTS))
        await eventually(lambda: "default_api_http_tcp" in p.services(), "resumed")
        assert "default_web_http_tcp" in p.services()


def test_master_alone_needs_no_kubeconfig(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    api = make_api_client(KubeProxyOptions(master="http://127.0.0.1:1"))
    try:
        assert api.configuration.host == "http://127.0.0.1:1"
    finally:
        api.close()


def test_master_overrides_the_kubeconfig_server(kubeconfig: Path) -> None:
    api = make_api_client(KubeProxyOptions(kubeconfig=str(kubeconfig), master="http://10.9.9.9"))
    try:
        assert api.configuration.host == "http://10.9.9.9"
        assert load_api_client(str(kubeconfig)).configuration.host.startswith("http://127.0.0.1")
    finally:
        api.close()
