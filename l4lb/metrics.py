"""Render a controller snapshot as Prometheus text.

The data plane keeps its own counters; this module only translates one snapshot of them
into metric families at scrape time, so nothing here holds state between scrapes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

__all__ = ["CONTENT_TYPE", "SnapshotCollector", "make_registry", "render_metrics"]

#: Content type matching the output of ``generate_latest`` (text exposition format 0.0.4).
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4

Snapshot = Mapping[str, Any]
_Family = GaugeMetricFamily | CounterMetricFamily

# (metric name, snapshot key, help text); counters keep the ``_total`` suffix in the name
# because prometheus-client strips it from the family and adds it back to the sample.
_BACKEND_GAUGES = (
    ("l4lb_backend_connections_active", "active", "Established connections to the backend."),
    (
        "l4lb_backend_connections_inactive",
        "inactive",
        "Connections to the backend that are not established (connecting or closing).",
    ),
    ("l4lb_backend_weight", "weight", "Configured scheduler weight of the backend."),
    (
        "l4lb_backend_effective_weight",
        "effective_weight",
        "Weight the scheduler currently uses (0 while draining or down).",
    ),
)
_BACKEND_COUNTERS = (
    ("l4lb_backend_connections_total", "total", "Connections scheduled to the backend."),
    ("l4lb_backend_bytes_in_total", "bytes_in", "Bytes received from clients for the backend."),
    ("l4lb_backend_bytes_out_total", "bytes_out", "Bytes sent to clients from the backend."),
    (
        "l4lb_backend_connect_errors_total",
        "connect_errors",
        "Failed connection attempts to the backend.",
    ),
)
_SERVICE_GAUGES = (
    ("l4lb_service_connections_active", "active", "Active connections of the service."),
)
_SERVICE_COUNTERS = (
    ("l4lb_service_connections_total", "total", "Connections accepted by the service."),
    (
        "l4lb_service_rejected_total",
        "rejected",
        "Connections the service refused.",
    ),
    (
        "l4lb_service_limit_rejected_total",
        "limit_rejected",
        "Connections refused because the service was at its max_connections.",
    ),
    ("l4lb_service_bytes_in_total", "bytes_in", "Bytes received from clients of the service."),
    ("l4lb_service_bytes_out_total", "bytes_out", "Bytes sent to clients of the service."),
)
_GLOBAL_GAUGES = (
    ("l4lb_pipes_used", "pipes_used", "Splice pipes currently in use."),
    ("l4lb_pipes_free", "pipes_free", "Splice pipes in the free pools."),
    ("l4lb_connections_active", "connections_active", "Connections open in the data plane."),
    ("l4lb_workers", "workers", "Data-plane worker threads."),
)
_GLOBAL_COUNTERS = (
    ("l4lb_accept_errors_total", "accept_errors", "Failed accept() calls in the data plane."),
)


class SnapshotCollector(Collector):
    """Collector that turns the snapshot returned by ``source`` into metric families.

    ``source`` is called once per scrape, so every value of one scrape comes from the same
    instant.
    """

    def __init__(self, source: Callable[[], Snapshot]) -> None:
        self._source = source

    def describe(self) -> list[Metric]:
        """Return nothing so that registering never calls ``source``."""
        return []

    def collect(self) -> Iterator[Metric]:
        """Yield every l4lb metric family for one fresh snapshot."""
        snapshot = self._source()
        yield from _global_families(snapshot)
        services = snapshot["services"]
        yield from _service_families(services)
        yield from _backend_families(services)


def _global_families(snapshot: Snapshot) -> Iterator[Metric]:
    dataplane = snapshot["dataplane"]
    for name, key, doc in _GLOBAL_GAUGES:
        yield GaugeMetricFamily(name, doc, value=dataplane[key])
    for name, key, doc in _GLOBAL_COUNTERS:
        yield CounterMetricFamily(name, doc, value=dataplane[key])
    yield GaugeMetricFamily(
        "l4lb_uptime_seconds", "Seconds since the load balancer started.", value=snapshot["uptime"]
    )
    # Exposed as l4lb_build_info{version="..."} 1.
    yield InfoMetricFamily(
        "l4lb_build", "Build information.", value={"version": snapshot["version"]}
    )


def _service_families(services: list[Snapshot]) -> Iterator[Metric]:
    labels = ["service"]
    families: list[tuple[_Family, str]] = [
        (GaugeMetricFamily(name, doc, labels=labels), key) for name, key, doc in _SERVICE_GAUGES
    ]
    families += [
        (CounterMetricFamily(name, doc, labels=labels), key) for name, key, doc in _SERVICE_COUNTERS
    ]
    for family, key in families:
        for service in services:
            family.add_metric([service["name"]], service[key])
        yield family
    # vip="other": connections to an address that is none of the service's VIPs.
    vips = CounterMetricFamily(
        "l4lb_vip_connections_total",
        "Connections accepted per VIP the client dialled.",
        labels=["service", "vip"],
    )
    for service in services:
        for vip, total in service.get("vip_connections", {}).items():
            vips.add_metric([service["name"], vip], total)
    yield vips


def _backend_families(services: list[Snapshot]) -> Iterator[Metric]:
    labels = ["service", "backend"]
    families: list[tuple[_Family, str]] = [
        (GaugeMetricFamily(name, doc, labels=labels), key) for name, key, doc in _BACKEND_GAUGES
    ]
    families += [
        (CounterMetricFamily(name, doc, labels=labels), key) for name, key, doc in _BACKEND_COUNTERS
    ]
    for family, key in families:
        for service in services:
            for backend in service["backends"]:
                family.add_metric([service["name"], backend["address"]], backend[key])
        yield family
    up = GaugeMetricFamily(
        "l4lb_backend_up",
        "1 if the backend is up (passes its health checks, or is not checked), else 0.",
        labels=labels,
    )
    transitions = CounterMetricFamily(
        "l4lb_backend_health_transitions_total",
        "Health state changes of the backend (up to down or down to up).",
        labels=labels,
    )
    duration = GaugeMetricFamily(
        "l4lb_backend_health_check_duration_seconds",
        "How long the backend's last active health check took.",
        labels=labels,
    )
    for service in services:
        for backend in service["backends"]:
            names = [service["name"], backend["address"]]
            up.add_metric(names, 1 if backend["up"] else 0)
            # Unchecked backends (no [services.health]) have no health samples at all.
            health = backend.get("health")
            if health is None:
                continue
            transitions.add_metric(names, health["transitions"])
            if health.get("last_check") is not None:
                duration.add_metric(names, health["last_check"]["duration"])
    yield up
    yield transitions
    yield duration


def make_registry(source: Callable[[], Snapshot]) -> CollectorRegistry:
    """Return a private registry holding one :class:`SnapshotCollector` fed by ``source``."""
    registry = CollectorRegistry()
    registry.register(SnapshotCollector(source))
    return registry


def render_metrics(snapshot: Snapshot) -> bytes:
    """Render ``snapshot`` as Prometheus text exposition format (see :data:`CONTENT_TYPE`)."""
    return generate_latest(make_registry(lambda: snapshot))
