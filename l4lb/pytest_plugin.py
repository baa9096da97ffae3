"""pytest fixtures for testing against a real l4lb process (the ``l4lb`` pytest11 plugin).

pytest loads this module in every run of every project that has l4lb installed, so it
imports only pytest at load time; :mod:`l4lb._testbase` is imported when a fixture is used.

Fixtures (all function-scoped; everything they start is stopped at teardown):

- ``l4lb_factory(config, *, workers=None, **kwargs)`` starts ``l4lb run`` and returns a
  ready :class:`~l4lb._testbase.L4lbProcess`. A process the test did not stop itself must
  exit 0 on SIGTERM at teardown, or the test errors with its stderr tail.
- ``echo_backend_factory(host="127.0.0.1")`` returns a started
  :class:`~l4lb._testbase.EchoServer`.
- ``named_backend_factory(name, host="127.0.0.1", *, hold=False)`` returns a started
  :class:`~l4lb._testbase.NamedServer`.
- ``sink_source_backend_factory(host="127.0.0.1", **kwargs)`` returns a started
  :class:`~l4lb._testbase.SinkSourceServer`.

Example::

    def test_round_robin(l4lb_factory, named_backend_factory):
        a, b = named_backend_factory("a"), named_backend_factory("b")
        lb = l4lb_factory({"services": [{"name": "web", "listen": "127.0.0.1:0",
                                         "backends": [{"address": a.address},
                                                      {"address": b.address}]}]})
        from l4lb._testbase import connect_name
        names = {connect_name(lb.service_address("web")) for _ in range(4)}
        assert names == {"a", "b"}
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from l4lb._testbase import EchoServer, L4lbProcess, NamedServer, SinkSourceServer

__all__ = [
    "echo_backend_factory",
    "l4lb_factory",
    "named_backend_factory",
    "sink_source_backend_factory",
]


class L4lbFactory:
    """Starts l4lb processes in numbered directories under ``base`` and stops them all."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.processes: list[L4lbProcess] = []

    def __call__(
        self, config: Mapping[str, Any] | str, *, workers: int | None = None, **kwargs: Any
    ) -> L4lbProcess:
        """Start l4lb with ``config`` (dict or TOML text) and wait until it is ready."""
        from l4lb._testbase import L4lbProcess

        workdir = self.base / f"l4lb-{len(self.processes)}"
        proc = L4lbProcess(config, workers=workers, workdir=workdir, **kwargs)
        self.processes.append(proc)
        proc.start()
        return proc

    def close(self) -> list[str]:
        """Stop every process; return one message per process that did not exit cleanly."""
        problems = []
        for proc in reversed(self.processes):
            if proc.returncode is not None or not proc.started:
                continue  # the test stopped it (or it never started) and judged that itself
            code = proc.stop()
            if code != 0:
                tail = "\n".join(proc.stderr_text().splitlines()[-30:])
                problems.append(f"l4lb pid {proc.pid} exited with {code} on SIGTERM:\n{tail}")
        return problems


class _ServerFactory:
    """Creates started backends and stops them all, collecting their errors."""

    def __init__(self, make: Callable[..., Any]) -> None:
        self._make = make
        self.servers: list[Any] = []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        server = self._make(*args, **kwargs)
        self.servers.append(server)
        return server.start()

    def close(self) -> list[str]:
        problems = []
        for server in reversed(self.servers):
            try:
                server.stop()
            except RuntimeError as exc:
                problems.append(str(exc))
        return problems


def _finish(problems: list[str]) -> None:
    if problems:
        pytest.fail("\n\n".join(problems), pytrace=False)


@pytest.fixture
def l4lb_factory(tmp_path: Path) -> Iterator[Callable[..., L4lbProcess]]:
    """Start l4lb processes: ``l4lb_factory(config, *, workers=None, **kwargs)``."""
    factory = L4lbFactory(tmp_path)
    try:
        yield factory
    finally:
        _finish(factory.close())


@pytest.fixture
def echo_backend_factory() -> Iterator[Callable[..., EchoServer]]:
    """Start echo backends: ``echo_backend_factory(host="127.0.0.1")``."""
    from l4lb._testbase import EchoServer

    factory = _ServerFactory(EchoServer)
    try:
        yield factory
    finally:
        _finish(factory.close())


@pytest.fixture
def named_backend_factory() -> Iterator[Callable[..., NamedServer]]:
    """Start named backends: ``named_backend_factory(name, host="127.0.0.1", *, hold=False)``."""
    from l4lb._testbase import NamedServer

    factory = _ServerFactory(NamedServer)
    try:
        yield factory
    finally:
        _finish(factory.close())


@pytest.fixture
def sink_source_backend_factory() -> Iterator[Callable[..., SinkSourceServer]]:
    """Start bulk backends: ``sink_source_backend_factory(host="127.0.0.1", **kwargs)``."""
    from l4lb._testbase import SinkSourceServer

    factory = _ServerFactory(SinkSourceServer)
    try:
        yield factory
    finally:
        _finish(factory.close())
