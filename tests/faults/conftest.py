"""Fixtures of the fault suite; at the end of the session the results table is written.

Each case asks for ``fault`` (a :class:`FaultResult` it fills and checks). The session-end
hook merges what ran into ``build/faults.json`` and ``build/faults.md``;
``python -m tests.faults.table`` copies the table into README.md.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from l4lb._testbase import EchoServer, L4lbProcess

from .record import RESULTS_MD, FaultResult, save

_RESULTS: list[FaultResult] = []

#: Health checks quick enough that a case sees a backend go down within a second.
HEALTH = {"interval": 0.1, "timeout": 0.1, "fall": 2, "rise": 2, "jitter": 0.0}


def backend_stats(lb: L4lbProcess, address: str, service: str = "web") -> dict[str, Any]:
    """One backend's entry in the admin API."""
    return next(b for b in lb.service(service)["backends"] if b["address"] == address)


def lb_config(backends: list[str], **service: Any) -> dict[str, Any]:
    """One service ``web`` on an ephemeral loopback port, admin on loopback."""
    return {
        "admin": {"listen": "127.0.0.1:0"},
        "dataplane": {"workers": 2},
        "services": [
            {
                "name": "web",
                "listen": "127.0.0.1:0",
                "backends": [{"address": a} for a in backends],
                **service,
            }
        ],
    }


@pytest.fixture
def fault() -> Callable[..., FaultResult]:
    """Factory: ``fault(case, injected, expected)`` registers a result row for this test."""

    def make(case: str, injected: str, expected: str) -> FaultResult:
        result = FaultResult(case, injected, expected)
        _RESULTS.append(result)
        return result

    return make


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    with EchoServer() as server:
        yield server


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _RESULTS:
        save(_RESULTS)
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"fault table: {RESULTS_MD}")
