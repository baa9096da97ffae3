"""Tests for l4lb.metrics: names, types, labels and values of the rendered snapshot."""

from __future__ import annotations

import copy
from typing import Any

import prometheus_client
import pytest
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from l4lb.metrics import SnapshotCollector, make_registry, render_metrics

SNAPSHOT: dict[str, Any] = {
    "version": "1.2.3",
    "uptime": 12.5,
    "dataplane": {
        "workers": 2,
        "pipes_used": 4,
        "pipes_free": 60,
        "accept_errors": 5,
        "connections_active": 3,
        "fd_limit": 1048576,
    },
    "services": [
        {
            "name": "web",
            "listen": "127.0.0.1:8080",
            "protocol": "tcp",
            "scheduler": "rr",
            "affinity_timeout": 0.0,
            "active": 3,
            "total": 120,
            "bytes_in": 1000,
            "bytes_out": 5000,
            "rejected": 4,
            "limit_rejected": 1,
            "vip_connections": {"10.96.0.10:80": 7, "other": 2},
            "backends": [
                {
                    "address": "[::1]:9002",
                    "weight": 3,
                    "effective_weight": 0,
                    "drain": True,
                    "up": False,
                    "active": 1,
                    "inactive": 0,
                    "total": 20,
                    "bytes_in": 200,
                    "bytes_out": 900,
                    "connect_errors": 7,
                    "health": {
                        "state": "down",
                        "reason": "connect refused (3/3)",
                        "since": 1700000000.0,
                        "last_check": {
                            "ok": False,
                            "detail": "connect refused",
                            "duration": 0.25,
                            "at": 1700000000.0,
                        },
                        "transitions": 3,
                    },
                },
                {
                    "address": "127.0.0.1:9001",
                    "weight": 1,
                    "effective_weight": 1,
                    "drain": False,
                    "up": True,
                    "active": 2,
                    "inactive": 1,
                    "total": 100,
                    "bytes_in": 800,
                    "bytes_out": 4100,
                    "connect_errors": 0,
                    "health": {
                        "state": "up",
                        "reason": "initial state up",
                        "since": 1700000000.0,
                        "last_check": None,
                        "transitions": 0,
                    },
                },
            ],
        },
        {
            "name": 'odd "name"\\',
            "listen": "127.0.0.1:5353",
            "protocol": "udp",
            "scheduler": "sh",
            "affinity_timeout": 300.0,
            "active": 0,
            "total": 9,
            "bytes_in": 90,
            "bytes_out": 180,
            "rejected": 0,
            "limit_rejected": 0,
            "backends": [
                {
                    "address": "127.0.0.2:53",
                    "weight": 65535,
                    "effective_weight": 65535,
                    "drain": False,
                    "up": True,
                    "active": 0,
                    "inactive": 0,
                    "total": 9,
                    "bytes_in": 90,
                    "bytes_out": 180,
                    "connect_errors": 0,
                }
            ],
        },
    ],
}

BACKEND_METRICS = {
    "l4lb_backend_connections_active": ("gauge", "active"),
    "l4lb_backend_connections_inactive": ("gauge", "inactive"),
    "l4lb_backend_connections_total": ("counter", "total"),
    "l4lb_backend_bytes_in_total": ("counter", "bytes_in"),
    "l4lb_backend_bytes_out_total": ("counter", "bytes_out"),
    "l4lb_backend_connect_errors_total": ("counter", "connect_errors"),
    "l4lb_backend_weight": ("gauge", "weight"),
    "l4lb_backend_effective_weight": ("gauge", "effective_weight"),
}
SERVICE_METRICS = {
    "l4lb_service_connections_active": ("gauge", "active"),
    "l4lb_service_connections_total": ("counter", "total"),
    "l4lb_service_rejected_total": ("counter", "rejected"),
    "l4lb_service_limit_rejected_total": ("counter", "limit_rejected"),
    "l4lb_service_bytes_in_total": ("counter", "bytes_in"),
    "l4lb_service_bytes_out_total": ("counter", "bytes_out"),
}
GLOBAL_METRICS = {
    "l4lb_pipes_used": ("gauge", 4),
    "l4lb_pipes_free": ("gauge", 60),
    "l4lb_accept_errors_total": ("counter", 5),
    "l4lb_connections_active": ("gauge", 3),
    "l4lb_workers": ("gauge", 2),
    "l4lb_uptime_seconds": ("gauge", 12.5),
}
ALL_NAMES = {
    *BACKEND_METRICS,
    *SERVICE_METRICS,
    *GLOBAL_METRICS,
    "l4lb_backend_up",
    "l4lb_backend_health_transitions_total",
    "l4lb_backend_health_check_duration_seconds",
    "l4lb_vip_connections_total",
    "l4lb_build_info",
}


def parse(snapshot: dict[str, Any]) -> tuple[dict[str, list[Sample]], dict[str, str]]:
    """Return samples by exposed name and the metric type of each exposed name."""
    samples: dict[str, list[Sample]] = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(render_metrics(snapshot).decode()):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
            types[sample.name] = family.type
    return samples, types


def by_labels(samples: list[Sample]) -> dict[tuple[tuple[str, str], ...], float]:
    return {tuple(sorted(s.labels.items())): s.value for s in samples}


def test_exposed_names_are_exactly_the_documented_ones() -> None:
    samples, _ = parse(SNAPSHOT)
    assert set(samples) == ALL_NAMES


def test_no_created_samples() -> None:
    # Snapshot counters have no creation time; _created series would be noise.
    assert b"_created" not in render_metrics(SNAPSHOT)


@pytest.mark.parametrize("name", sorted(BACKEND_METRICS))
def test_backend_metric(name: str) -> None:
    samples, types = parse(SNAPSHOT)
    kind, key = BACKEND_METRICS[name]
    assert types[name] == kind
    expected = {
        (("backend", b["address"]), ("service", s["name"])): float(b[key])
        for s in SNAPSHOT["services"]
        for b in s["backends"]
    }
    assert by_labels(samples[name]) == expected


def test_backend_up() -> None:
    samples, types = parse(SNAPSHOT)
    assert types["l4lb_backend_up"] == "gauge"
    assert by_labels(samples["l4lb_backend_up"]) == {
        (("backend", "[::1]:9002"), ("service", "web")): 0.0,
        (("backend", "127.0.0.1:9001"), ("service", "web")): 1.0,
        (("backend", "127.0.0.2:53"), ("service", 'odd "name"\\')): 1.0,
    }


def test_health_transitions_only_for_checked_backends() -> None:
    samples, types = parse(SNAPSHOT)
    assert types["l4lb_backend_health_transitions_total"] == "counter"
    # The third backend has no health checking: no sample rather than a made-up 0.
    assert by_labels(samples["l4lb_backend_health_transitions_total"]) == {
        (("backend", "[::1]:9002"), ("service", "web")): 3.0,
        (("backend", "127.0.0.1:9001"), ("service", "web")): 0.0,
    }


def test_health_check_duration_only_after_a_check() -> None:
    samples, types = parse(SNAPSHOT)
    assert types["l4lb_backend_health_check_duration_seconds"] == "gauge"
    assert by_labels(samples["l4lb_backend_health_check_duration_seconds"]) == {
        (("backend", "[::1]:9002"), ("service", "web")): 0.25,
    }


def test_snapshot_without_health_keys_renders() -> None:
    snapshot = copy.deepcopy(SNAPSHOT)
    for service in snapshot["services"]:
        for backend in service["backends"]:
            backend.pop("health", None)
    samples, _ = parse(snapshot)
    assert "l4lb_backend_health_transitions_total" not in samples
    assert len(samples["l4lb_backend_up"]) == 3


@pytest.mark.parametrize("name", sorted(SERVICE_METRICS))
def test_service_metric(name: str) -> None:
    samples, types = parse(SNAPSHOT)
    kind, key = SERVICE_METRICS[name]
    assert types[name] == kind
    expected = {(("service", s["name"]),): float(s[key]) for s in SNAPSHOT["services"]}
    assert by_labels(samples[name]) == expected


@pytest.mark.parametrize("name", sorted(GLOBAL_METRICS))
def test_global_metric(name: str) -> None:
    samples, types = parse(SNAPSHOT)
    kind, value = GLOBAL_METRICS[name]
    assert types[name] == kind
    assert by_labels(samples[name]) == {(): value}


def test_build_info() -> None:
    samples, _ = parse(SNAPSHOT)
    assert by_labels(samples["l4lb_build_info"]) == {(("version", "1.2.3"),): 1.0}


def test_no_services() -> None:
    snapshot = copy.deepcopy(SNAPSHOT)
    snapshot["services"] = []
    samples, _ = parse(snapshot)
    assert not any(name.startswith(("l4lb_backend_", "l4lb_service_")) for name in samples)
    assert by_labels(samples["l4lb_workers"]) == {(): 2.0}


def test_large_counter_renders() -> None:
    snapshot = copy.deepcopy(SNAPSHOT)
    snapshot["services"][0]["bytes_in"] = 2**53
    samples, _ = parse(snapshot)
    assert by_labels(samples["l4lb_service_bytes_in_total"])[(("service", "web"),)] == 2.0**53


def test_collector_reads_the_source_once_per_scrape() -> None:
    calls = 0

    def source() -> dict[str, Any]:
        nonlocal calls
        calls += 1
        snapshot = copy.deepcopy(SNAPSHOT)
        snapshot["dataplane"]["workers"] = calls
        return snapshot

    registry = make_registry(source)
    assert calls == 0, "registering must not take a snapshot"
    assert b"\nl4lb_workers 1.0\n" in generate_latest(registry)
    assert b"\nl4lb_workers 2.0\n" in generate_latest(registry)
    assert calls == 2


def test_collector_yields_every_family_once() -> None:
    names = [m.name for m in SnapshotCollector(lambda: SNAPSHOT).collect()]
    assert len(names) == len(set(names)) == len(ALL_NAMES)


def test_global_registry_untouched() -> None:
    render_metrics(SNAPSHOT)
    assert prometheus_client.REGISTRY.get_sample_value("l4lb_workers") is None
    assert b"l4lb_" not in generate_latest(prometheus_client.REGISTRY)


def test_vip_connections() -> None:
    # The second service has no VIPs (no "vip_connections"): it has no samples.
    samples, types = parse(SNAPSHOT)
    assert types["l4lb_vip_connections_total"] == "counter"
    assert by_labels(samples["l4lb_vip_connections_total"]) == {
        (("service", "web"), ("vip", "10.96.0.10:80")): 7.0,
        (("service", "web"), ("vip", "other")): 2.0,
    }
