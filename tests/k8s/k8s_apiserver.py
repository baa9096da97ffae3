"""A Kubernetes API-server double for Services and EndpointSlices, served over real HTTP.

It implements what a list-then-watch client relies on: a global resourceVersion, paged lists
with ``continue``, chunked watch streams that replay events after a version, bookmarks,
410 for compacted versions (as an ERROR event, like the real server, or as an HTTP status),
and bearer-token checks. Faults are injected by hand: drop every watch connection, write a
garbage line, split a line across slow writes, delay responses, fail requests with a status,
or stop and restart the whole server on the same port.
"""

from __future__ import annotations

import asyncio
import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

TOKEN = "l4lb-test-token"

PATHS = {
    "Service": "/api/v1/services",
    "EndpointSlice": "/apis/discovery.k8s.io/v1/endpointslices",
}
API_VERSIONS = {"Service": "v1", "EndpointSlice": "discovery.k8s.io/v1"}


@dataclass(eq=False)
class _Watch:
    kind: str
    bookmarks: bool
    queue: asyncio.Queue[tuple[str, Any]] = field(default_factory=asyncio.Queue)


@dataclass
class Request:
    """One request as the double saw it."""

    kind: str
    watch: bool
    query: dict[str, str]
    authorization: str | None


def _key(obj: dict[str, Any]) -> str:
    meta = obj["metadata"]
    return f"{meta['namespace']}/{meta['name']}"


class FakeApiServer:
    """The double; ``await start()``, mutate with add/modify/delete, ``await stop()``."""

    def __init__(self) -> None:
        self.rv = 100
        self.objects: dict[str, dict[str, dict[str, Any]]] = {k: {} for k in PATHS}
        self.log: list[tuple[int, str, str, dict[str, Any]]] = []  # rv, kind, type, object
        self.compacted = 0  # watches from a version below this get 410
        self.gone_as_http = False
        self.delay = 0.0
        self.fail_next: list[int] = []  # HTTP statuses for the next requests, in order
        self.requests: list[Request] = []
        self.port = 0
        self.host = "127.0.0.1"
        self.nodes: dict[str, dict[str, Any]] = {}  # name -> Node, served by GET only
        self._watches: set[_Watch] = set()
        self._runner: web.AppRunner | None = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self, host: str | None = None) -> None:
        """Serve on ``host`` (127.0.0.1); the first start picks a free port, restarts reuse it."""
        if host is not None:
            self.host = host
        app = web.Application()
        for kind, path in PATHS.items():
            app.router.add_get(path, self._handler(kind))
        app.router.add_get("/api/v1/nodes/{name}", self._get_node)
        self._runner = web.AppRunner(app, shutdown_timeout=1.0, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        """Close every connection and stop listening (the API server is down)."""
        self.drop_watches()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def write_kubeconfig(self, path: Path) -> Path:
        """A kubeconfig pointing at this server with a bearer token (JSON is valid YAML)."""
        cfg = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "double", "cluster": {"server": self.url}}],
            "users": [{"name": "proxy", "user": {"token": TOKEN}}],
            "contexts": [{"name": "double", "context": {"cluster": "double", "user": "proxy"}}],
            "current-context": "double",
        }
        path.write_text(json.dumps(cfg, indent=2))
        return path

    # ------------------------------------------------------------------ objects

    def _bump(self, obj: dict[str, Any]) -> dict[str, Any]:
        self.rv += 1
        obj = copy.deepcopy(obj)
        obj.setdefault("metadata", {})["resourceVersion"] = str(self.rv)
        return obj

    def _event(self, kind: str, type_: str, obj: dict[str, Any]) -> None:
        self.log.append((self.rv, kind, type_, obj))
        line = orjson.dumps({"type": type_, "object": obj}) + b"\n"
        for w in list(self._watches):
            if w.kind == kind:
                w.queue.put_nowait(("event", (self.rv, line)))

    def add(self, kind: str, obj: dict[str, Any], *, silent: bool = False) -> dict[str, Any]:
        """Create or replace an object; ``silent`` changes state without a watch event."""
        obj = self._bump(obj)
        type_ = "MODIFIED" if _key(obj) in self.objects[kind] else "ADDED"
        self.objects[kind][_key(obj)] = obj
        if not silent:
            self._event(kind, type_, obj)
        return obj

    def delete(self, kind: str, key: str, *, silent: bool = False) -> None:
        """Delete an object by ``namespace/name``."""
        obj = self._bump(self.objects[kind].pop(key))
        if not silent:
            self._event(kind, "DELETED", obj)

    def compact(self) -> None:
        """Forget history: every watch from an older version now gets 410 Gone."""
        self.compacted = self.rv + 1
        self.log.clear()

    # ------------------------------------------------------------------ faults

    def bookmark(self, kind: str) -> int:
        """Send a BOOKMARK at a new version to watches that asked for bookmarks."""
        self.rv += 1
        obj = {
            "kind": kind,
            "apiVersion": API_VERSIONS[kind],
            "metadata": {"resourceVersion": str(self.rv)},
        }
        line = orjson.dumps({"type": "BOOKMARK", "object": obj}) + b"\n"
        for w in list(self._watches):
            if w.kind == kind and w.bookmarks:
                w.queue.put_nowait(("raw", line))
        return self.rv

    def send_raw(self, kind: str, data: bytes, *, split: bool = False) -> None:
        """Write bytes to every watch of ``kind``; ``split`` writes them in two slow halves."""
        for w in list(self._watches):
            if w.kind == kind:
                w.queue.put_nowait(("split" if split else "raw", data))

    def drop_watches(self) -> None:
        """Cut every open watch connection without a proper end of stream."""
        for w in list(self._watches):
            w.queue.put_nowait(("drop", None))

    @property
    def open_watches(self) -> int:
        return len(self._watches)

    # ------------------------------------------------------------------ HTTP

    def _handler(self, kind: str) -> Any:
        async def handle(request: web.Request) -> web.StreamResponse:
            watch = request.query.get("watch") in ("true", "1", "True")
            self.requests.append(
                Request(kind, watch, dict(request.query), request.headers.get("Authorization"))
            )
            if self.delay:
                await asyncio.sleep(self.delay)
            if request.headers.get("Authorization") != f"Bearer {TOKEN}":
                return self._status(401, "Unauthorized", "no or wrong token")
            if self.fail_next:
                return self._status(self.fail_next.pop(0), "InternalError", "injected failure")
            if watch:
                return await self._watch(kind, request)
            return self._list(kind, request)

        return handle

    async def _get_node(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        self.requests.append(
            Request("Node", False, dict(request.query), request.headers.get("Authorization"))
        )
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return self._status(401, "Unauthorized", "no or wrong token")
        node = self.nodes.get(name)
        if node is None:
            return self._status(404, "NotFound", f'nodes "{name}" not found')
        body = {"kind": "Node", "apiVersion": "v1", **node}
        return web.Response(body=orjson.dumps(body), content_type="application/json")

    @staticmethod
    def _status(code: int, reason: str, message: str) -> web.Response:
        body = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": reason,
            "code": code,
        }
        return web.json_response(body, status=code)

    def _list(self, kind: str, request: web.Request) -> web.Response:
        items = [self.objects[kind][k] for k in sorted(self.objects[kind])]
        limit = int(request.query.get("limit") or 0)
        start = int(request.query.get("continue") or 0)
        meta: dict[str, Any] = {"resourceVersion": str(self.rv)}
        if limit and start + limit < len(items):
            meta["continue"] = str(start + limit)
        page = items[start : start + limit] if limit else items
        body = {
            "kind": f"{kind}List",
            "apiVersion": API_VERSIONS[kind],
            "metadata": meta,
            "items": [
                {k: v for k, v in o.items() if k not in ("kind", "apiVersion")} for o in page
            ],
        }
        return web.Response(body=orjson.dumps(body), content_type="application/json")

    async def _watch(self, kind: str, request: web.Request) -> web.StreamResponse:
        since = int(request.query.get("resourceVersion") or 0)
        if since < self.compacted and self.gone_as_http:
            return self._status(410, "Expired", f"too old resource version: {since}")
        w = _Watch(kind, request.query.get("allowWatchBookmarks") == "true")
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        if since < self.compacted:
            gone = {
                "type": "ERROR",
                "object": {
                    "kind": "Status",
                    "apiVersion": "v1",
                    "metadata": {},
                    "status": "Failure",
                    "message": f"too old resource version: {since} ({self.compacted})",
                    "reason": "Expired",
                    "code": 410,
                },
            }
            await resp.write(orjson.dumps(gone) + b"\n")
            await resp.write_eof()
            return resp
        self._watches.add(w)
        sent = since
        try:
            for rv, k, type_, obj in list(self.log):
                if k == kind and rv > sent:
                    await resp.write(orjson.dumps({"type": type_, "object": obj}) + b"\n")
                    sent = rv
            timeout = float(request.query.get("timeoutSeconds") or 30)
            async with asyncio.timeout(timeout):
                while True:
                    what, data = await w.queue.get()
                    if what == "drop":
                        if request.transport is not None:
                            request.transport.abort()
                        return resp
                    if what == "event":
                        rv, line = data
                        if rv > sent:
                            await resp.write(line)
                            sent = rv
                    elif what == "split":
                        half = len(data) // 2
                        await resp.write(data[:half])
                        await asyncio.sleep(0.2)
                        await resp.write(data[half:])
                    else:
                        await resp.write(data)
        except TimeoutError:
            pass
        except ConnectionResetError:
            return resp
        finally:
            self._watches.discard(w)
        await resp.write_eof()
        return resp
