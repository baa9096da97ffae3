"""kube-proxy's operational endpoints: healthz/livez, metrics, proxyMode and configz.

Health follows kube-proxy's ProxierHealthServer: the proxy is unhealthy once an update has
been queued (a watch event arrived) and not programmed for longer than twice the sync
period. ``/healthz`` additionally reports 503 while the Node is being deleted or carries the
cluster autoscaler's ``ToBeDeletedByClusterAutoscaler`` taint, so that cloud load balancers
drain the node; ``/livez`` ignores the Node. Both answer JSON with ``lastUpdated`` and
``currentTime`` (RFC 3339, as Go prints ``time.Time``).

The metrics address serves ``/metrics`` (kube-proxy's ``kubeproxy_*`` families plus l4lb's
process-wide ones), ``/proxyMode`` (plain text), ``/configz`` (the effective
KubeProxyConfiguration) and a plain ``/healthz``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from l4lb.metrics import CONTENT_TYPE, SnapshotCollector

__all__ = ["ProxyHealth", "ProxyMetrics", "healthz_app", "metrics_app"]

TAINT_TO_BE_DELETED = "ToBeDeletedByClusterAutoscaler"

# kube-proxy: 1 ms doubling 15 times.
SYNC_BUCKETS = tuple(0.001 * 2**i for i in range(15))
# kube-proxy's buckets (0.25 s .. 5 min) below finer ones, since l4lb programs in ms.
PROGRAMMING_BUCKETS = (
    *(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5),
    *(float(s) for s in range(1, 60)),
    *(float(s) for s in range(60, 120, 5)),
    *(float(s) for s in range(120, 331, 30)),
)


def _rfc3339(wall: float | None) -> str:
    if wall is None:
        return "0001-01-01T00:00:00Z"  # Go's zero time
    return datetime.fromtimestamp(wall, UTC).isoformat().replace("+00:00", "Z")


class ProxyHealth:
    """Queued/updated bookkeeping behind /healthz and /livez.

    ``clock`` returns monotonic seconds and ``wall`` epoch seconds; tests pass their own.
    """

    def __init__(
        self,
        sync_period: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.timeout = 2 * sync_period
        self._clock = clock
        self._wall = wall
        self.last_updated: float | None = None  # wall time of the last programming
        # Until the first sync everything is pending: a proxy that never syncs turns unhealthy.
        self.oldest_pending: float | None = clock()
        self.node: Mapping[str, Any] | None = None

    def queued(self, at: float | None = None) -> None:
        """An update arrived (at monotonic time ``at``, default now) and awaits programming."""
        if self.oldest_pending is None:
            self.oldest_pending = self._clock() if at is None else at

    def updated(self, pending_since: float | None = None) -> None:
        """Everything queued up to now is programmed; ``pending_since`` is a newer queued
        update that arrived meanwhile (it stays pending)."""
        self.last_updated = self._wall()
        self.oldest_pending = pending_since

    def healthy(self) -> bool:
        """False once the oldest pending update has waited longer than the timeout."""
        if self.oldest_pending is None:
            return True
        return self._clock() - self.oldest_pending < self.timeout

    def node_eligible(self) -> bool:
        """False while the Node is being deleted or is marked for deletion by the autoscaler."""
        node = self.node
        if not node:
            return True
        meta = node.get("metadata")
        if isinstance(meta, Mapping) and meta.get("deletionTimestamp"):
            return False
        spec = node.get("spec")
        taints = spec.get("taints") if isinstance(spec, Mapping) else None
        if isinstance(taints, list):
            for t in taints:
                if isinstance(t, Mapping) and t.get("key") == TAINT_TO_BE_DELETED:
                    return False
        return True

    def document(self, *, with_node: bool) -> tuple[int, dict[str, Any]]:
        """Status code and JSON body of /healthz (``with_node``) or /livez."""
        healthy = self.healthy()
        body: dict[str, Any] = {
            "lastUpdated": _rfc3339(self.last_updated),
            "currentTime": _rfc3339(self._wall()),
        }
        if with_node:
            eligible = self.node_eligible()
            body["nodeEligible"] = eligible
            healthy = healthy and eligible
        return (200 if healthy else 503), body


class ProxyMetrics:
    """kube-proxy's metric families in a private registry, plus l4lb's snapshot metrics."""

    def __init__(self, snapshot: Callable[[], Mapping[str, Any]] | None = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.sync_duration = Histogram(
            "kubeproxy_sync_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds",
            buckets=SYNC_BUCKETS,
            registry=r,
        )
        self.programming_duration = Histogram(
            "kubeproxy_network_programming_duration_seconds",
            "In Cluster Network Programming Latency in seconds (watch event arrival to "
            "programmed data plane)",
            buckets=PROGRAMMING_BUCKETS,
            registry=r,
        )
        self.last_sync = Gauge(
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "The last time proxy rules were successfully synced",
            registry=r,
        )
        self.last_queued = Gauge(
            "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
            "The last time a sync of proxy rules was queued",
            registry=r,
        )
        self.service_changes = Counter(
            "kubeproxy_sync_proxy_rules_service_changes_total",
            "Cumulative proxy rules Service changes",
            registry=r,
        )
        self.endpoint_changes = Counter(
            "kubeproxy_sync_proxy_rules_endpoint_changes_total",
            "Cumulative proxy rules EndpointSlice changes",
            registry=r,
        )
        self.no_local_endpoints = Gauge(
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
            "Number of services with a Local traffic policy and no endpoints",
            ["traffic_policy"],
            registry=r,
        )
        self.healthz = Counter(
            "kubeproxy_proxy_healthz_total",
            "Cumulative proxy healthz HTTP status",
            ["code"],
            registry=r,
        )
        self.livez = Counter(
            "kubeproxy_proxy_livez_total",
            "Cumulative proxy livez HTTP status",
            ["code"],
            registry=r,
        )
        self.object_errors = Counter(
            "l4lb_kube_object_errors_total",
            "Parts of Kubernetes objects skipped because they are invalid (first sighting)",
            registry=r,
        )
        if snapshot is not None:
            r.register(SnapshotCollector(snapshot))

    def render(self) -> bytes:
        """Prometheus text of every family."""
        return generate_latest(self.registry)


def healthz_app(health: ProxyHealth, metrics: ProxyMetrics) -> web.Application:
    """/healthz and /livez, like kube-proxy's healthz server."""

    def handler(with_node: bool) -> Callable[[web.Request], Any]:
        counter = metrics.healthz if with_node else metrics.livez

        async def handle(request: web.Request) -> web.Response:
            code, body = health.document(with_node=with_node)
            counter.labels(code=str(code)).inc()
            return web.Response(
                status=code,
                body=orjson.dumps(body),
                content_type="application/json",
                headers={"X-Content-Type-Options": "nosniff"},
            )

        return handle

    app = web.Application()
    app.router.add_get("/healthz", handler(True))
    app.router.add_get("/livez", handler(False))
    return app


def metrics_app(
    metrics: ProxyMetrics, proxy_mode: str, configz: Callable[[], Mapping[str, Any]]
) -> web.Application:
    """/metrics, /proxyMode, /configz and /healthz on the metrics address."""

    async def get_metrics(request: web.Request) -> web.Response:
        return web.Response(body=metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    async def get_mode(request: web.Request) -> web.Response:
        return web.Response(text=proxy_mode)

    async def get_configz(request: web.Request) -> web.Response:
        body = {"kubeproxy.config.k8s.io": configz()}
        return web.Response(body=orjson.dumps(body), content_type="application/json")

    async def get_healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/metrics", get_metrics)
    app.router.add_get("/proxyMode", get_mode)
    app.router.add_get("/configz", get_configz)
    app.router.add_get("/healthz", get_healthz)
    return app
