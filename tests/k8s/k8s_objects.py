"""Loading the hand-written ``kubectl get -o json`` fixtures."""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def load_items(name: str) -> list[dict[str, Any]]:
    """Items of a List stored under fixtures/ (a fresh copy on every call)."""
    items: list[dict[str, Any]] = json.loads((FIXTURES / name).read_text())["items"]
    return items


def service(
    name: str,
    cluster_ip: str,
    ports: list[dict[str, Any]],
    *,
    namespace: str = "default",
    type_: str = "ClusterIP",
    external_ips: list[str] | None = None,
    affinity_timeout: int | None = None,
    **spec: Any,
) -> dict[str, Any]:
    """A Service as ``kubectl get -o json`` prints it (defaults filled in like the API)."""
    body: dict[str, Any] = {
        "clusterIP": cluster_ip,
        "clusterIPs": [cluster_ip],
        "internalTrafficPolicy": "Cluster",
        "ipFamilies": ["IPv6" if ":" in cluster_ip else "IPv4"],
        "ipFamilyPolicy": "SingleStack",
        "ports": [{"protocol": "TCP", **p} for p in ports],
        "sessionAffinity": "None",
        "type": type_,
        **spec,
    }
    if type_ != "ClusterIP":
        body.setdefault("externalTrafficPolicy", "Cluster")
    if external_ips:
        body["externalIPs"] = external_ips
    if affinity_timeout is not None:
        body["sessionAffinity"] = "ClientIP"
        body["sessionAffinityConfig"] = {"clientIP": {"timeoutSeconds": affinity_timeout}}
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": f"00000000-0000-4000-8000-{zlib.crc32(name.encode()):012d}",
            "creationTimestamp": "2026-11-20T16:02:44Z",
        },
        "spec": body,
        "status": {"loadBalancer": {}},
    }


def endpoint_slice(
    service_name: str,
    endpoints: list[dict[str, Any]],
    ports: list[dict[str, Any]],
    *,
    name: str | None = None,
    namespace: str = "default",
    address_type: str = "IPv4",
) -> dict[str, Any]:
    """An EndpointSlice; each endpoint is ``{"ip": ..., "ready": ..., "terminating": ...,
    "node": ...}`` with ready defaulting to True."""
    eps = []
    for e in endpoints:
        ready = e.get("ready", True)
        terminating = e.get("terminating", False)
        ep: dict[str, Any] = {
            "addresses": [e["ip"]],
            "conditions": {
                "ready": ready,
                "serving": e.get("serving", ready or terminating),
                "terminating": terminating,
            },
        }
        if e.get("node"):
            ep["nodeName"] = e["node"]
        eps.append(ep)
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "addressType": address_type,
        "metadata": {
            "name": name or f"{service_name}-abcde",
            "namespace": namespace,
            "labels": {
                "kubernetes.io/service-name": service_name,
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
            },
            "generateName": f"{service_name}-",
        },
        "endpoints": eps,
        "ports": [{"protocol": "TCP", **p} for p in ports],
    }


def node(
    name: str, addresses: list[str], *, zone: str | None = None, **extra: Any
) -> dict[str, Any]:
    """A Node with InternalIP addresses and an optional zone label."""
    labels = {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux"}
    if zone:
        labels["topology.kubernetes.io/zone"] = zone
    obj: dict[str, Any] = {
        "metadata": {"name": name, "labels": labels},
        "spec": {"podCIDR": "10.244.0.0/24"},
        "status": {
            "addresses": [{"type": "InternalIP", "address": a} for a in addresses]
            + [{"type": "Hostname", "address": name}],
        },
    }
    for key, value in extra.items():
        obj[key] = {**obj.get(key, {}), **value}
    return obj
