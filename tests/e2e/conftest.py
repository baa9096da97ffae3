"""Fixtures that run the real ``l4lb run`` against real backends on loopback."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from l4lb._testbase import NamedServer


def lb_config(
    backends: list[str], *, workers: int = 2, service: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A one-service config listening on an ephemeral loopback port."""
    svc: dict[str, Any] = {
        "name": "web",
        "listen": "127.0.0.1:0",
        "backends": [{"address": a} for a in backends],
    }
    svc.update(service or {})
    return {
        "admin": {"listen": "127.0.0.1:0"},
        "dataplane": {"workers": workers},
        "services": [svc],
    }


@pytest.fixture
def named_backends() -> Iterator[Callable[[int], list[NamedServer]]]:
    """Factory of started NamedServers b0, b1, ...; all stopped at teardown."""
    started: list[NamedServer] = []

    def make(n: int, **kw: Any) -> list[NamedServer]:
        out = [NamedServer(f"b{len(started) + i}", **kw).start() for i in range(n)]
        started.extend(out)
        return out

    yield make
    for s in started:
        s.stop()
