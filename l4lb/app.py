"""The composition root of ``l4lb run``: config, data plane, admin API, signals.

Lifecycle:
1. Load and validate the config (a bad one never starts anything).
2. Raise the open-file limit, start the data plane's worker threads and program every
   service; a service that cannot be programmed (its address is taken, say) is logged and
   the others still run. ``mode = "offload"`` services go to kernel IPVS through
   :mod:`l4lb.offload` instead, and their rules stay when l4lb stops.
3. Serve the admin API, then write the ready file.
4. SIGHUP re-reads the file and applies only the difference; a bad file is logged and the
   running config stays. SIGTERM/SIGINT stop accepting, wait for open connections up to the
   drain timeout, then reset what is left and exit 0.

Runtime changes made through the admin API (weights, drain) last until the next reload,
which applies the file as written, as ``ipvsadm`` changes do under keepalived.

Health checks (:mod:`l4lb.health`) are one more input to the desired state: every health
transition and slow-start step re-programs the data plane, coalesced so that a burst of
transitions costs one programming pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import signal
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import orjson

from l4lb import _version
from l4lb.admin import AdminServer
from l4lb.config import Address, Config, ConfigError, load_config
from l4lb.dataplane import Dataplane
from l4lb.health import HealthMonitor, Transition
from l4lb.offload import Offload
from l4lb.permissions import admin_token, check_config_file
from l4lb.state import Override, ServiceSpec, desired_specs, desired_state, plan
from l4lb.vips import VipRules

log = logging.getLogger("l4lb")

DRAIN_POLL = 0.05
#: Health transitions within this many seconds are programmed together.
PROGRAM_COALESCE = 0.05


def raise_fd_limit(wanted: int) -> int:
    """Raise RLIMIT_NOFILE's soft limit as far as allowed; returns the new limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as e:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, target, e)
    # A proxied connection costs two sockets, and up to four pipe fds while data flows.
    if wanted and soft < 2 * wanted + 64:
        log.warning(
            "open-file limit %d is below what dataplane.max_connections = %d needs (%d)",
            soft,
            wanted,
            2 * wanted + 64,
        )
    return soft


class App:
    """One running ``l4lb run``: implements the admin API's Controller protocol."""

    def __init__(
        self,
        config_path: str,
        *,
        workers: int | None = None,
        ready_file: str | None = None,
        loader: Callable[[], Config] | None = None,
    ) -> None:
        """``loader`` replaces reading ``config_path`` (``l4lb kube-proxy`` builds its config
        from the API server); ``config_path`` then only names the source in messages."""
        self.config_path = config_path
        self._loader = loader
        self.workers_override = workers
        self.ready_file = ready_file
        self.config: Config | None = None
        self.dataplane: Dataplane | None = None
        self.admin: AdminServer | None = None
        self.applied: dict[str, ServiceSpec] = {}
        self.overrides: dict[tuple[str, str], Override] = {}
        self.failed: dict[str, str] = {}
        self.health = HealthMonitor(self._health_changed, self._consecutive_failures)
        self.vips = VipRules()
        # mode = "offload" services: kernel IPVS, never the data plane.
        self.offload = Offload(self._offload_done)
        self._pending_resets: set[tuple[str, str]] = set()
        self._program_handle: asyncio.TimerHandle | None = None
        self.started = time.monotonic()
        self.fd_limit = 0
        self._serving = False
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # ------------------------------------------------------------ lifecycle

    async def serve(self) -> int:
        """Run until SIGTERM/SIGINT; returns the process exit code."""
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            cfg = self._load()
            token = admin_token(cfg.admin)
        except ConfigError as e:
            log.error("%s", e)
            return 2
        self.config = cfg
        dpc = cfg.dataplane
        workers = self.workers_override or dpc.workers or os.cpu_count() or 1
        self.fd_limit = raise_fd_limit(dpc.max_connections)
        self.dataplane = Dataplane(
            workers=workers,
            pipe_size=dpc.pipe_size,
            max_pipes=dpc.max_pipes,
            inactive_timeout=dpc.inactive_timeout,
            reset_inactive_timeout=dpc.reset_inactive_timeout,
            on_worker_exit=self._worker_exited,
        )
        self.dataplane.start()
        try:
            self.health.update(cfg)
            self.offload.start()
            self._program_now()
            await self.offload.settle()
            await self.vips.settle()  # the ready file means the VIPs answer too
            self.vips.start()
            self.health.start()
            self.admin = AdminServer(
                self, cfg.admin.listen.host, cfg.admin.listen.port, token=token
            )
            await self.admin.start()
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._loop.add_signal_handler(sig, self._stop.set)
            self._loop.add_signal_handler(signal.SIGHUP, self.reload)
            self._serving = True
            self._write_ready_file()
            log.info(
                "serving %d service(s) with %d worker(s); admin on %s:%d",
                len(self.applied),
                workers,
                cfg.admin.listen.host,
                self.admin.port,
            )
            await self._stop.wait()
        finally:
            self._serving = False
            await self._shutdown()
        return 0

    def _worker_exited(self, index: int, error: BaseException | None) -> None:
        if error is not None and self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)

    async def _shutdown(self) -> None:
        if self._program_handle is not None:
            self._program_handle.cancel()
            self._program_handle = None
        await self.health.close()
        await self.vips.close()
        await self.offload.close()  # IPVS rules stay: offloaded connections outlive us
        dp = self.dataplane
        if dp is not None:
            dp.drain()
            await self._wait_drained(dp)
            dp.stop()
        if self.admin is not None:
            await self.admin.close()
        if self.ready_file:
            Path(self.ready_file).unlink(missing_ok=True)
        log.info("stopped")

    async def _wait_drained(self, dp: Dataplane) -> None:
        """Wait until no service has open connections, each up to its drain timeout."""
        start = time.monotonic()
        while True:
            elapsed = time.monotonic() - start
            waiting = [
                name
                for name, spec in self.applied.items()
                if elapsed < spec.drain_timeout and dp.active_connections(name) > 0
            ]
            if not waiting:
                break
            await asyncio.sleep(DRAIN_POLL)
        left = dp.active_connections()
        if left:
            log.warning("drain timeout: resetting %d open connection(s)", left)

    def _write_ready_file(self) -> None:
        if not self.ready_file or self.dataplane is None or self.admin is None:
            return
        assert self.config is not None
        host = self.config.admin.listen.host
        doc = {
            "pid": os.getpid(),
            "admin": f"[{host}]:{self.admin.port}" if ":" in host else f"{host}:{self.admin.port}",
            "services": {n: str(self.dataplane.listen_address(n)) for n in self.applied},
            "listeners": {
                n: [str(a) for a in self.dataplane.listen_addresses(n)] for n in self.applied
            },
            "vips": {n: [str(v) for v in s.vips] for n, s in self.applied.items() if s.vips},
        }
        tmp = f"{self.ready_file}.tmp"
        Path(tmp).write_bytes(orjson.dumps(doc))
        os.replace(tmp, self.ready_file)

    # ----------------------------------------------------------- programming

    def _program(self, desired: dict[str, ServiceSpec]) -> None:
        """Move the data plane from what it has to ``desired``."""
        assert self.dataplane is not None
        desired = self.offload.take(desired)
        desired, held = self.vips.admit(desired)
        errors = self.dataplane.apply(plan(self.applied, desired))
        # A service that failed is left out of what counts as applied, so the next
        # reload tries it again from scratch.
        programmed = set(self.dataplane.service_names())
        self.applied = {n: s for n, s in desired.items() if n in programmed and n not in errors}
        self.failed = {**held, **errors, **self.offload.failed}
        self.vips.update(self.applied, self.dataplane.listen_addresses)

    def _program_some(self, names: set[str]) -> None:
        """Program the services called ``names`` as ``self.config`` has them (removing
        those it lacks); every other service stays exactly as it is."""
        assert self.dataplane is not None and self.config is not None
        specs = desired_specs(self.config, names, self.overrides, self.health.states())
        offloaded = {n: s for n, s in specs.items() if s.mode == "offload"}
        if offloaded or any(n in self.offload.desired for n in names):
            kept = {n: s for n, s in self.offload.desired.items() if n not in names}
            self.offload.take({**kept, **offloaded})
        splice = {n: s for n, s in specs.items() if s.mode != "offload"}
        splice, held = self.vips.admit(splice, names)
        old = {n: self.applied[n] for n in names if n in self.applied}
        errors = self.dataplane.apply(plan(old, splice))
        for name in names:
            spec = splice.get(name)
            if spec is not None and name not in errors and self.dataplane.has_service(name):
                self.applied[name] = spec
            else:
                self.applied.pop(name, None)
        failed = {n: e for n, e in self.failed.items() if n not in names}
        self.failed = {**failed, **held, **errors, **self.offload.failed}
        self.vips.update(self.applied, self.dataplane.listen_addresses, names)

    def _offload_done(self) -> None:
        """An offload pass ended: its errors replace the offload services' old ones."""
        desired = self.offload.desired
        kept = {n: e for n, e in self.failed.items() if n not in desired}
        self.failed = {**kept, **self.offload.failed}

    def _program_now(self) -> None:
        """Program config, overrides and health as they are now; schedule slow start."""
        if self._program_handle is not None:
            self._program_handle.cancel()
            self._program_handle = None
        assert self.config is not None
        self._program(desired_state(self.config, self.overrides, self.health.states()))
        self._reset_downed()
        delay = self.health.ramp_delay()
        if delay is not None:
            self._request_program(delay)

    def _request_program(self, delay: float = PROGRAM_COALESCE) -> None:
        """Program within ``delay`` seconds, together with whatever else comes up meanwhile."""
        if self._loop is None:
            return
        when = self._loop.time() + delay
        if self._program_handle is not None:
            if self._program_handle.when() <= when:
                return
            self._program_handle.cancel()
        self._program_handle = self._loop.call_at(when, self._programmed_later)

    def _programmed_later(self) -> None:
        self._program_handle = None
        if self.dataplane is not None and self.config is not None:
            self._program_now()

    def _health_changed(self, transition: Transition) -> None:
        if not transition.up:
            hcfg = self.health.config(transition.service)
            if hcfg is not None and hcfg.on_down == "reset":
                self._pending_resets.add((transition.service, transition.address))
        self._request_program()

    def _reset_downed(self) -> None:
        """on_down = "reset": reset the connections of backends just taken out of service.

        Runs after programming, so no new connection reaches them in between; a backend
        still programmed with a weight (back up, or all_down = "all") is left alone.
        """
        assert self.dataplane is not None
        pending, self._pending_resets = self._pending_resets, set()
        for service, address in sorted(pending):
            spec = self.applied.get(service)
            if spec is None or self.health.is_up(service, address):
                continue
            if any(str(d.address) == address and d.weight for d in spec.dests):
                continue
            try:
                self.dataplane.reset_backend(service, address)
            except KeyError:  # removed by a reload in the meantime
                continue
            log.info("backend %s of %s: open connections reset (on_down = reset)", address, service)

    def _consecutive_failures(self, service: str, address: str) -> int | None:
        """The passive health signal: the data plane's consecutive connect failures."""
        if self.dataplane is None or service not in self.applied:
            return None
        try:
            return self.dataplane.slot_stats(service, address).consecutive_failures
        except KeyError:
            return None

    def _load(self) -> Config:
        if self._loader is not None:
            return self._loader()
        check_config_file(self.config_path)
        return load_config(self.config_path)

    def reload(self) -> None:
        """SIGHUP: re-read the config and apply the difference."""
        try:
            cfg = self._load()
        except ConfigError as e:
            log.error("reload rejected, keeping the running config: %s", e)
            return
        self.apply_config(cfg)

    def apply_config(self, cfg: Config, changed: Collection[str] | None = None) -> None:
        """Make ``cfg`` the running config: program only the difference.

        ``changed`` names the only services that may differ from the running config
        (added, changed or gone): only they are recomputed and programmed, and only their
        runtime overrides are dropped, so one change among thousands of services costs
        one service. Without it (``l4lb run``, SIGHUP) every service is compared.
        """
        assert self.config is not None
        if cfg.dataplane != self.config.dataplane:
            log.warning("reload: [dataplane] changes take effect only after a restart")
        if cfg.admin != self.config.admin:
            log.warning("reload: [admin] changes take effect only after a restart")
        self.config = cfg
        if changed is not None:
            names = set(changed)
            for key in [k for k in self.overrides if k[0] in names]:
                del self.overrides[key]
            self.health.update(cfg, names)
            self._program_some(names)
            self._reset_downed()
            self._write_ready_file()
            log.debug("applied %d changed service(s) of %s", len(names), self.config_path)
            return
        self.overrides.clear()
        self.health.update(cfg)
        self.vips.recheck()
        self._program_now()
        self._write_ready_file()
        log.info("reloaded %s: %d service(s)", self.config_path, len(self.applied))

    # ------------------------------------------------- the admin controller

    def is_serving(self) -> bool:
        """True while the data plane runs and shutdown has not begun."""
        return self._serving

    def set_backend(
        self, service: str, address: str, *, weight: int | None = None, drain: bool | None = None
    ) -> dict[str, Any]:
        """Change one backend's weight or drain flag at runtime."""
        assert self.config is not None
        try:
            cfg_svc = self.config.service(service)
        except KeyError:
            raise LookupError(f"no service named {service!r}") from None
        spelled = address
        with contextlib.suppress(ValueError, TypeError):
            # Any valid spelling names the backend ("[0:0::1]:80" is "[::1]:80").
            address = str(Address.parse(address))
        if not any(str(b.address) == address for b in cfg_svc.backends):
            raise LookupError(f"service {service!r} has no backend {spelled}")
        if weight is not None and not 0 <= weight <= 65535:
            raise ValueError(f"weight must be from 0 to 65535, got {weight}")
        key = (service, address)
        old = self.overrides.get(key, Override())
        self.overrides[key] = Override(
            weight=old.weight if weight is None else weight,
            drain=old.drain if drain is None else drain,
        )
        self._program_now()
        backends: list[dict[str, Any]] = self._service_doc(service)["backends"]
        for b in backends:
            if b["address"] == address:
                return b
        raise LookupError(f"service {service!r} has no backend {spelled}")

    def snapshot(self) -> dict[str, Any]:
        """Services, backends and counters as plain JSON-able data."""
        return {
            **self.process_doc(),
            "services": [
                *(self._service_doc(name) for name in self.applied),
                *(self._service_doc(name) for name in self.offload.applied),
            ],
            "failed": dict(self.failed),
        }

    def process_doc(self) -> dict[str, Any]:
        """The process-wide part of :meth:`snapshot`: version, uptime, data-plane totals."""
        dp = self.dataplane
        stats = dp.stats() if dp else None
        return {
            "version": _version.__version__,
            "uptime": round(time.monotonic() - self.started, 3),
            "dataplane": {
                "workers": dp.workers if dp else 0,
                "pipes_used": stats.pipes_used if stats else 0,
                "pipes_free": stats.pipes_free if stats else 0,
                "accept_errors": stats.accept_errors if stats else 0,
                "emfile_pauses": stats.emfile_pauses if stats else 0,
                "connections_active": stats.connections if stats else 0,
                "fd_limit": self.fd_limit,
            },
        }

    def _service_doc(self, name: str) -> dict[str, Any]:
        assert self.dataplane is not None and self.config is not None
        if name in self.offload.desired or name in self.offload.applied:
            cfg_svc = self.config.service(name)
            return self.offload.service_doc(name, cfg_svc, self.overrides, self.health)
        dp = self.dataplane
        spec = self.applied[name]
        cfg_weights = {str(b.address): b.weight for b in self.config.service(name).backends}
        dests = {str(d.address): d for d in spec.dests}
        backends = []
        total_in = total_out = 0
        for addr in dp.dest_order(name):
            st = dp.slot_stats(name, addr)
            ov = self.overrides.get((name, addr), Override())
            health = self.health.get(name, addr)
            weight = ov.weight if ov.weight is not None else cfg_weights.get(addr, 0)
            total_in += st.bytes_in
            total_out += st.bytes_out
            backends.append(
                {
                    "address": addr,
                    "weight": weight,
                    "effective_weight": dests[addr].weight if addr in dests else 0,
                    "drain": ov.drain,
                    "up": self.health.is_up(name, addr),
                    "overloaded": dp.overloaded(name, addr),
                    "active": st.active,
                    "inactive": st.inactive,
                    "total": st.conns,
                    "bytes_in": st.bytes_in,
                    "bytes_out": st.bytes_out,
                    "connect_errors": st.connect_errors,
                    "health": None if health is None else health.as_dict(),
                }
            )
        sst = dp.service_stats(name)
        return {
            "name": name,
            "mode": "splice",
            "listen": str(dp.listen_address(name)),
            "listeners": [str(a) for a in dp.listen_addresses(name)],
            "vips": [str(v) for v in spec.vips],
            "protocol": spec.protocol,
            "scheduler": spec.scheduler,
            "affinity_timeout": spec.persist_timeout,
            "active": sst.active,
            "total": sst.accepted,
            "bytes_in": total_in,
            "bytes_out": total_out,
            "rejected": sst.rejected,
            "failed": sst.failed,
            "limit_rejected": sst.limit_rejected,
            "vip_connections": dp.vip_connections(name),
            "backends": backends,
        }
