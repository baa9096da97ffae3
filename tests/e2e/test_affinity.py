"""Client affinity (IPVS persistence, spec §12) end to end through ``l4lb run``.

A client network's first connection creates a template bound to the scheduler's pick;
later connections reuse it without asking the scheduler, so the scheduler advances only
when a template is created. Expected backends are hand tables from the specification,
cross-checked against the reference model driven in lock step (see test_schedulers.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest

from l4lb._testbase import NamedServer, wait_for

from .test_schedulers import (
    RR_WRR_TABLES,
    Backend,
    Lockstep,
    locksteps,
    post_backend,
    reload,
    start,
    table,
)

SOURCES = [f"127.1.0.{i}" for i in range(1, 11)]


@pytest.fixture
def lockstep() -> Iterator[Callable[..., Lockstep]]:
    """Factory of lock-stepped services; held connections are closed at teardown."""
    with locksteps() as make:
        yield make


def rr3(
    lockstep: Callable[..., Lockstep], servers: list[NamedServer], name: str, **options: object
) -> Lockstep:
    """rr over b0, b1, b2 (kernel order b2 b1 b0) with the given affinity options."""
    return lockstep(name, "rr", [Backend(s) for s in servers], options=options)


def test_rr_advances_only_when_a_template_is_created(l4lb, named_backends, lockstep):
    servers = named_backends(3)
    back_to_back = rr3(lockstep, servers, "back-to-back", affinity_timeout=60)
    rounds = rr3(lockstep, servers, "rounds", affinity_timeout=60)
    start(l4lb, back_to_back, rounds)
    # §12: rr -p 60, 10 sources x 3 back-to-back connections: b2 x3, b1 x3, b0 x3, b2 x3 ...
    got = [back_to_back.pick(source=src) for src in SOURCES for _ in range(3)]
    assert got == [name for name in table("b2 b1 b0", 4)[:10] for _ in range(3)]
    # Interleaved: round 1 is the plain rr sequence, rounds 2 and 3 repeat it.
    for _ in range(3):
        assert [rounds.pick(source=src) for src in SOURCES] == table("b2 b1 b0", 4)[:10]
    for ls in (back_to_back, rounds):
        assert ls.observed == ls.expected, ls.name
        assert ls.doc()["affinity_timeout"] == 60


def test_new_sources_are_spread_by_wrr_and_then_stick(l4lb, named_backends, lockstep):
    servers = named_backends(3)
    backends = [Backend(s, w) for s, w in zip(servers, [4, 3, 2], strict=True)]
    ls = lockstep("web", "wrr", backends, options={"affinity_timeout": 60})
    start(l4lb, ls)
    sources = [f"127.1.{i // 200}.{i % 200 + 1}" for i in range(30)]
    first = [ls.pick(source=src) for src in sources]
    assert first == RR_WRR_TABLES[("wrr", (4, 3, 2))][:30]
    assert [ls.pick(source=src) for src in reversed(sources)] == first[::-1]
    assert ls.observed == ls.expected


def test_netmask_24_makes_a_subnet_share_one_backend(l4lb, named_backends, lockstep):
    servers = named_backends(3)
    services = [
        rr3(lockstep, servers, "prefix", affinity_timeout=60, affinity_netmask=24),
        rr3(lockstep, servers, "dotted", affinity_timeout=60, affinity_netmask="255.255.255.0"),
        rr3(lockstep, servers, "host", affinity_timeout=60),
    ]
    start(l4lb, *services)
    # Five hosts in each of four /24s, the subnets interleaved.
    sources = [f"127.1.{net}.{host}" for host in range(1, 6) for net in range(1, 5)]
    for ls in services:
        for src in sources:
            ls.pick(source=src)
        assert ls.observed == ls.expected, ls.name
    # /24: one template per subnet, created in the order b2 b1 b0 b2.
    assert services[0].observed == table("b2 b1 b0 b2", 5)
    assert services[1].observed == services[0].observed
    # /32: every host is a client network of its own.
    assert services[2].observed == table("b2 b1 b0", 7)[:20]


def test_a_client_is_rescheduled_after_the_timeout_unless_a_connection_remains(
    l4lb, named_backends, lockstep
):
    servers = named_backends(3)
    timeouts = {"inactive": 0.1, "reset_inactive": 0.1}
    ls = lockstep(
        "web", "rr", [Backend(s) for s in servers], options={"affinity_timeout": 1}, **timeouts
    )
    start(l4lb, ls, inactive_timeout=0.1, reset_inactive_timeout=0.1)
    s, t, u, v = SOURCES[:4]
    assert [ls.pick(source=s, gone=True) for _ in range(2)] == ["b2", "b2"]
    assert ls.pick(source=t, gone=True) == "b1"
    held = ls.open(source=u)  # stays open: its template outlives the timeout
    assert held.name == "b0"
    assert ls.pick(source=v, gone=True) == "b2"
    # Every template is 1 s old; only u's still controls a connection (re-armed for 60 s).
    time.sleep(1.6)
    got = [ls.pick(source=src, gone=True) for src in (s, u, t, v)]
    assert got == ["b1", "b0", "b0", "b2"]
    assert ls.observed == ls.expected
    assert ls.counters()[servers[0].address] == (1, 0, False)


@pytest.mark.parametrize("expire_quiescent", [False, True])
def test_a_drained_backend_keeps_its_affinity_clients_unless_expire_quiescent(
    l4lb, named_backends, lockstep, expire_quiescent
):
    servers = named_backends(3)
    b1 = servers[1]
    ls = rr3(lockstep, servers, "web", affinity_timeout=60, expire_quiescent=expire_quiescent)
    lb = start(l4lb, ls)
    s1, s2, s3, s4 = SOURCES[:4]
    assert [ls.pick(source=src) for src in (s1, s2, s3)] == ["b2", "b1", "b0"]
    status, doc = post_backend(lb, "web", b1.address, {"drain": True})
    assert status == 200 and doc["drain"] is True and doc["effective_weight"] == 0
    ls.override(b1, drain=True)
    got = [ls.pick(source=src) for src in (s2, s4, s1, s3)]
    if expire_quiescent:
        # s2's template is discarded: rr goes on from b0 and skips the drained b1.
        assert got == ["b2", "b0", "b2", "b0"]
    else:
        # s2 still goes to the drained b1; the scheduler itself never picks it.
        assert got == ["b1", "b2", "b2", "b0"]
    assert ls.observed == ls.expected
    assert b1.accepted == (1 if expire_quiescent else 2)


def test_a_removed_backends_clients_are_rescheduled(l4lb, named_backends, lockstep):
    b0, b1, b2 = servers = named_backends(3)
    ls = rr3(lockstep, servers, "web", affinity_timeout=60)
    lb = start(l4lb, ls)
    s1, s2, s3, s4 = SOURCES[:4]
    assert [ls.pick(source=src) for src in (s1, s2, s3)] == ["b2", "b1", "b0"]
    ls.set_backends([Backend(b0), Backend(b2)])
    reload(lb, ls)
    # s2's backend is gone: rescheduled (rr goes on from b0 to b2); the others stay.
    assert [ls.pick(source=src) for src in (s2, s1, s3)] == ["b2", "b2", "b0"]
    ls.set_backends([Backend(b0), Backend(b1), Backend(b2)])
    reload(lb, ls)
    # Re-added b1 (now the list head) gets s2 back only if its new template expires.
    assert [ls.pick(source=src) for src in (s2, s4, s1)] == ["b2", "b0", "b2"]
    assert ls.observed == ls.expected
    assert b1.accepted == 1


def test_kubernetes_client_ip_affinity_of_10800_seconds_is_accepted(l4lb, named_backends, lockstep):
    # sessionAffinity: ClientIP with timeoutSeconds 10800 is affinity_timeout = 10800.
    servers = named_backends(3)
    ls = rr3(lockstep, servers, "web", affinity_timeout=10800)
    start(l4lb, ls)
    assert ls.doc()["affinity_timeout"] == 10800
    first = [ls.pick(source=src) for src in SOURCES[:6]]
    assert first == table("b2 b1 b0", 2)
    assert [ls.pick(source=src) for src in SOURCES[:6]] == first
    assert ls.observed == ls.expected


def test_a_backend_removed_and_readded_before_its_clients_return_keeps_them(
    l4lb, named_backends, lockstep
):
    b0, b1, b2 = servers = named_backends(3)
    ls = rr3(lockstep, servers, "web", affinity_timeout=60)
    lb = start(l4lb, ls)
    s1, s2, s3, s4 = SOURCES[:4]
    assert [ls.pick(source=src) for src in (s1, s2, s3)] == ["b2", "b1", "b0"]
    ls.set_backends([Backend(b0), Backend(b2)])
    reload(lb, ls)
    ls.set_backends([Backend(b0), Backend(b1), Backend(b2)])
    reload(lb, ls)
    # §0: the re-added address revives the same dest, so s2's template is valid again.
    assert [ls.pick(source=src) for src in (s2, s4, s1)] == ["b1", "b1", "b2"]
    assert ls.observed == ls.expected


def test_affinity_switched_off_and_on_by_reload(l4lb, named_backends, lockstep):
    servers = named_backends(3)
    ls = rr3(lockstep, servers, "web", affinity_timeout=60)
    lb = start(l4lb, ls)
    s1, s2, s3 = SOURCES[:3]
    assert [ls.pick(source=src) for src in (s1, s2)] == ["b2", "b1"]
    ls.reconfigure(options={})
    reload(lb, ls)
    wait_for(lambda: ls.doc()["affinity_timeout"] == 0, 10, message="affinity off")
    # Plain rr from where it was; the templates are neither used nor touched.
    assert [ls.pick(source=src) for src in (s1, s1, s2)] == ["b0", "b2", "b1"]
    ls.reconfigure(options={"affinity_timeout": 60})
    reload(lb, ls)
    wait_for(lambda: ls.doc()["affinity_timeout"] == 60, 10, message="affinity on")
    # The old templates have not expired: s1 and s2 are back on their backends.
    assert [ls.pick(source=src) for src in (s1, s2, s3, s3)] == ["b2", "b1", "b0", "b0"]
    assert ls.observed == ls.expected


def test_a_template_ignores_its_backends_overload(l4lb, named_backends, lockstep):
    b0, b1, b2 = named_backends(3, hold=True)
    backends = [Backend(b0), Backend(b1), Backend(b2, upper=1)]
    ls = lockstep("web", "rr", backends, options={"affinity_timeout": 60})
    start(l4lb, ls)
    s1, s2 = SOURCES[:2]
    assert ls.open(source=s1).name == "b2"  # T = 1 = upper: overloaded
    assert ls.counters()[b2.address][2] is True
    # §12: an existing template sends its client on regardless; the scheduler skips b2.
    assert [ls.open(source=src).name for src in (s1, s2, s1)] == ["b2", "b1", "b2"]
    assert ls.observed == ls.expected
