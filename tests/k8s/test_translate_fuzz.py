"""Hypothesis-generated Services and EndpointSlices fed to the watcher's translation.

Whatever the API server (or a broken admission chain) hands over, ``translate`` must not
raise, must report what it skipped as ObjectErrors, and must translate a well-formed
Service in the same snapshot exactly as it would alone.
"""

from __future__ import annotations

import copy
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from l4lb.k8s.translate import NodeInfo, ObjectError, translate

NODE = NodeInfo(name="node-a", addresses=("192.168.1.10", "fd00:1::10"), zone="zone-a")

Obj = dict[str, Any]

# Scalars that real manifests contain, plus the ones they must not.
_SCALAR = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64),
    st.floats(allow_nan=True),
    st.text(max_size=20),
    st.sampled_from(
        [
            "10.0.0.1",
            "fd00::1",
            "10.0.0.999",
            "::ffff:1.2.3.4",
            "TCP",
            "UDP",
            "SCTP",
            "IPv4",
            "IPv6",
            "FQDN",
            "ClusterIP",
            "NodePort",
            "LoadBalancer",
            "ExternalName",
            "None",
            "ClientIP",
            "Local",
            "Cluster",
            "true",
            "rr",
            "wlc",
            "80",
            "http",
            "",
        ]
    ),
)
_JSON = st.recursive(
    _SCALAR,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=12,
)


def _good_service() -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "good", "namespace": "ok", "resourceVersion": "1"},
        "spec": {
            "clusterIP": "10.96.0.10",
            "clusterIPs": ["10.96.0.10"],
            "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}],
            "type": "ClusterIP",
        },
    }


def _good_slice() -> Obj:
    return {
        "addressType": "IPv4",
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": "good-1",
            "namespace": "ok",
            "labels": {"kubernetes.io/service-name": "good"},
        },
        "endpoints": [{"addresses": ["10.1.0.1"], "conditions": {"ready": True}}],
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
    }


ALONE = translate([_good_service()], [_good_slice()], NODE)

# Field paths of a Service and an EndpointSlice a mutation may replace with anything.
_SERVICE_PATHS = [
    ("metadata",), ("metadata", "name"), ("metadata", "namespace"), ("metadata", "labels"),
    ("metadata", "annotations"), ("spec",), ("spec", "clusterIP"), ("spec", "clusterIPs"),
    ("spec", "ports"), ("spec", "ports", 0), ("spec", "ports", 0, "port"),
    ("spec", "ports", 0, "protocol"), ("spec", "ports", 0, "targetPort"),
    ("spec", "ports", 0, "nodePort"), ("spec", "ports", 0, "name"), ("spec", "type"),
    ("spec", "externalIPs"), ("spec", "sessionAffinity"), ("spec", "sessionAffinityConfig"),
    ("spec", "internalTrafficPolicy"), ("spec", "externalTrafficPolicy"),
    ("spec", "ipFamilies"), ("status",), ("status", "loadBalancer"),
]  # fmt: skip
_SLICE_PATHS = [
    ("metadata",), ("metadata", "labels"), ("metadata", "name"), ("addressType",),
    ("endpoints",), ("endpoints", 0), ("endpoints", 0, "addresses"),
    ("endpoints", 0, "conditions"), ("endpoints", 0, "conditions", "ready"),
    ("endpoints", 0, "nodeName"), ("endpoints", 0, "zone"), ("endpoints", 0, "hints"),
    ("ports",), ("ports", 0), ("ports", 0, "port"), ("ports", 0, "name"),
    ("ports", 0, "protocol"),
]  # fmt: skip


def _set(doc: Any, path: tuple[Any, ...], value: Any) -> None:
    """Replace the value at ``path`` when every step of it exists."""
    parent: Any = None
    for step in path:
        if isinstance(doc, dict) and (step in doc or step == path[-1]):
            parent, doc = doc, doc.get(step)
        elif isinstance(doc, list) and isinstance(step, int) and step < len(doc):
            parent, doc = doc, doc[step]
        else:
            return
    parent[path[-1]] = value


def _mutated(base: Obj, paths: list[tuple[Any, ...]]) -> st.SearchStrategy[Obj]:
    def build(changes: list[tuple[tuple[Any, ...], Any]]) -> Obj:
        doc = copy.deepcopy(base)
        doc["metadata"]["name"] = "fuzz"
        doc["metadata"]["namespace"] = "fz"
        if "labels" in doc["metadata"]:
            doc["metadata"]["labels"] = {"kubernetes.io/service-name": "fuzz"}
        for path, value in changes:
            _set(doc, path, value)
        return doc

    return st.lists(st.tuples(st.sampled_from(paths), _JSON), max_size=4).map(build)


_services = st.lists(_mutated(_good_service(), _SERVICE_PATHS) | _JSON, max_size=3)
_slices = st.lists(_mutated(_good_slice(), _SLICE_PATHS) | _JSON, max_size=3)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(services=_services, slices=_slices)
def test_any_objects_translate_without_crash_and_spare_the_good_service(
    services: list[Any], slices: list[Any]
) -> None:
    before = copy.deepcopy((services, slices))
    t = translate([*services, _good_service()], [*slices, _good_slice()], NODE)
    assert (services, slices) == before, "translation changed its input"
    assert all(isinstance(e, ObjectError) for e in t.errors)
    assert all(isinstance(str(e), str) and e.kind in ("Service", "EndpointSlice", "Node")
               for e in t.errors)  # fmt: skip
    good = [s for s in t.services if s.service == ALONE.services[0].service]
    assert good == list(ALONE.services)


@settings(max_examples=200, deadline=None)
@given(
    node_addresses=st.lists(st.text(max_size=40) | st.sampled_from(["10.0.0.1", "::1"]), max_size=4)
)
def test_any_node_addresses_are_checked_not_trusted(node_addresses: list[str]) -> None:
    node = NodeInfo("node-a", tuple(node_addresses))
    t = translate([_good_service()], [_good_slice()], node)
    assert [s.name for s in t.services] == [s.name for s in ALONE.services]
    assert all(isinstance(e, ObjectError) for e in t.errors)
