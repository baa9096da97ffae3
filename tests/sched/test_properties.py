"""Property tests: random operation sequences on the C data plane and the
reference model must agree at every step; plus invariants of wrr, sh, dh."""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass

import ipvs_model as m
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from sched_harness import Both, CService

SCHEDS = ["rr", "wrr", "lc", "wlc", "sed", "nq", "sh", "dh"]
IDS = range(6)
CLIENTS = [f"10.0.{i // 4}.{i % 4 + 1}" for i in range(12)] + ["2001:db8::1", "2001:db8:1::2"]
VIPS = ["10.100.0.1", "10.100.0.2", "10.100.0.3", "fd00::1", "fd00::2"]
WEIGHTS = st.sampled_from([0, 0, 1, 1, 2, 3, 4, 5, 6, 8, 100])
FLAGS = st.sampled_from(
    [
        0,
        m.PERSISTENT,
        m.SH_FALLBACK,
        m.SH_PORT,
        m.SH_FALLBACK | m.SH_PORT,
        m.PERSISTENT | m.SH_FALLBACK,
    ]
)


@dataclass
class Open:
    """A connection both sides hold."""

    id: int
    tmpl: m.Template | None
    handle: int
    active: bool = True


class SchedulerMachine(RuleBasedStateMachine):
    """Dest list changes, connections and time, in any order."""

    def __init__(self) -> None:
        super().__init__()
        self.s: Both
        self.now = 0
        self.conns: list[Open] = []

    @initialize(
        sched=st.sampled_from(SCHEDS),
        flags=FLAGS,
        timeout=st.sampled_from([1, 10, 60, 300]),
        netmask4=st.sampled_from([32, 24, 0]),
        quiescent=st.booleans(),
    )
    def start(self, sched: str, flags: int, timeout: int, netmask4: int, quiescent: bool) -> None:
        self.opts = dict(
            flags=flags,
            persist_timeout_ms=timeout * 1000,
            netmask4=netmask4,
            netmask6=64,
            expire_quiescent=quiescent,
        )
        self.s = Both(sched, **self.opts)

    def linked(self) -> list[int]:
        return self.s.m.order()

    @rule(id=st.sampled_from(IDS), weight=WEIGHTS, u=st.integers(0, 4), lo=st.integers(0, 4))
    def add(self, id: int, weight: int, u: int, lo: int) -> None:
        if id in self.linked():
            return
        self.s.add(id, weight, u, min(lo, u) if u else 0)

    @precondition(lambda self: self.linked())
    @rule(data=st.data(), weight=WEIGHTS, u=st.integers(0, 4), lo=st.integers(0, 4))
    def edit(self, data: st.DataObject, weight: int, u: int, lo: int) -> None:
        id = data.draw(st.sampled_from(self.linked()))
        self.s.edit(id, weight, u, min(lo, u) if u else 0)

    @precondition(lambda self: self.linked())
    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        self.s.delete(data.draw(st.sampled_from(self.linked())))

    @rule(
        client=st.sampled_from(CLIENTS),
        cport=st.integers(0, 3),
        vip=st.sampled_from(VIPS),
        n=st.integers(1, 4),
    )
    def connect(self, client: str, cport: int, vip: str, n: int) -> None:
        for _ in range(n):
            weights = {d.id: (d.weight, d.overload) for d in self.s.m.dests}
            d, t, ct = self.s.connect(m.Conn(client, cport, vip), self.now)
            if d is None:
                continue
            if not self.opts["flags"] & m.PERSISTENT:
                # Only a template may lead to a quiesced or overloaded dest.
                assert weights[d.id][0] > 0 and not weights[d.id][1]
            self.conns.append(Open(d.id, t, ct))

    @precondition(lambda self: any(c.active for c in self.conns))
    @rule(data=st.data())
    def deactivate(self, data: st.DataObject) -> None:
        c = data.draw(st.sampled_from([c for c in self.conns if c.active]))
        self.s.deactivate(c.id)
        c.active = False

    @precondition(lambda self: self.conns)
    @rule(data=st.data())
    def end(self, data: st.DataObject) -> None:
        """The connection's inactive time is over (deactivated first if needed)."""
        c = data.draw(st.sampled_from(self.conns))
        if c.active:
            self.s.deactivate(c.id)
        self.s.unbind(c.id, c.tmpl, c.handle, self.now)
        self.conns.remove(c)

    @rule(dt=st.sampled_from([1, 500, 1000, 9_999, 30_000, 60_000, 61_000, 400_000]))
    def tick(self, dt: int) -> None:
        self.now += dt

    @rule()
    def expire(self) -> None:
        self.s.expire(self.now)

    @rule(sched=st.sampled_from(SCHEDS))
    def reconfigure(self, sched: str) -> None:
        self.s.configure(sched, **self.opts)

    @invariant()
    def agree(self) -> None:
        if hasattr(self, "s"):
            self.s.check()

    def teardown(self) -> None:
        # Leave no dangling template handles: end everything.
        if hasattr(self, "s"):
            for c in self.conns:
                self.s.unbind(c.id, c.tmpl, c.handle, self.now)
            self.s.expire(self.now + 10**9)


SchedulerMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestSchedulerMachine = SchedulerMachine.TestCase


# ------------------------------------------------------------------ wrr share


@settings(max_examples=150, deadline=None)
@given(
    weights=st.lists(st.integers(0, 12), min_size=1, max_size=6).filter(any),
    skip=st.integers(0, 40),
    switch=st.booleans(),
)
def test_wrr_full_cycle_gives_each_dest_its_weight(
    weights: list[int], skip: int, switch: bool
) -> None:
    s = CService("rr" if switch else "wrr")
    for i, w in enumerate(weights):
        s.add(i, w)
    if switch:
        s.configure("wrr")  # init path: a cycle starts at cw = mw
    for _ in range(skip):
        s.pick()
    g = math.gcd(*weights)
    cycle = [s.pick() for _ in range(sum(weights) // g)]
    for i, w in enumerate(weights):
        assert cycle.count(i) == w // g


@settings(max_examples=100, deadline=None)
@given(sched=st.sampled_from(SCHEDS), weights=st.lists(st.integers(0, 3), min_size=1, max_size=6))
def test_weight_zero_is_never_picked(sched: str, weights: list[int]) -> None:
    s = CService(sched, flags=m.SH_FALLBACK)
    for i, w in enumerate(weights):
        s.add(i, w)
    for k in range(40):
        d = s.pick(client=CLIENTS[k % len(CLIENTS)], cport=k, daddr=VIPS[k % len(VIPS)])
        if d is None:
            continue
        assert weights[d] > 0


# ------------------------------------------------------------ sh / dh tables


def _bucket_sources() -> list[str]:
    """One IPv4 address per bucket, found by walking 10.200.0.0/16."""
    found: dict[int, str] = {}
    for v in range(0x0AC80000, 0x0AC90000):
        found.setdefault(m.hash_32(v), str(ipaddress.IPv4Address(v)))
        if len(found) == 256:
            break
    return [found[b] for b in range(256)]


BUCKET_SOURCES = _bucket_sources()


def sh_rule(order: list[int], weights: dict[int, int]) -> list[int]:
    run = [d for d in order for _ in range(max(weights[d], 1))]
    return [run[i % len(run)] for i in range(256)]


TABLE_OPS = st.lists(
    st.tuples(st.sampled_from(["edit", "delete", "add"]), st.integers(0, 4), st.integers(0, 4)),
    max_size=6,
)


@settings(max_examples=40, deadline=None)
@given(weights=st.lists(st.integers(1, 4), min_size=1, max_size=5), ops=TABLE_OPS)
def test_sh_table_is_the_rebuild_of_order_and_weights(
    weights: list[int], ops: list[tuple[str, int, int]]
) -> None:
    s = CService("sh")
    w = dict(enumerate(weights))
    for i in w:
        s.add(i, w[i])
    for op, id, weight in [("noop", 0, 0), *ops]:
        if op == "edit" and id in s.order():
            s.edit(id, weight)
            w[id] = weight
        elif op == "delete" and id in s.order():
            s.delete(id)
        elif op == "add" and id not in s.order():
            s.add(id, weight)
            w[id] = weight
        order = s.order()
        want = sh_rule(order, w) if order else [None] * 256
        for b, ip in enumerate(BUCKET_SOURCES):
            d = want[b]
            expect = d if d is not None and w[d] > 0 else None
            assert s.pick(client=ip) == expect, (b, order, w)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 5), ops=TABLE_OPS)
def test_dh_table_is_the_list_order_repeated(n: int, ops: list[tuple[str, int, int]]) -> None:
    s = CService("dh")
    w = {i: 1 for i in range(n)}
    for i in w:
        s.add(i, 1)
    for op, id, weight in [("noop", 0, 0), *ops]:
        if op == "edit" and id in s.order():
            s.edit(id, weight)
            w[id] = weight
        elif op == "delete" and id in s.order():
            s.delete(id)
        elif op == "add" and id not in s.order():
            s.add(id, weight)
            w[id] = weight
        order = s.order()
        for b, ip in enumerate(BUCKET_SOURCES):
            d = order[b % len(order)] if order else None
            expect = d if d is not None and w[d] > 0 else None
            assert s.pick(client="10.9.9.9", daddr=ip) == expect, (b, order, w)
