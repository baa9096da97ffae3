"""``App.apply_config(cfg, changed)``: programming only the named services must leave the
data plane exactly as a full apply of the same config would."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from l4lb.app import App
from l4lb.config import (
    Address,
    AdminConfig,
    BackendConfig,
    Config,
    DataplaneConfig,
    HealthConfig,
    ServiceConfig,
)
from l4lb.dataplane import Dataplane
from l4lb.state import desired_state, plan

LOOPBACK_ANY = Address("127.0.0.1", 0, socket.AF_INET)


def service(name: str, backends: list[str], **kw: Any) -> ServiceConfig:
    return ServiceConfig(
        name=name,
        listen=LOOPBACK_ANY,
        backends=tuple(BackendConfig(Address.parse(a)) for a in backends),
        **kw,
    )


def config(*services: ServiceConfig) -> Config:
    return Config(
        source="test",
        admin=AdminConfig(listen=LOOPBACK_ANY),
        dataplane=DataplaneConfig(workers=1),
        services=services,
    )


def many(count: int) -> list[ServiceConfig]:
    return [service(f"s{i}", [f"127.0.0.{2 + i % 50}:{1000 + i}"]) for i in range(count)]


Starter = Callable[[Config], App]


@pytest.fixture
async def start() -> AsyncIterator[Starter]:
    """Apps whose data plane is programmed from a first config, as ``serve`` does."""
    apps: list[App] = []

    def make(cfg: Config) -> App:
        app = App("test", workers=1, loader=lambda: cfg)
        app._loop = asyncio.get_running_loop()
        app.config = cfg
        app.dataplane = Dataplane(workers=1)
        app.dataplane.start()
        app.health.update(cfg)
        app._program_now()
        apps.append(app)
        return app

    yield make
    for app in apps:
        await app.health.close()
        await app.vips.close()
        assert app.dataplane is not None
        app.dataplane.stop()


def programmed(app: App) -> dict[str, list[str]]:
    """Every programmed service with its destinations in the data plane's order."""
    dp = app.dataplane
    assert dp is not None
    return {name: dp.dest_order(name) for name in sorted(dp.service_names())}


def bound(app: App) -> dict[str, str]:
    dp = app.dataplane
    assert dp is not None
    return {name: str(dp.listen_address(name)) for name in dp.service_names()}


def check_same_as_full(app: App, reference: App) -> None:
    assert app.config is not None
    assert app.applied == reference.applied
    assert app.applied == desired_state(app.config)
    assert programmed(app) == programmed(reference)
    assert app.failed == reference.failed
    # A full apply of the same config has nothing left to do.
    assert all(p.action == "keep" for p in plan(app.applied, desired_state(app.config)))


async def test_one_changed_service_among_many(start: Starter) -> None:
    services = many(40)
    app = start(config(*services))
    ports_before = bound(app)
    services[7] = service("s7", ["127.0.0.9:7000", "127.0.0.9:7001", "127.0.0.10:7002"])
    new = config(*services)
    app.apply_config(new, {"s7"})
    check_same_as_full(app, start(new))
    assert sorted(programmed(app)["s7"]) == ["127.0.0.10:7002", "127.0.0.9:7000", "127.0.0.9:7001"]
    # Nothing else was touched: every other service kept its bound listener.
    after = bound(app)
    assert {n: p for n, p in after.items() if n != "s7"} == {
        n: p for n, p in ports_before.items() if n != "s7"
    }


async def test_added_and_removed_services(start: Starter) -> None:
    services = many(10)
    app = start(config(*services))
    kept = [s for s in services if s.name not in {"s2", "s5"}]
    added = service("fresh", ["127.0.0.3:80"])
    new = config(*kept, added)
    app.apply_config(new, {"s2", "s5", "fresh"})
    check_same_as_full(app, start(new))
    assert "s2" not in programmed(app) and "s5" not in programmed(app)
    assert programmed(app)["fresh"] == ["127.0.0.3:80"]


async def test_names_not_in_the_config_are_removed(start: Starter) -> None:
    services = many(5)
    app = start(config(*services))
    # Changed names that the new config lacks go away; unknown names are harmless.
    new = config(*services[1:])
    app.apply_config(new, {"s0", "never-existed"})
    check_same_as_full(app, start(new))
    assert set(programmed(app)) == {"s1", "s2", "s3", "s4"}


async def test_a_change_keeps_the_other_services_untouched(start: Starter) -> None:
    """Only the named services are looked at: a change elsewhere in ``cfg`` that is not
    named is not programmed (the caller promises there is none)."""
    services = many(4)
    app = start(config(*services))
    services[1] = service("s1", ["127.0.0.5:5"])
    services[2] = service("s2", ["127.0.0.6:6"])
    app.apply_config(config(*services), {"s1"})
    assert programmed(app)["s1"] == ["127.0.0.5:5"]
    assert programmed(app)["s2"] == ["127.0.0.4:1002"]
    app.apply_config(config(*services), {"s2"})
    assert programmed(app)["s2"] == ["127.0.0.6:6"]


async def test_failed_service_is_reported_and_retried(start: Starter) -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))  # no SO_REUSEPORT: nobody else can bind it
    holder.listen()
    holder_addr = Address("127.0.0.1", holder.getsockname()[1], socket.AF_INET)
    try:
        services = many(3)
        app = start(config(*services))
        old_port = bound(app)["s1"]
        clash = dataclasses.replace(services[1], listen=holder_addr)
        app.apply_config(config(services[0], clash, services[2]), {"s1"})
        assert "Address already in use" in app.failed["s1"]
        assert "s1" not in app.applied
        # As in a full apply, the old listener goes on serving until a new one is bound.
        assert bound(app)["s1"] == old_port
        # The next change of that service tries it again; a fixed one clears the error.
        app.apply_config(config(*services), {"s1"})
        assert "s1" not in app.failed and "s1" in app.applied
        assert set(programmed(app)) == {"s0", "s1", "s2"}
    finally:
        holder.close()


async def test_health_follows_only_the_changed_services(start: Starter) -> None:
    hc = HealthConfig(interval=60.0)
    services = [service(f"h{i}", [f"127.0.0.2:{2000 + i}"], health=hc) for i in range(3)]
    app = start(config(*services))
    assert app.health.get("h1", "127.0.0.2:2001") is not None
    before = app.health.get("h0", "127.0.0.2:2000")
    services[1] = service("h1", ["127.0.0.2:2101"], health=hc)
    services[2] = service("h2", ["127.0.0.2:2002"])  # health checks turned off
    app.apply_config(config(*services), {"h1", "h2"})
    assert app.health.get("h0", "127.0.0.2:2000") is before
    assert app.health.get("h1", "127.0.0.2:2001") is None
    assert app.health.get("h1", "127.0.0.2:2101") is not None
    assert app.health.get("h2", "127.0.0.2:2002") is None
    assert app.health.config("h2") is None and app.health.config("h1") == hc
