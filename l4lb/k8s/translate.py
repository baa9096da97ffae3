"""Service + EndpointSlices + node facts -> l4lb virtual-service descriptions (pure, no I/O).

Objects are plain dicts shaped like ``kubectl get -o json`` output. The mapping follows
kube-proxy:

1. Headless (``clusterIP`` None/empty) and ExternalName services, and objects labelled
   ``service.kubernetes.io/service-proxy-name`` (another proxy owns them), are skipped
   silently: they are valid, just not ours.
2. One description per service port and IP family. Cluster traffic arrives on the
   ClusterIP of that family; external traffic on externalIPs, LoadBalancer ingress IPs (not
   ``ipMode: Proxy``) and NodePort on the node's addresses of that family.
3. The backend port is the port of the EndpointSlice port with the same name and protocol,
   which is how a named ``targetPort`` is resolved. Slices join by the
   ``kubernetes.io/service-name`` label and their ``addressType`` selects the family.
4. Endpoints are merged across slices and de-duplicated by address. Ready endpoints are used;
   when none is ready, serving-and-terminating ones are (kube-proxy's CategorizeEndpoints).
   ``Local`` traffic policy keeps only endpoints whose ``nodeName`` is this node
   (``internalTrafficPolicy`` for cluster traffic, ``externalTrafficPolicy`` for external).
   Cluster policy with topology (``trafficDistribution: PreferClose``/``PreferSameZone`` or
   the ``service.kubernetes.io/topology-mode: Auto`` annotation) keeps endpoints hinted for
   this node's zone, but only when every ready endpoint carries zone hints and one matches.
5. Annotations under :data:`ANNOTATION_PREFIX` choose the scheduler, sh flags and affinity
   netmasks per Service.

Bad input never raises: the smallest enclosing unit (endpoint, IP, port, slice or service)
is dropped and one :class:`ObjectError` says why.
"""

from __future__ import annotations

import functools
import ipaddress
import socket
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from l4lb.config import SCHEDULERS, Address

__all__ = [
    "ANNOTATION_PREFIX",
    "DEFAULT_AFFINITY_TIMEOUT",
    "KubeBackend",
    "KubeVirtualService",
    "NodeInfo",
    "ObjectError",
    "Translation",
    "service_key",
    "slice_service_key",
    "translate",
    "translate_service",
]

ANNOTATION_PREFIX = "l4lb.io/"
DEFAULT_AFFINITY_TIMEOUT = 10800
MAX_AFFINITY_TIMEOUT = 86400

LABEL_PROXY_NAME = "service.kubernetes.io/service-proxy-name"
LABEL_HEADLESS = "service.kubernetes.io/headless"
LABEL_SERVICE_NAME = "kubernetes.io/service-name"
ANNOTATION_TOPOLOGY = "service.kubernetes.io/topology-mode"
ANNOTATION_TOPOLOGY_OLD = "service.kubernetes.io/topology-aware-hints"
_TOPOLOGY_DISTRIBUTIONS = frozenset({"PreferClose", "PreferSameZone"})
_PROTOCOLS = {"TCP": "tcp", "UDP": "udp"}
_FAMILIES: dict[str, int] = {"IPv4": socket.AF_INET, "IPv6": socket.AF_INET6}
_FAMILY_SUFFIX: dict[int, str] = {socket.AF_INET: "ipv4", socket.AF_INET6: "ipv6"}
_BOOL = {"true": True, "false": False}


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """What translation needs to know about the node this proxy runs on."""

    name: str
    addresses: tuple[str, ...] = ()
    zone: str | None = None


@dataclass(frozen=True, slots=True)
class KubeBackend:
    """One endpoint address and resolved target port."""

    address: Address
    weight: int = 1


@dataclass(frozen=True, slots=True)
class KubeVirtualService:
    """One service port of one IP family, ready to become an l4lb virtual service.

    ``name`` is ``"ns/svc:port/proto"`` where ``port`` is the port's name, or its number when
    the port is unnamed; a dual-stack service's second family appends ``"/ipv6"`` (or
    ``"/ipv4"``). ``backends`` serve ``cluster_vips``; ``external_backends`` serve
    ``external_vips`` and ``node_port_vips`` (they differ only under a Local policy).
    """

    name: str
    service: str
    port_name: str
    protocol: str
    family: int
    cluster_vips: tuple[Address, ...]
    external_vips: tuple[Address, ...]
    node_port_vips: tuple[Address, ...]
    scheduler: str
    affinity_timeout: int
    affinity_netmask: int
    affinity_netmask6: int
    sh_fallback: bool
    sh_port: bool
    backends: tuple[KubeBackend, ...]
    external_backends: tuple[KubeBackend, ...]

    @property
    def vips(self) -> tuple[Address, ...]:
        """Every address this service port is reachable on."""
        return self.cluster_vips + self.external_vips + self.node_port_vips


@dataclass(frozen=True, slots=True)
class ObjectError:
    """A part of one object that was skipped, and why (one log line)."""

    kind: str
    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.kind} {self.key}: {self.message}"


@dataclass(frozen=True, slots=True)
class Translation:
    """Everything translated from one snapshot, plus what had to be skipped."""

    services: tuple[KubeVirtualService, ...]
    errors: tuple[ObjectError, ...]


class _Bad(Exception):
    """Raised inside this module to drop the unit being translated."""


# --------------------------------------------------------------------------- parsing


def _dict(obj: object, what: str) -> Mapping[str, Any]:
    if obj is None:
        return {}
    if not isinstance(obj, Mapping):
        raise _Bad(f"{what} must be an object, got {type(obj).__name__}")
    return obj


def _list(obj: object, what: str) -> Sequence[Any]:
    if obj is None:
        return ()
    if not isinstance(obj, list):
        raise _Bad(f"{what} must be a list, got {type(obj).__name__}")
    return obj


def _str(obj: object, what: str, *, required: bool = False) -> str:
    if obj is None or obj == "":
        if required:
            raise _Bad(f"{what} is missing")
        return ""
    if not isinstance(obj, str):
        raise _Bad(f"{what} must be a string, got {type(obj).__name__}")
    return obj


def _port(obj: object, what: str, *, required: bool = True) -> int | None:
    if obj is None and not required:
        return None
    if obj is None:
        raise _Bad(f"{what} is missing")
    if not isinstance(obj, int) or isinstance(obj, bool):
        raise _Bad(f"{what} must be an integer, got {type(obj).__name__}")
    if not 1 <= obj <= 65535:
        raise _Bad(f"{what} {obj} is out of range 1-65535")
    return obj


_IP = ipaddress.IPv4Address | ipaddress.IPv6Address


@functools.lru_cache(maxsize=1 << 18)
def _parse_ip(text: str) -> _IP:
    """``ipaddress.ip_address`` with a fast path for IPv4 and a cache: a sync parses every
    endpoint address, and between syncs almost all of them are the same strings."""
    try:
        # inet_pton accepts exactly the dotted quads ip_address does (no leading zeros).
        return ipaddress.IPv4Address(socket.inet_pton(socket.AF_INET, text))
    except OSError:
        return ipaddress.ip_address(text)


def _ip(text: object, what: str) -> _IP:
    if not isinstance(text, str):
        raise _Bad(f"{what} must be a string, got {type(text).__name__}")
    try:
        ip = _parse_ip(text)
    except ValueError:
        raise _Bad(f"{what} {text!r} is not a valid IP address") from None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        raise _Bad(f"{what} {text!r} is an IPv4-mapped IPv6 address")
    return ip


def _family(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> int:
    return socket.AF_INET6 if ip.version == 6 else socket.AF_INET


def _metadata(obj: Mapping[str, Any]) -> tuple[str, str, Mapping[str, Any], Mapping[str, Any]]:
    meta = _dict(obj.get("metadata"), "metadata")
    ns = _str(meta.get("namespace"), "metadata.namespace", required=True)
    name = _str(meta.get("name"), "metadata.name", required=True)
    labels = _dict(meta.get("labels"), "metadata.labels")
    annotations = _dict(meta.get("annotations"), "metadata.annotations")
    return ns, name, labels, annotations


def _object_key(obj: object) -> str:
    """Best-effort ``ns/name`` for error messages about objects too broken to parse."""
    if isinstance(obj, Mapping):
        meta = obj.get("metadata")
        if isinstance(meta, Mapping):
            return f"{meta.get('namespace', '?')}/{meta.get('name', '?')}"
    return "?/?"


def service_key(service: Mapping[str, Any]) -> str:
    """``ns/name`` of a Service (or any namespaced object); ``"?/?"`` if unreadable."""
    return _object_key(service)


def slice_service_key(endpoint_slice: Mapping[str, Any]) -> str | None:
    """``ns/service`` an EndpointSlice belongs to, or None if it names no service."""
    meta = endpoint_slice.get("metadata")
    if not isinstance(meta, Mapping):
        return None
    labels = meta.get("labels")
    ns = meta.get("namespace")
    if not isinstance(labels, Mapping) or not isinstance(ns, str):
        return None
    svc = labels.get(LABEL_SERVICE_NAME)
    return f"{ns}/{svc}" if isinstance(svc, str) and svc else None


# --------------------------------------------------------------------------- endpoints


@dataclass(frozen=True, slots=True)
class _Endpoint:
    ip: str
    ports: Mapping[tuple[str, str], int]  # (port name, protocol) -> port
    ready: bool
    serving: bool
    terminating: bool
    node: str
    zones: frozenset[str] | None  # None: no hints at all

    def rank(self) -> int:
        return 2 if self.ready else 1 if self.serving and self.terminating else 0


def _slice_endpoints(
    sl: Mapping[str, Any], family: int, errors: list[ObjectError]
) -> list[_Endpoint]:
    key = _object_key(sl)
    try:
        addr_type = _str(sl.get("addressType"), "addressType", required=True)
        if addr_type not in _FAMILIES:
            if addr_type == "FQDN":
                return []  # kube-proxy ignores FQDN slices
            raise _Bad(f"unknown addressType {addr_type!r}")
        if _FAMILIES[addr_type] != family:
            return []
        ports: dict[tuple[str, str], int] = {}
        for i, p in enumerate(_list(sl.get("ports"), "ports")):
            p = _dict(p, f"ports[{i}]")
            proto = _str(p.get("protocol"), f"ports[{i}].protocol") or "TCP"
            port = _port(p.get("port"), f"ports[{i}].port", required=False)
            if port is not None:
                ports[(_str(p.get("name"), f"ports[{i}].name"), proto)] = port
        raw_endpoints = _list(sl.get("endpoints"), "endpoints")
    except _Bad as e:
        errors.append(ObjectError("EndpointSlice", key, str(e)))
        return []
    out = []
    for i, ep in enumerate(raw_endpoints):
        try:
            out.append(_endpoint(ep, i, family, ports))
        except _Bad as e:
            errors.append(ObjectError("EndpointSlice", key, str(e)))
    return out


def _endpoint(ep: object, i: int, family: int, ports: Mapping[tuple[str, str], int]) -> _Endpoint:
    ep = _dict(ep, f"endpoints[{i}]")
    addresses = _list(ep.get("addresses"), f"endpoints[{i}].addresses")
    if not addresses:
        raise _Bad(f"endpoints[{i}].addresses is empty")
    ip = _ip(addresses[0], f"endpoints[{i}].addresses[0]")  # kube-proxy uses the first only
    if _family(ip) != family:
        raise _Bad(f"endpoints[{i}].addresses[0] {ip} does not match the slice's addressType")
    cond = _dict(ep.get("conditions"), f"endpoints[{i}].conditions")
    flags = {}
    for name in ("ready", "serving", "terminating"):
        value = cond.get(name)
        if value is not None and not isinstance(value, bool):
            raise _Bad(f"endpoints[{i}].conditions.{name} must be a boolean")
        flags[name] = value
    # API semantics: unset ready means ready; unset serving follows ready.
    ready = flags["ready"] is not False
    serving = ready if flags["serving"] is None else bool(flags["serving"])
    terminating = bool(flags["terminating"])
    node = _str(ep.get("nodeName"), f"endpoints[{i}].nodeName")
    hints = _dict(ep.get("hints"), f"endpoints[{i}].hints")
    zones: frozenset[str] | None = None
    if "forZones" in hints:
        zlist = _list(hints.get("forZones"), f"endpoints[{i}].hints.forZones")
        zones = frozenset(
            _str(_dict(z, "forZones[]").get("name"), "forZones[].name") for z in zlist
        )
    return _Endpoint(str(ip), ports, ready, serving, terminating, node, zones)


def _merge(endpoints: Iterable[_Endpoint], pkey: tuple[str, str]) -> list[_Endpoint]:
    """Endpoints serving port ``pkey``, de-duplicated by address and port across slices,
    keeping the most usable copy; sorted so that output does not depend on slice order."""
    best: dict[tuple[str, int], _Endpoint] = {}
    for ep in endpoints:
        port = ep.ports.get(pkey)
        if port is None:
            continue
        old = best.get((ep.ip, port))
        if old is None or ep.rank() > old.rank():
            best[(ep.ip, port)] = ep
    order = sorted(best, key=lambda k: (_parse_ip(k[0]), k[1]))
    return [best[k] for k in order]


def _usable(eps: list[_Endpoint]) -> list[_Endpoint]:
    ready = [e for e in eps if e.ready]
    return ready or [e for e in eps if e.serving and e.terminating]


def _topology(eps: list[_Endpoint], zone: str | None) -> list[_Endpoint] | None:
    """The zone-hinted subset of ready endpoints, or None when hints cannot be used."""
    ready = [e for e in eps if e.ready]
    if not zone or not ready or any(e.zones is None for e in ready):
        return None
    local = [e for e in ready if e.zones is not None and zone in e.zones]
    return local or None


# --------------------------------------------------------------------------- services


@dataclass(frozen=True, slots=True)
class _Tuning:
    scheduler: str
    affinity_netmask: int
    affinity_netmask6: int
    sh_fallback: bool
    sh_port: bool


def _tuning(
    annotations: Mapping[str, Any], default_scheduler: str, schedulers: frozenset[str]
) -> _Tuning:
    def get(name: str) -> str | None:
        value = annotations.get(ANNOTATION_PREFIX + name)
        if value is None:
            return None
        if not isinstance(value, str):
            raise _Bad(f"annotation {ANNOTATION_PREFIX}{name} must be a string")
        return value.strip()

    def flag(name: str) -> bool:
        value = get(name)
        if value is None:
            return False
        if value.lower() not in _BOOL:
            raise _Bad(f"annotation {ANNOTATION_PREFIX}{name} must be true or false, got {value!r}")
        return _BOOL[value.lower()]

    def netmask(name: str, top: int) -> int:
        value = get(name)
        if value is None:
            return top
        if not value.isdigit() or not 1 <= int(value) <= top:
            raise _Bad(f"annotation {ANNOTATION_PREFIX}{name} must be 1-{top}, got {value!r}")
        return int(value)

    scheduler = get("scheduler") or default_scheduler
    if scheduler not in schedulers:
        known = ", ".join(sorted(schedulers))
        raise _Bad(f"annotation {ANNOTATION_PREFIX}scheduler: unknown {scheduler!r} ({known})")
    return _Tuning(
        scheduler=scheduler,
        affinity_netmask=netmask("affinity-netmask", 32),
        affinity_netmask6=netmask("affinity-netmask6", 128),
        sh_fallback=flag("sh-fallback"),
        sh_port=flag("sh-port"),
    )


def _affinity(spec: Mapping[str, Any]) -> int:
    kind = _str(spec.get("sessionAffinity"), "spec.sessionAffinity") or "None"
    if kind == "None":
        return 0
    if kind != "ClientIP":
        raise _Bad(f"unknown spec.sessionAffinity {kind!r}")
    cfg = _dict(spec.get("sessionAffinityConfig"), "spec.sessionAffinityConfig")
    client_ip = _dict(cfg.get("clientIP"), "spec.sessionAffinityConfig.clientIP")
    timeout = client_ip.get("timeoutSeconds")
    if timeout is None:
        return DEFAULT_AFFINITY_TIMEOUT
    if not isinstance(timeout, int) or isinstance(timeout, bool):
        raise _Bad("spec.sessionAffinityConfig.clientIP.timeoutSeconds must be an integer")
    if not 1 <= timeout <= MAX_AFFINITY_TIMEOUT:
        raise _Bad(f"timeoutSeconds {timeout} is out of range 1-{MAX_AFFINITY_TIMEOUT}")
    return timeout


def _ips(
    raw: Iterable[object], what: str, kind_key: tuple[str, str], errors: list[ObjectError]
) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    out = []
    for i, text in enumerate(raw):
        try:
            out.append(_ip(text, f"{what}[{i}]"))
        except _Bad as e:
            errors.append(ObjectError(*kind_key, str(e)))
    return out


def translate_service(
    service: Mapping[str, Any],
    slices: Iterable[Mapping[str, Any]],
    node: NodeInfo,
    *,
    default_scheduler: str = "rr",
    schedulers: frozenset[str] = SCHEDULERS,
) -> Translation:
    """Translate one Service and the EndpointSlices that belong to it; ``schedulers`` are
    the ones an annotation may choose (offload mode allows the kernel's)."""
    errors: list[ObjectError] = []
    key = _object_key(service)
    try:
        if not isinstance(service, Mapping):
            raise _Bad(f"object must be an object, got {type(service).__name__}")
        out = _service(service, list(slices), node, default_scheduler, schedulers, errors)
    except _Bad as e:
        errors.append(ObjectError("Service", key, str(e)))
        out = []
    return Translation(tuple(out), tuple(dict.fromkeys(errors)))


def _service(
    service: Mapping[str, Any],
    slices: list[Mapping[str, Any]],
    node: NodeInfo,
    default_scheduler: str,
    schedulers: frozenset[str],
    errors: list[ObjectError],
) -> list[KubeVirtualService]:
    ns, name, labels, annotations = _metadata(service)
    key = f"{ns}/{name}"
    if LABEL_PROXY_NAME in labels or LABEL_HEADLESS in labels:
        return []
    spec = _dict(service.get("spec"), "spec")
    svc_type = _str(spec.get("type"), "spec.type") or "ClusterIP"
    if svc_type == "ExternalName":
        return []
    if svc_type not in ("ClusterIP", "NodePort", "LoadBalancer"):
        raise _Bad(f"unknown spec.type {svc_type!r}")
    cluster_ip = _str(spec.get("clusterIP"), "spec.clusterIP")
    if cluster_ip in ("", "None"):
        return []
    raw_ips = _list(spec.get("clusterIPs"), "spec.clusterIPs") or [cluster_ip]
    cluster_ips = [_ip(ip, f"spec.clusterIPs[{i}]") for i, ip in enumerate(raw_ips)]
    tuning = _tuning(annotations, default_scheduler, schedulers)
    affinity = _affinity(spec)
    internal_local = _policy(spec, "internalTrafficPolicy")
    external_local = _policy(spec, "externalTrafficPolicy")
    topology = _str(spec.get("trafficDistribution"), "spec.trafficDistribution")
    topo_annotation = annotations.get(ANNOTATION_TOPOLOGY, annotations.get(ANNOTATION_TOPOLOGY_OLD))
    use_topology = topology in _TOPOLOGY_DISTRIBUTIONS or (
        isinstance(topo_annotation, str) and topo_annotation.lower() == "auto"
    )

    where = ("Service", key)
    raw_external = _list(spec.get("externalIPs"), "spec.externalIPs")
    external = _ips(raw_external, "spec.externalIPs", where, errors)
    status = _dict(service.get("status"), "status")
    lb = _dict(status.get("loadBalancer"), "status.loadBalancer")
    for i, ing in enumerate(_list(lb.get("ingress"), "status.loadBalancer.ingress")):
        try:
            ing = _dict(ing, f"status.loadBalancer.ingress[{i}]")
            if ing.get("ip") in (None, "") or ing.get("ipMode") == "Proxy":
                continue  # hostname-only, or the LB proxies itself and needs no VIP here
            external.append(_ip(ing.get("ip"), f"status.loadBalancer.ingress[{i}].ip"))
        except _Bad as e:
            errors.append(ObjectError(*where, str(e)))
    node_ips = _ips(node.addresses, "addresses", ("Node", node.name), errors)

    own_slices = [s for s in slices if slice_service_key(s) == key]
    own_slices.sort(key=lambda s: str(_dict(s.get("metadata"), "metadata").get("name", "")))
    families: list[int] = []
    for ip in cluster_ips:
        if _family(ip) not in families:
            families.append(_family(ip))
    endpoints = {
        fam: [ep for s in own_slices for ep in _slice_endpoints(s, fam, errors)] for fam in families
    }

    out = []
    for i, raw_port in enumerate(_list(spec.get("ports"), "spec.ports")):
        try:
            port = _dict(raw_port, f"spec.ports[{i}]")
            port_name = _str(port.get("name"), f"spec.ports[{i}].name")
            proto_text = _str(port.get("protocol"), f"spec.ports[{i}].protocol") or "TCP"
            if proto_text not in _PROTOCOLS:
                raise _Bad(f"spec.ports[{i}]: protocol {proto_text} is not supported")
            number = _port(port.get("port"), f"spec.ports[{i}].port")
            assert number is not None
            node_port = None
            if svc_type != "ClusterIP":
                node_port = _port(port.get("nodePort"), f"spec.ports[{i}].nodePort", required=False)
        except _Bad as e:
            errors.append(ObjectError(*where, str(e)))
            continue
        label = port_name or str(number)
        for n, fam in enumerate(families):
            name_ = f"{key}:{label}/{_PROTOCOLS[proto_text]}"
            if n:
                name_ += "/" + _FAMILY_SUFFIX[fam]
            pkey = (port_name, proto_text)
            eps = _merge(endpoints[fam], pkey)
            local = [e for e in eps if node.name and e.node == node.name]
            usable_local = _usable(local)
            cluster = (use_topology and _topology(eps, node.zone)) or _usable(eps)
            backends = _backends(usable_local if internal_local else cluster, pkey, fam)
            # Mostly both policies pick the same endpoints: one tuple then serves both.
            external_backends = (
                backends
                if internal_local == external_local
                else _backends(usable_local if external_local else cluster, pkey, fam)
            )
            out.append(
                KubeVirtualService(
                    name=name_,
                    service=key,
                    port_name=port_name,
                    protocol=_PROTOCOLS[proto_text],
                    family=fam,
                    cluster_vips=_addrs(cluster_ips, number, fam),
                    external_vips=_addrs(external, number, fam),
                    node_port_vips=_addrs(node_ips, node_port, fam) if node_port else (),
                    scheduler=tuning.scheduler,
                    affinity_timeout=affinity,
                    affinity_netmask=tuning.affinity_netmask,
                    affinity_netmask6=tuning.affinity_netmask6,
                    sh_fallback=tuning.sh_fallback,
                    sh_port=tuning.sh_port,
                    backends=backends,
                    external_backends=external_backends,
                )
            )
    return out


def _backends(chosen: list[_Endpoint], pkey: tuple[str, str], fam: int) -> tuple[KubeBackend, ...]:
    return tuple(KubeBackend(Address(e.ip, e.ports[pkey], fam)) for e in chosen)


def _addrs(
    ips: Iterable[ipaddress.IPv4Address | ipaddress.IPv6Address], port: int, fam: int
) -> tuple[Address, ...]:
    seen = dict.fromkeys(str(ip) for ip in ips if _family(ip) == fam)
    return tuple(Address(ip, port, fam) for ip in seen)


def _policy(spec: Mapping[str, Any], field: str) -> bool:
    value = _str(spec.get(field), f"spec.{field}") or "Cluster"
    if value not in ("Cluster", "Local"):
        raise _Bad(f"unknown spec.{field} {value!r}")
    return value == "Local"


def _valid_ip(text: str, node: NodeInfo, errors: list[ObjectError]) -> bool:
    return bool(_ips([text], "addresses", ("Node", node.name), errors))


def _has_label(obj: object, label: str) -> bool:
    meta = obj.get("metadata") if isinstance(obj, Mapping) else None
    labels = meta.get("labels") if isinstance(meta, Mapping) else None
    return isinstance(labels, Mapping) and label in labels


def translate(
    services: Iterable[Mapping[str, Any]],
    slices: Iterable[Mapping[str, Any]],
    node: NodeInfo,
    *,
    default_scheduler: str = "rr",
    schedulers: frozenset[str] = SCHEDULERS,
) -> Translation:
    """Translate a whole snapshot; output is sorted by name, errors in input order."""
    by_service: dict[str, list[Mapping[str, Any]]] = {}
    errors: list[ObjectError] = []
    # Report bad node addresses once, not once per service.
    good = [ip for ip in node.addresses if _valid_ip(ip, node, errors)]
    node = NodeInfo(node.name, tuple(good), node.zone)
    for sl in slices:
        owner = slice_service_key(sl) if isinstance(sl, Mapping) else None
        if owner is None:
            if not _has_label(sl, LABEL_HEADLESS):
                errors.append(
                    ObjectError("EndpointSlice", _object_key(sl), f"no {LABEL_SERVICE_NAME} label")
                )
            continue
        by_service.setdefault(owner, []).append(sl)
    out: list[KubeVirtualService] = []
    for svc in services:
        result = translate_service(
            svc,
            by_service.get(_object_key(svc), ()),
            node,
            default_scheduler=default_scheduler,
            schedulers=schedulers,
        )
        out.extend(result.services)
        errors.extend(result.errors)
    out.sort(key=lambda s: s.name)
    return Translation(tuple(out), tuple(errors))
