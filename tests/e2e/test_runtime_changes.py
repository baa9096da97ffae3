"""Runtime changes through the admin API and SIGHUP, end to end through ``l4lb run``.

New connections must follow the changed weights exactly as IPVS would after the
equivalent ``ipvsadm -e/-a/-d`` (hand tables from the specification, cross-checked with
the reference model in lock step, see test_schedulers.py); established connections must
never break; bad requests must be refused and change nothing.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from l4lb._testbase import L4lbProcess, NamedServer, wait_for

from .test_schedulers import (
    RR_WRR_TABLES,
    SOURCES,
    Backend,
    Held,
    Lockstep,
    echo,
    locksteps,
    make_config,
    post_backend,
    reload,
    sh_bucket,
    start,
    table,
)


@pytest.fixture
def lockstep() -> Iterator[Callable[..., Lockstep]]:
    """Factory of lock-stepped services; held connections are closed at teardown."""
    with locksteps() as make:
        yield make


def backend_doc(lb: L4lbProcess, service: str, address: str) -> dict[str, Any]:
    """One backend's entry in ``GET /api/v1/services``."""
    return next(b for b in lb.service(service)["backends"] if b["address"] == address)


def all_alive(held: list[Held], servers: list[NamedServer]) -> None:
    """Every held connection still echoes, and no backend saw a reset."""
    for h in held:
        assert h.sock is not None
        assert echo(h.sock) == b"still there\n", h.name
    assert [s.resets for s in servers] == [0] * len(servers)


def test_admin_weight_changes_the_wrr_distribution_until_a_reload(l4lb, named_backends, lockstep):
    b0, b1, b2 = servers = named_backends(3)
    ls = lockstep("web", "wrr", [Backend(s) for s in servers])
    lb = start(l4lb, ls)
    held = [ls.open() for _ in range(3)]
    assert ls.picks(3) == table("b2 b1 b0")
    status, doc = post_backend(lb, "web", b0.address, {"weight": 3})
    assert status == 200
    assert (doc["weight"], doc["effective_weight"], doc["drain"]) == (3, 3, False)
    ls.override(b0, weight=3)
    # §4 edit: mw 3, cw stays 1, the mark goes back to the head: one round at cw 1,
    # then cw 3 (b0), 2 (b0), 1 (everyone).
    got = ls.picks(18)
    assert got == table("b2 b1 b0") + table("b0 b0 b2 b1 b0", 3)
    assert Counter(got[3:]) == {"b0": 9, "b1": 3, "b2": 3}
    # A reload applies the file as written: b0 back to 1, and b1 now 2.
    ls.set_backends([Backend(b0), Backend(b1, 2), Backend(b2)])
    reload(lb, ls)
    assert backend_doc(lb, "web", b0.address)["weight"] == 1
    got = ls.picks(16)
    assert Counter(got) == {"b1": 8, "b0": 4, "b2": 4}
    assert ls.observed == ls.expected
    all_alive(held, servers)


def test_drain_stops_new_connections_and_keeps_the_established_ones(l4lb, named_backends, lockstep):
    (b0,) = named_backends(1)
    (b1,) = named_backends(1, host="::1")
    (b2,) = named_backends(1)
    servers = [b0, b1, b2]
    ls = lockstep("web", "rr", [Backend(s) for s in servers])
    lb = start(l4lb, ls)
    held = [ls.open() for _ in range(3)]
    assert [h.name for h in held] == ["b2", "b1", "b0"]
    status, doc = post_backend(lb, "web", b1.address, {"drain": True})  # "[::1]:PORT"
    assert status == 200
    assert (doc["weight"], doc["effective_weight"], doc["drain"]) == (1, 0, True)
    ls.override(b1, drain=True)
    shown = backend_doc(lb, "web", b1.address)
    assert (shown["weight"], shown["effective_weight"], shown["drain"]) == (1, 0, True)
    assert ls.picks(12) == table("b2 b0", 6)
    all_alive(held, servers)  # including the one on the drained backend
    status, doc = post_backend(lb, "web", b1.address, {"drain": False})
    assert status == 200 and (doc["effective_weight"], doc["drain"]) == (1, False)
    ls.override(b1, drain=False)
    assert ls.picks(6) == table("b2 b1 b0", 2)
    # Weight 0 is not a drain, but no new connections either.
    status, doc = post_backend(lb, "web", b2.address, {"weight": 0})
    assert status == 200 and (doc["weight"], doc["effective_weight"], doc["drain"]) == (0, 0, False)
    ls.override(b2, weight=0)
    assert ls.picks(6) == table("b1 b0", 3)
    assert ls.observed == ls.expected
    all_alive(held, servers)


def test_sighup_adds_and_removes_backends_without_breaking_established_ones(
    l4lb, named_backends, lockstep
):
    b0, b1, b2, b3 = servers = named_backends(4)
    ls = lockstep("web", "rr", [Backend(b0), Backend(b1), Backend(b2)])
    lb = start(l4lb, ls)
    held = [ls.open() for _ in range(3)]
    assert [h.name for h in held] == ["b2", "b1", "b0"]
    # b0 (under the cursor) goes, b3 comes: order b3 b2 b1, the cursor moved to b1.
    ls.set_backends([Backend(b1), Backend(b2), Backend(b3)])
    reload(lb, ls)
    assert ls.order() == [b3.address, b2.address, b1.address]
    assert ls.picks(6) == table("b3 b2 b1", 2)
    all_alive(held, servers)  # including the one on the removed b0
    held.append(ls.open())
    ls.set_backends([Backend(b0), Backend(b1), Backend(b2), Backend(b3)])
    reload(lb, ls)
    assert ls.order() == [b0.address, b3.address, b2.address, b1.address]
    assert ls.picks(8) == table("b2 b1 b0 b3", 2)  # on from b3, the last pick
    assert ls.observed == ls.expected
    all_alive(held, servers)


def test_a_reload_undoes_admin_changes(l4lb, named_backends, lockstep):
    b0, b1 = servers = named_backends(2)
    ls = lockstep("web", "wrr", [Backend(b0, 2), Backend(b1, 1)])
    lb = start(l4lb, ls)
    held = [ls.open() for _ in range(2)]
    assert post_backend(lb, "web", b1.address, {"drain": True})[0] == 200
    assert post_backend(lb, "web", b0.address, {"weight": 7})[0] == 200
    ls.override(b1, drain=True)
    ls.override(b0, weight=7)
    ls.picks(4)
    ls.set_backends(ls.backends)  # the same file again
    lb.reload(lb.config, wait=False)
    wait_for(
        lambda: (
            [(b["weight"], b["drain"]) for b in lb.service("web")["backends"]]
            == [(1, False), (2, False)]
        ),
        10,
        message="the file's weights back",
    )
    ls.picks(9)
    assert Counter(ls.observed[-9:]) == {"b0": 6, "b1": 3}
    assert ls.observed == ls.expected
    all_alive(held, servers)


BAD_REQUESTS = [
    ("nope", "b0", {"weight": 2}, 404),
    ("web", "127.0.0.1:1", {"weight": 2}, 404),
    ("web", "not-an-address", {"weight": 2}, 404),
    ("web", "b0", {"weight": 70000}, 400),
    ("web", "b0", {"weight": -1}, 400),
    ("web", "b0", {"weight": True}, 400),
    ("web", "b0", {"weight": "3"}, 400),
    ("web", "b0", {"weight": 2.5}, 400),
    ("web", "b0", {"weight": None}, 400),
    ("web", "b0", {"drain": "yes"}, 400),
    ("web", "b0", {"drain": 1}, 400),
    ("web", "b0", {"weigth": 2}, 400),
    ("web", "b0", {}, 400),
    ("web", "b0", b"", 400),
    ("web", "b0", b"not json", 400),
    ("web", "b0", b"[1, 2]", 400),
]


def test_bad_admin_requests_are_refused_and_change_nothing(l4lb, named_backends, lockstep):
    servers = named_backends(3)
    ls = lockstep("web", "wrr", [Backend(s, w) for s, w in zip(servers, [4, 3, 2], strict=True)])
    lb = start(l4lb, ls)
    by_name = {s.name: s.address for s in servers}

    def state() -> list[tuple[str, int, int, bool]]:
        return [
            (b["address"], b["weight"], b["effective_weight"], b["drain"])
            for b in lb.service("web")["backends"]
        ]

    before = state()
    ls.picks(5)
    for service, backend, body, code in BAD_REQUESTS:
        status, doc = post_backend(lb, service, by_name.get(backend, backend), body)
        assert (status, type(doc.get("error"))) == (code, str), (service, backend, body, doc)
        assert state() == before, body
        ls.pick()
    # Any edit would have sent the wrr mark back to the head: the sequence runs on untouched.
    assert ls.observed == RR_WRR_TABLES[("wrr", (4, 3, 2))][: len(ls.observed)]
    assert ls.observed == ls.expected
    assert lb.running


def reloads_done(lb: L4lbProcess) -> int:
    """How many reloads l4lb has logged as applied."""
    return lb.stderr_text().count("reloaded ")


def test_sighup_switches_the_scheduler_afresh_and_otherwise_keeps_its_state(
    l4lb, named_backends, lockstep
):
    servers = named_backends(3)
    ls = lockstep("web", "rr", [Backend(s, w) for s, w in zip(servers, [4, 3, 2], strict=True)])
    lb = start(l4lb, ls)
    assert ls.picks(5) == table("b2 b1 b0 b2 b1")
    ls.reconfigure(scheduler="wrr")
    reload(lb, ls)
    wait_for(lambda: lb.service("web")["scheduler"] == "wrr", 10, message="wrr")
    # §4 init path on a populated [4, 3, 2] list: cw starts at 4.
    cycle = table("b0 b1 b0 b2 b1 b0 b2 b1 b0")
    assert ls.picks(13) == (cycle * 2)[:13]
    # Same scheduler, other settings: the wrr mark is kept.
    done = reloads_done(lb)
    ls.reconfigure(options={"connect_timeout": 2.5, "idle_timeout": 60})
    reload(lb, ls)
    wait_for(lambda: reloads_done(lb) > done, 10, message="the reload")
    assert ls.picks(14) == (cycle * 3)[13:27]
    assert ls.observed == ls.expected


def test_thresholds_changed_by_sighup_apply_at_once(l4lb, named_backends, lockstep):
    b0, b1 = named_backends(2, hold=True)
    ls = lockstep("web", "rr", [Backend(b0), Backend(b1)])
    lb = start(l4lb, ls)
    assert [ls.open().name for _ in range(4)] == table("b1 b0", 2)
    # §2 on a threshold change: T (2) >= upper (2) sets OVERLOAD at once.
    ls.set_backends([Backend(b0), Backend(b1, upper=2)])
    reload(lb, ls)
    ls.wait_counters()
    assert ls.counters()[b1.address] == (2, 0, True)
    assert [ls.open().name for _ in range(3)] == ["b0"] * 3
    # Upper 0 clears it.
    ls.set_backends([Backend(b0), Backend(b1)])
    reload(lb, ls)
    ls.wait_counters()
    assert [ls.open().name for _ in range(2)] == ["b1", "b0"]
    assert ls.observed == ls.expected


def test_all_weights_zero_refuses_clients_until_a_weight_comes_back(l4lb, named_backends, lockstep):
    b0, b1 = servers = named_backends(2)
    ls = lockstep("web", "wrr", [Backend(b0, 2), Backend(b1, 1)])
    lb = start(l4lb, ls)
    held = [ls.open() for _ in range(2)]
    for server in servers:
        assert post_backend(lb, "web", server.address, {"weight": 0})[0] == 200
        ls.override(server, weight=0)
    # §4: mw 0 -> no dest: every new client is reset.
    assert ls.picks(4) == [None] * 4
    assert lb.service("web")["rejected"] == 4
    assert post_backend(lb, "web", b1.address, {"weight": 3})[0] == 200
    ls.override(b1, weight=3)
    assert ls.picks(3) == ["b1"] * 3
    assert post_backend(lb, "web", b0.address, {"weight": 3})[0] == 200
    ls.override(b0, weight=3)
    assert Counter(ls.picks(6)) == {"b0": 3, "b1": 3}
    assert ls.observed == ls.expected
    all_alive(held, servers)


def test_the_sh_table_follows_runtime_weight_changes(l4lb, named_backends, lockstep):
    servers = named_backends(3)
    b0 = servers[0]
    ls = lockstep("web", "sh", [Backend(s) for s in servers])
    lb = start(l4lb, ls)
    sources = SOURCES[:80]
    before = [ls.pick(source=src) for src in sources]
    assert before == [table("b2 b1 b0")[sh_bucket(src) % 3] for src in sources]
    assert post_backend(lb, "web", b0.address, {"weight": 3})[0] == 200
    ls.override(b0, weight=3)
    # §10: rebuilt on the edit, b0 now takes three buckets per round.
    after = [ls.pick(source=src) for src in sources]
    assert after == [table("b2 b1 b0 b0 b0")[sh_bucket(src) % 5] for src in sources]
    assert ls.observed == ls.expected


def test_a_backend_can_be_named_as_the_config_file_spells_it(l4lb, named_backends):
    """The file may spell an IPv6 address any valid way; the API must accept that spelling."""
    (b0,) = named_backends(1, host="::1")
    spelled = f"[0:0::1]:{b0.port}"
    service = {"name": "web", "listen": "127.0.0.1:0", "backends": [{"address": spelled}]}
    lb = l4lb(make_config(service))
    status, doc = post_backend(lb, "web", spelled, {"weight": 2})
    assert status == 200, doc
    assert lb.service("web")["backends"][0]["weight"] == 2


def test_a_new_listen_address_makes_a_new_service_with_fresh_counters(
    l4lb, named_backends, lockstep
):
    b0, b1 = servers = named_backends(2)
    ls = lockstep("web", "lc", [Backend(b0), Backend(b1)])
    lb = start(l4lb, ls)
    held = [ls.open() for _ in range(3)]
    assert [h.name for h in held] == ["b1", "b0", "b1"]
    ls.relisten("127.0.0.3:0")
    reload(lb, ls)
    wait_for(lambda: ls.doc()["listen"].startswith("127.0.0.3:"), 10, message="the new listener")
    # A new virtual service: its dests start from zero, whatever the old one still carries,
    # so lc starts again from the head.
    assert [ls.open().name for _ in range(3)] == ["b1", "b0", "b1"]
    assert ls.counters() == {b0.address: (1, 0, False), b1.address: (2, 0, False)}
    assert ls.observed == ls.expected
    all_alive(held, servers)  # the old listener's connections go on


def test_a_new_listen_address_starts_without_affinity_templates(l4lb, named_backends, lockstep):
    servers = named_backends(3)
    ls = lockstep("web", "rr", [Backend(s) for s in servers], options={"affinity_timeout": 60})
    lb = start(l4lb, ls)
    s1, s2 = SOURCES[:2]
    assert [ls.pick(source=src) for src in (s1, s2)] == ["b2", "b1"]
    ls.relisten("127.0.0.3:0")
    reload(lb, ls)
    wait_for(lambda: ls.doc()["listen"].startswith("127.0.0.3:"), 10, message="the new listener")
    # The templates belonged to the old service (their key holds its address and port).
    assert [ls.pick(source=src) for src in (s2, s1)] == ["b2", "b1"]
    assert ls.observed == ls.expected


def test_a_service_added_by_reload_starts_from_zero(l4lb, named_backends, lockstep):
    (b0,) = named_backends(1)
    keep = lockstep("keep", "rr", [Backend(b0)])
    gone = lockstep("gone", "rr", [Backend(b0)])
    lb = start(l4lb, keep, gone)
    gone.picks(5)
    held = gone.open()
    reload(lb, keep)  # "gone" is removed; its open connection goes on
    fresh = lockstep("fresh", "rr", [Backend(b0)])
    fresh.lb = lb
    reload(lb, keep, fresh)
    doc = fresh.doc()
    assert (doc["total"], doc["active"], doc["rejected"], doc["failed"]) == (0, 0, 0, 0)
    assert fresh.counters() == {b0.address: (0, 0, False)}
    all_alive([held], [b0])
