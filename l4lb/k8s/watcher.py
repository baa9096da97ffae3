"""List-then-watch per resource, keeping the latest objects for a level-triggered reconciler.

Each :class:`Watcher` follows the API-server contract:

1. List, then watch from the list's resourceVersion with bookmarks allowed; every event and
   bookmark advances the resourceVersion, so a re-watch resumes exactly where it stopped.
2. 410 Gone (the version was compacted away) drops the version and relists; the new list
   replaces the store in one step.
3. Any other failure (refused connection, dropped stream, a line that is not an event, an
   HTTP error) keeps the store as it is -- the last known state keeps serving -- and
   retries after exponential backoff with jitter, capped.
4. A watch that ends without delivering anything also backs off, so a server that closes
   streams at once cannot drive a busy loop. The backoff resets only after a watch
   delivered at least one event or bookmark.

Watchers never call the reconciler: they store facts and poke a shared
:class:`ChangeSignal`, which coalesces any number of changes into one wake-up.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from l4lb.k8s.client import ENDPOINT_SLICES, SERVICES, Gone, KubeClient, KubeError, Resource
from l4lb.k8s.translate import ObjectError, slice_service_key

__all__ = ["Backoff", "ChangeSignal", "Discovery", "ErrorLog", "Watcher", "object_key"]

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Backoff:
    """Exponential backoff with jitter: ``min(cap, initial * factor**n)``, scaled down by a
    random fraction of at most ``jitter`` so that many proxies do not retry in step."""

    initial: float = 0.5
    factor: float = 2.0
    cap: float = 30.0
    jitter: float = 0.5
    failures: int = 0
    rng: random.Random = field(default_factory=random.Random)

    def next(self) -> float:
        """The delay before the next attempt; each call counts one more failure."""
        base = min(self.cap, self.initial * self.factor ** min(self.failures, 64))
        self.failures += 1
        return base * (1.0 - self.jitter * self.rng.random())

    def reset(self) -> None:
        """Forget past failures after a success."""
        self.failures = 0


class ChangeSignal:
    """A coalescing "something changed" flag shared by watchers and awaited by a reconciler.

    It also gathers which Services the changes concern (``namespace/name`` keys), so that a
    reconciler can redo only those; a change that names none (a relist, the node) stands
    for every Service.
    """

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self.generation = 0
        self._touched: set[str] | None = set()

    def notify(self, keys: Iterable[str] | None = None) -> None:
        """Record a change of the Services ``keys`` (None: of any); wakes a waiter once
        however often it is called."""
        if keys is None:
            self._touched = None
        elif self._touched is not None:
            self._touched.update(keys)
        self.generation += 1
        self._event.set()

    def take_touched(self) -> set[str] | None:
        """The Service keys changed since the last call (None: any may have); clears them."""
        touched, self._touched = self._touched, set()
        return touched

    async def wait(self) -> int:
        """Wait for at least one change since the last wait; return the generation."""
        await self._event.wait()
        self._event.clear()
        return self.generation


def object_key(obj: Mapping[str, Any]) -> str | None:
    """``namespace/name`` of an object, or None when its metadata is unusable."""
    meta = obj.get("metadata")
    if not isinstance(meta, Mapping):
        return None
    ns, name = meta.get("namespace"), meta.get("name")
    if not isinstance(name, str) or not name:
        return None
    return f"{ns}/{name}" if isinstance(ns, str) and ns else name


def _slim(obj: dict[str, Any]) -> dict[str, Any]:
    """Drop managedFields: often the bulk of an object, and never read here."""
    meta = obj.get("metadata")
    if isinstance(meta, dict):
        meta.pop("managedFields", None)
    return obj


def _resource_version(obj: Mapping[str, Any]) -> str | None:
    meta = obj.get("metadata")
    rv = meta.get("resourceVersion") if isinstance(meta, Mapping) else None
    return rv if isinstance(rv, str) and rv else None


class Watcher:
    """Keeps :attr:`objects` equal to the API server's view of one resource kind."""

    def __init__(
        self,
        client: KubeClient,
        resource: Resource,
        *,
        changed: ChangeSignal | None = None,
        backoff: Backoff | None = None,
        watch_timeout: int = 300,
        owner: Callable[[Mapping[str, Any]], str | None] | None = None,
    ) -> None:
        """``owner`` maps an object to the Service key it belongs to (default: its own key);
        objects are also kept grouped by it, in :attr:`by_owner`."""
        self._client = client
        self.resource = resource
        self._owner = owner
        self._by_owner: dict[str, dict[str, dict[str, Any]]] = {}
        self.changed = changed if changed is not None else ChangeSignal()
        self._backoff = backoff if backoff is not None else Backoff()
        self._watch_timeout = watch_timeout
        self._store: dict[str, dict[str, Any]] = {}
        self.resource_version: str | None = None
        self.synced = asyncio.Event()
        self.lists = 0
        self.watches = 0
        self.failures = 0

    @property
    def objects(self) -> Mapping[str, dict[str, Any]]:
        """Read-only view of the latest objects keyed by ``namespace/name``."""
        return MappingProxyType(self._store)

    def by_owner(self, owner: str) -> list[dict[str, Any]]:
        """The objects that belong to the Service ``owner`` (needs an ``owner`` function)."""
        return list(self._by_owner.get(owner, {}).values())

    def _owner_of(self, key: str, obj: Mapping[str, Any]) -> str | None:
        return key if self._owner is None else self._owner(obj)

    def _index(self, key: str, old: Mapping[str, Any] | None, new: dict[str, Any] | None) -> None:
        if self._owner is None:
            return
        if old is not None and (was := self._owner(old)) is not None:
            group = self._by_owner.get(was)
            if group is not None:
                group.pop(key, None)
                if not group:
                    del self._by_owner[was]
        if new is not None and (now := self._owner(new)) is not None:
            self._by_owner.setdefault(now, {})[key] = new

    def _notify_owners(
        self, key: str, old: Mapping[str, Any] | None, new: Mapping[str, Any] | None
    ) -> None:
        owners = {self._owner_of(key, o) for o in (old, new) if o is not None}
        # An object of no Service is reported by a full pass.
        self.changed.notify(None if None in owners else [o for o in owners if o is not None])

    async def run(self) -> None:
        """List and watch forever; cancel the task to stop."""
        kind = self.resource.kind
        while True:
            try:
                if self.resource_version is None:
                    await self._relist()
                if await self._watch_once():
                    self._backoff.reset()
                    continue
                delay = self._backoff.next()
                log.debug("%s watch ended without events; re-watching in %.2fs", kind, delay)
            except Gone as e:
                self.resource_version = None
                self.failures += 1
                delay = self._backoff.next()
                log.info("%s: %s; relisting in %.2fs", kind, e, delay)
            except KubeError as e:
                self.failures += 1
                delay = self._backoff.next()
                log.warning(
                    "%s: %s; keeping %d known objects, retrying in %.2fs",
                    kind,
                    e,
                    len(self._store),
                    delay,
                )
            except Exception:  # a bug or an unforeseen reply must not end discovery
                self.failures += 1
                delay = self._backoff.next()
                log.exception("%s: unexpected failure; retrying in %.2fs", kind, delay)
            await asyncio.sleep(delay)

    async def _relist(self) -> None:
        result = await self._client.list(self.resource)
        self.lists += 1
        fresh: dict[str, dict[str, Any]] = {}
        for obj in result.items:
            key = object_key(obj)
            if key is None:
                log.warning("%s list: skipping an object without name", self.resource.kind)
                continue
            fresh[key] = _slim(obj)
        first = not self.synced.is_set()
        self.resource_version = result.resource_version
        if first or fresh != self._store:
            self._store = fresh
            self._by_owner = {}
            for key, obj in fresh.items():
                self._index(key, None, obj)
            self.changed.notify()
        self.synced.set()

    async def _watch_once(self) -> bool:
        """Run one watch stream to its end; True if it delivered anything."""
        assert self.resource_version is not None
        self.watches += 1
        delivered = False
        stream = self._client.watch(
            self.resource, self.resource_version, timeout_seconds=self._watch_timeout
        )
        async for event in stream:
            delivered = True
            rv = _resource_version(event.object)
            if event.type != "BOOKMARK":
                self._apply(event.type, event.object)
            if rv is not None:
                self.resource_version = rv
        return delivered

    def _apply(self, kind: str, obj: dict[str, Any]) -> None:
        key = object_key(obj)
        if key is None:
            log.warning("%s watch: skipping a %s event without name", self.resource.kind, kind)
            return
        if kind == "DELETED":
            old = self._store.pop(key, None)
            if old is not None:
                self._index(key, old, None)
                self._notify_owners(key, old, None)
        elif (old := self._store.get(key)) != _slim(obj):
            self._store[key] = obj
            self._index(key, old, obj)
            self._notify_owners(key, old, obj)


class Discovery:
    """Services and EndpointSlices watched together behind one change signal."""

    def __init__(
        self,
        client: KubeClient,
        *,
        backoff: Backoff | None = None,
        watch_timeout: int = 300,
        changed: ChangeSignal | None = None,
    ) -> None:
        self.changed = changed if changed is not None else ChangeSignal()
        self.services, self.slices = (
            Watcher(
                client,
                resource,
                changed=self.changed,
                backoff=_fresh_backoff(backoff),
                watch_timeout=watch_timeout,
                owner=owner,
            )
            for resource, owner in ((SERVICES, None), (ENDPOINT_SLICES, slice_service_key))
        )

    async def run(self) -> None:
        """Run both watchers until cancelled."""
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.services.run(), name="k8s-watch-services")
            tg.create_task(self.slices.run(), name="k8s-watch-endpointslices")

    async def wait_synced(self) -> None:
        """Return once both kinds have been listed at least once."""
        await self.services.synced.wait()
        await self.slices.synced.wait()

    def snapshot(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """The latest Services and EndpointSlices, for :func:`l4lb.k8s.translate.translate`."""
        return list(self.services.objects.values()), list(self.slices.objects.values())


def _fresh_backoff(template: Backoff | None) -> Backoff:
    """A private copy, so the two watchers' failure counts stay independent."""
    if template is None:
        return Backoff()
    return dataclasses.replace(template, failures=0, rng=random.Random())


class ErrorLog:
    """Logs each translation error once, however many syncs it survives.

    An error that disappears (the object was fixed or deleted) and comes back is logged again.
    """

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self._log = logger if logger is not None else log
        self._seen: frozenset[ObjectError] = frozenset()

    def report(self, errors: Iterable[ObjectError]) -> list[ObjectError]:
        """Log the errors not reported by the previous call; return them."""
        current = list(dict.fromkeys(errors))
        fresh = [e for e in current if e not in self._seen]
        for e in fresh:
            self._log.warning("skipping %s", e)
        self._seen = frozenset(current)
        return fresh
