"""The typed facade over the C data plane (the only importer of ``l4lb._dataplane``).

It turns :class:`~l4lb.state.ServicePlan` operations into calls on the extension, owns the
worker threads and the listening sockets until they are handed over, and maps the
extension's numeric service and slot ids to names and addresses.

Ids are never reused while anything in C may still refer to them: a removed service is
"retired" and its id comes back, with zeroed counters, only once no connection and no
affinity template belongs to it any more. As in IPVS, re-adding an address that was just
removed from a service revives the same destination slot, counters included; a service
whose protocol or listen address changed is a new virtual service and starts afresh.
"""

from __future__ import annotations

import logging
import random
import socket
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from l4lb import _dataplane
from l4lb.config import Address
from l4lb.state import DestOp, ServicePlan, ServiceSpec, listeners

log = logging.getLogger("l4lb.dataplane")

LISTEN_BACKLOG = 4096


class ServiceError(Exception):
    """A service could not be (re)programmed; the other services are unaffected."""


@dataclass(frozen=True, slots=True)
class SlotStats:
    """Counters of one destination."""

    active: int
    inactive: int
    conns: int
    bytes_in: int
    bytes_out: int
    connect_errors: int
    consecutive_failures: int
    templates: int


@dataclass(frozen=True, slots=True)
class ServiceStats:
    """Counters of one service."""

    accepted: int
    active: int
    rejected: int
    failed: int
    templates: int
    limit_rejected: int  # refused because the service was at max_connections


@dataclass(frozen=True, slots=True)
class DataplaneStats:
    """Counters summed over the workers."""

    connections: int
    pipes_used: int
    pipes_free: int
    accept_errors: int
    emfile_pauses: int


@dataclass(slots=True)
class _Service:
    id: int
    spec: ServiceSpec
    bound: tuple[Address, ...]  # the listeners with their real ports (port 0 resolved)
    slots: dict[str, int] = field(default_factory=dict)  # str(address) -> slot id


class _FreePorts:
    """Free ports for port-0 listeners, from the kernel's ephemeral range.

    ``bind()`` to port 0 makes the kernel scan the range past every port already taken:
    with thousands of listeners that scan is most of what programming them costs (O(n²)
    in all). A cursor that moves on from the last port it gave usually finds a free port
    at once. A port counts as free when a socket without any reuse option can bind it, so
    a listener never joins another's SO_REUSEPORT group.
    """

    def __init__(self) -> None:
        self._range: tuple[int, int] | None = None
        self._next = 0

    def _ephemeral(self) -> tuple[int, int]:
        if self._range is None:
            try:
                with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
                    low, high = (int(x) for x in f.read().split())
            except (OSError, ValueError):
                low, high = 32768, 60999
            self._range = (low, high)
            self._next = random.randint(low, high)  # as unpredictable as the kernel's
        return self._range

    def find(self, addr: Address, kind: int, tries: int = 64) -> int:
        """A port nothing is bound to on ``addr``'s host, or 0 (let the kernel pick)."""
        low, high = self._ephemeral()
        for _ in range(tries):
            port = self._next
            self._next = low if port >= high else port + 1
            with socket.socket(addr.family, kind) as probe:
                if addr.family == socket.AF_INET6:
                    probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                try:
                    probe.bind((addr.host, port))
                except OSError:
                    continue
            return port
        return 0


_free_ports = _FreePorts()


def _bind_listeners(addr: Address, count: int, protocol: str = "tcp") -> list[socket.socket]:
    """``count`` SO_REUSEPORT sockets on one address (port 0: a free port, see
    :class:`_FreePorts`, else the kernel's choice).

    For UDP, SO_REUSEPORT hashes each client address to one socket, hence one worker,
    so a flow's datagrams all reach the worker that owns the flow."""
    kind = socket.SOCK_DGRAM if protocol == "udp" else socket.SOCK_STREAM
    if addr.port == 0:
        port = _free_ports.find(addr, kind)
        if port:
            try:
                return _bind_group(addr, count, kind, port)
            except OSError:
                pass  # taken since it was probed: the kernel picks instead
    return _bind_group(addr, count, kind, addr.port)


def _bind_group(addr: Address, count: int, kind: int, port: int) -> list[socket.socket]:
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket(addr.family, kind)
            socks.append(s)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if addr.family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.bind((addr.host, port))
            port = s.getsockname()[1]
            if kind == socket.SOCK_STREAM:
                s.listen(LISTEN_BACKLOG)
            s.setblocking(False)
    except OSError:
        for s in socks:
            s.close()
        raise
    return socks


def _trash_key(bound: tuple[Address, ...]) -> str:
    return ",".join(str(a) for a in bound)


def _bind_service(spec: ServiceSpec, count: int) -> list[list[socket.socket]]:
    """Every listener of ``spec`` (see :func:`l4lb.state.listeners`), ``count`` sockets each."""
    bound: list[list[socket.socket]] = []
    try:
        for addr in listeners(spec):
            try:
                bound.append(_bind_listeners(addr, count, spec.protocol))
            except OSError as e:
                raise OSError(
                    e.errno, f"cannot listen on {spec.protocol} {addr}: {e.strerror}"
                ) from None
    except OSError:
        for socks in bound:
            for s in socks:
                s.close()
        raise
    return bound


class Dataplane:
    """Worker threads plus the service tables they forward by."""

    def __init__(
        self,
        *,
        workers: int,
        pipe_size: int = 65536,
        max_pipes: int = 0,
        inactive_timeout: float = 120.0,
        reset_inactive_timeout: float = 10.0,
        splice: bool = True,
        on_worker_exit: Callable[[int, BaseException | None], None] | None = None,
    ) -> None:
        self.workers = workers
        self._dp = _dataplane.Dataplane(
            workers,
            pipe_size=pipe_size,
            max_pipes=max_pipes,
            inactive_timeout=inactive_timeout,
            reset_inactive_timeout=reset_inactive_timeout,
            splice=splice,
        )
        self._threads: list[threading.Thread] = []
        self._services: dict[str, _Service] = {}
        self._next_service = 0
        self._retired_services: list[int] = []  # removed, maybe still referenced
        self._free_services: list[int] = []  # removed and quiescent: reusable
        self._next_slot = 0
        # (protocol, listen, backend address) -> slot: IPVS's trash of deleted destinations
        self._retired_slots: dict[tuple[str, str, str], int] = {}
        self._on_worker_exit = on_worker_exit

    # ------------------------------------------------------------------ threads

    def start(self) -> None:
        """Start one thread per worker."""
        for i in range(self.workers):
            t = threading.Thread(target=self._run, args=(i,), name=f"l4lb-worker-{i}")
            t.start()
            self._threads.append(t)

    def _run(self, index: int) -> None:
        error: BaseException | None = None
        try:
            self._dp.run_worker(index)
        except BaseException as e:  # reported to the app, which shuts down
            error = e
            log.error("worker %d failed: %s", index, e)
        if self._on_worker_exit is not None:
            self._on_worker_exit(index, error)

    def drain(self) -> None:
        """Stop accepting; established connections go on."""
        self._dp.drain()

    def stop(self, timeout: float = 10.0) -> None:
        """Reset what is left and wait for the worker threads."""
        self._dp.stop()
        for t in self._threads:
            t.join(timeout)
        self._threads.clear()

    # -------------------------------------------------------------- programming

    def apply(self, plans: Iterable[ServicePlan]) -> dict[str, str]:
        """Apply service plans in order; returns {service: error} for the ones that failed."""
        self._reclaim()
        errors: dict[str, str] = {}
        for p in plans:
            try:
                self._apply_one(p)
            except (OSError, ValueError, ServiceError) as e:
                errors[p.name] = str(e)
                log.error("service %s: %s", p.name, e)
        return errors

    def _apply_one(self, p: ServicePlan) -> None:
        if p.action == "remove":
            self._remove(p.name)
            return
        if p.action == "keep":
            return
        assert p.spec is not None
        svc = self._services.get(p.name)
        if svc is not None and p.listen_changed:
            # A new key for IPVS means a new virtual service: the plan's ops rebuild
            # it from scratch, and connections to the old listener go on.
            socks = _bind_service(p.spec, self.workers)
            self._remove(p.name)
            self._add(p.spec, p.ops, socks)
            return
        if svc is None:
            self._add(p.spec, p.ops)
            return
        if p.settings_changed:
            self._configure(svc.id, p.spec)
        svc.spec = p.spec
        self._apply_ops(svc, p.ops)

    def _add(
        self,
        spec: ServiceSpec,
        ops: Iterable[DestOp],
        bound: list[list[socket.socket]] | None = None,
    ) -> None:
        if bound is None:
            bound = _bind_service(spec, self.workers)
        socks = [s for group in bound for s in group]
        if self._free_services:
            sid = self._free_services.pop()
            self._dp.service_reset_counters(sid)
        else:
            sid = self._new_service_id()
        try:
            self._configure(sid, spec)
        except BaseException:
            for s in socks:
                s.close()
            self._free_services.append(sid)
            raise
        addrs = tuple(
            Address(a.host, group[0].getsockname()[1], a.family)
            for a, group in zip(listeners(spec), bound, strict=True)
        )
        svc = _Service(sid, spec, addrs)
        self._services[spec.name] = svc
        try:
            self._apply_ops(svc, ops)
        except BaseException:
            for s in socks:
                s.close()
            self._remove(spec.name)
            raise
        for group in bound:
            self._hand_over(sid, group)

    def _new_service_id(self) -> int:
        sid = self._next_service
        self._next_service += 1
        return sid

    def _configure(self, sid: int, spec: ServiceSpec) -> None:
        self._dp.service_configure(
            sid,
            spec.scheduler,
            flags=spec.flags,
            persist_timeout=spec.persist_timeout,
            netmask4=spec.persist_netmask,
            netmask6=spec.persist_netmask6,
            expire_quiescent=spec.expire_quiescent,
            connect_timeout=spec.connect_timeout,
            idle_timeout=spec.idle_timeout,
            retries=spec.retries,
            send_proxy=spec.send_proxy,
            max_connections=spec.max_connections,
        )
        self._dp.service_vips(
            sid, [(v.family, socket.inet_pton(v.family, v.host), v.port) for v in spec.vips]
        )

    def _hand_over(self, sid: int, socks: list[socket.socket]) -> None:
        for i, s in enumerate(socks):
            self._dp.add_listener(i, sid, s.detach())

    def _apply_ops(self, svc: _Service, ops: Iterable[DestOp]) -> None:
        for op in ops:
            key = str(op.dest.address)
            d = op.dest
            trash_key = (svc.spec.protocol, _trash_key(svc.bound), key)
            if op.kind == "add":
                slot = self._retired_slots.pop(trash_key, None)
                if slot is None:
                    slot = self._next_slot
                    self._next_slot += 1
                self._dp.dest_add(
                    svc.id,
                    slot,
                    d.address.host,
                    d.address.port,
                    d.weight,
                    d.upper_threshold,
                    d.lower_threshold,
                )
                svc.slots[key] = slot
            elif op.kind == "edit":
                self._dp.dest_edit(
                    svc.id, svc.slots[key], d.weight, d.upper_threshold, d.lower_threshold
                )
            else:
                slot = svc.slots.pop(key)
                self._dp.dest_del(svc.id, slot)
                self._retired_slots[trash_key] = slot

    def _remove(self, name: str) -> None:
        svc = self._services.pop(name, None)
        if svc is None:
            return
        self._dp.remove_listeners(svc.id)
        self._dp.service_clear(svc.id)
        for key, slot in svc.slots.items():
            self._retired_slots[(svc.spec.protocol, _trash_key(svc.bound), key)] = slot
        self._retired_services.append(svc.id)

    def _reclaim(self) -> None:
        """Forget retired slots that nothing refers to any more (IPVS empties its trash),
        and make retired service ids reusable once nothing belongs to them."""
        for key, slot in list(self._retired_slots.items()):
            st = self._dp.slot_stats(slot)
            if st[0] == 0 and st[1] == 0 and st[7] == 0:
                del self._retired_slots[key]
        # Slot ids themselves are cheap; they are not recycled.
        for sid in list(self._retired_services):
            _, active, _, _, templates, _ = self._dp.service_stats(sid)
            if active == 0 and templates == 0:
                self._retired_services.remove(sid)
                self._free_services.append(sid)

    def reset_backend(self, name: str, address: str) -> None:
        """Reset every open connection of one service to one backend (e.g. it went down)."""
        self._dp.reset_slot(self._services[name].slots[address])

    # ----------------------------------------------------------------- reading

    def listen_address(self, name: str) -> Address:
        """Where the service really listens (its first listener, port 0 resolved)."""
        return self._services[name].bound[0]

    def listen_addresses(self, name: str) -> tuple[Address, ...]:
        """Every listener of the service, in :func:`l4lb.state.listeners` order."""
        return self._services[name].bound

    def dest_order(self, name: str) -> list[str]:
        """The service's backend addresses in the data plane's (IPVS) list order."""
        svc = self._services[name]
        by_slot = {slot: key for key, slot in svc.slots.items()}
        return [by_slot[s] for s in self._dp.dest_order(svc.id) if s in by_slot]

    def service_stats(self, name: str) -> ServiceStats:
        """Counters of one service."""
        return ServiceStats(*self._dp.service_stats(self._services[name].id))

    def vip_connections(self, name: str) -> dict[str, int]:
        """Connections per VIP of one service, ``{str(vip): total}``, plus ``"other"``:
        those that dialled an address not among its VIPs. Empty when it has no VIPs."""
        svc = self._services[name]
        if not svc.spec.vips:
            return {}
        totals, other = self._dp.vip_stats(svc.id)
        out = {str(v): n for v, n in zip(svc.spec.vips, totals, strict=False)}
        out["other"] = other
        return out

    def slot_stats(self, name: str, address: str) -> SlotStats:
        """Counters of one backend of one service."""
        return SlotStats(*self._dp.slot_stats(self._services[name].slots[address]))

    def overloaded(self, name: str, address: str) -> bool:
        """Whether the backend is over its upper connection threshold."""
        svc = self._services[name]
        return self._dp.slot_overloaded(svc.id, svc.slots[address])

    def stats(self) -> DataplaneStats:
        """Counters summed over the workers."""
        return DataplaneStats(*self._dp.worker_stats())

    def active_connections(self, name: str | None = None) -> int:
        """Open client connections of one service, or of all of them."""
        if name is not None:
            return self.service_stats(name).active
        return sum(self.service_stats(n).active for n in self._services)

    def service_names(self) -> list[str]:
        """Names of the programmed services."""
        return list(self._services)

    def has_service(self, name: str) -> bool:
        """Whether a service called ``name`` is programmed."""
        return name in self._services
