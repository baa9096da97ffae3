"""Desired data-plane state and the ordered diff that moves a sink from one state to another.

Both sinks (the userspace splicer and kernel IPVS) are driven by the same ordered list of
operations, shaped like ``ipvsadm`` commands. IPVS inserts each new destination at the
head of its list and several schedulers (rr, wrr) walk that list, so the order of "add"
operations decides the order in which backends are picked. Feeding both sinks the same
operations keeps their destination lists, and therefore their choices, identical.

Everything here is pure: no I/O, no clocks, no mutation of the inputs.
"""

from __future__ import annotations

import math
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from l4lb.config import Address, Config, ServiceConfig

__all__ = [
    "FLAG_PERSISTENT",
    "FLAG_SH_FALLBACK",
    "FLAG_SH_PORT",
    "DestOp",
    "DestSpec",
    "Health",
    "Override",
    "ServicePlan",
    "ServiceSpec",
    "desired_specs",
    "desired_state",
    "listeners",
    "plan",
    "ramped_weight",
]

# IPVS service flags (include/uapi/linux/ip_vs.h): IP_VS_SVC_F_PERSISTENT, _SCHED1, _SCHED2.
FLAG_PERSISTENT = 0x1
FLAG_SH_FALLBACK = 0x8
FLAG_SH_PORT = 0x10


@dataclass(frozen=True, slots=True)
class Override:
    """A runtime change to one backend, made through the admin API.

    ``drain`` wins over ``weight``: a drained backend is programmed with weight 0.
    """

    weight: int | None = None
    drain: bool = False


@dataclass(frozen=True, slots=True)
class Health:
    """What health checking says about one backend, as an input to :func:`desired_state`.

    A down backend is programmed with weight 0 (keepalived's ``inhibit_on_failure``), so
    it keeps its place in the destination list and its open connections; with
    ``inhibit_on_failure = false`` it is removed from the service instead. ``ramp`` is the
    slow-start fraction of the weight an up backend gets, in (0, 1].
    """

    up: bool = True
    ramp: float = 1.0


def ramped_weight(weight: int, ramp: float) -> int:
    """``weight`` scaled by a slow-start ``ramp``, never 0 unless ``weight`` is 0."""
    if weight <= 0 or ramp >= 1.0:
        return weight
    return max(1, math.floor(weight * ramp))


@dataclass(frozen=True, slots=True)
class DestSpec:
    """One destination as it must be programmed (``weight`` is the effective weight)."""

    address: Address
    weight: int
    upper_threshold: int
    lower_threshold: int


@dataclass(frozen=True, slots=True)
class ServiceSpec:
    """One virtual service as it must be programmed, with every default resolved."""

    name: str
    listen: Address | None
    protocol: str
    scheduler: str
    flags: int
    persist_timeout: float
    persist_netmask: int
    persist_netmask6: int
    expire_quiescent: bool
    connect_timeout: float
    idle_timeout: float
    drain_timeout: float
    retries: int
    dests: tuple[DestSpec, ...]
    vips: tuple[Address, ...] = ()
    mode: str = "splice"
    send_proxy: str | None = None
    max_connections: int = 0


_WILDCARDS: dict[int, str] = {socket.AF_INET: "0.0.0.0", socket.AF_INET6: "::"}


def listeners(spec: ServiceSpec) -> tuple[Address, ...]:
    """Where the splicer accepts for ``spec``: ``listen``, plus the wildcard address of each
    VIP family that ``listen`` does not already cover.

    REDIRECT delivers to the address of the interface a packet came in on (or loopback for
    the node's own traffic), so a VIP is served by a wildcard listener; its port is
    ``listen``'s when ``listen`` is that family's wildcard, else one the kernel picks.
    """
    found: list[Address] = [] if spec.listen is None else [spec.listen]
    for family in sorted({v.family for v in spec.vips}):
        wildcard = _WILDCARDS[family]
        if not any(a.family == family and a.host == wildcard for a in found):
            found.append(Address(wildcard, 0, family))
    return tuple(found)


@dataclass(frozen=True, slots=True)
class DestOp:
    """One destination command: ``ipvsadm -a`` / ``-e`` / ``-d``.

    For "del" only ``dest.address`` matters.
    """

    kind: Literal["add", "edit", "del"]
    dest: DestSpec


@dataclass(frozen=True, slots=True)
class ServicePlan:
    """What to do with one service, and the destination commands to run, in order.

    Rules:

    1. "add": create the service from ``spec``, then run ``ops`` (one "add" per dest, in
       config order). ``listen_changed`` and ``settings_changed`` are False.
    2. "remove": delete the service with all its dests; ``spec`` is None, ``ops`` empty.
    3. "update" with ``listen_changed``: the service key (listen address or protocol)
       changed, which IPVS can only do by deleting and re-creating the service. ``ops``
       are therefore those of an added service.
    4. "update" otherwise: apply the settings in place if ``settings_changed``, then run
       ``ops``: "del" for dropped addresses (old order), "add" for new ones (config
       order), "edit" for those whose weight or thresholds changed (config order).
    5. "keep": nothing to do. Reordering backends in the config alone is not a change.
    """

    name: str
    action: Literal["add", "update", "remove", "keep"]
    spec: ServiceSpec | None
    listen_changed: bool
    settings_changed: bool
    ops: tuple[DestOp, ...]


def desired_state(
    cfg: Config,
    overrides: Mapping[tuple[str, str], Override] | None = None,
    health: Mapping[tuple[str, str], Health] | None = None,
) -> dict[str, ServiceSpec]:
    """Resolve ``cfg``, runtime ``overrides`` and ``health`` into specs, keyed by name in
    config order.

    ``overrides`` and ``health`` are keyed by ``(service name, str(backend address))``;
    entries naming no configured backend are ignored, so stale ones are harmless. A
    backend without a health entry is up at full weight, and health is ignored for a
    service without a ``[services.health]`` table. Drain wins over everything. When every
    backend of a service is down, its ``all_down`` policy decides: "reject" programs them
    all with weight 0, "all" programs them as if health checking were off.
    """
    overrides = overrides or {}
    health = health or {}
    return {
        svc.name: _service_spec(svc, cfg.dataplane.drain_timeout, overrides, health)
        for svc in cfg.services
    }


def desired_specs(
    cfg: Config,
    names: Iterable[str],
    overrides: Mapping[tuple[str, str], Override] | None = None,
    health: Mapping[tuple[str, str], Health] | None = None,
) -> dict[str, ServiceSpec]:
    """:func:`desired_state` for only the services called ``names``; names that ``cfg``
    does not have are left out."""
    overrides = overrides or {}
    health = health or {}
    drain = cfg.dataplane.drain_timeout
    return {
        svc.name: _service_spec(svc, drain, overrides, health)
        for name in names
        if (svc := cfg.get(name)) is not None
    }


def _service_spec(
    svc: ServiceConfig,
    default_drain: float,
    overrides: Mapping[tuple[str, str], Override],
    health: Mapping[tuple[str, str], Health],
) -> ServiceSpec:
    flags = 0
    if svc.affinity_timeout > 0:
        flags |= FLAG_PERSISTENT
    if svc.sh_fallback:
        flags |= FLAG_SH_FALLBACK
    if svc.sh_port:
        flags |= FLAG_SH_PORT
    states = _health_of(svc, health)
    dests = []
    for backend in svc.backends:
        key = str(backend.address)
        override = overrides.get((svc.name, key))
        weight = backend.weight
        if override is not None and override.weight is not None:
            weight = override.weight
        state = states.get(key)
        if override is not None and override.drain:
            weight = 0
        elif state is not None:
            if not state.up and svc.health is not None and not svc.health.inhibit_on_failure:
                continue
            weight = ramped_weight(weight, state.ramp) if state.up else 0
        dests.append(
            DestSpec(
                address=backend.address,
                weight=weight,
                upper_threshold=backend.upper_threshold,
                lower_threshold=backend.lower_threshold,
            )
        )
    return ServiceSpec(
        name=svc.name,
        listen=svc.listen,
        protocol=svc.protocol,
        scheduler=svc.scheduler,
        flags=flags,
        persist_timeout=svc.affinity_timeout,
        persist_netmask=svc.affinity_netmask,
        persist_netmask6=svc.affinity_netmask6,
        expire_quiescent=svc.expire_quiescent,
        connect_timeout=svc.connect_timeout,
        # A UDP flow's only end is its idle timeout.
        idle_timeout=svc.udp_idle_timeout if svc.protocol == "udp" else svc.idle_timeout,
        drain_timeout=default_drain if svc.drain_timeout is None else svc.drain_timeout,
        retries=-1 if svc.retries is None else svc.retries,
        dests=tuple(dests),
        vips=svc.vips,
        mode=svc.mode,
        send_proxy=svc.send_proxy,
        max_connections=svc.max_connections,
    )


def _health_of(svc: ServiceConfig, health: Mapping[tuple[str, str], Health]) -> dict[str, Health]:
    """The health entries that apply to ``svc``'s backends, after its all_down policy."""
    if svc.health is None or not svc.backends:
        return {}
    states = {}
    for backend in svc.backends:
        state = health.get((svc.name, str(backend.address)))
        if state is not None:
            states[str(backend.address)] = state
    all_down = len(states) == len(svc.backends) and not any(s.up for s in states.values())
    if all_down and svc.health.all_down == "all":
        return {}
    return states


def plan(old: Mapping[str, ServiceSpec], new: Mapping[str, ServiceSpec]) -> list[ServicePlan]:
    """Return the plans that turn ``old`` into ``new``: services in ``new``'s order, then
    the removed ones in ``old``'s order. See :class:`ServicePlan` for the rules.
    """
    plans = [_plan_service(old.get(name), spec) for name, spec in new.items()]
    plans += [
        ServicePlan(name, "remove", None, listen_changed=False, settings_changed=False, ops=())
        for name in old
        if name not in new
    ]
    return plans


def _plan_service(old: ServiceSpec | None, new: ServiceSpec) -> ServicePlan:
    if old is None:
        return ServicePlan(new.name, "add", new, False, False, _add_all(new))
    listen_changed = (
        listeners(old) != listeners(new) or old.protocol != new.protocol or old.mode != new.mode
    )
    settings_changed = _settings(old) != _settings(new)
    if listen_changed:
        return ServicePlan(new.name, "update", new, True, settings_changed, _add_all(new))
    ops = _dest_ops(old.dests, new.dests)
    action: Literal["update", "keep"] = "update" if settings_changed or ops else "keep"
    return ServicePlan(new.name, action, new, False, settings_changed, ops)


def _add_all(spec: ServiceSpec) -> tuple[DestOp, ...]:
    return tuple(DestOp("add", d) for d in spec.dests)


def _settings(spec: ServiceSpec) -> tuple[object, ...]:
    """Everything that ``ipvsadm -E`` (or its userspace equivalent) sets."""
    return (
        spec.protocol,
        spec.scheduler,
        spec.flags,
        spec.persist_timeout,
        spec.persist_netmask,
        spec.persist_netmask6,
        spec.expire_quiescent,
        spec.connect_timeout,
        spec.idle_timeout,
        spec.drain_timeout,
        spec.retries,
        spec.vips,
        spec.send_proxy,
        spec.max_connections,
    )


def _dest_ops(old: tuple[DestSpec, ...], new: tuple[DestSpec, ...]) -> tuple[DestOp, ...]:
    before = {d.address: d for d in old}
    after = {d.address for d in new}
    ops = [DestOp("del", d) for d in old if d.address not in after]
    ops += [DestOp("add", d) for d in new if d.address not in before]
    # Only a real change is an edit: wrr, sh and dh recompute their state on every edit.
    ops += [DestOp("edit", d) for d in new if d.address in before and before[d.address] != d]
    return tuple(ops)
