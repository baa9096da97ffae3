"""IPVS offload: the kernel sink behind the same desired state as the splice data plane.

Each :class:`~l4lb.state.ServiceSpec` becomes an IPVS virtual service (VIP = its listen
address) with masquerading real servers, programmed over generic netlink with pyroute2.
The VIPs live on a dummy interface l4lb owns (``l4lb-ipvs0``), and one iptables chain
(``L4LB-IPVS-MASQ``, hooked from nat POSTROUTING) masquerades the forwarded traffic so
backends answer through the balancer whatever their routes.

Reconciliation is level-triggered: every :meth:`IpvsSink.apply` dumps what the kernel
holds, decodes it into plain dataclasses, diffs it against the specs with
:func:`diff` (pure, no I/O) and issues only the difference. So a no-op apply sends
nothing, a restart does not disturb traffic, and a service deleted by hand comes back.

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
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

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
    "decode_dest",
    "decode_service",
    "desired_service",
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


def desired_service(spec: ServiceSpec) -> Desired:
    """Translate ``spec``; raise :class:`IpvsConfigError` for what IPVS cannot express."""
    listen = spec.listen if spec.listen is not None else spec.vips[0]
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
    dests = tuple(
        RealServer(
            addr=d.address.host,
            port=d.address.port,
            weight=d.weight,
            u_thresh=d.upper_threshold,
            l_thresh=d.lower_threshold,
        )
        for d in spec.dests
    )
    for d in spec.dests:
        if d.address.family != listen.family:
            raise IpvsConfigError(
                f"service {spec.name}: backend {d.address} is not of the VIP's address family"
                " (IPVS masquerading cannot translate between IPv4 and IPv6)"
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
    def execute(self, cmd: Command) -> None: ...
    def link_addrs(self) -> set[str]: ...
    def sync_addrs(self, addrs: set[str]) -> None: ...
    def remove_link(self) -> None: ...
    def sync_masq(self, vips: set[str]) -> None: ...
    def remove_masq(self) -> None: ...
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

    def close(self) -> None:
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
        out = []
        for m in self._ipvs.service("dump"):
            raw = m.get_attr("IPVS_CMD_ATTR_SERVICE")
            if raw.get_attr("IPVS_SVC_ATTR_FWMARK"):
                continue  # fwmark services are never ours
            head = decode_service(raw)
            dests = [
                d.get_attr("IPVS_CMD_ATTR_DEST")
                for d in self._ipvs.dest("dump", service=self._svc(head.key))
            ]
            out.append(decode_service(raw, dests))
        return out

    def execute(self, cmd: Command) -> None:
        try:
            self._execute(cmd)
        except self._pr.NetlinkError as e:
            raise NetlinkError(e.code, os.strerror(e.code)) from e

    def _execute(self, cmd: Command) -> None:
        verb, noun = cmd.verb.split("_")
        nl_verb = {"add": "add", "set": "set", "del": "del"}[verb]
        if noun == "service":
            self._ipvs.service(nl_verb, service=self._svc(cmd.key, cmd.settings))
            return
        assert cmd.dest is not None
        dest = self._pr.IPVSDest(**dest_fields(cmd.dest, key_only=verb == "del"))
        self._ipvs.dest(nl_verb, service=self._svc(cmd.key), dest=dest)

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
        found = set()
        for a in self._ipr.addr("dump"):
            if a["index"] != idx:
                continue  # the dump is not filtered by the kernel
            ip = ipaddress.ip_address(a.get_attr("IFA_ADDRESS"))
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
        for a in sorted(addrs - have):
            v6 = ipaddress.ip_address(a).version == 6
            # IFA_F_NODAD (0x2): a VIP must be usable at once, not after DAD.
            extra = {"flags": 0x2} if v6 else {}
            self._ipr.addr("add", index=idx, address=a, prefixlen=128 if v6 else 32, **extra)
        for a in sorted(have - addrs):
            v6 = ipaddress.ip_address(a).version == 6
            self._ipr.addr("del", index=idx, address=a, prefixlen=128 if v6 else 32)

    def remove_link(self) -> None:
        idx = self._link_index(create=False)
        if idx is not None:
            self._ipr.link("del", index=idx)

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

    def remove_masq(self) -> None:
        for tool in ("iptables", "ip6tables"):
            while _run([tool, "-w", "-t", "nat", "-D", "POSTROUTING", "-j", CHAIN], check=False):
                pass
            if _run([tool, "-w", "-t", "nat", "-F", CHAIN], check=False) is not None:
                _run([tool, "-w", "-t", "nat", "-X", CHAIN], check=False)

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


# ------------------------------------------------------------------ the sink


@dataclass(slots=True)
class _State:
    drains: dict[DrainKey, float] = field(default_factory=dict)
    created: set[VsKey] = field(default_factory=set)
    names: dict[VsKey, str] = field(default_factory=dict)


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

    def apply(self, specs: Mapping[str, ServiceSpec]) -> dict[str, str]:
        """Reconcile the kernel to ``specs``; returns {service name: error} for failures."""
        result: dict[str, str] = self._call(self._apply, dict(specs))
        return result

    async def apply_async(self, specs: Mapping[str, ServiceSpec]) -> dict[str, str]:
        """:meth:`apply` for a coroutine: the netlink work stays on the sink's thread."""
        result: dict[str, str] = await self._call_async(self._apply, dict(specs))
        return result

    @property
    def draining(self) -> bool:
        """True while removed destinations wait for their connections: apply again later."""
        return bool(self._state.drains)

    def counters(self) -> dict[str, dict[str, dict[str, int]]]:
        """{service name: {"addr:port": {weight, active, inactive, persistent, conns,
        inbytes, outbytes}}} for the services this sink programs, from the kernel."""
        result: dict[str, dict[str, dict[str, int]]] = self._call(self._counters)
        return result

    def cleanup(self) -> None:
        """Remove every service, VIP address, interface and rule this sink owns."""
        self._call(self._cleanup)

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

    def _apply(self, specs: dict[str, ServiceSpec]) -> dict[str, str]:
        kernel = self._kernel()
        st = self._state
        errors: dict[str, str] = {}
        desired: list[Desired] = []
        for name, spec in specs.items():
            try:
                desired.append(desired_service(spec))
            except IpvsConfigError as e:
                errors[name] = str(e)
        by_key = {d.key: d for d in desired}
        vips = {d.key.addr for d in desired}
        kernel.sync_addrs(vips | kernel.link_addrs() if desired else kernel.link_addrs())
        if desired:
            kernel.sysctl("conntrack", 1)
            kernel.sysctl("expire_nodest_conn", 1)
            kernel.sysctl(
                "expire_quiescent_template", int(any(s.expire_quiescent for s in specs.values()))
            )
        current = kernel.dump()
        on_link = kernel.link_addrs()
        cmds, st.drains = diff(
            desired,
            current,
            owned=lambda k: k in st.created or k.addr in on_link,
            drains=st.drains,
            now=self._clock(),
        )
        failed: set[VsKey] = set()
        for cmd in cmds:
            if cmd.key in failed:
                continue
            name = by_key[cmd.key].name if cmd.key in by_key else str(cmd.key)
            try:
                kernel.execute(cmd)
            except OSError as e:
                msg = error_message(cmd, e.errno or 0)
                if msg is None:
                    continue
                errors[name] = msg
                failed.add(cmd.key)
                log.error("ipvs: %s", msg)
                continue
            if cmd.verb == "add_service":
                st.created.add(cmd.key)
            elif cmd.verb == "del_service":
                st.created.discard(cmd.key)
        st.names = {d.key: d.name for d in desired}
        # Addresses go only after their services: traffic to a live VIP is never dropped.
        kernel.sync_addrs(vips)
        if self._manage_masq:
            kernel.sync_masq(vips)
        return errors

    def _counters(self) -> dict[str, dict[str, dict[str, int]]]:
        out: dict[str, dict[str, dict[str, int]]] = {}
        for svc in self._kernel().dump():
            name = self._state.names.get(svc.key)
            if name is None:
                continue
            per = out.setdefault(name, {})
            for d in svc.dests:
                s = d.server
                host = f"[{s.addr}]" if svc.key.af == socket.AF_INET6 else s.addr
                per[f"{host}:{s.port}"] = {
                    "weight": s.weight,
                    "active": d.active,
                    "inactive": d.inactive,
                    "persistent": d.persistent,
                    "conns": d.conns,
                    "inbytes": d.inbytes,
                    "outbytes": d.outbytes,
                }
        return out

    def _cleanup(self) -> None:
        kernel = self._kernel()
        on_link = kernel.link_addrs()
        st = self._state
        for svc in kernel.dump():
            if svc.key in st.created or svc.key.addr in on_link:
                cmd = Command("del_service", svc.key)
                try:
                    kernel.execute(cmd)
                except OSError as e:
                    if error_message(cmd, e.errno or 0) is not None:
                        raise
        st.created.clear()
        st.drains.clear()
        st.names.clear()
        kernel.remove_link()
        if self._manage_masq:
            kernel.remove_masq()

    def _close(self) -> None:
        k: Kernel | None = getattr(self._local, "kernel", None)
        if k is not None:
            k.close()
            self._local.kernel = None
