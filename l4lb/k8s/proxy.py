"""``l4lb kube-proxy``: watch the API server and serve its Services from l4lb's data plane.

Pieces, all on one event loop:

1. :class:`~l4lb.app.App` runs the data plane, VIP portals and admin API from a Config that
   this module builds (its loader gives the empty starting config).
2. :class:`~l4lb.k8s.watcher.Discovery` lists and watches Services and EndpointSlices;
   :class:`NodeFacts` reads this node's addresses and zone from its Node object, retrying
   with backoff while that fails (the proxy serves meanwhile, without node facts).
3. :class:`Reconciler` wakes on every coalesced change (and every sync period). The
   watchers name the Services that changed (a slice names its Service through its
   ``kubernetes.io/service-name`` label); those alone are translated and built again when
   that cannot affect any other Service (an endpoint change), else the whole snapshot is
   (unchanged Services from cache), each bad object logged once. The App is handed the
   Config and the names of the services that differ, and programs only those. Each pass
   feeds the sync-duration and network-programming (watch event arrival to programmed)
   histograms and the healthz state.
4. The healthz and metrics servers of :mod:`l4lb.k8s.healthz`. A server that cannot bind
   is logged and the proxy runs on, like kube-proxy without ``--bind-address-hard-fail``.

The first sync waits until both kinds were listed once, so a half-listed cluster is never
programmed. While the API server is unreachable the last programmed state keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import os
import socket
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web
from kubernetes import client as k8s_client
from kubernetes.client.exceptions import ApiException

from l4lb.config import (
    KERNEL_SCHEDULERS,
    SCHEDULERS,
    Address,
    AdminConfig,
    Config,
    DataplaneConfig,
    ServiceConfig,
)
from l4lb.k8s.client import KubeClient, KubeError, load_api_client
from l4lb.k8s.healthz import ProxyHealth, ProxyMetrics, healthz_app, metrics_app
from l4lb.k8s.incremental import IncrementalTranslator
from l4lb.k8s.options import KubeProxyOptions
from l4lb.k8s.reconcile import BuildCache, BuildSettings, PortAllocator, build_config, rebuild
from l4lb.k8s.translate import NodeInfo, ObjectError, service_key
from l4lb.k8s.watcher import Backoff, ChangeSignal, Discovery, ErrorLog

if TYPE_CHECKING:
    from l4lb.app import App

__all__ = [
    "NodeFacts",
    "Reconciler",
    "TimedSignal",
    "changed_services",
    "make_api_client",
    "node_info",
    "node_name",
    "run",
]

log = logging.getLogger("l4lb.kube-proxy")

LABEL_ZONE = "topology.kubernetes.io/zone"
_NODE_ADDRESS_TYPES = ("InternalIP", "ExternalIP")
# Always among the node's addresses: they let a NodePort be known (and held by a wildcard
# listener) before, or without, the Node object; offload mode skips them as VIPs.
_WILDCARDS = ("0.0.0.0", "::")


class TimedSignal(ChangeSignal):
    """A :class:`ChangeSignal` that remembers when the oldest unconsumed change arrived."""

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        on_notify: Callable[[float], None] | None = None,
    ) -> None:
        super().__init__()
        self._clock = clock
        self._on_notify = on_notify
        self.pending_since: float | None = None

    def notify(self, keys: Iterable[str] | None = None) -> None:
        """Record a change and, for the first since the last :meth:`take`, its time."""
        if self.pending_since is None:
            self.pending_since = self._clock()
            if self._on_notify is not None:
                self._on_notify(self.pending_since)
        super().notify(keys)

    def take(self) -> float | None:
        """The arrival time of the oldest pending change (None: none); clears it."""
        since, self.pending_since = self.pending_since, None
        return since


def node_name(opts: KubeProxyOptions) -> str:
    """kube-proxy's node name: ``--hostname-override``, else the host name, lower-cased."""
    return (opts.hostname_override or socket.gethostname()).strip().lower()


def node_info(name: str, node: Mapping[str, Any] | None, bind_address: str) -> NodeInfo:
    """NodeInfo from a Node object (``kubectl get node -o json`` shape), tolerant of gaps."""
    addresses: list[str] = []
    zone: str | None = None
    if isinstance(node, Mapping):
        status = node.get("status")
        raw = status.get("addresses") if isinstance(status, Mapping) else None
        for a in raw if isinstance(raw, list) else ():
            if isinstance(a, Mapping) and a.get("type") in _NODE_ADDRESS_TYPES:
                text = a.get("address")
                if isinstance(text, str) and text not in addresses:
                    addresses.append(text)
        meta = node.get("metadata")
        labels = meta.get("labels") if isinstance(meta, Mapping) else None
        if isinstance(labels, Mapping) and isinstance(labels.get(LABEL_ZONE), str):
            zone = labels[LABEL_ZONE] or None
    if bind_address not in _WILDCARDS and bind_address not in addresses:
        addresses.append(bind_address)  # kube-proxy: a specific bind address is the node IP
    return NodeInfo(name, (*addresses, *_WILDCARDS), zone)


class NodeFacts:
    """This node's Node object, fetched at start and every ``refresh`` seconds.

    Failures are logged and retried with backoff; the last good facts stay in use. A change
    pokes ``changed`` so the services are translated again.
    """

    def __init__(
        self,
        api_client: k8s_client.ApiClient | None,
        name: str,
        bind_address: str,
        changed: ChangeSignal,
        *,
        refresh: float = 30.0,
        backoff: Backoff | None = None,
    ) -> None:
        self._api = k8s_client.CoreV1Api(api_client) if api_client is not None else None
        self.name = name
        self._bind_address = bind_address
        self._changed = changed
        self._refresh = refresh
        self._backoff = backoff if backoff is not None else Backoff()
        self.node: dict[str, Any] | None = None
        self.info = node_info(name, None, bind_address)

    def _get(self) -> dict[str, Any]:
        assert self._api is not None
        resp: Any = self._api.read_node(self.name, _preload_content=False, _request_timeout=(5, 30))
        try:
            body = orjson.loads(resp.data)
        finally:
            resp.release_conn()
        if not isinstance(body, dict):
            raise KubeError("malformed Node object")
        return body

    async def run(self) -> None:
        """Fetch forever; cancel to stop."""
        if self._api is None:
            return
        while True:
            try:
                node = await asyncio.to_thread(self._get)
            except Exception as e:  # any failure: keep what we have, retry later
                delay = self._backoff.next()
                why = f"HTTP {e.status} {e.reason}" if isinstance(e, ApiException) else e
                log.warning("cannot get Node %s: %s; retrying in %.1fs", self.name, why, delay)
                await asyncio.sleep(delay)
                continue
            self._backoff.reset()
            self.node = node
            info = node_info(self.name, node, self._bind_address)
            if info != self.info:
                log.info(
                    "node %s: addresses %s, zone %s",
                    self.name,
                    ", ".join(a for a in info.addresses if a not in _WILDCARDS) or "none",
                    info.zone or "none",
                )
                self.info = info
                self._changed.notify()
            await asyncio.sleep(self._refresh)


class Reconciler:
    """Snapshot -> translation -> Config -> ``apply``, on every coalesced change.

    ``apply`` takes a whole Config; ``apply_changes``, when given, is used instead after the
    first pass, with the names of the services that differ from the previous Config; the
    periodic pass then adds the names ``retry`` returns (the services that failed), and
    without ``retry`` it applies in full.
    """

    def __init__(
        self,
        discovery: Discovery,
        signal: TimedSignal,
        apply: Callable[[Config], None],
        *,
        apply_changes: Callable[[Config, frozenset[str]], None] | None = None,
        retry: Callable[[], Iterable[str]] | None = None,
        node: Callable[[], NodeInfo],
        settings: BuildSettings,
        default_scheduler: str = "rr",
        ports: PortAllocator | None = None,
        health: ProxyHealth | None = None,
        metrics: ProxyMetrics | None = None,
        sync_period: float = 30.0,
        min_sync_period: float = 0.0,
        errors: ErrorLog | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.discovery = discovery
        self.signal = signal
        self._apply = apply
        self._apply_changes = apply_changes
        self._retry = retry
        self._node = node
        self.settings = settings
        self._translator = IncrementalTranslator(
            default_scheduler=default_scheduler,
            schedulers=KERNEL_SCHEDULERS if settings.offload else SCHEDULERS,
        )
        self._built = BuildCache()
        self._ports = ports
        self.health = health
        self.metrics = metrics
        self._sync_period = sync_period
        self._min_sync_period = min_sync_period
        self._errors = errors if errors is not None else ErrorLog(log)
        self._clock = clock
        self.syncs = 0
        self._failed = False
        self.config: Config | None = None
        self.last_sync: float | None = None

    def sync(
        self, pending_since: float | None = None, touched: Collection[str] | None = None
    ) -> Config:
        """One pass; ``pending_since`` is when the oldest change it covers arrived.

        ``touched`` names the only Services (``namespace/name``) whose objects changed: if
        they can be redone alone (see :meth:`_sync_some`), nothing else is looked at.
        Otherwise, and when it is None, the whole snapshot is translated (unchanged
        Services from cache) and built.
        """
        start = self._clock()
        fresh: list[ObjectError] = []
        changed: frozenset[str] | None
        some = None if touched is None else self._sync_some(touched)
        if some is not None:
            config, changed = some
        else:
            services, slices = self.discovery.snapshot()
            translation = self._translator.translate(services, slices, self._node())
            config, dropped = build_config(
                translation.services, self.settings, self._ports, self._built
            )
            fresh = self._errors.report([*translation.errors, *dropped])
            changed = changed_services(self.config, config)
        # A change that alters nothing here (a label, a status field) is not programmed.
        # The periodic pass (nothing pending) always is, so that failed services are
        # retried: in full, or given ``retry``, just the failed ones with the changes.
        apply_changes, retry = self._apply_changes, self._retry
        if changed is None or apply_changes is None:
            if changed is None or changed or pending_since is None:
                self._apply(config)
        elif pending_since is None and retry is None:
            self._apply(config)
        else:
            if pending_since is None and retry is not None:
                changed = changed | frozenset(retry())
            if changed:
                apply_changes(config, changed)
        if some is None:
            # What a full pass leaves is mostly long-lived (millions of objects at 10,000
            # Services): out of the collector's sight, a full collection no longer stalls
            # the loop for a tenth of a second in the middle of a change.
            gc.freeze()
        done = self._clock()
        self.config = config
        self.syncs += 1
        self.last_sync = done
        if self.metrics is not None:
            self.metrics.sync_duration.observe(done - start)
            self.metrics.last_sync.set(time.time())
            if fresh:
                self.metrics.object_errors.inc(len(fresh))
            if pending_since is not None:
                self.metrics.programming_duration.observe(max(0.0, done - pending_since))
        if self.health is not None:
            self.health.updated(self.signal.pending_since)
        return config

    def _sync_some(self, touched: Collection[str]) -> tuple[Config, frozenset[str]] | None:
        """The Config with only the Services ``touched`` redone, and the names of the
        services that differ; None when a full pass is needed (see
        :meth:`~l4lb.k8s.incremental.IncrementalTranslator.retranslate` and
        :func:`~l4lb.k8s.reconcile.rebuild`). Caches updated on the way stay valid."""
        old = self.config
        if old is None:
            return None
        node = self._node()
        objects = self.discovery.services.objects
        replaced: dict[str, ServiceConfig] = {}
        for key in touched:
            service = objects.get(key)
            if service is not None and service_key(service) != key:
                return None  # no namespace: the translation knows it by another key
            step = self._translator.retranslate(
                key, service, self.discovery.slices.by_owner(key), node
            )
            if step is None:
                return None
            before, after = step
            if [k.name for k in before] != [k.name for k in after]:
                return None  # a port or family came or went: a full pass places it
            for kvs in after:
                made = rebuild(kvs, self.settings, self._built, self._ports)
                if made is None:
                    return None
                for svc in made:
                    if old.get(svc.name) is None:
                        return None
                    replaced[svc.name] = svc
        changed = frozenset(n for n, svc in replaced.items() if old.get(n) != svc)
        if not changed:
            return old, changed
        services = tuple(replaced.get(svc.name, svc) for svc in old.services)
        return dataclasses.replace(old, services=services), changed

    async def run(self) -> None:
        """Sync after the first complete list, then on every change; cancel to stop."""
        await self.discovery.wait_synced()
        while True:
            if self.last_sync is not None and self._min_sync_period > 0:
                wait = self.last_sync + self._min_sync_period - self._clock()
                if wait > 0:
                    await asyncio.sleep(wait)
            pending = self.signal.take()
            touched = self.signal.take_touched()
            try:
                self.sync(pending, None if self._failed else touched)
                self._failed = False
            except Exception:  # a bug must not stop the proxy; the next change retries
                # in full, since what this pass was to redo is known to it alone
                self._failed = True
                log.exception("sync failed; keeping the programmed state")
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation
            # that races with the signal, and the task would then never stop.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._sync_period):
                    await self.signal.wait()


def changed_services(old: Config | None, new: Config) -> frozenset[str] | None:
    """Names of the services that were added, changed or removed from ``old`` to ``new``;
    None when there is no ``old``. Unchanged services are mostly the very same objects
    (see :class:`~l4lb.k8s.reconcile.BuildCache`), so this costs little per service."""
    if old is None:
        return None
    names = {
        svc.name for svc in new.services if (was := old.get(svc.name)) is not svc and was != svc
    }
    names.update(svc.name for svc in old.services if new.get(svc.name) is None)
    return frozenset(names)


def process_snapshot(app: App) -> dict[str, Any]:
    """l4lb's process-wide figures for the metrics address, without the per-service and
    per-backend ones: at cluster scale those are hundreds of thousands of samples (and a
    scrape would hold up programming); they stay on the admin API's /metrics."""
    return {**app.process_doc(), "services": [], "failed": {}}


def make_api_client(opts: KubeProxyOptions) -> k8s_client.ApiClient:
    """The API client: ``--kubeconfig``, else in-cluster, else ``~/.kube/config``;
    ``--master`` overrides the server (and alone is enough, without credentials)."""
    if opts.master and not opts.kubeconfig and not os.environ.get("KUBERNETES_SERVICE_HOST"):
        cfg = k8s_client.Configuration()
        cfg.host = opts.master
        cfg.retries = 0
        return k8s_client.ApiClient(cfg)
    api = load_api_client(opts.kubeconfig)
    if opts.master:
        api.configuration.host = opts.master
    return api


async def _serve_http(app: web.Application, addr: Address, what: str) -> web.AppRunner | None:
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, addr.host, addr.port, reuse_address=True)
        await site.start()
    except OSError as e:
        log.error("cannot serve %s on %s: %s", what, addr, e.strerror or e)
        await runner.cleanup()
        return None
    port = runner.addresses[0][1] if runner.addresses else addr.port
    log.info("%s on %s", what, Address(addr.host, port, addr.family))
    return runner


def _initial_config(opts: KubeProxyOptions) -> Config:
    return Config(
        source="kubernetes",
        admin=AdminConfig(listen=opts.admin_bind_address),
        dataplane=DataplaneConfig(workers=opts.workers or 0),
        services=(),
    )


async def run(opts: KubeProxyOptions) -> int:
    """Run the proxy until SIGTERM/SIGINT; returns the exit code."""
    from l4lb.app import App  # the data plane extension loads only when really running

    for warning in opts.warnings:
        log.warning("%s: %s", opts.config, warning)
    try:
        api_client = make_api_client(opts)
    except KubeError as e:
        log.error("%s", e)
        return 1
    initial = _initial_config(opts)
    app = App("kubernetes", workers=opts.workers, loader=lambda: initial)
    serving = asyncio.create_task(app.serve(), name="l4lb-app")
    for _ in range(6000):  # bounded wait for the data plane to come up (60 s)
        if app.is_serving() or serving.done():
            break
        await asyncio.sleep(0.01)
    if not app.is_serving():
        return await serving if serving.done() else 1

    health = ProxyHealth(opts.sync_period)
    metrics = ProxyMetrics(lambda: process_snapshot(app))

    def queued(at: float) -> None:
        health.queued(at)
        metrics.last_queued.set(time.time())

    signal = TimedSignal(on_notify=queued)
    discovery = Discovery(KubeClient(api_client), changed=signal)
    facts = NodeFacts(
        api_client, node_name(opts), opts.bind_address, signal, refresh=opts.sync_period
    )
    ports = PortAllocator(*opts.proxy_port_range) if opts.proxy_port_range else None
    settings = BuildSettings(
        offload=opts.offload,
        udp_timeout=opts.udp_timeout,
        admin=initial.admin,
        dataplane=initial.dataplane,
    )

    def node() -> NodeInfo:
        health.node = facts.node
        return facts.info

    reconciler = Reconciler(
        discovery,
        signal,
        app.apply_config,
        apply_changes=app.apply_config,
        retry=lambda: list(app.failed),
        node=node,
        settings=settings,
        default_scheduler=opts.ipvs_scheduler,
        ports=ports,
        health=health,
        metrics=metrics,
        sync_period=opts.sync_period,
        min_sync_period=opts.min_sync_period,
    )
    runners = [
        await _serve_http(healthz_app(health, metrics), opts.healthz_bind_address, "healthz"),
        await _serve_http(
            metrics_app(metrics, opts.proxy_mode, opts.as_configuration),
            opts.metrics_bind_address,
            "metrics",
        ),
    ]
    log.info("kube-proxy (%s mode) for node %s", opts.proxy_mode, facts.name)
    tasks = [
        asyncio.create_task(discovery.run(), name="k8s-discovery"),
        asyncio.create_task(facts.run(), name="k8s-node"),
        asyncio.create_task(reconciler.run(), name="k8s-reconciler"),
    ]
    try:
        return await serving
    finally:
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        for r in runners:
            if r is not None:
                await r.cleanup()


def cleanup() -> int:
    """``--cleanup``: what ``l4lb cleanup`` does (portal rules and IPVS state), then exit."""
    from l4lb.cleanup import main as cleanup_main

    return cleanup_main()


def main(opts: KubeProxyOptions) -> int:
    """Entry point behind ``l4lb kube-proxy`` (flags already parsed and checked)."""
    if opts.cleanup:
        return cleanup()
    import uvloop

    return uvloop.run(run(opts))
