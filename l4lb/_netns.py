"""Throwaway network namespaces for root tests, built with iproute2.

A test builds its own topology, sends traffic only inside it and deletes it afterwards::

    a, b = Netns.create("client"), Netns.create("node")
    try:
        veth_pair(a, "eth0", b, "eth0")
        add_address(a, "eth0", "10.231.0.1/24")
        a.run(["ping", "-c1", "10.231.0.2"])
    finally:
        b.delete()
        a.delete()

Names get a random part (``l4lbt-<hex>-<role>``) so parallel runs never collide, and veth
ends are created directly inside their namespaces, so the host namespace never sees them.
Every command has a timeout. Deleting a namespace does not stop processes running in it:
whoever starts one with :meth:`Netns.popen` stops it.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "Netns",
    "NetnsError",
    "add_address",
    "add_route",
    "unavailable_reason",
    "veth_pair",
]

TIMEOUT = 10.0


class NetnsError(Exception):
    """An ``ip`` command failed; the message holds the command and its stderr."""


def _run(
    argv: Sequence[str], *, stdin: str | None = None, timeout: float = TIMEOUT, check: bool = True
) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(
            list(argv), input=stdin, capture_output=True, text=True, timeout=timeout, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise NetnsError(f"{' '.join(argv)}: {e}") from None
    if check and proc.returncode != 0:
        err = " ".join(proc.stderr.split())
        raise NetnsError(f"{' '.join(argv)} failed (exit {proc.returncode}): {err}")
    return proc


@dataclass(frozen=True, slots=True)
class Netns:
    """A named network namespace (``/run/netns/<name>``)."""

    name: str

    @classmethod
    def create(cls, role: str) -> Netns:
        """Create a fresh namespace with its loopback up; ``role`` ends its name."""
        ns = cls(f"l4lbt-{secrets.token_hex(4)}-{role}")
        _run(["ip", "netns", "add", ns.name])
        try:
            ns.ip("link", "set", "lo", "up")
        except NetnsError:
            ns.delete()
            raise
        return ns

    def delete(self) -> None:
        """Delete the namespace; no error if it is already gone."""
        if os.path.exists(f"/run/netns/{self.name}"):
            _run(["ip", "netns", "delete", self.name])

    @property
    def exec_prefix(self) -> tuple[str, ...]:
        """The argv prefix that runs a command inside this namespace."""
        return ("ip", "netns", "exec", self.name)

    def ip(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run ``ip -n <name> ARGS`` (raises NetnsError on failure)."""
        return _run(["ip", "-n", self.name, *args])

    def run(
        self,
        argv: Sequence[str],
        *,
        stdin: str | None = None,
        timeout: float = TIMEOUT,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside the namespace and wait for it (bounded by ``timeout``)."""
        return _run([*self.exec_prefix, *argv], stdin=stdin, timeout=timeout, check=check)

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[str]:
        """Start ``argv`` inside the namespace (text mode); the caller must stop it."""
        kwargs.setdefault("text", True)
        return subprocess.Popen([*self.exec_prefix, *argv], **kwargs)


def veth_pair(a: Netns, a_dev: str, b: Netns, b_dev: str) -> None:
    """Join ``a`` and ``b`` with a veth pair named ``a_dev`` / ``b_dev``; both ends up."""
    peer = ["peer", "name", b_dev, "netns", b.name]
    _run(["ip", "link", "add", a_dev, "netns", a.name, "type", "veth", *peer])
    a.ip("link", "set", a_dev, "up")
    b.ip("link", "set", b_dev, "up")


def add_address(ns: Netns, dev: str, cidr: str) -> None:
    """Add ``cidr`` to ``dev``; IPv6 skips duplicate address detection, so it works at once."""
    extra = ["nodad"] if ":" in cidr else []
    ns.ip("addr", "add", cidr, "dev", dev, *extra)


def add_route(ns: Netns, prefix: str, via: str) -> None:
    """Route ``prefix`` (or ``default``) via the gateway ``via`` inside ``ns``."""
    family = "-6" if ":" in via else "-4"
    ns.ip(family, "route", "add", prefix, "via", via)


def unavailable_reason() -> str | None:
    """Why namespaces cannot be used here (for ``pytest.skip``), or None if they can."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if shutil.which("ip") is None:
        return "iproute2 'ip' is not installed"
    try:
        Netns.create("probe").delete()
    except NetnsError as e:
        return f"cannot create a network namespace: {e}"
    return None
