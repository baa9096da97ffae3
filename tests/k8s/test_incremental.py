"""Incremental translation and config building give what a full pass gives, and redo only
what changed."""

from __future__ import annotations

import copy
from typing import Any

from k8s_objects import endpoint_slice, load_items, service

from l4lb.k8s.incremental import IncrementalTranslator
from l4lb.k8s.reconcile import BuildCache, BuildSettings, build_config
from l4lb.k8s.translate import NodeInfo, translate

NODE = NodeInfo("node-a", ("10.0.0.5", "bogus", "0.0.0.0"), "zone-a")


def test_same_result_as_a_full_translation() -> None:
    services, slices = load_items("services.json"), load_items("endpointslices.json")
    inc = IncrementalTranslator()
    full = translate(services, slices, NODE)
    assert inc.translate(services, slices, NODE) == full
    assert inc.translated == len(services)
    # Unchanged objects: nothing is translated again, the result is the same.
    assert inc.translate(services, slices, NODE) == full
    assert inc.translated == 0


def test_only_changed_services_are_translated_again() -> None:
    services = [service(f"s{i}", f"10.96.0.{i + 1}", [{"port": 80}]) for i in range(5)]
    slices: list[dict[str, Any]] = [
        endpoint_slice(f"s{i}", [{"ip": f"10.244.0.{i + 1}"}], [{"port": 80}]) for i in range(5)
    ]
    inc = IncrementalTranslator()
    first = inc.translate(services, slices, NODE)
    # A new slice object for s2 (as a watch MODIFIED event makes) and a new Service s4.
    slices[2] = copy.deepcopy(slices[2])
    slices[2]["endpoints"][0]["addresses"] = ["10.244.9.9"]
    services[4] = copy.deepcopy(services[4])
    services[4]["spec"]["ports"][0]["port"] = 81
    second = inc.translate(services, slices, NODE)
    assert inc.translated == 2
    assert second == translate(services, slices, NODE)
    assert second != first
    # Unchanged services come back as the very same objects.
    assert second.services[0] is first.services[0]
    # Another node: everything again.
    inc.translate(services, slices, NodeInfo("node-b"))
    assert inc.translated == 5


def test_build_cache_reuses_and_still_resolves_conflicts() -> None:
    services = [service(f"s{i}", f"10.96.0.{i + 1}", [{"port": 80}]) for i in range(3)]
    inc, cache, settings = IncrementalTranslator(), BuildCache(), BuildSettings()
    t = inc.translate(services, [], NODE)
    cfg, errors = build_config(t.services, settings, cache=cache)
    assert errors == [] and cache.reused == 0
    again, _ = build_config(inc.translate(services, [], NODE).services, settings, cache=cache)
    assert again == cfg and cache.reused == 3
    # s0 changes to take s2's VIP: s0 is rebuilt, claims first, and s2 (cached) loses it.
    services[0] = service("s0", "10.96.0.3", [{"port": 80}])
    t = inc.translate(services, [], NODE)
    cfg, errors = build_config(t.services, settings, cache=cache)
    fresh, fresh_errors = build_config(t.services, settings)
    assert (cfg, errors) == (fresh, fresh_errors)
    assert [str(e) for e in errors] == [
        "Service default/s2: default/s2:80/tcp: VIP 10.96.0.3:80/tcp is already used by "
        "default_s0_80_tcp, skipped"
    ]
