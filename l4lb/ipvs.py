"""IPVS offload: the kernel sink behind the same desired state as the splice data plane.

Each :class:`~l4lb.state.ServiceSpec` becomes one IPVS virtual service per VIP (its
``vips``, or its listen address when it has none), each with the masquerading real
servers of the VIP's address family, programmed over generic netlink with pyroute2.
The VIPs live on a dummy interface l4lb owns (``l4lb-ipvs0``), and one iptables chain
(``L4LB-IPVS-MASQ``, hooked from nat POSTROUTING) masquerades the forwarded traffic so
backends answer through the balancer whatever their routes.

Reconciliation is level-triggered: a full :meth:`IpvsSink.apply` dumps what the kernel
holds, decodes it into plain dataclasses, diffs it against the specs with
:func:`diff` (pure, no I/O) and issues only the difference. So a no-op apply sends
nothing, a restart does not disturb traffic, and a service deleted by hand comes back.
An apply with ``trust_cache`` diffs only the services whose spec changed against the
state the previous apply left (kept by replaying each command on a copy, as the kernel
would), so one endpoint change costs the same with ten services or ten thousand.

Rules:

1. Ownership: a kernel service is l4lb's when its address is on ``l4lb-ipvs0`` or this
   process created it. Only those are ever deleted; other services are left alone.
2. Destination order: IPVS inserts a new destination at the head of its list and rr/wrr
   walk that list, so new destinations are added in spec order, like the splicer does.
3. Graceful removal: a destination that leaves the spec is set to weight 0 first, and
   deleted once its active connections reach zero or the service's drain timeout passes.
4. Every add/set passes ``fwd_method`` and ``sched_name`` explicitly (pyroute2 defaults
   to direct routing and to wlc), and pyroute2's ``"update"`` verb (a DELETE) is never used.
5. All netlink I/O runs on one dedicated thread that owns its own ``IPVS()``/``IPRoute()``
   objects on a stdlib selector loop: pyroute2 cannot run on uvloop (AF_NETLINK).
   pyroute2 is imported only on that thread, never when l4lb is imported.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import math
import os
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol

from l4lb import netlink
from l4lb.config import Address
from l4lb.state import FLAG_PERSISTENT, ServiceSpec

__all__ = [
    "CHAIN",
    "LINK",
    "Command",
    "Desired",
    "IpvsConfigError",
    "IpvsSink",
    "IpvsUnavailable",
    "KernelDest",
    "KernelService",
    "RealServer",
    "VsKey",
    "VsSettings",
    "cleanup_kernel",
    "decode_dest",
    "decode_service",
    "desired_service",
    "desired_services",
    "dest_fields",
    "diff",
    "error_message",
    "masq_restore",
    "netmask_from_wire",
    "netmask_to_wire",
    "service_fields",
]

log = logging.getLogger(__name__)

LINK = "l4lb-ipvs0"
CHAIN = "L4LB-IPVS-MASQ"
FWD_MASQ = 0
# IP_VS_SVC_F_HASHED: set by the kernel on every listed service, never by us.
_FLAG_HASHED = 0x2
_PROTOCOLS = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP}
_PROTO_NAMES = {v: k for k, v in _PROTOCOLS.items()}
_SYSCTL = "/proc/sys/net/ipv4/vs/"
_COMMENT = "l4lb-vip "


class IpvsUnavailable(RuntimeError):
    """IPVS cannot be used in the running kernel (module, netlink family or privilege)."""


class IpvsConfigError(ValueError):
    """A service spec that IPVS cannot express."""


# ------------------------------------------------------------------ plain kernel model


@dataclass(frozen=True, slots=True, order=True)
class VsKey:
    """A virtual service's identity in IPVS: family, protocol, address, port."""

    af: int
    protocol: int
    addr: str
    port: int

    def __str__(self) -> str:
        proto = _PROTO_NAMES.get(self.protocol, str(self.protocol))
        host = f"[{self.addr}]" if self.af == socket.AF_INET6 else self.addr
        return f"{proto}/{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class VsSettings:
    """What ``ipvsadm -E`` sets: scheduler, flags, persistence timeout and netmask.

    ``netmask`` is a prefix length for both families (the wire forms differ).
    """

    sched: str
    flags: int
    timeout: int
    netmask: int


@dataclass(frozen=True, slots=True)
class RealServer:
    """A destination as programmed: address, forwarding method, weight, thresholds."""

    addr: str
    port: int
    weight: int
    u_thresh: int = 0
    l_thresh: int = 0
    fwd: int = FWD_MASQ

    @property
    def ident(self) -> tuple[str, int]:
        """The destination's identity within its service."""
        return (self.addr, self.port)


@dataclass(frozen=True, slots=True)
class KernelDest:
    """A destination as dumped, with the kernel's counters."""

    server: RealServer
    active: int = 0
    inactive: int = 0
    persistent: int = 0
    conns: int = 0
    inbytes: int = 0
    outbytes: int = 0


@dataclass(frozen=True, slots=True)
class KernelService:
    """A virtual service as dumped; ``dests`` in kernel list order (newest first)."""

    key: VsKey
    settings: VsSettings
    dests: tuple[KernelDest, ...] = ()


@dataclass(frozen=True, slots=True)
class Desired:
    """A spec translated into IPVS terms; ``dests`` in spec (addition) order."""

    name: str
    key: VsKey
    settings: VsSettings
    dests: tuple[RealServer, ...]
    drain_timeout: float


@dataclass(frozen=True, slots=True)
class Command:
    """One netlink command; ``settings`` for service add/set, ``dest`` for dest verbs."""

    verb: Literal["add_service", "set_service", "del_service", "add_dest", "set_dest", "del_dest"]
    key: VsKey
    settings: VsSettings | None = None
    dest: RealServer | None = None


# ------------------------------------------------------------------ spec <-> netlink


def desired_services(spec: ServiceSpec) -> tuple[Desired, ...]:
    """One virtual service per VIP of ``spec`` (its ``listen`` when it has no ``vips``).

    Each VIP gets the backends of its own address family; raise
    :class:`IpvsConfigError` for what IPVS cannot express.
    """
    vips = spec.vips or ((spec.listen,) if spec.listen is not None else ())
    if not vips:
        raise IpvsConfigError(f"service {spec.name}: offload needs a VIP (vips or listen)")
    families = {v.family for v in vips}
    for d in spec.dests:
        if d.address.family not in families:
            raise IpvsConfigError(
                f"service {spec.name}: backend {d.address} is of another address family than"
                " every VIP (IPVS masquerading cannot translate between IPv4 and IPv6)"
            )
    return tuple(desired_service(spec, vip) for vip in vips)


def desired_service(spec: ServiceSpec, vip: Address | None = None) -> Desired:
    """The virtual service of ``spec`` at ``vip`` (default: its listen address or first VIP),
    with the backends of the VIP's family; raise :class:`IpvsConfigError` for what IPVS
    cannot express."""
    listen = vip or (spec.listen if spec.listen is not None else spec.vips[0])
    ip = ipaddress.ip_address(listen.host)
    if ip.is_unspecified:
        raise IpvsConfigError(
            f"service {spec.name}: offload needs a concrete VIP, not {listen.host}"
        )
    if ip.is_link_local:
        raise IpvsConfigError(f"service {spec.name}: a link-local VIP cannot be offloaded")
    if listen.port == 0:
        raise IpvsConfigError(f"service {spec.name}: offload needs a fixed listen port, not 0")
    if spec.protocol not in _PROTOCOLS:
        raise IpvsConfigError(f"service {spec.name}: protocol {spec.protocol!r} not supported")
    v6 = listen.family == socket.AF_INET6
    persistent = bool(spec.flags & FLAG_PERSISTENT)
    if persistent:
        timeout = max(1, math.ceil(spec.persist_timeout))
        netmask = spec.persist_netmask6 if v6 else spec.persist_netmask
        if v6 and not 1 <= netmask <= 128:
            raise IpvsConfigError(
                f"service {spec.name}: IPVS needs an IPv6 affinity prefix of 1..128, not {netmask}"
            )
    else:
        timeout, netmask = 0, 128 if v6 else 32
    if vip is None:
        for d in spec.dests:
            if d.address.family != listen.family:
                raise IpvsConfigError(
                    f"service {spec.name}: backend {d.address} is not of the VIP's address"
                    " family (IPVS masquerading cannot translate between IPv4 and IPv6)"
                )
    dests = tuple(
        RealServer(
            addr=d.address.host,
            port=d.address.port,
            weight=d.weight,
            u_thresh=d.upper_threshold,
            l_thresh=d.lower_threshold,
        )
        for d in spec.dests
        if d.address.family == listen.family
    )
    return Desired(
        name=spec.name,
        key=VsKey(listen.family, _PROTOCOLS[spec.protocol], str(ip), listen.port),
        settings=VsSettings(spec.scheduler, spec.flags, timeout, netmask),
        dests=dests,
        drain_timeout=spec.drain_timeout,
    )


def netmask_to_wire(af: int, prefix: int) -> str:
    """The netmask attribute as pyroute2 encodes it (an IPv4 address string).

    IPv4: the dotted mask. IPv6: the kernel reads a u32 prefix length in host byte
    order, while pyroute2 packs the string in network order, so /128 is "128.0.0.0"
    on a little-endian machine.
    """
    if af == socket.AF_INET6:
        return socket.inet_ntoa(struct.pack("=I", prefix))
    mask = (0xFFFFFFFF << (32 - prefix)) & 0xFFFFFFFF if prefix else 0
    return socket.inet_ntoa(struct.pack("!I", mask))


def netmask_from_wire(af: int, value: str | None) -> int:
    """Inverse of :func:`netmask_to_wire`; a missing attribute means a host mask."""
    if value is None:
        return 128 if af == socket.AF_INET6 else 32
    raw = socket.inet_aton(value)
    if af == socket.AF_INET6:
        return int(struct.unpack("=I", raw)[0])
    return bin(struct.unpack("!I", raw)[0]).count("1")


def service_fields(key: VsKey, settings: VsSettings | None = None) -> dict[str, Any]:
    """Keyword arguments for ``pyroute2.IPVSService``: the key alone, or key + settings."""
    fields: dict[str, Any] = {
        "af": key.af,
        "protocol": key.protocol,
        "addr": key.addr,
        "port": key.port,
        # pyroute2 needs a netmask for IPv6 even to name a service; harmless otherwise.
        "netmask": netmask_to_wire(key.af, 128 if key.af == socket.AF_INET6 else 32),
    }
    if settings is not None:
        fields.update(
            sched_name=settings.sched,
            flags={"flags": settings.flags, "mask": 0xFFFF},
            timeout=settings.timeout,
            netmask=netmask_to_wire(key.af, settings.netmask),
        )
    return fields


def dest_fields(dest: RealServer, *, key_only: bool = False) -> dict[str, Any]:
    """Keyword arguments for ``pyroute2.IPVSDest``; always with ``fwd_method``."""
    fields: dict[str, Any] = {"addr": dest.addr, "port": dest.port}
    if not key_only:
        fields.update(
            fwd_method=dest.fwd,
            weight=dest.weight,
            u_thresh=dest.u_thresh,
            l_thresh=dest.l_thresh,
        )
    return fields


class _Attrs(Protocol):
    def get_attr(self, name: str) -> Any: ...


def decode_service(svc: _Attrs, dests: Iterable[_Attrs] = ()) -> KernelService:
    """A dumped ``IPVS_CMD_ATTR_SERVICE`` (and its ``IPVS_CMD_ATTR_DEST``s) as data."""
    af = int(svc.get_attr("IPVS_SVC_ATTR_AF"))
    flags = svc.get_attr("IPVS_SVC_ATTR_FLAGS") or {"flags": 0}
    key = VsKey(
        af=af,
        protocol=int(svc.get_attr("IPVS_SVC_ATTR_PROTOCOL") or 0),
        addr=str(ipaddress.ip_address(svc.get_attr("IPVS_SVC_ATTR_ADDR") or "0.0.0.0")),
        port=int(svc.get_attr("IPVS_SVC_ATTR_PORT") or 0),
    )
    settings = VsSettings(
        sched=str(svc.get_attr("IPVS_SVC_ATTR_SCHED_NAME") or ""),
        flags=int(flags["flags"]) & ~_FLAG_HASHED,
        timeout=int(svc.get_attr("IPVS_SVC_ATTR_TIMEOUT") or 0),
        netmask=netmask_from_wire(af, svc.get_attr("IPVS_SVC_ATTR_NETMASK")),
    )
    return KernelService(key, settings, tuple(decode_dest(d) for d in dests))


def decode_dest(d: _Attrs) -> KernelDest:
    """A dumped ``IPVS_CMD_ATTR_DEST`` as data."""

    def num(name: str) -> int:
        return int(d.get_attr(name) or 0)

    stats = d.get_attr("IPVS_DEST_ATTR_STATS64")

    def stat(name: str) -> int:
        return int(stats.get_attr(name) or 0) if stats is not None else 0

    server = RealServer(
        addr=str(ipaddress.ip_address(d.get_attr("IPVS_DEST_ATTR_ADDR"))),
        port=num("IPVS_DEST_ATTR_PORT"),
        weight=num("IPVS_DEST_ATTR_WEIGHT"),
        u_thresh=num("IPVS_DEST_ATTR_U_THRESH"),
        l_thresh=num("IPVS_DEST_ATTR_L_THRESH"),
        fwd=num("IPVS_DEST_ATTR_FWD_METHOD") & 0x7,
    )
    return KernelDest(
        server=server,
        active=num("IPVS_DEST_ATTR_ACTIVE_CONNS"),
        inactive=num("IPVS_DEST_ATTR_INACT_CONNS"),
        persistent=num("IPVS_DEST_ATTR_PERSIST_CONNS"),
        conns=stat("IPVS_STATS_ATTR_CONNS"),
        inbytes=stat("IPVS_STATS_ATTR_INBYTES"),
        outbytes=stat("IPVS_STATS_ATTR_OUTBYTES"),
    )


# ------------------------------------------------------------------ the diff

DrainKey = tuple[VsKey, str, int]


def diff(
    desired: Sequence[Desired],
    current: Sequence[KernelService],
    *,
    owned: Callable[[VsKey], bool],
    drains: Mapping[DrainKey, float],
    now: float,
) -> tuple[list[Command], dict[DrainKey, float]]:
    """The commands that move ``current`` to ``desired``, and the new drain deadlines.

    Per service: settings first, then destinations leaving (quiesced to weight 0, deleted
    once idle or past their deadline), then new ones in spec order, then changed ones.
    Then the owned services nobody wants any more. A no-op diff is an empty list.
    """
    cmds: list[Command] = []
    next_drains: dict[DrainKey, float] = {}
    by_key = {s.key: s for s in current}
    for want in desired:
        have = by_key.get(want.key)
        if have is None:
            cmds.append(Command("add_service", want.key, settings=want.settings))
            cmds += [Command("add_dest", want.key, dest=d) for d in want.dests]
            continue
        if have.settings != want.settings:
            cmds.append(Command("set_service", want.key, settings=want.settings))
        wanted = {d.ident: d for d in want.dests}
        present = {d.server.ident: d for d in have.dests}
        # Kernel order is newest first; walk leaving dests in the order they were added.
        for kd in reversed(have.dests):
            if kd.server.ident in wanted:
                continue
            dkey = (want.key, *kd.server.ident)
            deadline = drains.get(dkey, now + want.drain_timeout)
            if kd.server.weight != 0:
                quiet = RealServer(**{**_asdict(kd.server), "weight": 0})
                cmds.append(Command("set_dest", want.key, dest=quiet))
            if kd.active == 0 or now >= deadline:
                cmds.append(Command("del_dest", want.key, dest=kd.server))
            else:
                next_drains[dkey] = deadline
        cmds += [
            Command("add_dest", want.key, dest=d) for d in want.dests if d.ident not in present
        ]
        cmds += [
            Command("set_dest", want.key, dest=d)
            for d in want.dests
            if d.ident in present and present[d.ident].server != d
        ]
    wanted_keys = {w.key for w in desired}
    cmds += [
        Command("del_service", s.key) for s in current if s.key not in wanted_keys and owned(s.key)
    ]
    return cmds, next_drains


def _asdict(r: RealServer) -> dict[str, Any]:
    return {f: getattr(r, f) for f in RealServer.__slots__}


def error_message(cmd: Command, code: int) -> str | None:
    """None when error ``code`` on ``cmd`` means "already done"; otherwise a clear message."""
    already = {
        "add_service": {errno.EEXIST},
        "add_dest": {errno.EEXIST},
        "del_service": {errno.ESRCH, errno.ENOENT},
        "del_dest": {errno.ENOENT, errno.ESRCH},
        # The dest went away meanwhile: the next pass adds it back.
        "set_dest": {errno.ENOENT},
        "set_service": set(),
    }
    if code in already[cmd.verb]:
        return None
    what = cmd.verb.replace("_", " ")
    target = f"{cmd.key}" + (f" -> {cmd.dest.addr}:{cmd.dest.port}" if cmd.dest else "")
    if code == errno.ENOENT and cmd.settings is not None:
        return (
            f"{what} {target}: scheduler {cmd.settings.sched!r} is not available in the "
            f"kernel (no module ip_vs_{cmd.settings.sched})"
        )
    if code == errno.ESRCH:
        return f"{what} {target}: the virtual service does not exist in the kernel"
    if code == errno.ERANGE:
        return f"{what} {target}: weight or thresholds out of range (lower above upper?)"
    if code == errno.EINVAL:
        return f"{what} {target}: the kernel rejected the attributes (EINVAL)"
    if code in (errno.EPERM, errno.EACCES):
        return f"{what} {target}: not permitted (needs CAP_NET_ADMIN)"
    return f"{what} {target}: {os.strerror(code)} (errno {code})"


def masq_restore(vips: Iterable[str], *, v6: bool) -> str:
    """iptables-restore input that atomically rewrites the masquerade chain."""
    bits = 128 if v6 else 32
    lines = ["*nat", f":{CHAIN} - [0:0]"]
    for vip in sorted(vips):
        lines.append(
            f"-A {CHAIN} -m ipvs --vaddr {vip}/{bits} --vdir ORIGINAL --vmethod MASQ"
            f' -m comment --comment "{_COMMENT}{vip}" -j MASQUERADE'
        )
    lines += ["COMMIT", ""]
    return "\n".join(lines)


def _masq_vips(listing: str) -> set[str]:
    """The VIPs that ``iptables -S CHAIN`` shows rules for (read from our comments)."""
    found = set()
    for line in listing.splitlines():
        start = line.find(_COMMENT)
        if line.startswith(f"-A {CHAIN} ") and start >= 0:
            found.add(line[start + len(_COMMENT) :].split('"')[0].split()[0])
    return found


# ------------------------------------------------------------------ kernel access


class Kernel(Protocol):
    """What the sink needs from the kernel; the real one lives on the netlink thread."""

    def dump(self) -> list[KernelService]: ...
    def dump_dests(self, key: VsKey) -> tuple[KernelDest, ...] | None: ...
    def execute(self, cmd: Command) -> None: ...
    def execute_many(self, cmds: Sequence[Command]) -> list[int]: ...
    def link_addrs(self) -> set[str]: ...
    def sync_addrs(self, addrs: set[str]) -> None: ...
    def remove_link(self) -> bool: ...
    def sync_masq(self, vips: set[str]) -> None: ...
    def remove_masq(self) -> list[str]: ...
    def sysctl(self, name: str, value: int) -> None: ...
    def close(self) -> None: ...


class NetlinkError(OSError):
    """A netlink command failed; ``errno`` is the kernel's code."""


class _NetlinkKernel:
    """pyroute2-backed :class:`Kernel`; create and use it on one thread only."""

    def __init__(self) -> None:
        import pyroute2  # type: ignore[import-untyped]

        self._pr = pyroute2
        # One stdlib loop per socket: a global uvloop policy must not leak in here.
        self._loops = [asyncio.SelectorEventLoop(), asyncio.SelectorEventLoop()]
        try:
            self._ipvs = pyroute2.IPVS(use_event_loop=self._loops[0])
        except Exception as e:
            self._close_loops()
            raise IpvsUnavailable(
                f"the generic netlink family IPVS is missing ({e}): load ip_vs"
            ) from e
        self._ipr = pyroute2.IPRoute(use_event_loop=self._loops[1])
        # Bulk work goes over raw sockets in batches (l4lb.netlink); pyroute2 names the
        # family and manages the link.
        self._family = int(self._ipvs.prid)
        self._gen = netlink.NetlinkSocket(netlink.NETLINK_GENERIC)
        self._rt = netlink.NetlinkSocket(netlink.NETLINK_ROUTE)

    def close(self) -> None:
        self._gen.close()
        self._rt.close()
        self._ipvs.close()
        self._ipr.close()
        self._close_loops()

    def _close_loops(self) -> None:
        for loop in self._loops:
            if not loop.is_closed():
                loop.close()

    def _svc(self, key: VsKey, settings: VsSettings | None = None) -> Any:
        return self._pr.IPVSService(**service_fields(key, settings))

    def dump(self) -> list[KernelService]:
        seq = self._gen.next_seq()
        request = netlink.genl_message(
            self._family,
            netlink.CMD["get_service"],
            b"",
            flags=netlink.NLM_F_REQUEST | netlink.NLM_F_DUMP,
            seq=seq,
        )
        heads = []
        for payload in self._gen.dump(request, seq):
            top = netlink.parse_attrs(payload, 4)
            attrs = netlink.parse_attrs(top.get(netlink.CMD_ATTR_SERVICE, b""))
            if netlink.u32(attrs.get(netlink.SVC_FWMARK, b"")):
                continue  # fwmark services are never ours
            heads.append(_raw_service(attrs))
        out = []
        for head in heads:
            dests = self.dump_dests(head.key)
            if dests is not None:  # None: deleted meanwhile
                out.append(KernelService(head.key, head.settings, dests))
        return out

    def dump_dests(self, key: VsKey) -> tuple[KernelDest, ...] | None:
        seq = self._gen.next_seq()
        request = netlink.genl_message(
            self._family,
            netlink.CMD["get_dest"],
            netlink.service_attrs(key.af, key.protocol, key.addr, key.port),
            flags=netlink.NLM_F_REQUEST | netlink.NLM_F_DUMP,
            seq=seq,
        )
        try:
            found = []
            for payload in self._gen.dump(request, seq):
                top = netlink.parse_attrs(payload, 4)
                found.append(_raw_dest(key.af, netlink.parse_attrs(top[netlink.CMD_ATTR_DEST])))
        except OSError as e:
            if e.errno in (errno.ESRCH, errno.ENOENT):
                return None
            raise NetlinkError(e.errno or 0, os.strerror(e.errno or 0)) from e
        return tuple(found)

    def execute(self, cmd: Command) -> None:
        (code,) = self.execute_many([cmd])
        if code:
            raise NetlinkError(code, os.strerror(code))

    def execute_many(self, cmds: Sequence[Command]) -> list[int]:
        return self._gen.request_many(cmds, self._encode)

    def _encode(self, cmd: Command, seq: int) -> bytes:
        key = cmd.key
        settings = None
        if cmd.settings is not None:
            st = cmd.settings
            wire = socket.inet_aton(netmask_to_wire(key.af, st.netmask))
            settings = (st.sched, st.flags, st.timeout, wire)
        attrs = netlink.service_attrs(key.af, key.protocol, key.addr, key.port, settings)
        if cmd.dest is not None:
            d = cmd.dest
            full = None if cmd.verb == "del_dest" else (d.fwd, d.weight, d.u_thresh, d.l_thresh)
            attrs += netlink.dest_attrs(key.af, d.addr, d.port, full)
        return netlink.genl_message(
            self._family,
            netlink.CMD[cmd.verb],
            attrs,
            flags=netlink.NLM_F_REQUEST | netlink.NLM_F_ACK,
            seq=seq,
        )

    def _link_index(self, create: bool) -> int | None:
        found = self._ipr.link_lookup(ifname=LINK)
        if found:
            return int(found[0])
        if not create:
            return None
        self._ipr.link("add", ifname=LINK, kind="dummy")
        idx = int(self._ipr.link_lookup(ifname=LINK)[0])
        self._ipr.link("set", index=idx, state="up")
        return idx

    def link_addrs(self) -> set[str]:
        idx = self._link_index(create=False)
        if idx is None:
            return set()
        seq = self._rt.next_seq()
        # RTM_GETADDR dump with an empty ifaddrmsg; the kernel does not filter by index.
        request = struct.pack("=IHHII", 24, 22, netlink.NLM_F_REQUEST | netlink.NLM_F_DUMP, seq, 0)
        request += bytes(8)
        found = set()
        for payload in self._rt.dump(request, seq):
            family, _plen, _flags, _scope, index = struct.unpack_from("=BBBBI", payload)
            if index != idx:
                continue
            attrs = netlink.parse_attrs(payload, 8)
            raw = attrs.get(netlink.IFA_LOCAL) or attrs.get(netlink.IFA_ADDRESS)
            if raw is None:
                continue
            ip = ipaddress.ip_address(socket.inet_ntop(family, raw))
            if not ip.is_link_local:  # the kernel's own fe80:: on an up link
                found.add(str(ip))
        return found

    def sync_addrs(self, addrs: set[str]) -> None:
        try:
            self._sync_addrs(addrs)
        except self._pr.NetlinkError as e:
            raise NetlinkError(e.code, f"{LINK}: {os.strerror(e.code)}") from e

    def _sync_addrs(self, addrs: set[str]) -> None:
        have = self.link_addrs()
        if have == addrs:
            return
        idx = self._link_index(create=True)
        assert idx is not None
        for add, todo, fine in (
            (True, sorted(addrs - have), errno.EEXIST),
            (False, sorted(have - addrs), errno.EADDRNOTAVAIL),
        ):
            codes = self._rt.request_many(
                todo, lambda a, seq, add=add: netlink.addr_message(add, idx, a, seq=seq)
            )
            for a, code in zip(todo, codes, strict=True):
                if code and code != fine:
                    raise NetlinkError(code, f"{LINK}: {a}: {os.strerror(code)}")

    def remove_link(self) -> bool:
        idx = self._link_index(create=False)
        if idx is None:
            return False
        self._ipr.link("del", index=idx)
        return True

    def sync_masq(self, vips: set[str]) -> None:
        for tool, v6 in (("iptables", False), ("ip6tables", True)):
            fam = {v for v in vips if (ipaddress.ip_address(v).version == 6) == v6}
            listing = _run([tool, "-w", "-t", "nat", "-S", CHAIN], check=False)
            hooked = _run([tool, "-w", "-t", "nat", "-C", "POSTROUTING", "-j", CHAIN], check=False)
            if listing is None and not fam:
                continue  # never created for this family
            if listing is None or _masq_vips(listing) != fam:
                _run([f"{tool}-restore", "-w", "--noflush"], stdin=masq_restore(fam, v6=v6))
            if hooked is None:
                _run([tool, "-w", "-t", "nat", "-A", "POSTROUTING", "-j", CHAIN])

    def remove_masq(self) -> list[str]:
        removed = []
        for tool in ("iptables", "ip6tables"):
            unhook = [tool, "-w", "-t", "nat", "-D", "POSTROUTING", "-j", CHAIN]
            while _run(unhook, check=False) is not None:  # "" on success
                removed.append(f"{tool}: nat POSTROUTING jump to {CHAIN}")
            if _run([tool, "-w", "-t", "nat", "-F", CHAIN], check=False) is not None:
                _run([tool, "-w", "-t", "nat", "-X", CHAIN], check=False)
                removed.append(f"{tool}: nat chain {CHAIN}")
        return removed

    def sysctl(self, name: str, value: int) -> None:
        path = _SYSCTL + name
        with open(path) as f:
            if f.read().strip() == str(value):
                return
        with open(path, "w") as f:
            f.write(f"{value}\n")


def _run(cmd: list[str], *, stdin: str | None = None, check: bool = True) -> str | None:
    """Run a tool; its stdout, or None when it failed and ``check`` is False."""
    r = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=30)
    if r.returncode == 0:
        return r.stdout
    if check:
        raise OSError(f"{' '.join(cmd)} failed: {r.stderr.strip() or r.returncode}")
    return None


def _raw_service(a: netlink.Attrs) -> KernelService:
    """A dumped service nest (raw attributes) as data, without its dests."""
    af = netlink.u16(a.get(netlink.SVC_AF, b""))
    netmask = a.get(netlink.SVC_NETMASK)
    key = VsKey(
        af=af,
        protocol=netlink.u16(a.get(netlink.SVC_PROTOCOL, b"")),
        addr=netlink.inet(af, a[netlink.SVC_ADDR]),
        port=netlink.be16(a.get(netlink.SVC_PORT, b"")),
    )
    settings = VsSettings(
        sched=a.get(netlink.SVC_SCHED_NAME, b"").rstrip(b"\0").decode(),
        flags=netlink.flags(a.get(netlink.SVC_FLAGS, b"")) & ~_FLAG_HASHED,
        timeout=netlink.u32(a.get(netlink.SVC_TIMEOUT, b"")),
        netmask=netmask_from_wire(af, None if netmask is None else socket.inet_ntoa(netmask)),
    )
    return KernelService(key, settings)


def _raw_dest(svc_af: int, a: netlink.Attrs) -> KernelDest:
    """A dumped dest nest (raw attributes) as data."""
    af = netlink.u16(a.get(netlink.DEST_ADDR_FAMILY, b"")) or svc_af
    stats = netlink.parse_attrs(a.get(netlink.DEST_STATS64, b""))

    def num(kind: int) -> int:
        return netlink.u32(a.get(kind, b""))

    server = RealServer(
        addr=netlink.inet(af, a[netlink.DEST_ADDR]),
        port=netlink.be16(a.get(netlink.DEST_PORT, b"")),
        weight=num(netlink.DEST_WEIGHT),
        u_thresh=num(netlink.DEST_U_THRESH),
        l_thresh=num(netlink.DEST_L_THRESH),
        fwd=num(netlink.DEST_FWD_METHOD) & 0x7,
    )
    return KernelDest(
        server=server,
        active=num(netlink.DEST_ACTIVE),
        inactive=num(netlink.DEST_INACTIVE),
        persistent=num(netlink.DEST_PERSIST),
        conns=netlink.u64(stats.get(netlink.STATS_CONNS, b"")),
        inbytes=netlink.u64(stats.get(netlink.STATS_INBYTES, b"")),
        outbytes=netlink.u64(stats.get(netlink.STATS_OUTBYTES, b"")),
    )


# ------------------------------------------------------------------ the sink


@dataclass(slots=True)
class _State:
    drains: dict[DrainKey, float] = field(default_factory=dict)
    created: set[VsKey] = field(default_factory=set)
    names: dict[VsKey, str] = field(default_factory=dict)
    # What the last apply left in the kernel, for applies that trust it (None: unknown).
    cache: dict[VsKey, KernelService] | None = None
    specs: dict[str, ServiceSpec] = field(default_factory=dict)
    desired: dict[str, tuple[Desired, ...]] = field(default_factory=dict)
    vips: set[str] | None = None


Counters = dict[str, dict[str, dict[str, dict[str, int]]]]
_COUNTER_KEYS = ("active", "inactive", "persistent", "conns", "inbytes", "outbytes")


class IpvsSink:
    """Programs IPVS from service specs; see the module docstring for the rules.

    Every public method is blocking and runs its work on the sink's own netlink thread;
    async callers use the ``*_async`` twins (``loop.run_in_executor`` underneath).
    """

    def __init__(
        self,
        *,
        kernel_factory: Callable[[], Kernel] | None = None,
        clock: Callable[[], float] = time.monotonic,
        manage_masq: bool = True,
    ) -> None:
        self._factory = kernel_factory or _NetlinkKernel
        self._clock = clock
        self._manage_masq = manage_masq
        self._local = threading.local()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="l4lb-ipvs")
        self._state = _State()

    # -------------------------------------------------------------- thread plumbing

    def _kernel(self) -> Kernel:
        k: Kernel | None = getattr(self._local, "kernel", None)
        if k is None:
            k = self._factory()
            self._local.kernel = k
        return k

    def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self._executor.submit(fn, *args).result()

    async def _call_async(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # -------------------------------------------------------------- public API

    def check_available(self) -> None:
        """Raise :class:`IpvsUnavailable` saying why IPVS cannot be used here."""
        self._call(self._check)

    def apply(
        self, specs: Mapping[str, ServiceSpec], *, trust_cache: bool = False
    ) -> dict[str, str]:
        """Reconcile the kernel to ``specs``; returns {service name: error} for failures.

        By default the kernel is dumped and diffed in full, which also repairs drift.
        With ``trust_cache`` only the services whose spec changed since the last apply
        are diffed, against what that apply left in the kernel: the cost of an endpoint
        change is then independent of how many services there are. Run a full apply
        now and then to repair changes made behind the sink's back.
        """
        result: dict[str, str] = self._call(self._apply, dict(specs), trust_cache)
        return result

    async def apply_async(
        self, specs: Mapping[str, ServiceSpec], *, trust_cache: bool = False
    ) -> dict[str, str]:
        """:meth:`apply` for a coroutine: the netlink work stays on the sink's thread."""
        result: dict[str, str] = await self._call_async(self._apply, dict(specs), trust_cache)
        return result

    @property
    def draining(self) -> bool:
        """True while removed destinations wait for their connections: apply again later."""
        return bool(self._state.drains)

    def counters(self) -> Counters:
        """The kernel's counters of the services this sink programs, by service name:

        ``{"backends": {"addr:port": {weight, active, inactive, persistent, conns,
        inbytes, outbytes}}, "vips": {"vip:port": {the same without weight}}}``, where a
        backend's numbers are summed over the service's VIPs.
        """
        result: Counters = self._call(self._counters)
        return result

    async def counters_async(self) -> Counters:
        """:meth:`counters` for a coroutine."""
        result: Counters = await self._call_async(self._counters)
        return result

    def cleanup(self) -> list[str]:
        """Remove every service, VIP address, interface and rule this sink owns; returns
        one line per thing removed."""
        result: list[str] = self._call(self._cleanup)
        return result

    def close(self) -> None:
        """Release the netlink sockets and stop the thread (kernel state stays)."""
        self._executor.submit(self._close).result()
        self._executor.shutdown(wait=True)

    # -------------------------------------------------------------- on the thread

    def _check(self) -> None:
        if os.geteuid() != 0:
            raise IpvsUnavailable("IPVS offload needs root (CAP_NET_ADMIN)")
        if not os.path.exists("/proc/net/ip_vs"):
            try:
                r = subprocess.run(["modprobe", "ip_vs"], capture_output=True, text=True)
                why = r.stderr.strip() or f"exit status {r.returncode}"
            except OSError as e:
                why = str(e)
            if not os.path.exists("/proc/net/ip_vs"):
                raise IpvsUnavailable(
                    f"IPVS is not available in the running kernel ({os.uname().release}): "
                    f"modprobe ip_vs failed: {why}; "
                    "offload mode needs a kernel with CONFIG_IP_VS"
                )
        self._kernel()

    def _translate(
        self, specs: dict[str, ServiceSpec], errors: dict[str, str]
    ) -> tuple[dict[str, tuple[Desired, ...]], set[str]]:
        """Desired services by name, and the names whose spec changed since last time."""
        st = self._state
        out: dict[str, tuple[Desired, ...]] = {}
        changed: set[str] = set()
        for name, spec in specs.items():
            prev = st.specs.get(name)
            if name in st.desired and (prev is spec or prev == spec):
                out[name] = st.desired[name]
                continue
            changed.add(name)
            try:
                out[name] = desired_services(spec)
            except IpvsConfigError as e:
                errors[name] = str(e)
        return out, changed

    def _apply(self, specs: dict[str, ServiceSpec], trust_cache: bool) -> dict[str, str]:
        kernel = self._kernel()
        st = self._state
        errors: dict[str, str] = {}
        by_name, changed = self._translate(specs, errors)
        fast = trust_cache and st.cache is not None
        if fast and not changed and not st.drains and specs.keys() == st.specs.keys():
            return errors  # the cache says the kernel is there already
        desired = [d for ds in by_name.values() for d in ds]
        by_key = {d.key: d for d in desired}
        vips = {d.key.addr for d in desired}
        if not fast or vips != st.vips:
            kernel.sync_addrs(vips | kernel.link_addrs() if desired else kernel.link_addrs())
        if desired and (not fast or changed):
            kernel.sysctl("conntrack", 1)
            kernel.sysctl("expire_nodest_conn", 1)
            kernel.sysctl(
                "expire_quiescent_template", int(any(s.expire_quiescent for s in specs.values()))
            )
        cache = st.cache if fast else None
        if cache is not None:
            # Only what changed, what is draining, and what went away needs a diff.
            draining = {k for k, _, _ in st.drains}
            todo = [d for d in desired if d.name in changed or d.key in draining]
            gone = [k for k in st.names if k not in by_key]
            current = []
            for want in todo:
                have = cache.get(want.key)
                idents = {r.ident for r in want.dests}
                if have is not None and any(d.server.ident not in idents for d in have.dests):
                    draining.add(want.key)  # leaving dests: their real connection counts
            for key in {d.key for d in todo} | set(gone):
                have = cache.get(key)
                if have is not None and key in draining:
                    dests = kernel.dump_dests(key)
                    have = None if dests is None else replace(have, dests=dests)
                    if have is None:
                        del cache[key]
                if have is not None:
                    current.append(have)
            # Every draining service is in ``todo`` (or gone), so no deadline is lost.
            cmds, st.drains = diff(
                todo, current, owned=lambda k: True, drains=st.drains, now=self._clock()
            )
        else:
            dumped = kernel.dump()
            cache = {s.key: s for s in dumped}
            on_link = kernel.link_addrs()
            cmds, st.drains = diff(
                desired,
                dumped,
                owned=lambda k: k in st.created or k.addr in on_link,
                drains=st.drains,
                now=self._clock(),
            )
        failed: set[VsKey] = set()
        trusted = True
        st.cache = None  # until the commands below are all through
        # Services first, then every dest command (a service's in order), then deletions:
        # each phase is one batch, and a service that failed is left out of the next.
        phases = (
            [c for c in cmds if c.verb in ("add_service", "set_service")],
            [c for c in cmds if c.dest is not None],
            [c for c in cmds if c.verb == "del_service"],
        )
        for phase in phases:
            batch = [c for c in phase if c.key not in failed]
            codes = kernel.execute_many(batch) if batch else []
            for cmd, code in zip(batch, codes, strict=True):
                if cmd.key in failed:
                    continue
                if code:
                    # The kernel was not what the cache said: the next apply dumps it.
                    trusted = False
                    msg = error_message(cmd, code)
                    if msg is None:
                        continue
                    errors[by_key[cmd.key].name if cmd.key in by_key else str(cmd.key)] = msg
                    failed.add(cmd.key)
                    log.error("ipvs: %s", msg)
                    continue
                _simulate(cache, cmd)
                if cmd.verb == "add_service":
                    st.created.add(cmd.key)
                elif cmd.verb == "del_service":
                    st.created.discard(cmd.key)
        st.names = {d.key: d.name for d in desired}
        st.specs = {n: specs[n] for n in by_name if n not in errors}
        st.desired = {n: ds for n, ds in by_name.items() if n not in errors}
        st.cache = cache if trusted else None
        if not fast or vips != st.vips:
            # Addresses go only after their services: traffic to a live VIP is never dropped.
            kernel.sync_addrs(vips)
            if self._manage_masq:
                kernel.sync_masq(vips)
            st.vips = vips
        return errors

    def _counters(self) -> Counters:
        out: Counters = {}
        for svc in self._kernel().dump():
            name = self._state.names.get(svc.key)
            if name is None:
                continue
            per = out.setdefault(name, {"backends": {}, "vips": {}})
            total = dict.fromkeys(_COUNTER_KEYS, 0)
            for d in svc.dests:
                s = d.server
                host = f"[{s.addr}]" if svc.key.af == socket.AF_INET6 else s.addr
                row = per["backends"].setdefault(
                    f"{host}:{s.port}", {"weight": s.weight, **dict.fromkeys(_COUNTER_KEYS, 0)}
                )
                for k in _COUNTER_KEYS:
                    n = int(getattr(d, k))
                    row[k] += n
                    total[k] += n
            vip = f"[{svc.key.addr}]" if svc.key.af == socket.AF_INET6 else svc.key.addr
            per["vips"][f"{vip}:{svc.key.port}"] = total
        return out

    def _cleanup(self) -> list[str]:
        kernel = self._kernel()
        on_link = kernel.link_addrs()
        st = self._state
        removed = []
        cmds = [
            Command("del_service", svc.key)
            for svc in kernel.dump()
            if svc.key in st.created or svc.key.addr in on_link
        ]
        for cmd, code in zip(cmds, kernel.execute_many(cmds) if cmds else [], strict=True):
            msg = error_message(cmd, code) if code else None
            if msg is not None:
                raise NetlinkError(code, msg)
            removed.append(f"virtual service {cmd.key}")
        st.created.clear()
        st.drains.clear()
        st.names.clear()
        st.specs.clear()
        st.desired.clear()
        st.cache = None
        st.vips = None
        if kernel.remove_link():
            removed.append(f"interface {LINK} with its addresses")
        if self._manage_masq:
            removed += kernel.remove_masq()
        return removed

    def _close(self) -> None:
        k: Kernel | None = getattr(self._local, "kernel", None)
        if k is not None:
            k.close()
            self._local.kernel = None


def _simulate(cache: dict[VsKey, KernelService], cmd: Command) -> None:
    """Apply ``cmd`` to the cached kernel state as the kernel does (new dests at the head)."""
    svc = cache.get(cmd.key)
    if cmd.verb == "add_service":
        assert cmd.settings is not None
        cache[cmd.key] = KernelService(cmd.key, cmd.settings)
        return
    if svc is None:
        return
    if cmd.verb == "del_service":
        del cache[cmd.key]
    elif cmd.verb == "set_service":
        assert cmd.settings is not None
        cache[cmd.key] = replace(svc, settings=cmd.settings)
    else:
        assert cmd.dest is not None
        ident = cmd.dest.ident
        rest = tuple(d for d in svc.dests if d.server.ident != ident)
        if cmd.verb == "add_dest":
            cache[cmd.key] = replace(svc, dests=(KernelDest(cmd.dest), *rest))
        elif cmd.verb == "set_dest":
            cache[cmd.key] = replace(
                svc,
                dests=tuple(
                    replace(d, server=cmd.dest) if d.server.ident == ident else d for d in svc.dests
                ),
            )
        else:
            cache[cmd.key] = replace(svc, dests=rest)


def cleanup_kernel() -> list[str]:
    """``l4lb cleanup``: remove every virtual service on l4lb's interface addresses, the
    interface itself and l4lb's masquerade chain; one line per thing removed.

    Raises :class:`IpvsUnavailable` when this kernel has no IPVS (or we are not root).
    """
    sink = IpvsSink()
    try:
        sink.check_available()
        return sink.cleanup()
    finally:
        sink.close()
