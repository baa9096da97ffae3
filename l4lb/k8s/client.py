"""The official ``kubernetes`` client, wrapped for asyncio: list pages and watch streams.

The client is synchronous (urllib3), so every request runs on a thread and results reach
the event loop through :meth:`asyncio.AbstractEventLoop.call_soon_threadsafe`. Responses are
read raw (``_preload_content=False``) and decoded with orjson into plain dicts shaped like
``kubectl get -o json`` output, which is what :mod:`l4lb.k8s.translate` consumes; building
the client's model objects would cost time and lose unknown fields.

Errors are reduced to two kinds the watcher acts on: :class:`Gone` (HTTP 410 or a watch
ERROR event with code 410: the resourceVersion is too old, relist) and :class:`KubeError`
(anything else: back off and retry). urllib3's own retries are turned off so an outage is
seen at once and handled by the watcher's backoff.
"""

from __future__ import annotations

import asyncio
import builtins
import logging
import os
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import orjson
import urllib3
from kubernetes import client as k8s_client
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException

__all__ = [
    "DEFAULT_LABEL_SELECTOR",
    "ENDPOINT_SLICES",
    "SERVICES",
    "Gone",
    "KubeClient",
    "KubeError",
    "ListResult",
    "Resource",
    "WatchEvent",
    "load_api_client",
]

log = logging.getLogger(__name__)

# kube-proxy's informer filter: objects another proxy owns, and headless services' slices.
DEFAULT_LABEL_SELECTOR = "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless"


@dataclass(frozen=True, slots=True)
class Resource:
    """A cluster-wide listable kind: the API class and its list-for-all-namespaces method."""

    kind: str
    api: str
    method: str


SERVICES = Resource("Service", "CoreV1Api", "list_service_for_all_namespaces")
ENDPOINT_SLICES = Resource(
    "EndpointSlice", "DiscoveryV1Api", "list_endpoint_slice_for_all_namespaces"
)


class KubeError(Exception):
    """The API server could not be reached or answered with an error."""


class Gone(KubeError):
    """HTTP 410: the requested resourceVersion is too old; the caller must relist."""


@dataclass(frozen=True, slots=True)
class ListResult:
    """All objects of one kind and the resourceVersion to watch from."""

    items: tuple[dict[str, Any], ...]
    resource_version: str


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """One watch event: ADDED, MODIFIED, DELETED or BOOKMARK, and its object."""

    type: str
    object: dict[str, Any]


def load_api_client(
    kubeconfig: str | None = None, *, context: str | None = None
) -> k8s_client.ApiClient:
    """Build an ApiClient from ``kubeconfig``, else in-cluster settings, else ~/.kube/config.

    Raise :class:`KubeError` when no usable configuration is found.
    """
    cfg = k8s_client.Configuration()
    try:
        if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
            k8s_config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
        else:
            k8s_config.load_kube_config(  # type: ignore[no-untyped-call]
                config_file=kubeconfig,
                context=context,
                client_configuration=cfg,
                persist_config=False,
            )
    except (ConfigException, OSError, ValueError, TypeError) as e:
        raise KubeError(f"cannot load Kubernetes client configuration: {e}") from e
    cfg.retries = 0
    return k8s_client.ApiClient(cfg)


def _api_error(e: Exception) -> KubeError:
    if isinstance(e, ApiException):
        reason = f"HTTP {e.status} {e.reason}"
        if e.status == 410:
            return Gone(reason)
        return KubeError(reason)
    if isinstance(e, orjson.JSONDecodeError):
        return KubeError(f"malformed response: {e}")
    return KubeError(f"{type(e).__name__}: {e}")


_ERRORS = (ApiException, urllib3.exceptions.HTTPError, OSError, orjson.JSONDecodeError)


class KubeClient:
    """List and watch calls on one ApiClient, usable from asyncio.

    1. Every blocking call runs on a thread; the loop is never blocked.
    2. A watch owns its response; closing the iterator shuts the connection down, which
       also unblocks the thread reading it.
    """

    def __init__(
        self,
        api_client: k8s_client.ApiClient,
        *,
        label_selector: str = DEFAULT_LABEL_SELECTOR,
        page_size: int = 500,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
    ) -> None:
        self._api_client = api_client
        self._label_selector = label_selector
        self._page_size = page_size
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout

    def _method(self, resource: Resource) -> Callable[..., Any]:
        api = getattr(k8s_client, resource.api)(self._api_client)
        method: Callable[..., Any] = getattr(api, resource.method)
        return method

    async def list(self, resource: Resource) -> ListResult:
        """List every object of ``resource``, following ``continue`` tokens."""
        return await asyncio.to_thread(self._list_sync, resource)

    def _list_sync(self, resource: Resource) -> ListResult:
        method = self._method(resource)
        items: list[dict[str, Any]] = []
        token: str | None = None
        for _ in range(1_000_000):  # bounded: a server repeating a token cannot trap us
            try:
                resp = method(
                    label_selector=self._label_selector,
                    limit=self._page_size,
                    _continue=token,
                    _preload_content=False,
                    _request_timeout=(self._connect_timeout, self._read_timeout),
                )
                try:
                    body = orjson.loads(resp.data)
                finally:
                    resp.release_conn()
            except _ERRORS as e:
                raise _api_error(e) from e
            if not isinstance(body, dict) or not isinstance(body.get("items"), list):
                raise KubeError(f"malformed {resource.kind} list: no items")
            meta = body.get("metadata") or {}
            items.extend(i for i in body["items"] if isinstance(i, dict))
            token = meta.get("continue") or None
            if token is None:
                rv = meta.get("resourceVersion")
                if not isinstance(rv, str) or not rv:
                    raise KubeError(f"malformed {resource.kind} list: no resourceVersion")
                return ListResult(tuple(items), rv)
        raise KubeError(f"{resource.kind} list did not end")

    async def watch(
        self, resource: Resource, resource_version: str, *, timeout_seconds: int = 300
    ) -> AsyncIterator[WatchEvent]:
        """Yield events after ``resource_version`` until the server ends the stream.

        Raise :class:`Gone` on 410 (HTTP status or ERROR event) and :class:`KubeError` on any
        other failure, including a line that is not a JSON watch event.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[WatchEvent | BaseException | None] = asyncio.Queue()
        stop = threading.Event()
        holder: list[Any] = []

        def put(item: WatchEvent | BaseException | None) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:
                stop.set()  # the loop is closed; nobody is listening any more

        def run() -> None:
            try:
                self._watch_sync(resource, resource_version, timeout_seconds, put, stop, holder)
                put(None)
            except BaseException as e:
                put(e)

        thread = threading.Thread(target=run, name=f"k8s-watch-{resource.kind}", daemon=True)
        thread.start()
        try:
            while True:
                item = await queue.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            for resp in holder:
                _shutdown(resp)

    def _watch_sync(
        self,
        resource: Resource,
        resource_version: str,
        timeout_seconds: int,
        put: Callable[[WatchEvent | BaseException | None], None],
        stop: threading.Event,
        holder: builtins.list[Any],
    ) -> None:
        method = self._method(resource)
        try:
            resp = method(
                label_selector=self._label_selector,
                watch=True,
                allow_watch_bookmarks=True,
                resource_version=resource_version,
                timeout_seconds=timeout_seconds,
                _preload_content=False,
                # A quiet watch is normal until the server ends it; only silence past that
                # point means the connection is dead.
                _request_timeout=(self._connect_timeout, timeout_seconds + self._read_timeout),
            )
        except _ERRORS as e:
            raise _api_error(e) from e
        holder.append(resp)
        if stop.is_set():
            _shutdown(resp)
            return
        try:
            buf = b""
            for chunk in resp.stream():
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    if stop.is_set():
                        return
                    if line.strip():
                        put(_event(line))
            if buf.strip() and not stop.is_set():
                put(_event(buf))
        except Exception as e:
            if stop.is_set():
                return  # closed under our feet on purpose; whatever broke does not matter
            if isinstance(e, _ERRORS):
                raise _api_error(e) from e
            raise
        finally:
            _shutdown(resp)


def _shutdown(resp: Any) -> None:
    """Close a streaming response, unblocking a thread that is reading it.

    The connection is never returned to the pool: its stream is unfinished.
    """
    if getattr(resp, "_l4lb_closed", False):
        return
    resp._l4lb_closed = True
    for step in ("shutdown", "close"):
        try:
            getattr(resp, step)()
        except Exception:  # a broken connection may refuse; it is gone either way
            log.debug("watch response %s failed", step, exc_info=True)


def _event(line: bytes) -> WatchEvent:
    try:
        data = orjson.loads(line)
    except orjson.JSONDecodeError as e:
        raise KubeError(f"malformed watch line {line[:80]!r}") from e
    if not isinstance(data, dict) or not isinstance(data.get("object"), dict):
        raise KubeError(f"malformed watch event {line[:80]!r}")
    kind = data.get("type")
    obj = data["object"]
    if kind == "ERROR":
        code = obj.get("code")
        message = f"watch error {code}: {obj.get('reason', '')} {obj.get('message', '')}".strip()
        raise Gone(message) if code == 410 else KubeError(message)
    if kind not in ("ADDED", "MODIFIED", "DELETED", "BOOKMARK"):
        raise KubeError(f"unknown watch event type {kind!r}")
    return WatchEvent(kind, obj)
