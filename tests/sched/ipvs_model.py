"""A plain-Python reference model of the Linux IPVS schedulers and persistence.

Written from docs/ipvs-schedulers.md (kernel 6.1.192) alone, to check the C data
plane decision by decision.  It mirrors the kernel's own shapes rather than the
C code's: dests are objects on a list (newest first), scheduler cursors are
object references (``None`` is the list head), and persistence templates carry
real timers that fire in time order before every operation.
"""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass, field

GOLDEN_RATIO_32 = 0x61C88647
SH_FALLBACK = 0x0008
SH_PORT = 0x0010
PERSISTENT = 0x0001
TEMPLATE_REARM_MS = 60_000
TAB_SIZE = 256


def hash_32(value: int, bits: int = 8) -> int:
    """Linux hash_32() (§9)."""
    return ((value * GOLDEN_RATIO_32) & 0xFFFFFFFF) >> (32 - bits)


def addr_key(ip: str) -> int:
    """The u32 an address hashes as: IPv4 as is, IPv6 the XOR of its words (§9)."""
    a = ipaddress.ip_address(ip)
    if a.version == 4:
        return int(a)
    v = int(a)
    return (v >> 96 ^ v >> 64 ^ v >> 32 ^ v) & 0xFFFFFFFF


@dataclass(eq=False)
class Dest:
    """One real server and its counters (§0, §1)."""

    id: int
    weight: int
    u_threshold: int = 0
    l_threshold: int = 0
    overload: bool = False
    active: int = 0
    total: int = 0
    persist: int = 0
    linked: bool = True

    @property
    def inactive(self) -> int:
        return max(self.total - self.active, 0)

    @property
    def l_val(self) -> int:
        return self.l_threshold or self.u_threshold - (self.u_threshold >> 2)


def usable(d: Dest | None) -> bool:
    """Available for new connections: weight > 0 and not OVERLOAD."""
    return d is not None and d.weight > 0 and not d.overload


@dataclass
class Conn:
    """A new connection's identity, as far as the schedulers look at it."""

    client: str
    cport: int = 0
    daddr: str = ""


# ----------------------------------------------------------------- schedulers


class Scheduler:
    """Base: no state, no hooks."""

    name = ""

    def init(self, svc: Service) -> None:
        pass

    def add(self, svc: Service, d: Dest) -> None:
        pass

    def delete(self, svc: Service, d: Dest, pos: int) -> None:
        pass

    def edit(self, svc: Service, d: Dest) -> None:
        pass

    def pick(self, svc: Service, c: Conn) -> Dest | None:
        raise NotImplementedError


class RR(Scheduler):
    """§3: a cursor on the list; only deletion is hooked."""

    name = "rr"

    def init(self, svc: Service) -> None:
        self.cur: Dest | None = None

    def delete(self, svc: Service, d: Dest, pos: int) -> None:
        if self.cur is d:
            self.cur = svc.dests[pos - 1] if pos > 0 else None

    def pick(self, svc: Service, c: Conn) -> Dest | None:
        if self.cur is None:
            cands = list(svc.dests)
        else:
            i = svc.dests.index(self.cur)
            cands = svc.dests[i + 1 :] + svc.dests[: i + 1]
        for d in cands:
            if not d.overload and d.weight > 0:
                self.cur = d
                return d
        return None


class WRR(Scheduler):
    """§4: the {cl, cw, mw, di} mark."""

    name = "wrr"

    def __init__(self) -> None:
        # Bound to an empty service: cl = head, di = 1, mw = cw = 0.
        self.cl: Dest | None = None
        self.cw = 0
        self.mw = 0
        self.di = 1

    @staticmethod
    def _gcd(svc: Service) -> int:
        g = 0
        for d in svc.dests:
            if d.weight > 0:
                g = math.gcd(g, d.weight)
        return g or 1

    @staticmethod
    def _max(svc: Service) -> int:
        return max((d.weight for d in svc.dests), default=0)

    def init(self, svc: Service) -> None:
        self.cl = None
        self.di = self._gcd(svc)
        self.mw = self._max(svc) - (self.di - 1)
        self.cw = self.mw

    def _changed(self, svc: Service) -> None:
        self.cl = None
        self.di = self._gcd(svc)
        self.mw = self._max(svc) - (self.di - 1)
        if self.cw > self.mw or self.cw == 0:
            self.cw = self.mw
        elif self.di > 1:
            self.cw = (self.cw // self.di) * self.di + 1

    def add(self, svc: Service, d: Dest) -> None:
        self._changed(svc)

    def delete(self, svc: Service, d: Dest, pos: int) -> None:
        self._changed(svc)

    def edit(self, svc: Service, d: Dest) -> None:
        self._changed(svc)

    def pick(self, svc: Service, c: Conn) -> Dest | None:
        if self.mw == 0:
            return None
        dests = svc.dests
        start = self.cl
        last = self.cl
        stop: Dest | None = None
        last_pass = restarted = False
        while True:
            begin = 0 if start is None else dests.index(start) + 1
            for d in dests[begin:]:
                if not d.overload and d.weight >= self.cw:
                    self.cl = d
                    return d
                if d is stop:
                    self.cl = d
                    return None
            start = None
            self.cw -= self.di
            if self.cw <= 0:
                self.cw = self.mw
                if last_pass or last is None:
                    self.cl = None
                    return None
                restarted = True
            last_pass = self.cw <= self.di
            if last_pass and restarted and last is not None:
                stop = last


def overhead(d: Dest) -> int:
    """§5: (A << 8) + T, the 6.1.187+ formula."""
    return (d.active << 8) + d.total


class LC(Scheduler):
    """§5."""

    name = "lc"

    def pick(self, svc: Service, c: Conn) -> Dest | None:
        least = None
        for d in svc.dests:
            if d.overload or d.weight == 0:
                continue
            if least is None or overhead(d) < overhead(least):
                least = d
        return least


class WLC(Scheduler):
    """§6; sed (§7) is the same loop with another overhead."""

    name = "wlc"

    def oh(self, d: Dest) -> int:
        return overhead(d)

    def pick(self, svc: Service, c: Conn) -> Dest | None:
        first = next((i for i, d in enumerate(svc.dests) if not d.overload and d.weight > 0), None)
        if first is None:
            return None
        least = svc.dests[first]
        loh = self.oh(least)
        for d in svc.dests[first + 1 :]:
            if d.overload:
                continue
            doh = self.oh(d)
            if loh * d.weight > doh * least.weight:
                least, loh = d, doh
        return least


class SED(WLC):
    """§7: overhead A + 1."""

    name = "sed"

    def oh(self, d: Dest) -> int:
        return d.active + 1


class NQ(Scheduler):
    """§8."""

    name = "nq"

    def pick(self, svc: Service, c: Conn) -> Dest | None:
        least = None
        loh = 0
        for d in svc.dests:
            if d.overload or d.weight == 0:
                continue
            if d.active == 0:
                return d
            doh = d.active + 1
            if least is None or loh * d.weight > doh * least.weight:
                least, loh = d, doh
        return least


class SH(Scheduler):
    """§10: 256 buckets rebuilt on every change, weights as bucket runs."""

    name = "sh"

    def init(self, svc: Service) -> None:
        self.rebuild(svc)

    def rebuild(self, svc: Service) -> None:
        self.bucket: list[Dest | None] = [None] * TAB_SIZE
        if not svc.dests:
            return
        p, n = 0, 0
        for i in range(TAB_SIZE):
            d = svc.dests[p]
            self.bucket[i] = d
            n += 1
            if n >= d.weight:
                p = (p + 1) % len(svc.dests)
                n = 0

    def add(self, svc: Service, d: Dest) -> None:
        self.rebuild(svc)

    def delete(self, svc: Service, d: Dest, pos: int) -> None:
        self.rebuild(svc)

    def edit(self, svc: Service, d: Dest) -> None:
        self.rebuild(svc)

    def pick(self, svc: Service, c: Conn) -> Dest | None:
        key = addr_key(c.client)
        if svc.flags & SH_PORT:
            key = (key + c.cport) & 0xFFFFFFFF
        h = hash_32(key)
        d = self.bucket[h]
        if not svc.flags & SH_FALLBACK:
            return d if usable(d) else None
        if d is None:
            return None
        if usable(d):
            return d
        for off in range(TAB_SIZE):
            d = self.bucket[((h + off) % TAB_SIZE + h) % TAB_SIZE]
            if d is None:
                return None
            if usable(d):
                return d
        return None


class DH(Scheduler):
    """§11: bucket i = dests[i % n], keyed by the packet's destination."""

    name = "dh"

    def init(self, svc: Service) -> None:
        self.rebuild(svc)

    def rebuild(self, svc: Service) -> None:
        n = len(svc.dests)
        self.bucket = [svc.dests[i % n] if n else None for i in range(TAB_SIZE)]

    add = SH.add
    delete = SH.delete
    edit = SH.edit

    def pick(self, svc: Service, c: Conn) -> Dest | None:
        # An unknown destination hashes as the zero address of the client's family.
        daddr = c.daddr or ("::" if ":" in c.client else "0.0.0.0")
        d = self.bucket[hash_32(addr_key(daddr))]
        if d is None or not d.linked or d.weight <= 0 or d.overload:
            return None
        return d


SCHEDULERS: dict[str, type[Scheduler]] = {s.name: s for s in (RR, WRR, LC, WLC, SED, NQ, SH, DH)}


# ---------------------------------------------------------------- persistence


@dataclass(eq=False)
class Template:
    """§12: a client network's binding to a dest, with a kernel-style timer."""

    key: tuple[int, int]
    dest: Dest
    timeout: int
    timer: int
    controls: int = 0
    in_table: bool = True


@dataclass
class Persistence:
    """The template table of one service, its timers fired in time order."""

    templates: dict[tuple[int, int], Template] = field(default_factory=dict)

    def run_timers(self, now: int) -> None:
        """Fire every timer due by ``now``, earliest first."""
        while True:
            due = [t for t in self.templates.values() if t.timer <= now]
            if not due:
                return
            t = min(due, key=lambda x: x.timer)
            if t.controls:
                # Still controlling a connection: another 60 s, and from now
                # on 60 s is this template's timeout.
                t.timeout = TEMPLATE_REARM_MS
                t.timer += TEMPLATE_REARM_MS
            else:
                self._remove(t)

    def _remove(self, t: Template) -> None:
        del self.templates[t.key]
        t.in_table = False
        if t.controls == 0:
            t.dest.persist -= 1

    def count(self) -> int:
        return len(self.templates)


# -------------------------------------------------------------------- service


class Service:
    """An IPVS virtual service: dest list, scheduler, thresholds, persistence."""

    def __init__(self, sched: str = "rr", **opts: int | bool) -> None:
        self.dests: list[Dest] = []
        self.slots: dict[int, Dest] = {}
        self.sched: Scheduler = SCHEDULERS[sched]()
        self.sched.init(self)
        self.flags = 0
        self.persist_timeout_ms = 0
        self.netmask4 = 32
        self.netmask6 = 128
        self.expire_quiescent = False
        self.persistence = Persistence()
        self.configure(sched, **opts)

    def configure(
        self,
        sched: str,
        *,
        flags: int = 0,
        persist_timeout_ms: int = 0,
        netmask4: int = 32,
        netmask6: int = 128,
        expire_quiescent: bool = False,
    ) -> None:
        """A different scheduler starts afresh over the current list (§0)."""
        if sched != self.sched.name:
            self.sched = SCHEDULERS[sched]()
            self.sched.init(self)
        self.flags = flags
        self.persist_timeout_ms = persist_timeout_ms
        self.netmask4 = netmask4
        self.netmask6 = netmask6
        self.expire_quiescent = expire_quiescent

    # dests -----------------------------------------------------------------

    @staticmethod
    def _thresholds(d: Dest, u: int, lo: int) -> None:
        changed = (d.u_threshold, d.l_threshold) != (u, lo)
        d.u_threshold, d.l_threshold = u, lo
        if not changed:
            return
        if u == 0:
            d.overload = False
        elif d.total >= u:
            d.overload = True
        elif d.total < d.l_val:
            d.overload = False

    def add(self, id: int, weight: int, u: int = 0, lo: int = 0) -> None:
        """Add (or revive, counters intact) dest ``id`` at the head."""
        d = self.slots.get(id)
        if d is None:
            d = self.slots[id] = Dest(id, weight)
        assert d not in self.dests, "already linked"
        d.weight = weight
        d.linked = True
        self._thresholds(d, u, lo)
        self.dests.insert(0, d)
        self.sched.add(self, d)

    def edit(self, id: int, weight: int, u: int = 0, lo: int = 0) -> None:
        d = self.slots[id]
        d.weight = weight
        self._thresholds(d, u, lo)
        self.sched.edit(self, d)

    def delete(self, id: int) -> None:
        d = self.slots[id]
        pos = self.dests.index(d)
        del self.dests[pos]
        d.linked = False
        self.sched.delete(self, d, pos)

    def order(self) -> list[int]:
        return [d.id for d in self.dests]

    # connections -----------------------------------------------------------

    def _cnet(self, ip: str) -> tuple[int, int]:
        a = ipaddress.ip_address(ip)
        bits = self.netmask4 if a.version == 4 else self.netmask6
        net = ipaddress.ip_network(f"{ip}/{bits}", strict=False)
        return a.version, int(net.network_address)

    def connect(self, c: Conn, now: int = 0) -> tuple[Dest | None, Template | None]:
        """Schedule and bind a new connection (§1, §2, §12)."""
        p = self.persistence
        p.run_timers(now)
        t: Template | None = None
        d: Dest | None = None
        persistent = bool(self.flags & PERSISTENT)
        if persistent:
            key = self._cnet(c.client)
            t = p.templates.get(key)
            if t is not None:
                bad = not t.dest.linked or (self.expire_quiescent and t.dest.weight == 0)
                if bad:
                    p._remove(t)
                    t = None
                else:
                    d = t.dest
        if d is None:
            d = self.sched.pick(self, c)
            if d is None:
                return None, None
            if persistent:
                t = Template(key, d, self.persist_timeout_ms, 0)
                p.templates[key] = t
                d.persist += 1
        if t is not None:
            t.timer = now + t.timeout
            t.controls += 1
        d.total += 1
        d.active += 1
        if d.u_threshold and d.total == d.u_threshold:
            d.overload = True
        return d, t

    def deactivate(self, d: Dest) -> None:
        d.active -= 1

    def unbind(self, d: Dest, t: Template | None = None, now: int = 0) -> None:
        """The connection is gone: T -= 1 with the §2 hysteresis, template let go."""
        self.persistence.run_timers(now)
        before = d.total
        d.total -= 1
        if before == d.l_val and d.total < d.l_val:
            d.overload = False
        if t is not None:
            t.controls -= 1
            if t.controls == 0 and not t.in_table:
                t.dest.persist -= 1

    def expire(self, now: int) -> None:
        self.persistence.run_timers(now)
