"""Translated Kubernetes services -> one l4lb :class:`~l4lb.config.Config` (pure, no I/O).

Rules:

1. One :class:`~l4lb.config.ServiceConfig` per :class:`KubeVirtualService`, named from the
   translation name with ``_`` for its separators (``default/web:http/tcp`` becomes
   ``default_web_http_tcp``; Kubernetes names never contain ``_``, so the name stays
   unambiguous and is a valid config name usable in admin API paths and metrics labels).
   Names longer than 63 characters keep a readable head and end in a hash.
2. Under a Local traffic policy the external backends differ from the cluster ones; the
   external VIPs and the NodePort then get a second service named ``<name>_external``.
3. A NodePort is held by a real socket: the service's ``listen`` is the wildcard address
   of its family on the node port, so the port shows up in ``ss`` and nothing else can take
   it; the cluster and external VIPs are REDIRECTed to that same listener. In offload mode
   (IPVS) the node's addresses on the node port become VIPs instead.
4. Other services listen on a kernel-chosen port, or on one from ``--proxy-port-range``;
   :class:`PortAllocator` keeps a service on the same port from one sync to the next.
5. A failed dial moves to the next endpoint, as the legacy proxy did (four attempts with
   250 ms, 500 ms, 1 s and 2 s timeouts, 3.75 s in all): here every attempt gets
   :data:`CONNECT_TIMEOUT` and :data:`CONNECT_RETRIES` further endpoints are tried, so a
   client waits at most 4 s, about as long, and a fast refusal moves on at once.
6. A VIP or node port already used by an earlier service (same protocol), or a VIP that is
   not a unicast address, drops that address (or that service) with one
   :class:`~l4lb.k8s.translate.ObjectError`; the other services are unaffected.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from l4lb.config import (
    Address,
    AdminConfig,
    BackendConfig,
    Config,
    DataplaneConfig,
    ServiceConfig,
)
from l4lb.k8s.translate import KubeBackend, KubeVirtualService, ObjectError

__all__ = [
    "CONNECT_RETRIES",
    "CONNECT_TIMEOUT",
    "BuildCache",
    "BuildSettings",
    "PortAllocator",
    "build_config",
    "config_name",
    "rebuild",
]

CONNECT_TIMEOUT = 1.0
CONNECT_RETRIES = 3
EXTERNAL_SUFFIX = "_external"
_MAX_NAME = 63
_WILDCARD: dict[int, str] = {socket.AF_INET: "0.0.0.0", socket.AF_INET6: "::"}


def config_name(translation_name: str, suffix: str = "") -> str:
    """A valid, stable config name for a translation name (see rule 1)."""
    name = translation_name.replace("/", "_").replace(":", "_") + suffix
    if len(name) <= _MAX_NAME:
        return name
    digest = hashlib.sha1(name.encode()).hexdigest()[:10]
    return f"{name[: _MAX_NAME - 11]}-{digest}"


class PortAllocator:
    """Hands out listener ports from ``[begin, end]``, stably per service name.

    A service keeps its port while it exists; ports of services that disappear are freed
    at the next :meth:`retain`.
    """

    def __init__(self, begin: int, end: int) -> None:
        if not 1 <= begin <= end <= 65535:
            raise ValueError(f"invalid port range {begin}-{end}")
        self.begin, self.end = begin, end
        self._ports: dict[str, int] = {}
        self._used: set[int] = set()
        self._next = begin

    def get(self, name: str) -> int | None:
        """The port of ``name``, allocating one; None when the range is used up."""
        port = self._ports.get(name)
        if port is not None:
            return port
        size = self.end - self.begin + 1
        if len(self._used) >= size:
            return None
        for _ in range(size):
            candidate = self._next
            self._next = self.begin if candidate >= self.end else candidate + 1
            if candidate not in self._used:
                self._ports[name] = candidate
                self._used.add(candidate)
                return candidate
        return None  # pragma: no cover - the size check above rules this out

    def retain(self, names: Iterable[str]) -> None:
        """Free the ports of every service not in ``names``."""
        keep = set(names)
        for name in [n for n in self._ports if n not in keep]:
            self._used.discard(self._ports.pop(name))


@dataclass(frozen=True, slots=True)
class BuildSettings:
    """What :func:`build_config` needs besides the services."""

    offload: bool = False
    udp_timeout: float = 0.25
    admin: AdminConfig = field(default_factory=AdminConfig)
    dataplane: DataplaneConfig = field(default_factory=DataplaneConfig)
    source: str = "kubernetes"


def _backends(backends: tuple[KubeBackend, ...]) -> tuple[BackendConfig, ...]:
    return tuple(BackendConfig(b.address, b.weight) for b in backends)


_Claim = tuple[str, Address, str]  # protocol, address, owner


class _Claims:
    """Which (protocol, address) pairs earlier services already took."""

    def __init__(self, admin: Address) -> None:
        self._owner: dict[tuple[str, Address], str] = {}
        self.log: list[_Claim] = []
        if admin.port:
            self._owner[("tcp", admin)] = "the admin API"

    def claim(self, protocol: str, addr: Address, owner: str) -> str | None:
        """Take ``addr``; return who already has it, or None."""
        prev = self._owner.setdefault((protocol, addr), owner)
        if prev == owner:
            self.log.append((protocol, addr, owner))
            return None
        return prev

    def claim_all(self, claims: Iterable[_Claim]) -> bool:
        """Take every one of ``claims`` if none is taken by someone else; else take none."""
        claims = tuple(claims)
        for protocol, addr, owner in claims:
            if self._owner.get((protocol, addr), owner) != owner:
                return False
        for protocol, addr, owner in claims:
            self._owner[(protocol, addr)] = owner
        return True


@dataclass(frozen=True, slots=True)
class _Built:
    kvs: KubeVirtualService
    services: tuple[ServiceConfig, ...]
    claims: tuple[_Claim, ...]


class BuildCache:
    """What :func:`build_config` made of each translated service last time.

    A service that is the very same :class:`KubeVirtualService` object (see
    :class:`~l4lb.k8s.incremental.IncrementalTranslator`) and can take the same addresses
    again reuses its ServiceConfigs. Only results without errors are kept, so every problem
    is reported on every pass.
    """

    def __init__(self) -> None:
        self._entries: dict[str, _Built] = {}
        self.reused = 0

    def get(self, kvs: KubeVirtualService) -> _Built | None:
        entry = self._entries.get(kvs.name)
        return entry if entry is not None and entry.kvs is kvs else None


def _unicast(addr: Address) -> bool:
    return _unicast_host(addr.host)


@functools.lru_cache(maxsize=1 << 16)
def _unicast_host(host: str) -> bool:
    ip = ipaddress.ip_address(host)
    return not (ip.is_unspecified or ip.is_multicast or ip.is_loopback)


def build_config(
    services: Iterable[KubeVirtualService],
    settings: BuildSettings,
    ports: PortAllocator | None = None,
    cache: BuildCache | None = None,
) -> tuple[Config, list[ObjectError]]:
    """Map translated services to a Config; return it and what had to be dropped.

    ``cache`` (kept across calls with the same ``settings``) skips unchanged services.
    """
    errors: list[ObjectError] = []
    claims = _Claims(settings.admin.listen)
    out: list[tuple[KubeVirtualService, ServiceConfig]] = []
    entries: dict[str, _Built] = {}
    reused = 0
    for kvs in services:
        hit = cache.get(kvs) if cache is not None else None
        if hit is not None and claims.claim_all(hit.claims):
            out.extend((kvs, svc) for svc in hit.services)
            entries[kvs.name] = hit
            reused += 1
            continue
        first_error, first_claim = len(errors), len(claims.log)
        made = _build_one(kvs, settings, claims, errors)
        out.extend((kvs, svc) for svc in made)
        if len(errors) == first_error:
            entries[kvs.name] = _Built(kvs, made, tuple(claims.log[first_claim:]))
    if cache is not None:
        cache._entries = entries
        cache.reused = reused
    if ports is not None and not settings.offload:
        out = _with_ports(out, ports, errors)
    config = Config(
        source=settings.source,
        admin=settings.admin,
        dataplane=settings.dataplane,
        services=tuple(svc for _, svc in out),
    )
    return config, errors


def _build_one(
    kvs: KubeVirtualService, settings: BuildSettings, claims: _Claims, errors: list[ObjectError]
) -> tuple[ServiceConfig, ...]:
    """The ServiceConfigs of one translated service (see rules 1 to 3 and 6)."""
    groups: list[tuple[str, tuple[Address, ...], tuple[Address, ...], tuple[KubeBackend, ...]]]
    if kvs.external_backends != kvs.backends:
        groups = [
            (config_name(kvs.name), kvs.cluster_vips, (), kvs.backends),
            (
                config_name(kvs.name, EXTERNAL_SUFFIX),
                kvs.external_vips,
                kvs.node_port_vips,
                kvs.external_backends,
            ),
        ]
    else:
        groups = [
            (
                config_name(kvs.name),
                kvs.cluster_vips + kvs.external_vips,
                kvs.node_port_vips,
                kvs.backends,
            )
        ]
    made = []
    for name, raw_vips, node_ports, backends in groups:
        svc = _service(kvs, name, raw_vips, node_ports, backends, settings, claims, errors)
        if svc is not None:
            made.append(svc)
    return tuple(made)


def rebuild(
    kvs: KubeVirtualService,
    settings: BuildSettings,
    cache: BuildCache,
    ports: PortAllocator | None = None,
) -> tuple[ServiceConfig, ...] | None:
    """The ServiceConfigs of one changed service, as :func:`build_config` would make them
    for the whole set, when that needs no other service: the previous pass built it without
    errors and it takes exactly the same addresses again (so no other service gains or
    loses one). None when it does not hold and only a full :func:`build_config` can tell.
    """
    old = cache._entries.get(kvs.name)
    if old is None:
        return None
    if old.kvs is kvs:
        made = old.services
    else:
        claims = _Claims(settings.admin.listen)
        errors: list[ObjectError] = []
        made = _build_one(kvs, settings, claims, errors)
        if errors or tuple(claims.log) != old.claims:
            return None
        if [s.name for s in made] != [s.name for s in old.services]:
            return None
        cache._entries[kvs.name] = _Built(kvs, made, old.claims)
    if ports is None or settings.offload:
        return made
    out = []
    for svc in made:
        if svc.listen is None:
            port = ports.get(svc.name)
            if port is None:
                return None
            svc = replace(svc, listen=Address(_WILDCARD[kvs.family], port, kvs.family))
        out.append(svc)
    return tuple(out)


def _with_ports(
    services: list[tuple[KubeVirtualService, ServiceConfig]],
    ports: PortAllocator,
    errors: list[ObjectError],
) -> list[tuple[KubeVirtualService, ServiceConfig]]:
    """Give services without a listen address one from ``ports`` (freeing the ports of
    services that are gone first, so that they can be reused at once)."""
    ports.retain(svc.name for _, svc in services)
    out = []
    for kvs, svc in services:
        if svc.listen is None:
            port = ports.get(svc.name)
            if port is None:
                message = f"no free port left in the proxy port range {ports.begin}-{ports.end}"
                errors.append(ObjectError("Service", kvs.service, f"{kvs.name}: {message}"))
                continue
            svc = replace(svc, listen=Address(_WILDCARD[kvs.family], port, kvs.family))
        out.append((kvs, svc))
    return out


def _service(
    kvs: KubeVirtualService,
    name: str,
    raw_vips: tuple[Address, ...],
    node_ports: tuple[Address, ...],
    backends: tuple[KubeBackend, ...],
    settings: BuildSettings,
    claims: _Claims,
    errors: list[ObjectError],
) -> ServiceConfig | None:
    def drop(message: str) -> None:
        errors.append(ObjectError("Service", kvs.service, f"{kvs.name}: {message}"))

    listen: Address | None = None
    node_port = next((a.port for a in node_ports), None)
    vip_candidates = list(raw_vips)
    if settings.offload:
        vip_candidates += [a for a in node_ports if _unicast(a)]
    elif node_port is not None:
        listen = Address(_WILDCARD[kvs.family], node_port, kvs.family)
        owner = claims.claim(kvs.protocol, listen, name)
        if owner is not None:
            drop(f"node port {node_port}/{kvs.protocol} is already used by {owner}")
            return None
    vips: list[Address] = []
    for vip in dict.fromkeys(vip_candidates):
        if not _unicast(vip):
            drop(f"VIP {vip} is not a unicast address, skipped")
            continue
        owner = claims.claim(kvs.protocol, vip, name)
        if owner is not None:
            drop(f"VIP {vip}/{kvs.protocol} is already used by {owner}, skipped")
            continue
        vips.append(vip)
    if not vips and listen is None:
        return None
    return ServiceConfig(
        name=name,
        listen=listen,
        vips=tuple(vips),
        protocol=kvs.protocol,
        mode="offload" if settings.offload else "splice",
        scheduler=kvs.scheduler,
        affinity_timeout=float(kvs.affinity_timeout),
        affinity_netmask=kvs.affinity_netmask,
        affinity_netmask6=kvs.affinity_netmask6,
        sh_fallback=kvs.sh_fallback,
        sh_port=kvs.sh_port,
        connect_timeout=CONNECT_TIMEOUT,
        retries=CONNECT_RETRIES,
        udp_idle_timeout=settings.udp_timeout,
        backends=_backends(backends),
    )
