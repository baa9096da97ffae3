"""The Reconciler hands the App only the services that changed from one pass to the next."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any

from k8s_objects import endpoint_slice, service

from l4lb.config import Config
from l4lb.k8s.client import ENDPOINT_SLICES, SERVICES
from l4lb.k8s.proxy import Reconciler, TimedSignal, changed_services
from l4lb.k8s.reconcile import BuildSettings, PortAllocator
from l4lb.k8s.translate import NodeInfo, slice_service_key
from l4lb.k8s.watcher import ChangeSignal, Discovery, Watcher, object_key

NODE = NodeInfo("node-a", ("10.0.0.5", "0.0.0.0"), None)
PORTS = [{"name": "http", "port": 80}]


class Objects:
    """What a Watcher offers the Reconciler, over a list the test holds."""

    def __init__(self, items: list[dict[str, Any]]) -> None:
        self.items = items

    @property
    def objects(self) -> dict[str, dict[str, Any]]:
        return {object_key(o) or "": o for o in self.items}

    def by_owner(self, owner: str) -> list[dict[str, Any]]:
        return [o for o in self.items if slice_service_key(o) == owner]


class Snapshot(Discovery):
    """A Discovery whose objects are whatever the test holds (no API server)."""

    def __init__(self, services: list[dict[str, Any]], slices: list[dict[str, Any]]) -> None:
        self.services_now, self.slices_now = services, slices
        self.services = Objects(services)  # type: ignore[assignment]
        self.slices = Objects(slices)  # type: ignore[assignment]
        self.snapshots = 0

    def snapshot(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        self.snapshots += 1
        return list(self.services_now), list(self.slices_now)


def objects(n: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    services = [service(f"s{i}", f"10.96.0.{i + 1}", PORTS) for i in range(n)]
    slices = [
        endpoint_slice(f"s{i}", [{"ip": f"10.244.0.{i + 1}"}], [{"name": "http", "port": 80}])
        for i in range(n)
    ]
    return services, slices


class Recorder:
    def __init__(self) -> None:
        self.full: list[Config] = []
        self.changes: list[tuple[Config, frozenset[str]]] = []

    def apply(self, cfg: Config) -> None:
        self.full.append(cfg)

    def apply_changes(self, cfg: Config, changed: frozenset[str]) -> None:
        self.changes.append((cfg, changed))


def reconciler(
    snap: Snapshot,
    rec: Recorder,
    ports: PortAllocator | None = None,
    retry: Callable[[], Iterable[str]] | None = None,
) -> Reconciler:
    return Reconciler(
        snap,
        TimedSignal(),
        rec.apply,
        apply_changes=rec.apply_changes,
        retry=retry,
        node=lambda: NODE,
        settings=BuildSettings(),
        ports=ports,
    )


def test_first_and_periodic_passes_are_full_others_name_the_changes() -> None:
    services, slices = objects(5)
    snap, rec = Snapshot(services, slices), Recorder()
    r = reconciler(snap, rec)
    first = r.sync(pending_since=1.0)
    assert rec.full == [first] and rec.changes == []
    # An endpoint change of s2, a new Service s9, s4 deleted.
    slices[2] = copy.deepcopy(slices[2])
    slices[2]["endpoints"][0]["addresses"] = ["10.244.9.9"]
    services.append(service("s9", "10.96.0.99", PORTS))
    del services[4], slices[4]
    second = r.sync(pending_since=2.0)
    assert rec.changes == [
        (second, frozenset({"default_s2_http_tcp", "default_s9_http_tcp", "default_s4_http_tcp"}))
    ]
    # A change that alters no service programs nothing; the periodic pass is full.
    r.sync(pending_since=3.0)
    assert len(rec.changes) == 1 and len(rec.full) == 1
    r.sync(pending_since=None)
    assert len(rec.full) == 2


def test_port_allocated_services_are_not_reported_unchanged() -> None:
    """With a port range every pass makes new ServiceConfig objects; equal ones are not
    changes."""
    services, slices = objects(3)
    snap, rec = Snapshot(services, slices), Recorder()
    r = reconciler(snap, rec, PortAllocator(30000, 30010))
    r.sync(pending_since=1.0)
    slices[0] = copy.deepcopy(slices[0])
    slices[0]["endpoints"][0]["addresses"] = ["10.244.7.7"]
    r.sync(pending_since=2.0)
    assert [names for _, names in rec.changes] == [frozenset({"default_s0_http_tcp"})]


def test_changed_services() -> None:
    services, slices = objects(3)
    snap, rec = Snapshot(services, slices), Recorder()
    cfg = reconciler(snap, rec).sync()
    assert changed_services(None, cfg) is None
    assert changed_services(cfg, cfg) == frozenset()
    fewer = Config(cfg.source, cfg.admin, cfg.dataplane, cfg.services[1:])
    assert changed_services(cfg, fewer) == {cfg.services[0].name}
    assert changed_services(fewer, cfg) == {cfg.services[0].name}


def modified(items: list[dict[str, Any]], i: int, ip: str) -> None:
    """A new object for ``items[i]`` with another endpoint, as a MODIFIED event makes."""
    items[i] = copy.deepcopy(items[i])
    items[i]["endpoints"][0]["addresses"] = [ip]


def full_config(snap: Snapshot, ports: PortAllocator | None = None) -> Config:
    return reconciler(snap, Recorder(), ports).sync()


def test_touched_services_alone_give_what_a_full_pass_gives() -> None:
    services, slices = objects(6)
    snap, rec = Snapshot(services, slices), Recorder()
    r = reconciler(snap, rec)
    r.sync(pending_since=1.0)
    modified(slices, 3, "10.244.3.33")
    modified(slices, 5, "10.244.5.55")
    snapshots = snap.snapshots
    cfg = r.sync(pending_since=2.0, touched={"default/s3", "default/s5", "default/s1"})
    assert snap.snapshots == snapshots  # nothing but the touched Services was looked at
    assert cfg == full_config(snap)
    assert [names for _, names in rec.changes] == [
        frozenset({"default_s3_http_tcp", "default_s5_http_tcp"})
    ]
    # The caches stay right for the full passes after.
    modified(slices, 0, "10.244.0.10")
    assert r.sync(pending_since=3.0) == full_config(snap)


def test_touched_with_a_port_range_keeps_the_ports() -> None:
    services, slices = objects(3)
    snap, rec = Snapshot(services, slices), Recorder()
    ports = PortAllocator(30000, 30010)
    r = reconciler(snap, rec, ports)
    first = r.sync(pending_since=1.0)
    modified(slices, 1, "10.244.1.11")
    cfg = r.sync(pending_since=2.0, touched={"default/s1"})
    assert [s.listen for s in cfg.services] == [s.listen for s in first.services]
    assert cfg == full_config(snap, PortAllocator(30000, 30010))


def test_what_a_touched_pass_cannot_do_alone_falls_back_to_a_full_pass() -> None:
    services, slices = objects(4)
    snap, rec = Snapshot(services, slices), Recorder()
    r = reconciler(snap, rec)
    r.sync(pending_since=1.0)
    cases: list[tuple[str, Any]] = [
        ("new Service", lambda: services.append(service("s9", "10.96.0.99", PORTS))),
        ("deleted Service", lambda: services.pop(0)),
        (
            "VIP taken from another",
            lambda: services.__setitem__(1, service("s1", "10.96.0.3", PORTS)),
        ),
    ]
    for what, change in cases:
        change()
        touched = {object_key(s) or "" for s in services} | {"default/s0"}
        snapshots = snap.snapshots
        cfg = r.sync(pending_since=2.0, touched=touched)
        assert snap.snapshots == snapshots + 1, what
        assert cfg == full_config(snap), what


def test_periodic_pass_with_retry_applies_the_failed_services_only() -> None:
    services, slices = objects(3)
    snap, rec = Snapshot(services, slices), Recorder()
    failed = ["default_s1_http_tcp"]
    r = reconciler(snap, rec, retry=lambda: failed)
    first = r.sync(pending_since=1.0)
    snapshots = snap.snapshots
    assert r.sync(pending_since=None, touched=set()) is first
    assert snap.snapshots == snapshots  # nothing changed: nothing translated again
    assert rec.changes == [(first, frozenset(failed))] and rec.full == [first]
    failed.clear()
    r.sync(pending_since=None, touched=set())
    assert len(rec.changes) == 1 and len(rec.full) == 1


def test_watchers_name_the_services_their_changes_concern() -> None:
    signal = ChangeSignal()
    slices = Watcher(None, ENDPOINT_SLICES, changed=signal, owner=slice_service_key)  # type: ignore[arg-type]
    services = Watcher(None, SERVICES, changed=signal)  # type: ignore[arg-type]
    a = endpoint_slice("web", [{"ip": "10.244.0.1"}], [{"port": 80}], name="web-1")
    slices._apply("ADDED", a)
    services._apply("ADDED", service("db", "10.96.0.2", PORTS))
    assert signal.take_touched() == {"default/web", "default/db"}
    assert slices.by_owner("default/web") == [a]
    # A slice moving to another Service concerns both.
    moved = copy.deepcopy(a)
    moved["metadata"]["labels"]["kubernetes.io/service-name"] = "db"
    slices._apply("MODIFIED", moved)
    assert signal.take_touched() == {"default/web", "default/db"}
    assert slices.by_owner("default/web") == [] and slices.by_owner("default/db") == [moved]
    slices._apply("DELETED", moved)
    assert signal.take_touched() == {"default/db"} and slices.by_owner("default/db") == []
    # A slice of no Service stands for every Service.
    orphan = copy.deepcopy(a)
    del orphan["metadata"]["labels"]["kubernetes.io/service-name"]
    slices._apply("ADDED", orphan)
    assert signal.take_touched() is None
    assert signal.take_touched() == set()
