"""Shared test setup: the data plane extension must be built and fresh."""

from __future__ import annotations

import resource
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from l4lb._testbase import L4lbProcess

ROOT = Path(__file__).resolve().parent.parent


def _stale_extension() -> str | None:
    built = sorted(ROOT.glob("l4lb/_dataplane*.so"))
    if not built:
        return "l4lb/_dataplane is not built"
    newest_src = max(
        p.stat().st_mtime
        for p in ROOT.joinpath("src").rglob("*")
        if p.suffix in {".c", ".h", ".pyx", ".pxi"}
    )
    if built[-1].stat().st_mtime < newest_src:
        return "l4lb/_dataplane is older than src/"
    return None


def pytest_sessionstart(session: pytest.Session) -> None:
    problem = _stale_extension()
    if problem:
        raise pytest.UsageError(f"{problem}: run `python3 setup.py build_ext --inplace`")
    # Tests hold thousands of sockets at once; the default soft limit is often 1024.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


@pytest.fixture
def l4lb() -> Iterator[Callable[..., L4lbProcess]]:
    """Factory of started l4lb processes; each is stopped and checked at teardown."""
    procs: list[L4lbProcess] = []

    def start(config: dict[str, Any] | str, **kw: Any) -> L4lbProcess:
        p = L4lbProcess(config, **kw)
        procs.append(p)
        return p.start()

    yield start
    for p in procs:
        p.close()
        assert "Traceback" not in p.stderr_text(), p.stderr_text()
