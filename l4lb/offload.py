"""The App's side of offload mode: ``mode = "offload"`` services go to IPVS, not the splicer.

:class:`Offload` takes the offload specs out of every programming pass (the rest go to
the splice data plane) and reconciles the kernel to them on a task of its own, so the
event loop never waits for netlink:

- a change (reload, admin API, health transition) is applied as soon as the previous
  pass ends, diffing only what changed (``trust_cache``);
- every ``repair_interval`` seconds (or five times as long as the last one took, with a
  very large table, but at least every ``MAX_REPAIR_INTERVAL``) a full pass dumps the
  kernel and repairs drift (a virtual service deleted by hand comes back);
- the kernel's counters are read every second (or ten times as long as reading them
  takes) for the admin API;
- while removed backends drain, a pass every ``drain_poll`` seconds deletes those whose
  connections are gone (or whose drain timeout passed).

IPVS is first touched when an offload service appears, so a splice-only config runs on
a kernel without IPVS. When IPVS is unavailable every offload service fails with the
reason and the splice services keep running.

Shutting down closes the netlink sockets and nothing else: the virtual services, VIP
addresses and masquerade rules stay, as keepalived leaves them, so forwarded connections
outlive a restart and the next start finds nothing to change. ``l4lb cleanup`` removes
them (:func:`l4lb.ipvs.cleanup_kernel`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from l4lb.config import ServiceConfig
from l4lb.ipvs import Counters, IpvsSink, IpvsUnavailable
from l4lb.state import Override, ServiceSpec

__all__ = ["DRAIN_POLL", "REPAIR_INTERVAL", "Offload", "partition"]

log = logging.getLogger("l4lb.offload")

REPAIR_INTERVAL = 5.0
DRAIN_POLL = 1.0
#: However slow a full pass is, drift is repaired at least this often.
MAX_REPAIR_INTERVAL = 60.0
#: The kernel's counters are read this often (less often when reading them is slow).
COUNTER_INTERVAL = 1.0


def partition(
    specs: Mapping[str, ServiceSpec],
) -> tuple[dict[str, ServiceSpec], dict[str, ServiceSpec]]:
    """Split ``specs`` into (splice, offload), each in the given order."""
    splice = {n: s for n, s in specs.items() if s.mode != "offload"}
    offload = {n: s for n, s in specs.items() if s.mode == "offload"}
    return splice, offload


class _HealthView(Protocol):
    def get(self, service: str, address: str) -> Any: ...
    def is_up(self, service: str, address: str) -> bool: ...


class Offload:
    """Holds the :class:`~l4lb.ipvs.IpvsSink` and keeps the kernel at the offload specs."""

    def __init__(
        self,
        on_result: Callable[[], None],
        *,
        sink_factory: Callable[[], IpvsSink] = IpvsSink,
        repair_interval: float = REPAIR_INTERVAL,
        drain_poll: float = DRAIN_POLL,
    ) -> None:
        """``on_result`` is called on the loop after every pass (``failed`` may differ)."""
        self._on_result = on_result
        self._factory = sink_factory
        self._repair_interval = repair_interval
        self._drain_poll = drain_poll
        self.desired: dict[str, ServiceSpec] = {}
        self.applied: dict[str, ServiceSpec] = {}
        self.failed: dict[str, str] = {}
        self.counters: Counters = {}
        self._sink: IpvsSink | None = None
        self._unavailable: str | None = None
        self._wake: asyncio.Event | None = None
        self._idle: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None

    # ---------------------------------------------------------------- the App's side

    def take(self, specs: Mapping[str, ServiceSpec]) -> dict[str, ServiceSpec]:
        """Keep the offload specs of ``specs`` for the kernel; return the splice ones."""
        splice, offload = partition(specs)
        self.desired = offload
        self.failed = {n: e for n, e in self.failed.items() if n in offload}
        self.applied = {n: s for n, s in self.applied.items() if n in offload}
        if offload or self._sink is not None:
            self._kick()
        return splice

    def start(self) -> None:
        """Start the reconciling task (on the running loop)."""
        if self._task is None:
            self._wake = self._wake or asyncio.Event()
            self._idle = self._idle or asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run(), name="l4lb-offload")

    async def settle(self) -> None:
        """Wait until the pass that the latest :meth:`take` asked for has run."""
        if self._task is None or self._wake is None or self._idle is None:
            return
        while self._wake.is_set() or not self._idle.is_set():
            await self._idle.wait()
            if self._wake.is_set():
                await asyncio.sleep(0)

    async def close(self) -> None:
        """Stop reconciling and release the netlink sockets; the kernel state stays."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._sink is not None:
            sink, self._sink = self._sink, None
            await asyncio.get_running_loop().run_in_executor(None, sink.close)

    def service_doc(
        self,
        name: str,
        cfg: ServiceConfig,
        overrides: Mapping[tuple[str, str], Override],
        health: _HealthView,
    ) -> dict[str, Any]:
        """The admin API's document for offloaded service ``name``, with kernel counters."""
        spec = self.desired.get(name) or self.applied[name]
        kernel = self.counters.get(name, {"backends": {}, "vips": {}})
        dests = {str(d.address): d for d in spec.dests}
        backends = []
        for b in cfg.backends:
            addr = str(b.address)
            ov = overrides.get((name, addr), Override())
            k = kernel["backends"].get(addr, {})
            bh = health.get(name, addr)
            backends.append(
                {
                    "address": addr,
                    "weight": ov.weight if ov.weight is not None else b.weight,
                    "effective_weight": dests[addr].weight if addr in dests else 0,
                    "kernel_weight": k.get("weight"),
                    "drain": ov.drain,
                    "up": health.is_up(name, addr),
                    "overloaded": False,
                    "active": k.get("active", 0),
                    "inactive": k.get("inactive", 0),
                    "persistent": k.get("persistent", 0),
                    "total": k.get("conns", 0),
                    "bytes_in": k.get("inbytes", 0),
                    "bytes_out": k.get("outbytes", 0),
                    "connect_errors": 0,
                    "health": None if bh is None else bh.as_dict(),
                }
            )
        vips = [str(v) for v in spec.vips] or [str(spec.listen)]
        per_vip = {
            v: {
                "active": t["active"],
                "inactive": t["inactive"],
                "total": t["conns"],
                "bytes_in": t["inbytes"],
                "bytes_out": t["outbytes"],
            }
            for v, t in kernel["vips"].items()
        }
        return {
            "name": name,
            "mode": "offload",
            "listen": vips[0],
            "vips": vips,
            "protocol": spec.protocol,
            "scheduler": spec.scheduler,
            "affinity_timeout": spec.persist_timeout,
            "active": sum(b["active"] for b in backends),
            "total": sum(t["total"] for t in per_vip.values()),
            "bytes_in": sum(t["bytes_in"] for t in per_vip.values()),
            "bytes_out": sum(t["bytes_out"] for t in per_vip.values()),
            "rejected": 0,
            "failed": 0,
            "limit_rejected": 0,
            "kernel_vips": per_vip,
            "backends": backends,
        }

    # ---------------------------------------------------------------- the task

    def _kick(self) -> None:
        if self._wake is None:
            self._wake = asyncio.Event()
            self._idle = asyncio.Event()
        self._wake.set()

    async def _run(self) -> None:
        assert self._wake is not None and self._idle is not None
        loop = asyncio.get_running_loop()
        next_full = next_counters = loop.time()
        while True:
            self._idle.set()
            now = loop.time()
            wait = next_full - now
            draining = self._sink is not None and self._sink.draining
            if draining:
                wait = min(wait, self._drain_poll)
            if self._sink is not None:
                wait = min(wait, next_counters - now)
            if self._sink is None and self._unavailable is None and not self.desired:
                wait = self._repair_interval  # nothing to do until an offload service appears
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(0.0, wait))
            self._idle.clear()
            woken = self._wake.is_set()
            self._wake.clear()
            if not self.desired and self._sink is None:
                continue
            full = loop.time() >= next_full
            if woken or full or draining:
                started = loop.time()
                await self._pass(full)
                if full:
                    # A full pass dumps the whole table: with many services it must not
                    # take more than a fifth of the time.
                    took = loop.time() - started
                    stretched = min(MAX_REPAIR_INTERVAL, 5 * took)
                    next_full = loop.time() + max(self._repair_interval, stretched)
                self._on_result()
            if self._sink is not None and (full or loop.time() >= next_counters):
                started = loop.time()
                await self._read_counters()
                # Likewise: reading the counters dumps the table too.
                took = loop.time() - started
                next_counters = loop.time() + max(COUNTER_INTERVAL, 10 * took)

    async def _pass(self, full: bool) -> None:
        desired = dict(self.desired)
        if self._sink is None and self._unavailable is not None and not full:
            sink = None  # asked again on the next full pass, not on every change
        else:
            sink = await self._open()
        if sink is None:
            self.applied = {}
            self.failed = {n: str(self._unavailable) for n in desired}
            return
        try:
            errors = await sink.apply_async(desired, trust_cache=not full)
        except Exception as e:  # a netlink or iptables failure outside one service
            log.error("offload: programming IPVS failed: %s", e)
            errors = {n: f"programming IPVS failed: {e}" for n in desired}
        for name, msg in errors.items():
            if self.failed.get(name) != msg:
                log.error("offload service %s: %s", name, msg)
        self.applied = {n: s for n, s in desired.items() if n not in errors}
        self.failed = errors

    async def _read_counters(self) -> None:
        if self._sink is None:
            return
        try:
            self.counters = await self._sink.counters_async()
        except Exception as e:
            log.warning("offload: reading IPVS counters failed: %s", e)

    async def _open(self) -> IpvsSink | None:
        """The sink, opened on first use; None (and ``_unavailable`` set) without IPVS."""
        if self._sink is not None:
            return self._sink
        sink = self._factory()
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(None, sink.check_available)
        except IpvsUnavailable as e:
            await loop.run_in_executor(None, sink.close)
            if self._unavailable != str(e):
                log.error("offload: %s; offload services are not programmed", e)
            self._unavailable = str(e)
            return None
        self._unavailable = None
        self._sink = sink
        return sink
