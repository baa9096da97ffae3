"""HTTP admin API: health, Prometheus metrics, service state and backend changes.

Handlers stay thin: they validate input, make one quick synchronous controller call and
serialise the answer. Every error leaves as JSON ``{"error": "..."}``.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import orjson
from aiohttp import web
from prometheus_client.exposition import generate_latest

from l4lb.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from l4lb.metrics import make_registry

__all__ = ["OPENAPI", "AdminServer", "Controller", "make_app"]

log = logging.getLogger(__name__)

MAX_WEIGHT = 65535
_BODY_LIMIT = 64 * 1024
_UPDATE_FIELDS = frozenset({"weight", "drain"})

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Controller(Protocol):
    """What the admin API needs from the running load balancer."""

    def snapshot(self) -> dict[str, Any]:
        """Return the whole state and counters, taken at one instant."""
        ...

    def set_backend(
        self,
        service: str,
        address: str,
        *,
        weight: int | None = None,
        drain: bool | None = None,
    ) -> dict[str, Any]:
        """Change one backend; raise LookupError if unknown, ValueError for a bad value."""
        ...

    def is_serving(self) -> bool:
        """Return True while the data plane runs and shutdown has not started."""
        ...


class AdminServer:
    """The admin API bound to ``host:port`` (port 0 picks a free port, see :attr:`port`)."""

    def __init__(
        self, controller: Controller, host: str, port: int, *, token: str | None = None
    ) -> None:
        self._app = make_app(controller, token=token)
        self._host = host
        self._requested_port = port
        self._runner: web.AppRunner | None = None

    @property
    def port(self) -> int:
        """The port actually bound; only valid after :meth:`start`."""
        if self._runner is None or not self._runner.addresses:
            raise RuntimeError("admin server is not started")
        return int(self._runner.addresses[0][1])

    async def start(self) -> None:
        """Bind the listening socket and start serving."""
        if self._runner is not None:
            raise RuntimeError("admin server already started")
        runner = web.AppRunner(self._app, shutdown_timeout=5.0)
        await runner.setup()
        try:
            await web.TCPSite(runner, self._host, self._requested_port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        log.debug("admin API listening on %s port %d", self._host, self.port)

    async def close(self) -> None:
        """Stop serving and release the socket; safe to call more than once."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> AdminServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


def make_app(controller: Controller, *, token: str | None = None) -> web.Application:
    """Build the aiohttp application serving the admin routes for ``controller``."""
    api = _Api(controller, token)
    app = web.Application(client_max_size=_BODY_LIMIT, middlewares=[_json_errors])
    app.add_routes(
        [
            web.get("/healthz", api.healthz),
            web.get("/metrics", api.metrics),
            web.get("/api/v1/openapi.json", api.openapi),
            web.get("/api/v1/services", api.services),
            web.get("/api/v1/services/{name}", api.service),
            web.post("/api/v1/services/{name}/backends/{address}", api.update_backend),
        ]
    )
    return app


class _Api:
    def __init__(self, controller: Controller, token: str | None) -> None:
        self._controller = controller
        self._token = token.encode() if token else None
        self._registry = make_registry(controller.snapshot)

    async def healthz(self, request: web.Request) -> web.Response:
        if self._controller.is_serving():
            return web.Response(text="ok\n")
        return web.Response(status=503, text="not serving\n")

    async def metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self._registry)
        return web.Response(body=body, headers={"Content-Type": METRICS_CONTENT_TYPE})

    async def openapi(self, request: web.Request) -> web.Response:
        return _json(OPENAPI)

    async def services(self, request: web.Request) -> web.Response:
        return _json({"services": self._controller.snapshot()["services"]})

    async def service(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        for service in self._controller.snapshot()["services"]:
            if service["name"] == name:
                return _json(service)
        return _error(404, f"unknown service {name!r}")

    async def update_backend(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return _error(
                401,
                "missing or invalid bearer token",
                headers={"WWW-Authenticate": 'Bearer realm="l4lb"'},
            )
        changes = _parse_update(await request.read())
        if isinstance(changes, str):
            return _error(400, changes)
        name = request.match_info["name"]
        address = request.match_info["address"]
        try:
            backend = self._controller.set_backend(name, address, **changes)
        except LookupError as exc:
            return _error(404, _exc_message(exc))
        except ValueError as exc:
            return _error(400, _exc_message(exc))
        log.info("backend %s of service %s changed: %s", address, name, changes)
        return _json(backend)

    def _authorized(self, request: web.Request) -> bool:
        if self._token is None:
            return True
        scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            return False
        # surrogatepass never fails, and cannot produce the UTF-8 of a valid token by accident.
        offered = credentials.strip().encode("utf-8", "surrogatepass")
        return hmac.compare_digest(offered, self._token)


def _parse_update(body: bytes) -> dict[str, Any] | str:
    """Return the keyword arguments for ``set_backend``, or an error message."""
    if not body.strip():
        return "request body is empty: expected a JSON object with 'weight' and/or 'drain'"
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        return f"request body is not valid JSON: {exc}"
    if not isinstance(doc, dict):
        return "request body must be a JSON object"
    unknown = sorted(doc.keys() - _UPDATE_FIELDS)
    if unknown:
        return f"unknown field(s) {', '.join(map(repr, unknown))}: allowed are 'weight', 'drain'"
    if not doc:
        return "request body must set 'weight' and/or 'drain'"
    if "weight" in doc:
        weight = doc["weight"]
        # bool is an int subclass, and true must not mean weight 1.
        if type(weight) is not int:
            return "'weight' must be an integer"
        if not 0 <= weight <= MAX_WEIGHT:
            return f"'weight' must be between 0 and {MAX_WEIGHT}, got {weight}"
    if "drain" in doc and not isinstance(doc["drain"], bool):
        return "'drain' must be true or false"
    return doc


@web.middleware
async def _json_errors(request: web.Request, handler: _Handler) -> web.StreamResponse:
    """Turn aiohttp's plain-text errors (404, 405, 413, ...) and crashes into JSON errors."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        message = exc.reason.lower()
        if exc.status == 404:
            message = f"no such resource: {request.path}"
        elif exc.status == 405:
            message = f"method {request.method} not allowed for {request.path}"
        elif exc.status == 413:
            message = f"request body larger than {_BODY_LIMIT} bytes"
        return _error(exc.status, message, headers=headers)
    except Exception:
        log.exception("admin API request %s %s failed", request.method, request.path)
        return _error(500, "internal error")


def _exc_message(exc: Exception) -> str:
    # str(KeyError("x")) is "'x'"; the argument itself reads better.
    if isinstance(exc, KeyError) and exc.args:
        return str(exc.args[0])
    return str(exc)


def _json(doc: Any, *, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=orjson.dumps(doc), status=status, content_type="application/json", headers=headers
    )


def _error(status: int, message: str, *, headers: dict[str, str] | None = None) -> web.Response:
    # Lone surrogates from odd request paths would make orjson refuse the message.
    safe = message.encode("utf-8", "backslashreplace").decode("utf-8")
    return _json({"error": safe}, status=status, headers=headers)


def _schema_ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json_content(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _error_response(description: str) -> dict[str, Any]:
    return {"description": description, "content": _json_content(_schema_ref("Error"))}


_COUNT = {"type": "integer", "minimum": 0}
_TEXT = {"text/plain": {"schema": {"type": "string"}}}

#: OpenAPI 3.0 description of the admin API, served at ``/api/v1/openapi.json``.
OPENAPI: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {"title": "l4lb admin API", "version": "1"},
    "paths": {
        "/healthz": {
            "get": {
                "summary": "Whether the load balancer is serving traffic",
                "operationId": "healthz",
                "responses": {
                    "200": {"description": "Serving", "content": _TEXT},
                    "503": {"description": "Starting or shutting down", "content": _TEXT},
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics (text exposition format 0.0.4)",
                "operationId": "metrics",
                "responses": {"200": {"description": "Metrics", "content": _TEXT}},
            }
        },
        "/api/v1/openapi.json": {
            "get": {
                "summary": "This description",
                "operationId": "openapi",
                "responses": {
                    "200": {
                        "description": "OpenAPI document",
                        "content": _json_content({"type": "object"}),
                    }
                },
            }
        },
        "/api/v1/services": {
            "get": {
                "summary": "All services with their backends and counters",
                "operationId": "listServices",
                "responses": {
                    "200": {
                        "description": "Services",
                        "content": _json_content(
                            {
                                "type": "object",
                                "required": ["services"],
                                "properties": {
                                    "services": {"type": "array", "items": _schema_ref("Service")}
                                },
                            }
                        ),
                    }
                },
            }
        },
        "/api/v1/services/{name}": {
            "parameters": [
                {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
            ],
            "get": {
                "summary": "One service",
                "operationId": "getService",
                "responses": {
                    "200": {
                        "description": "Service",
                        "content": _json_content(_schema_ref("Service")),
                    },
                    "404": _error_response("Unknown service"),
                },
            },
        },
        "/api/v1/services/{name}/backends/{address}": {
            "parameters": [
                {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}},
                {
                    "name": "address",
                    "in": "path",
                    "required": True,
                    "description": "Backend address as host:port or [v6]:port, URL-encoded",
                    "schema": {"type": "string"},
                },
            ],
            "post": {
                "summary": "Change a backend's weight or drain state",
                "operationId": "updateBackend",
                "security": [{"bearerAuth": []}],
                "requestBody": {
                    "required": True,
                    "content": _json_content(_schema_ref("BackendUpdate")),
                },
                "responses": {
                    "200": {
                        "description": "The updated backend",
                        "content": _json_content(_schema_ref("Backend")),
                    },
                    "400": _error_response("Malformed or invalid request body"),
                    "401": _error_response("Missing or wrong bearer token"),
                    "404": _error_response("Unknown service or backend"),
                    "413": _error_response("Request body too large"),
                },
            },
        },
    },
    "components": {
        "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer"}},
        "schemas": {
            "Error": {
                "type": "object",
                "required": ["error"],
                "properties": {"error": {"type": "string"}},
            },
            "BackendUpdate": {
                "type": "object",
                "minProperties": 1,
                "additionalProperties": False,
                "properties": {
                    "weight": {"type": "integer", "minimum": 0, "maximum": MAX_WEIGHT},
                    "drain": {"type": "boolean"},
                },
            },
            "Backend": {
                "type": "object",
                "required": [
                    "address",
                    "weight",
                    "effective_weight",
                    "drain",
                    "up",
                    "active",
                    "inactive",
                    "total",
                    "bytes_in",
                    "bytes_out",
                    "connect_errors",
                ],
                "properties": {
                    "address": {"type": "string"},
                    "weight": {"type": "integer", "minimum": 0, "maximum": MAX_WEIGHT},
                    "effective_weight": _COUNT,
                    "drain": {"type": "boolean"},
                    "up": {"type": "boolean"},
                    "active": _COUNT,
                    "inactive": _COUNT,
                    "total": _COUNT,
                    "bytes_in": _COUNT,
                    "bytes_out": _COUNT,
                    "connect_errors": _COUNT,
                    "overloaded": {"type": "boolean"},
                    "health": {
                        "description": "null when the service has no health checks",
                        "type": "object",
                        "nullable": True,
                        "properties": {
                            "state": {"type": "string"},
                            "reason": {"type": "string"},
                            "since": {"type": "number"},
                            "transitions": _COUNT,
                            "last_check": {"type": "object", "nullable": True},
                        },
                    },
                },
            },
            "Service": {
                "type": "object",
                "required": [
                    "name",
                    "listen",
                    "protocol",
                    "scheduler",
                    "affinity_timeout",
                    "active",
                    "total",
                    "bytes_in",
                    "bytes_out",
                    "rejected",
                    "limit_rejected",
                    "backends",
                ],
                "properties": {
                    "name": {"type": "string"},
                    "listen": {"type": "string"},
                    "protocol": {"type": "string"},
                    "scheduler": {"type": "string"},
                    "affinity_timeout": {"type": "number", "minimum": 0},
                    "active": _COUNT,
                    "total": _COUNT,
                    "bytes_in": _COUNT,
                    "bytes_out": _COUNT,
                    "rejected": _COUNT,
                    "limit_rejected": _COUNT,
                    "backends": {"type": "array", "items": _schema_ref("Backend")},
                },
            },
        },
    },
}
