"""VIPs of splice-mode services: the portal rules they need, kept installed while l4lb runs.

Each VIP is captured by a :class:`~l4lb.portals.Portal` pointing at the port of its service's
wildcard listener of the VIP's family (see :func:`l4lb.state.listeners`): REDIRECT from
PREROUTING for traffic from elsewhere, DNAT to a node address of that family from OUTPUT for
the node's own traffic (mandatory for UDP, whose replies REDIRECT breaks; used for TCP too, as
the legacy userspace kube-proxy did, with REDIRECT as the TCP fallback when the node has no
such address).

Lifecycle, driven by :class:`l4lb.app.App`:

1. :meth:`VipRules.admit` before every programming pass: a service whose VIP family cannot
   have portal rules (no root, no iptables, no nat table; a UDP VIP without a node address)
   is held back with a message naming what is missing. Each family is checked once; a reload
   checks again.
2. :meth:`VipRules.update` after every programming pass: when the VIPs or listeners changed,
   the rules are reconciled on the rules thread. The first reconcile replaces whatever a
   crashed earlier run left in l4lb's chains.
3. Every :data:`REPAIR_INTERVAL` seconds the installed rules are compared with the expected
   ones (``iptables -S``) and re-synced only if someone changed or deleted them, so the
   rules' packet counters survive an untouched check.
4. :meth:`VipRules.close` on clean shutdown removes the hooks and chains. Established
   connections keep flowing: conntrack holds their NAT binding.

All iptables work runs on one thread, in order, so the event loop never waits for it and
two reconciles never interleave. Offload-mode services are not handled here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import subprocess
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from l4lb.config import Address
from l4lb.portals import (
    HOOK_COMMENT,
    HOOKS,
    OWNED_CHAINS,
    Portal,
    PortalError,
    PortalManager,
    Runner,
    SubprocessRunner,
    container_rule,
    host_rule,
    node_address,
)
from l4lb.state import ServiceSpec

__all__ = [
    "REPAIR_INTERVAL",
    "VipRules",
    "VipService",
    "build_portals",
    "expected_lines",
    "owned_lines",
    "proxy_port",
    "vip_families",
    "vip_services",
]

log = logging.getLogger("l4lb.vips")

#: Seconds between checks that the installed rules are still the expected ones.
REPAIR_INTERVAL = 10.0
_FAMILIES = (4, 6)
_FAMILY_NAME = {4: "IPv4", 6: "IPv6"}
_WILDCARD = {4: "0.0.0.0", 6: "::"}
_LIST_TIMEOUT = 15.0


def _family(addr: Address) -> int:
    return 6 if addr.family == socket.AF_INET6 else 4


# --------------------------------------------------------------------------- pure parts


@dataclass(frozen=True, slots=True)
class VipService:
    """What the rules of one service depend on: its VIPs and its bound listeners."""

    name: str
    protocol: str
    vips: tuple[Address, ...]
    listeners: tuple[Address, ...]


def vip_families(spec: ServiceSpec) -> set[int]:
    """The IP versions (4, 6) of ``spec``'s VIPs that need portal rules (none for offload)."""
    if spec.mode == "offload":
        return set()
    return {_family(v) for v in spec.vips}


def vip_services(
    applied: Mapping[str, ServiceSpec], bound: Callable[[str], Sequence[Address]]
) -> tuple[VipService, ...]:
    """The splice-mode services of ``applied`` that have VIPs, with ``bound(name)``'s
    listeners (real ports), in name order so equal inputs compare equal."""
    return tuple(
        VipService(name, spec.protocol, spec.vips, tuple(bound(name)))
        for name, spec in sorted(applied.items())
        if vip_families(spec)
    )


def proxy_port(listeners: Iterable[Address], family: int) -> int | None:
    """The port of the wildcard listener of ``family`` among ``listeners``, or None."""
    for a in listeners:
        if _family(a) == family and a.host == _WILDCARD[family] and a.port:
            return a.port
    return None


def build_portals(
    services: Iterable[VipService], nodes: Mapping[int, str | None]
) -> tuple[list[Portal], list[str]]:
    """The portals for ``services``, and one message per VIP that cannot have one.

    ``nodes`` maps 4 and 6 to the node address host-originated traffic is DNATed to (None:
    the node has none, which TCP survives with REDIRECT and UDP does not).
    """
    portals: list[Portal] = []
    problems: list[str] = []
    for svc in services:
        for vip in svc.vips:
            fam = _family(vip)
            port = proxy_port(svc.listeners, fam)
            node = nodes.get(fam)
            if port is None:
                problems.append(
                    f"service {svc.name}: VIP {vip} has no {_WILDCARD[fam]} listener to go to"
                )
                continue
            if node is None and svc.protocol == "udp":
                problems.append(
                    f"service {svc.name}: UDP VIP {vip} needs a global {_FAMILY_NAME[fam]} "
                    "address on this node for host-originated traffic; there is none"
                )
                continue
            portals.append(
                Portal(
                    vip=vip,
                    protocol=svc.protocol,
                    proxy_port=port,
                    proxy_host_v4=node if fam == 4 else None,
                    proxy_host_v6=node if fam == 6 else None,
                    comment=svc.name,
                )
            )
    return portals, problems


def _hook_line(builtin: str, chain: str) -> str:
    return f'-A {builtin} -m comment --comment "{HOOK_COMMENT}" -j {chain}'


def expected_lines(portals: Iterable[Portal], family: int) -> list[str]:
    """The lines of ``iptables -t nat -S`` that name l4lb's chains once ``portals`` are
    synced, sorted (compare with :func:`owned_lines`)."""
    chosen = [p for p in portals if p.family == family]
    lines = [f"-N {c}" for c in OWNED_CHAINS]
    lines += [_hook_line(b, c) for b, c in HOOKS]
    lines += [container_rule(p) for p in chosen]
    lines += [host_rule(p) for p in chosen]
    return sorted(lines)


def owned_lines(listing: str) -> list[str]:
    """The lines of an ``iptables -S`` listing that name one of l4lb's chains, sorted.

    Duplicates stay, so a hook added twice does not compare equal to the expected lines.
    """
    return sorted(ln for ln in listing.splitlines() if any(c in ln.split() for c in OWNED_CHAINS))


# --------------------------------------------------------------------------- the rules owner


class VipRules:
    """Owns l4lb's portal rules for one ``l4lb run``; see the module docstring.

    ``runner`` executes iptables and ip (default :class:`~l4lb.portals.SubprocessRunner`).
    """

    def __init__(
        self, *, runner: Runner | None = None, repair_interval: float = REPAIR_INTERVAL
    ) -> None:
        self._runner: Runner = runner if runner is not None else SubprocessRunner()
        self._manager = PortalManager(runner=self._runner, families=_FAMILIES)
        self._repair_interval = repair_interval
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="l4lb-portals")
        # family -> None (usable) or why not; filled on first use, cleared by recheck().
        self._usable: dict[int, str | None] = {}
        self._nodes: dict[int, str | None] = {}
        self._held: dict[str, str] = {}
        self._want: tuple[VipService, ...] = ()
        self._by_name: dict[str, VipService] = {}  # what _want is made of
        self._synced: tuple[VipService, ...] | None = None
        self._pending: list[asyncio.Future[None]] = []
        self._installed = False
        self._last_problems: tuple[str, ...] = ()
        self._last_error: str | None = None
        self._repair: asyncio.Task[None] | None = None

    # ---- admission (blocking, but only the first time a family is seen)

    def recheck(self) -> None:
        """Forget what was learnt about iptables, so the next :meth:`admit` checks again."""
        self._usable.clear()
        self._held.clear()

    def admit(
        self, desired: Mapping[str, ServiceSpec], changed: Collection[str] | None = None
    ) -> tuple[dict[str, ServiceSpec], dict[str, str]]:
        """Split ``desired`` into the services that may be programmed and {name: why not}
        for those whose VIPs cannot have portal rules here.

        With ``changed``, ``desired`` holds only (some of) the services called ``changed``
        and what was held of the others stays as it was."""
        keep: dict[str, ServiceSpec] = {}
        held: dict[str, str] = {}
        if changed is not None:
            before = self._held
            self._held = {n: w for n, w in before.items() if n not in changed}
            for name, spec in desired.items():
                problem = self._problems(spec)
                if problem is None:
                    keep[name] = spec
                    continue
                held[name] = problem
                if before.get(name) != problem:
                    log.error("service %s: %s", name, problem)
            self._held.update(held)
            return keep, held
        for name, spec in desired.items():
            why = [self._family_problem(fam, spec.protocol) for fam in sorted(vip_families(spec))]
            reasons = [w for w in why if w is not None]
            if reasons:
                held[name] = "; ".join(reasons)
                if self._held.get(name) != held[name]:  # once, not on every pass
                    log.error("service %s: %s", name, held[name])
            else:
                keep[name] = spec
        self._held = held
        return keep, held

    def _problems(self, spec: ServiceSpec) -> str | None:
        if not spec.vips:
            return None
        why = [self._family_problem(fam, spec.protocol) for fam in sorted(vip_families(spec))]
        reasons = [w for w in why if w is not None]
        return "; ".join(reasons) if reasons else None

    def _family_problem(self, fam: int, protocol: str) -> str | None:
        if fam not in self._usable:
            try:
                self._manager.check_available([fam])
                self._nodes[fam] = node_address(fam, runner=self._runner)
                self._usable[fam] = None
            except PortalError as e:
                self._usable[fam] = f"VIPs cannot be served: {e}"
        problem = self._usable[fam]
        if problem is None and protocol == "udp" and self._nodes.get(fam) is None:
            return (
                f"UDP VIPs need a global {_FAMILY_NAME[fam]} address on this node, where "
                "host-originated traffic is DNATed to; there is none"
            )
        return problem

    # ---- reconciling (on the rules thread)

    def update(
        self,
        applied: Mapping[str, ServiceSpec],
        bound: Callable[[str], Sequence[Address]],
        changed: Collection[str] | None = None,
    ) -> None:
        """After a programming pass: reconcile the rules if VIPs or listeners changed.

        With ``changed``, only the services of those names can differ from the last call,
        so one service's change costs one comparison unless its VIPs or listeners moved."""
        if changed is None:
            self._by_name = {v.name: v for v in vip_services(applied, bound)}
        else:
            dirty = False
            for name in changed:
                spec = applied.get(name)
                new = None
                if spec is not None and vip_families(spec):
                    new = VipService(name, spec.protocol, spec.vips, tuple(bound(name)))
                old = self._by_name.pop(name, None)
                if new is not None:
                    self._by_name[name] = new
                dirty = dirty or new != old
            if not dirty:
                return
        want = tuple(self._by_name[n] for n in sorted(self._by_name))
        self._want = want
        if want == self._synced or (not want and not self._installed and self._synced is None):
            return
        self._synced = want
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(self._pool, self._reconcile, want)
        self._pending = [f for f in self._pending if not f.done()] + [fut]

    async def settle(self) -> None:
        """Wait until every reconcile requested so far has run."""
        pending, self._pending = self._pending, []
        for fut in pending:
            await fut

    def start(self) -> None:
        """Start the periodic repair check on the running loop."""
        if self._repair is None:
            self._repair = asyncio.get_running_loop().create_task(self._repair_loop())

    async def _repair_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self._repair_interval)
            if self._want or self._installed:
                await loop.run_in_executor(self._pool, self._reconcile, self._want)

    def _reconcile(self, want: tuple[VipService, ...]) -> None:
        """Make the installed rules match ``want``; log, never raise (repair retries)."""
        try:
            changed = self._reconcile_once(want)
        except PortalError as e:
            if str(e) != self._last_error:
                log.error("portal rules: %s", e)
            self._last_error = str(e)
            return
        if self._last_error is not None:
            log.info("portal rules: installed again")
            self._last_error = None
        if changed:
            log.info("portal rules: %s", changed)

    def _reconcile_once(self, want: tuple[VipService, ...]) -> str | None:
        families = {_family(v) for s in want for v in s.vips}
        nodes: dict[int, str | None] = {}
        for fam in sorted(families):
            nodes[fam] = node_address(fam, runner=self._runner)
        portals, problems = build_portals(want, nodes)
        if tuple(problems) != self._last_problems:
            for p in problems:
                log.error("%s", p)
        self._last_problems = tuple(problems)
        if not portals:
            if not self._installed:
                return None
            result = self._manager.cleanup()
            self._installed = False
            return f"removed ({len(result.removed)} item(s)), no VIP left"
        stale = []
        for fam in _FAMILIES:
            have = self._listed(fam)
            if have is None and not any(p.family == fam for p in portals):
                continue  # no tools for a family without VIPs: sync skips it too
            if have != expected_lines(portals, fam):
                stale.append(fam)
        if not stale:
            self._installed = True
            return None
        self._manager.sync(portals)
        self._installed = True
        return f"synced {len(portals)} portal(s) ({', '.join(_FAMILY_NAME[f] for f in stale)})"

    def _listed(self, fam: int) -> list[str] | None:
        """l4lb's lines in the nat table of ``fam``, or None if it cannot be listed."""
        tool = "ip6tables" if fam == 6 else "iptables"
        try:
            r = self._runner(
                [tool, "--wait=5", "-t", "nat", "-S"], stdin=None, timeout=_LIST_TIMEOUT
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        if r.returncode != 0:
            return None
        return owned_lines(r.stdout)

    # ---- shutdown

    async def close(self) -> None:
        """Stop repairing and remove the rules if any were installed (clean shutdown)."""
        if self._repair is not None:
            self._repair.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._repair
            self._repair = None
        with contextlib.suppress(Exception):
            await self.settle()
        loop = asyncio.get_running_loop()
        if self._installed or self._synced:
            await loop.run_in_executor(self._pool, self._remove)
        self._pool.shutdown(wait=True)

    def _remove(self) -> None:
        try:
            result = self._manager.cleanup()
        except PortalError as e:
            log.error("portal rules: cannot remove them: %s", e)
            return
        self._installed = False
        if result.removed:
            log.info("portal rules: removed (%d item(s))", len(result.removed))
