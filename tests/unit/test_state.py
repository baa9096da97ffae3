"""Tests for l4lb.state: resolving desired state and planning ordered operations."""

from __future__ import annotations

import socket
from collections.abc import Mapping, Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from l4lb.config import Address, Config, parse_config
from l4lb.state import (
    FLAG_PERSISTENT,
    FLAG_SH_FALLBACK,
    FLAG_SH_PORT,
    DestOp,
    DestSpec,
    Health,
    Override,
    ServicePlan,
    ServiceSpec,
    desired_state,
    plan,
    ramped_weight,
)


def reference_dest_order(initial: Sequence[str], ops: Sequence[DestOp]) -> list[str]:
    """The destination list IPVS ends up with: adds go to the head, dels unlink, edits stay."""
    order = list(initial)
    for op in ops:
        addr = str(op.dest.address)
        if op.kind == "add":
            assert addr not in order, f"add of an existing dest {addr}"
            order.insert(0, addr)
        elif op.kind == "del":
            order.remove(addr)
        else:
            assert addr in order, f"edit of a missing dest {addr}"
    return order


def backend(port: int, **extra: Any) -> dict[str, Any]:
    return {"address": f"127.0.0.1:{port}", **extra}


def service(name: str = "web", *ports: int, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "listen": extra.pop("listen", "127.0.0.1:8080"),
        "backends": [backend(p) for p in ports],
        **extra,
    }


def config(*services: dict[str, Any], **dataplane: Any) -> Config:
    return parse_config({"services": list(services), "dataplane": dataplane}, source="t.toml")


def state(*services: dict[str, Any], **kw: Any) -> dict[str, ServiceSpec]:
    return desired_state(config(*services), kw.get("overrides"))


def addr(port: int) -> Address:
    return Address("127.0.0.1", port, socket.AF_INET)


def ops_of(p: ServicePlan) -> list[tuple[str, int, int]]:
    return [(op.kind, op.dest.address.port, op.dest.weight) for op in p.ops]


# ----------------------------------------------------------------------------- desired_state


def test_desired_state_resolves_defaults() -> None:
    spec = state(service("web", 9001, 9002))["web"]
    assert spec == ServiceSpec(
        name="web",
        listen=addr(8080),
        protocol="tcp",
        scheduler="rr",
        flags=0,
        persist_timeout=0.0,
        persist_netmask=32,
        persist_netmask6=128,
        expire_quiescent=False,
        connect_timeout=3.0,
        idle_timeout=900.0,
        drain_timeout=30.0,
        retries=-1,
        dests=(DestSpec(addr(9001), 1, 0, 0), DestSpec(addr(9002), 1, 0, 0)),
    )


def test_desired_state_keeps_config_order() -> None:
    specs = desired_state(
        config(
            service("b", 3, 1, 2, listen="127.0.0.1:1"),
            service("a", listen="127.0.0.1:2"),
        )
    )
    assert list(specs) == ["b", "a"]
    assert [d.address.port for d in specs["b"].dests] == [3, 1, 2]


def test_desired_state_flags_and_persistence() -> None:
    svc = service(
        "web",
        9001,
        scheduler="sh",
        sh_fallback=True,
        sh_port=True,
        affinity_timeout=60,
        affinity_netmask="255.255.0.0",
        affinity_netmask6=48,
        expire_quiescent=True,
        drain_timeout=4,
        retries=0,
    )
    spec = state(svc)["web"]
    assert spec.flags == FLAG_PERSISTENT | FLAG_SH_FALLBACK | FLAG_SH_PORT == 0x19
    assert (spec.persist_timeout, spec.persist_netmask, spec.persist_netmask6) == (60.0, 16, 48)
    assert spec.expire_quiescent
    assert spec.drain_timeout == 4.0
    assert spec.retries == 0


def test_desired_state_flags_individually() -> None:
    assert state(service(affinity_timeout=1))["web"].flags == FLAG_PERSISTENT
    assert state(service(scheduler="sh", sh_port=True))["web"].flags == FLAG_SH_PORT
    assert state(service(scheduler="sh", sh_fallback=True))["web"].flags == FLAG_SH_FALLBACK


def test_dataplane_drain_timeout_is_the_default() -> None:
    specs = desired_state(config(service(), drain_timeout=12))
    assert specs["web"].drain_timeout == 12.0


def test_backend_weight_and_thresholds_are_carried() -> None:
    svc = service()
    svc["backends"] = [backend(1, weight=5, upper_threshold=10, lower_threshold=3)]
    assert state(svc)["web"].dests == (DestSpec(addr(1), 5, 10, 3),)


def test_overrides() -> None:
    overrides = {
        ("web", "127.0.0.1:1"): Override(weight=7),
        ("web", "127.0.0.1:2"): Override(drain=True),
        ("web", "127.0.0.1:3"): Override(weight=9, drain=True),
        ("web", "127.0.0.1:4"): Override(),
        ("web", "127.0.0.1:99"): Override(weight=5),  # not configured: ignored
        ("other", "127.0.0.1:1"): Override(weight=5),  # no such service: ignored
    }
    specs = state(service("web", 1, 2, 3, 4, 5), overrides=overrides)
    assert [(d.address.port, d.weight) for d in specs["web"].dests] == [
        (1, 7),
        (2, 0),
        (3, 0),
        (4, 1),
        (5, 1),
    ]


def test_override_key_uses_bracketed_ipv6() -> None:
    svc = {"name": "v6", "listen": "[::1]:80", "backends": [{"address": "[::1]:81"}]}
    specs = state(svc, overrides={("v6", "[::1]:81"): Override(weight=3)})
    assert specs["v6"].dests[0].weight == 3


# ----------------------------------------------------------------------------- health


def checked(*ports: int, weights: Sequence[int] = (), **health: Any) -> dict[str, Any]:
    """A service "web" on ``ports`` with a [services.health] table."""
    svc = service("web", *ports, health=health)
    for b, w in zip(svc["backends"], weights, strict=False):
        b["weight"] = w
    return svc


def weights(specs: Mapping[str, ServiceSpec], name: str = "web") -> list[int]:
    return [d.weight for d in specs[name].dests]


def key(port: int) -> tuple[str, str]:
    return ("web", f"127.0.0.1:{port}")


def test_down_backend_gets_weight_zero_and_keeps_its_place() -> None:
    cfg = config(checked(1, 2, 3, weights=[5, 5, 5]))
    specs = desired_state(cfg, health={key(2): Health(up=False)})
    assert [d.address.port for d in specs["web"].dests] == [1, 2, 3]
    assert weights(specs) == [5, 0, 5]


def test_missing_health_entry_means_up_at_full_weight() -> None:
    cfg = config(checked(1, 2, weights=[3, 4]))
    assert weights(desired_state(cfg, health={})) == [3, 4]
    assert weights(desired_state(cfg, health={key(1): Health()})) == [3, 4]


def test_health_is_ignored_without_a_health_table() -> None:
    cfg = config(service("web", 1, 2))
    specs = desired_state(cfg, health={key(1): Health(up=False), key(2): Health(up=False)})
    assert weights(specs) == [1, 1]


def test_health_entries_for_unknown_backends_are_ignored() -> None:
    cfg = config(checked(1, 2))
    health = {key(99): Health(up=False), ("other", "127.0.0.1:1"): Health(up=False)}
    assert weights(desired_state(cfg, health=health)) == [1, 1]


@pytest.mark.parametrize(
    ("weight", "ramp", "expected"),
    [
        (100, 0.0, 1),  # never 0 while up
        (100, 1e-9, 1),
        (100, 0.25, 25),
        (100, 0.999, 99),
        (100, 1.0, 100),
        (3, 0.5, 1),
        (3, 0.7, 2),
        (1, 0.01, 1),
        (0, 0.5, 0),  # a configured weight of 0 stays 0
        (65535, 0.5, 32767),
    ],
)
def test_ramped_weight(weight: int, ramp: float, expected: int) -> None:
    assert ramped_weight(weight, ramp) == expected


def test_slow_start_ramp_scales_the_weight() -> None:
    cfg = config(checked(1, 2, weights=[40, 40], slowstart=10))
    specs = desired_state(cfg, health={key(1): Health(up=True, ramp=0.1)})
    assert weights(specs) == [4, 40]


def test_slow_start_ramps_an_override_weight() -> None:
    cfg = config(checked(1, weights=[40], slowstart=10))
    specs = desired_state(
        cfg, {key(1): Override(weight=20)}, health={key(1): Health(up=True, ramp=0.5)}
    )
    assert weights(specs) == [10]


def test_drain_wins_over_health() -> None:
    cfg = config(checked(1, 2, 3))
    overrides = {key(1): Override(drain=True), key(2): Override(weight=7)}
    health = {key(1): Health(up=True), key(2): Health(up=False), key(3): Health(up=True)}
    assert weights(desired_state(cfg, overrides, health)) == [0, 0, 1]


def test_all_down_reject_is_the_default() -> None:
    cfg = config(checked(1, 2, weights=[2, 3]))
    health = {key(1): Health(up=False), key(2): Health(up=False)}
    assert weights(desired_state(cfg, health=health)) == [0, 0]


def test_all_down_all_programs_configured_weights() -> None:
    cfg = config(checked(1, 2, weights=[2, 3], all_down="all"))
    health = {key(1): Health(up=False), key(2): Health(up=False, ramp=0.1)}
    assert weights(desired_state(cfg, health=health)) == [2, 3]


def test_all_down_all_still_honours_drain_and_overrides() -> None:
    cfg = config(checked(1, 2, 3, weights=[2, 3, 4], all_down="all"))
    overrides = {key(1): Override(drain=True), key(2): Override(weight=9)}
    health = {key(p): Health(up=False) for p in (1, 2, 3)}
    assert weights(desired_state(cfg, overrides, health)) == [0, 9, 4]


def test_all_down_all_does_not_apply_while_one_is_up() -> None:
    cfg = config(checked(1, 2, 3, weights=[2, 3, 4], all_down="all"))
    health = {key(1): Health(up=False), key(2): Health(up=False)}  # 3 has no entry: up
    assert weights(desired_state(cfg, health=health)) == [0, 0, 4]
    health[key(3)] = Health(up=True, ramp=0.5)
    assert weights(desired_state(cfg, health=health)) == [0, 0, 2]


def test_health_plans_as_edits_only() -> None:
    cfg = config(checked(1, 2, weights=[5, 5]))
    old = desired_state(cfg)
    new = desired_state(cfg, health={key(2): Health(up=False)})
    [p] = plan(old, new)
    assert (p.action, p.settings_changed, ops_of(p)) == ("update", False, [("edit", 2, 0)])
    [back] = plan(new, desired_state(cfg))
    assert ops_of(back) == [("edit", 2, 5)]


def test_desired_state_with_health_does_not_mutate_inputs() -> None:
    cfg = config(checked(1, 2))
    overrides = {key(1): Override(weight=3)}
    health = {key(2): Health(up=False)}
    before = (dict(overrides), dict(health))
    desired_state(cfg, overrides, health)
    assert (overrides, health) == before


# ----------------------------------------------------------------------------- plan


def test_plan_from_nothing_adds_everything_in_config_order() -> None:
    new = state(service("web", 3, 1, 2))
    [p] = plan({}, new)
    assert (p.name, p.action, p.spec) == ("web", "add", new["web"])
    assert not p.listen_changed and not p.settings_changed
    assert ops_of(p) == [("add", 3, 1), ("add", 1, 1), ("add", 2, 1)]
    # IPVS then holds them newest first.
    assert reference_dest_order([], p.ops) == ["127.0.0.1:2", "127.0.0.1:1", "127.0.0.1:3"]


def test_plan_add_service_without_backends() -> None:
    [p] = plan({}, state(service("web")))
    assert p.action == "add"
    assert p.ops == ()


def test_plan_identical_is_keep() -> None:
    old = state(service("web", 1, 2))
    [p] = plan(old, state(service("web", 1, 2)))
    assert (p.action, p.ops, p.listen_changed, p.settings_changed) == ("keep", (), False, False)
    assert p.spec == old["web"]


def test_plan_remove_service() -> None:
    old = desired_state(
        config(service("a", 1, listen="127.0.0.1:1"), service("b", 2, listen="127.0.0.1:2"))
    )
    new = desired_state(config(service("b", 2, listen="127.0.0.1:2")))
    plans = plan(old, new)
    assert [(p.name, p.action) for p in plans] == [("b", "keep"), ("a", "remove")]
    removed = plans[1]
    assert removed.spec is None
    assert removed.ops == ()


def test_plan_orders_new_then_removed() -> None:
    old = desired_state(
        config(
            service("x", listen="127.0.0.1:1"),
            service("y", listen="127.0.0.1:2"),
            service("z", listen="127.0.0.1:3"),
        )
    )
    new = desired_state(
        config(service("c", listen="127.0.0.1:4"), service("y", listen="127.0.0.1:2"))
    )
    assert [(p.name, p.action) for p in plan(old, new)] == [
        ("c", "add"),
        ("y", "keep"),
        ("x", "remove"),
        ("z", "remove"),
    ]


def test_plan_reweight_is_an_edit() -> None:
    old = state(service("web", 1, 2))
    svc = service("web")
    svc["backends"] = [backend(1), backend(2, weight=4)]
    [p] = plan(old, state(svc))
    assert p.action == "update"
    assert not p.settings_changed and not p.listen_changed
    assert ops_of(p) == [("edit", 2, 4)]


def test_plan_threshold_change_is_an_edit() -> None:
    old = state(service("web", 1))
    svc = service("web")
    svc["backends"] = [backend(1, upper_threshold=10)]
    [p] = plan(old, state(svc))
    assert [(op.kind, op.dest.upper_threshold) for op in p.ops] == [("edit", 10)]


def test_plan_reorder_alone_is_not_an_op() -> None:
    old = state(service("web", 1, 2, 3))
    new = state(service("web", 3, 1, 2))
    [p] = plan(old, new)
    assert p.action == "keep"
    assert p.ops == ()
    assert p.spec == new["web"]


def test_plan_backend_changes_are_del_then_add_then_edit() -> None:
    old = state(service("web", 1, 2, 3, 4))
    svc = service("web")
    svc["backends"] = [backend(6), backend(3, weight=2), backend(5), backend(1, weight=9)]
    [p] = plan(old, state(svc))
    assert p.action == "update"
    assert ops_of(p) == [
        ("del", 2, 1),  # removed, in old order
        ("del", 4, 1),
        ("add", 6, 1),  # new, in config order
        ("add", 5, 1),
        ("edit", 3, 2),  # changed, in config order
        ("edit", 1, 9),
    ]
    order = reference_dest_order(
        ["127.0.0.1:4", "127.0.0.1:3", "127.0.0.1:2", "127.0.0.1:1"], p.ops
    )
    assert order == ["127.0.0.1:5", "127.0.0.1:6", "127.0.0.1:3", "127.0.0.1:1"]


def test_plan_listen_change_recreates_the_service() -> None:
    old = state(service("web", 1, 2))
    new = state(service("web", 2, 1, listen="127.0.0.1:8081"))
    [p] = plan(old, new)
    assert p.action == "update"
    assert p.listen_changed
    assert not p.settings_changed
    assert p.spec is not None and p.spec.listen == addr(8081)
    assert ops_of(p) == [("add", 2, 1), ("add", 1, 1)]
    assert reference_dest_order([], p.ops) == ["127.0.0.1:1", "127.0.0.1:2"]


def test_plan_listen_family_change() -> None:
    old = state(service("web", 1))
    [p] = plan(old, state(service("web", 1, listen="[::1]:8080")))
    assert p.listen_changed
    assert [op.kind for op in p.ops] == ["add"]


def test_plan_scheduler_change() -> None:
    old = state(service("web", 1, 2))
    [p] = plan(old, state(service("web", 1, 2, scheduler="wrr")))
    assert p.action == "update"
    assert p.settings_changed and not p.listen_changed
    assert p.ops == ()
    assert p.spec is not None and p.spec.scheduler == "wrr"


@pytest.mark.parametrize(
    "change",
    [
        {"affinity_timeout": 10},
        {"affinity_netmask": 24},
        {"affinity_netmask6": 64},
        {"expire_quiescent": True},
        {"scheduler": "sh", "sh_port": True},
        {"connect_timeout": 1},
        {"idle_timeout": 1},
        {"drain_timeout": 1},
        {"retries": 3},
    ],
)
def test_plan_any_setting_change_is_an_update(change: dict[str, Any]) -> None:
    old = state(service("web", 1))
    [p] = plan(old, state(service("web", 1, **change)))
    assert (p.action, p.settings_changed, p.listen_changed, p.ops) == ("update", True, False, ())


def test_plan_dataplane_drain_timeout_reaches_services() -> None:
    old = desired_state(config(service("web", 1)))
    new = desired_state(config(service("web", 1), drain_timeout=5))
    [p] = plan(old, new)
    assert (p.action, p.settings_changed) == ("update", True)


def test_plan_drain_override() -> None:
    cfg = config(service("web", 1, 2))
    old = desired_state(cfg)
    new = desired_state(cfg, {("web", "127.0.0.1:2"): Override(drain=True)})
    [p] = plan(old, new)
    assert p.action == "update"
    assert ops_of(p) == [("edit", 2, 0)]
    # Undraining restores the configured weight.
    [back] = plan(new, desired_state(cfg))
    assert ops_of(back) == [("edit", 2, 1)]


def test_plan_does_not_touch_its_inputs() -> None:
    old = state(service("web", 1, 2))
    new = state(service("web", 2, 3))
    old_copy, new_copy = dict(old), dict(new)
    plan(old, new)
    assert (old, new) == (old_copy, new_copy)


# ----------------------------------------------------------------------------- properties

_ports = st.lists(st.integers(1, 12), unique=True, max_size=8)
_weights = st.integers(0, 3)


@st.composite
def _specs(draw: st.DrawFn) -> dict[str, ServiceSpec]:
    backends = [
        backend(p, weight=draw(_weights), upper_threshold=draw(st.sampled_from([0, 5])))
        for p in draw(_ports)
    ]
    svc = {
        "name": "web",
        "listen": draw(st.sampled_from(["127.0.0.1:80", "127.0.0.1:81"])),
        "scheduler": draw(st.sampled_from(["rr", "wrr"])),
        "backends": backends,
    }
    return desired_state(config(svc))


def _apply(
    kernel: Mapping[str, DestSpec], order: list[str], p: ServicePlan
) -> tuple[dict[str, DestSpec], list[str]]:
    """Run one plan against a model of a sink holding ``kernel`` in ``order``."""
    if p.action == "remove":
        return {}, []
    if p.action == "add" or p.listen_changed:
        kernel, order = {}, []
    table = dict(kernel)
    for op in p.ops:
        key = str(op.dest.address)
        if op.kind == "del":
            del table[key]
        else:
            table[key] = op.dest
    return table, reference_dest_order(order, p.ops)


@settings(max_examples=300, deadline=None, database=None)
@given(_specs(), _specs())
def test_plan_converges(old: dict[str, ServiceSpec], new: dict[str, ServiceSpec]) -> None:
    # Program "old" from scratch, then apply plan(old, new): the sink must hold exactly new.
    [first] = plan({}, old)
    kernel, order = _apply({}, [], first)
    [p] = plan(old, new)
    kernel, order = _apply(kernel, order, p)

    want = {str(d.address): d for d in new["web"].dests}
    assert kernel == want
    assert sorted(order) == sorted(want)
    # Ops happen only for real differences.
    old_dests = {str(d.address): d for d in old["web"].dests}
    if not p.listen_changed:
        for op in p.ops:
            key = str(op.dest.address)
            if op.kind == "edit":
                assert old_dests[key] != want[key]
            elif op.kind == "add":
                assert key not in old_dests
            else:
                assert key not in want
        changed = {k for k in want if old_dests.get(k) != want[k]} | (old_dests.keys() - want)
        assert {str(op.dest.address) for op in p.ops} == changed
    assert (p.action == "keep") == (not p.ops and not p.listen_changed and not p.settings_changed)


@settings(max_examples=100, deadline=None, database=None)
@given(_specs())
def test_plan_against_itself_is_keep(specs: dict[str, ServiceSpec]) -> None:
    [p] = plan(specs, specs)
    assert p.action == "keep"
