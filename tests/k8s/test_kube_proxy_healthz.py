"""healthz/livez semantics (503 once an update waits longer than 2x the sync period) and the
metrics address (/metrics, /proxyMode, /configz), served over real HTTP."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from l4lb.k8s.healthz import ProxyHealth, ProxyMetrics, healthz_app, metrics_app
from l4lb.k8s.options import KubeProxyOptions


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_health(clock: Clock) -> ProxyHealth:
    return ProxyHealth(30.0, clock=clock, wall=lambda: 1_700_000_000.5 + clock.now)


def test_pending_update_turns_unhealthy_after_twice_the_sync_period() -> None:
    clock = Clock()
    h = make_health(clock)
    # Nothing synced yet: pending since start, healthy until the timeout passes.
    assert h.healthy()
    clock.now += 59.9
    assert h.healthy()
    clock.now += 0.2
    assert not h.healthy()
    h.updated()
    assert h.healthy() and h.oldest_pending is None
    # Queued updates count from the oldest one; a later one does not reset it.
    h.queued()
    clock.now += 40
    h.queued()
    clock.now += 21
    assert not h.healthy()
    # A sync that leaves a newer update pending is healthy until that one is too old.
    h.updated(pending_since=clock.now - 5)
    assert h.healthy()
    clock.now += 56
    assert not h.healthy()


def test_documents_and_node_eligibility() -> None:
    clock = Clock()
    h = make_health(clock)
    code, body = h.document(with_node=True)
    assert code == 200
    assert body == {
        "lastUpdated": "0001-01-01T00:00:00Z",
        "currentTime": "2023-11-14T22:30:00.500000Z",
        "nodeEligible": True,
    }
    h.updated()
    code, body = h.document(with_node=False)
    assert code == 200 and body["lastUpdated"] == body["currentTime"]
    assert "nodeEligible" not in body
    h.node = {"spec": {"taints": [{"key": "ToBeDeletedByClusterAutoscaler"}]}}
    assert h.document(with_node=True)[0] == 503
    assert h.document(with_node=False)[0] == 200  # livez does not look at the Node
    h.node = {"metadata": {"deletionTimestamp": "2026-12-01T00:00:00Z"}}
    assert h.document(with_node=True)[0] == 503
    h.node = {"spec": {"taints": "garbage"}}
    assert h.document(with_node=True)[0] == 200


@pytest.fixture
async def servers() -> AsyncIterator[tuple[str, str, ProxyHealth, ProxyMetrics, Clock]]:
    clock = Clock()
    health = make_health(clock)
    snapshot = {
        "version": "0",
        "uptime": 1.0,
        "dataplane": {
            "workers": 1,
            "pipes_used": 0,
            "pipes_free": 0,
            "accept_errors": 0,
            "emfile_pauses": 0,
            "connections_active": 0,
            "fd_limit": 1024,
        },
        "services": [],
        "failed": {},
    }
    metrics = ProxyMetrics(lambda: snapshot)
    opts = KubeProxyOptions(proxy_mode="ipvs", ipvs_scheduler="wlc")
    runners = []
    urls = []
    for app in (healthz_app(health, metrics), metrics_app(metrics, "ipvs", opts.as_configuration)):
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        urls.append(f"http://127.0.0.1:{runner.addresses[0][1]}")
    try:
        yield urls[0], urls[1], health, metrics, clock
    finally:
        for runner in runners:
            await runner.cleanup()


async def test_healthz_server(servers: tuple[str, str, ProxyHealth, ProxyMetrics, Clock]) -> None:
    healthz, metrics_url, _, _, clock = servers
    async with aiohttp.ClientSession() as s:
        for path in ("/healthz", "/livez"):
            async with s.get(healthz + path) as r:
                assert r.status == 200
                assert r.content_type == "application/json"
                body = await r.json()
                assert set(body) >= {"lastUpdated", "currentTime"}
        clock.now += 61
        for path in ("/healthz", "/livez"):
            async with s.get(healthz + path) as r:
                assert r.status == 503
        async with s.get(metrics_url + "/metrics") as r:
            text = await r.text()
    assert 'kubeproxy_proxy_healthz_total{code="200"} 1.0' in text
    assert 'kubeproxy_proxy_healthz_total{code="503"} 1.0' in text
    assert 'kubeproxy_proxy_livez_total{code="503"} 1.0' in text


async def test_metrics_server(servers: tuple[str, str, ProxyHealth, ProxyMetrics, Clock]) -> None:
    _, url, _, metrics, _ = servers
    metrics.sync_duration.observe(0.003)
    metrics.programming_duration.observe(0.004)
    async with aiohttp.ClientSession() as s:
        async with s.get(url + "/metrics") as r:
            assert r.status == 200
            text = await r.text()
        async with s.get(url + "/proxyMode") as r:
            assert await r.text() == "ipvs"
        async with s.get(url + "/configz") as r:
            configz = await r.json()
        async with s.get(url + "/healthz") as r:
            assert r.status == 200
    assert 'kubeproxy_sync_proxy_rules_duration_seconds_bucket{le="0.004"} 1.0' in text
    assert 'kubeproxy_sync_proxy_rules_duration_seconds_bucket{le="0.002"} 0.0' in text
    assert 'kubeproxy_network_programming_duration_seconds_bucket{le="0.005"} 1.0' in text
    assert "kubeproxy_network_programming_duration_seconds_count 1.0" in text
    assert "l4lb_workers 1.0" in text  # l4lb's own families ride along
    cfg = configz["kubeproxy.config.k8s.io"]
    assert cfg["kind"] == "KubeProxyConfiguration"
    assert cfg["mode"] == "ipvs" and cfg["ipvs"]["scheduler"] == "wlc"
    assert cfg["udpIdleTimeout"] == "250ms"
