""":func:`~l4lb.k8s.translate.translate` with memory, so one change costs one Service.

A Service whose object and EndpointSlices equal those of the previous pass reuses that
pass's result; any other is translated afresh. The watchers replace an object's dict when
it changes, so the comparison is mostly by identity and costs next to nothing. A different
node (addresses, zone) invalidates everything. The output equals what
:func:`~l4lb.k8s.translate.translate` returns for the same snapshot.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from l4lb.config import SCHEDULERS
from l4lb.k8s.translate import (
    LABEL_HEADLESS,
    LABEL_SERVICE_NAME,
    KubeVirtualService,
    NodeInfo,
    ObjectError,
    Translation,
    _has_label,
    _object_key,
    _valid_ip,
    slice_service_key,
    translate_service,
)

__all__ = ["IncrementalTranslator"]


@dataclass(frozen=True, slots=True)
class _Entry:
    service: Mapping[str, Any]
    slices: tuple[Mapping[str, Any], ...]
    services: tuple[KubeVirtualService, ...]
    errors: tuple[ObjectError, ...]


class IncrementalTranslator:
    """Translates snapshots, re-translating only the Services whose objects changed."""

    def __init__(
        self, *, default_scheduler: str = "rr", schedulers: frozenset[str] = SCHEDULERS
    ) -> None:
        self._scheduler = default_scheduler
        self._schedulers = schedulers
        self._cache: dict[str, _Entry] = {}
        self._node: NodeInfo | None = None
        self._valid_node = NodeInfo("")
        self._node_errors: tuple[ObjectError, ...] = ()
        self.translated = 0  # Services translated by the last pass (the rest were reused)

    def _set_node(self, node: NodeInfo) -> None:
        # As translate() does: bad node addresses are reported once, not per service.
        errors: list[ObjectError] = []
        good = tuple(a for a in node.addresses if _valid_ip(a, node, errors))
        self._node_errors = tuple(errors)
        self._valid_node = NodeInfo(node.name, good, node.zone)
        self._node = node
        self._cache.clear()

    def retranslate(
        self,
        key: str,
        service: Mapping[str, Any] | None,
        slices: Sequence[Mapping[str, Any]],
        node: NodeInfo,
    ) -> tuple[tuple[KubeVirtualService, ...], tuple[KubeVirtualService, ...]] | None:
        """Translate the one Service ``key`` again (``service`` None: it is gone) and
        return what it made before and now. None when that alone cannot tell what a full
        :meth:`translate` would: another node, an unknown Service, or errors before or now
        (those are reported by full passes only)."""
        if node != self._node:
            return None
        old = self._cache.get(key)
        if old is None or old.errors:
            return None
        if service is None:
            del self._cache[key]
            return old.services, ()
        own = tuple(slices)
        if old.service == service and old.slices == own:
            return old.services, old.services
        result = translate_service(
            service,
            own,
            self._valid_node,
            default_scheduler=self._scheduler,
            schedulers=self._schedulers,
        )
        if result.errors:
            return None
        self._cache[key] = _Entry(service, own, result.services, result.errors)
        return old.services, result.services

    def translate(
        self,
        services: Iterable[Mapping[str, Any]],
        slices: Iterable[Mapping[str, Any]],
        node: NodeInfo,
    ) -> Translation:
        """Same as :func:`~l4lb.k8s.translate.translate` for this snapshot."""
        if node != self._node:
            self._set_node(node)
        errors: list[ObjectError] = list(self._node_errors)
        by_service: dict[str, list[Mapping[str, Any]]] = {}
        for sl in slices:
            owner = slice_service_key(sl) if isinstance(sl, Mapping) else None
            if owner is None:
                if not _has_label(sl, LABEL_HEADLESS):
                    errors.append(
                        ObjectError(
                            "EndpointSlice", _object_key(sl), f"no {LABEL_SERVICE_NAME} label"
                        )
                    )
                continue
            by_service.setdefault(owner, []).append(sl)
        cache: dict[str, _Entry] = {}
        out: list[KubeVirtualService] = []
        translated = 0
        for svc in services:
            key = _object_key(svc)
            own = tuple(by_service.get(key, ()))
            entry = self._cache.get(key)
            # Tuple and dict equality test identity first, so unchanged objects compare in
            # no time; equal copies (a relist) translate the same, so they count as equal.
            if entry is None or entry.service != svc or entry.slices != own:
                result = translate_service(
                    svc,
                    own,
                    self._valid_node,
                    default_scheduler=self._scheduler,
                    schedulers=self._schedulers,
                )
                entry = _Entry(svc, own, result.services, result.errors)
                translated += 1
            if key not in cache:
                cache[key] = entry
            out.extend(entry.services)
            errors.extend(entry.errors)
        self._cache = cache
        self.translated = translated
        out.sort(key=lambda s: s.name)
        return Translation(tuple(out), tuple(errors))
