"""Tests for l4lb.admin: every route, every error path, bearer-token handling."""

from __future__ import annotations

import copy
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import orjson
import pytest
import yarl
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.parser import text_string_to_metric_families

from l4lb.admin import OPENAPI, AdminServer, make_app

TOKEN = "s3cret-t0ken"

SNAPSHOT: dict[str, Any] = {
    "version": "0.1.0",
    "uptime": 12.5,
    "dataplane": {
        "workers": 2,
        "pipes_used": 4,
        "pipes_free": 60,
        "accept_errors": 1,
        "connections_active": 3,
        "fd_limit": 1048576,
    },
    "services": [
        {
            "name": "web",
            "listen": "127.0.0.1:8080",
            "protocol": "tcp",
            "scheduler": "wrr",
            "affinity_timeout": 0.0,
            "active": 3,
            "total": 120,
            "bytes_in": 1000,
            "bytes_out": 5000,
            "rejected": 2,
            "limit_rejected": 0,
            "backends": [
                {
                    "address": "[::1]:9002",
                    "weight": 2,
                    "effective_weight": 2,
                    "drain": False,
                    "up": True,
                    "active": 1,
                    "inactive": 0,
                    "total": 60,
                    "bytes_in": 500,
                    "bytes_out": 2500,
                    "connect_errors": 0,
                },
                {
                    "address": "127.0.0.1:9001",
                    "weight": 1,
                    "effective_weight": 1,
                    "drain": False,
                    "up": True,
                    "active": 2,
                    "inactive": 1,
                    "total": 60,
                    "bytes_in": 500,
                    "bytes_out": 2500,
                    "connect_errors": 3,
                },
            ],
        },
        {
            "name": "dns",
            "listen": "127.0.0.1:5353",
            "protocol": "udp",
            "scheduler": "sh",
            "affinity_timeout": 300.0,
            "active": 0,
            "total": 7,
            "bytes_in": 70,
            "bytes_out": 140,
            "rejected": 0,
            "limit_rejected": 0,
            "backends": [],
        },
    ],
}


class FakeController:
    """Controller double: serves a copy of SNAPSHOT and applies backend changes to it."""

    def __init__(self) -> None:
        self.state = copy.deepcopy(SNAPSHOT)
        self.serving = True
        self.reject: str | None = None
        self.calls: list[tuple[str, str, int | None, bool | None]] = []

    def snapshot(self) -> dict[str, Any]:
        return copy.deepcopy(self.state)

    def is_serving(self) -> bool:
        return self.serving

    def set_backend(
        self, service: str, address: str, *, weight: int | None = None, drain: bool | None = None
    ) -> dict[str, Any]:
        self.calls.append((service, address, weight, drain))
        svc = next((s for s in self.state["services"] if s["name"] == service), None)
        if svc is None:
            raise LookupError(f"unknown service {service!r}")
        backend = next((b for b in svc["backends"] if b["address"] == address), None)
        if backend is None:
            raise KeyError(f"service {service!r} has no backend {address!r}")
        if self.reject is not None:
            raise ValueError(self.reject)
        if weight is not None:
            backend["weight"] = backend["effective_weight"] = weight
        if drain is not None:
            backend["drain"] = drain
        return copy.deepcopy(backend)


ServerFactory = Callable[..., Awaitable[AdminServer]]


@pytest.fixture
def controller() -> FakeController:
    return FakeController()


@pytest.fixture
async def make_server(controller: FakeController) -> AsyncIterator[ServerFactory]:
    servers: list[AdminServer] = []

    async def factory(*, token: str | None = None, host: str = "127.0.0.1") -> AdminServer:
        server = AdminServer(controller, host, 0, token=token)
        await server.start()
        servers.append(server)
        return server

    yield factory
    for server in servers:
        await server.close()


@pytest.fixture
async def server(make_server: ServerFactory) -> AdminServer:
    return await make_server()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


def url(server: AdminServer, path: str, host: str = "127.0.0.1") -> yarl.URL:
    # encoded=True: send the path exactly as written, percent escapes included.
    return yarl.URL(f"http://{host}:{server.port}{path}", encoded=True)


def backend_path(address: str, service: str = "web") -> str:
    return f"/api/v1/services/{service}/backends/{address}"


async def json_of(response: aiohttp.ClientResponse) -> Any:
    assert response.content_type == "application/json"
    return orjson.loads(await response.read())


# --- lifecycle --------------------------------------------------------------------------


async def test_port_is_the_bound_port(server: AdminServer) -> None:
    assert server.port > 0
    with socket.create_connection(("127.0.0.1", server.port), timeout=5):
        pass


async def test_port_before_start_raises(controller: FakeController) -> None:
    with pytest.raises(RuntimeError, match="not started"):
        _ = AdminServer(controller, "127.0.0.1", 0).port


async def test_close_is_idempotent_and_frees_the_port(controller: FakeController) -> None:
    server = AdminServer(controller, "127.0.0.1", 0)
    await server.start()
    port = server.port
    await server.close()
    await server.close()
    with (
        pytest.raises(ConnectionRefusedError),
        socket.create_connection(("127.0.0.1", port), timeout=5),
    ):
        pass


async def test_async_context_manager(
    controller: FakeController, session: aiohttp.ClientSession
) -> None:
    async with AdminServer(controller, "127.0.0.1", 0) as server:
        assert server.port > 0
        async with session.get(url(server, "/healthz")) as response:
            assert response.status == 200
    with pytest.raises(RuntimeError):
        _ = server.port


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback")
async def test_ipv6_host(make_server: ServerFactory, session: aiohttp.ClientSession) -> None:
    server = await make_server(host="::1")
    async with session.get(url(server, "/healthz", host="[::1]")) as response:
        assert response.status == 200
        assert await response.text() == "ok\n"


# --- health and metrics -----------------------------------------------------------------


async def test_healthz_serving(server: AdminServer, session: aiohttp.ClientSession) -> None:
    async with session.get(url(server, "/healthz")) as response:
        assert response.status == 200
        assert response.content_type == "text/plain"
        assert await response.text() == "ok\n"


async def test_healthz_not_serving(
    server: AdminServer, controller: FakeController, session: aiohttp.ClientSession
) -> None:
    controller.serving = False
    async with session.get(url(server, "/healthz")) as response:
        assert response.status == 503
        assert await response.text() == "not serving\n"


async def test_head_healthz(server: AdminServer, session: aiohttp.ClientSession) -> None:
    async with session.head(url(server, "/healthz")) as response:
        assert response.status == 200


async def test_metrics(
    server: AdminServer, controller: FakeController, session: aiohttp.ClientSession
) -> None:
    async with session.get(url(server, "/metrics")) as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == CONTENT_TYPE_PLAIN_0_0_4
        text = await response.text()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    key = (("backend", "127.0.0.1:9001"), ("service", "web"))
    assert samples[("l4lb_backend_connect_errors_total", key)] == 3
    assert samples[("l4lb_workers", ())] == 2

    # Every scrape reads a fresh snapshot.
    controller.state["dataplane"]["workers"] = 5
    async with session.get(url(server, "/metrics")) as response:
        assert "\nl4lb_workers 5.0\n" in await response.text()


# --- reading services -------------------------------------------------------------------


async def test_list_services(server: AdminServer, session: aiohttp.ClientSession) -> None:
    async with session.get(url(server, "/api/v1/services")) as response:
        assert response.status == 200
        assert await json_of(response) == {"services": SNAPSHOT["services"]}


async def test_get_one_service(server: AdminServer, session: aiohttp.ClientSession) -> None:
    async with session.get(url(server, "/api/v1/services/dns")) as response:
        assert response.status == 200
        assert await json_of(response) == SNAPSHOT["services"][1]


async def test_get_unknown_service(server: AdminServer, session: aiohttp.ClientSession) -> None:
    async with session.get(url(server, "/api/v1/services/nope")) as response:
        assert response.status == 404
        assert await json_of(response) == {"error": "unknown service 'nope'"}


# --- changing backends ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "weight", "drain"),
    [
        ({"weight": 7}, 7, None),
        ({"weight": 0}, 0, None),
        ({"weight": 65535}, 65535, None),
        ({"drain": True}, None, True),
        ({"drain": False}, None, False),
        ({"weight": 3, "drain": True}, 3, True),
    ],
)
async def test_update_backend(
    server: AdminServer,
    controller: FakeController,
    session: aiohttp.ClientSession,
    body: dict[str, Any],
    weight: int | None,
    drain: bool | None,
) -> None:
    async with session.post(
        url(server, backend_path("127.0.0.1:9001")), data=orjson.dumps(body)
    ) as response:
        assert response.status == 200
        backend = await json_of(response)
    assert controller.calls == [("web", "127.0.0.1:9001", weight, drain)]
    assert backend["address"] == "127.0.0.1:9001"
    assert backend["weight"] == (1 if weight is None else weight)
    assert backend["drain"] is (False if drain is None else drain)


@pytest.mark.parametrize(
    ("encoded", "address"),
    [
        ("127.0.0.1%3A9001", "127.0.0.1:9001"),
        ("%5B%3A%3A1%5D%3A9002", "[::1]:9002"),
        ("%5b%3a%3a1%5d%3a9002", "[::1]:9002"),
    ],
)
async def test_url_encoded_address(
    server: AdminServer,
    controller: FakeController,
    session: aiohttp.ClientSession,
    encoded: str,
    address: str,
) -> None:
    async with session.post(url(server, backend_path(encoded)), data=b'{"drain": true}') as resp:
        assert resp.status == 200
        assert (await json_of(resp))["address"] == address
    assert controller.calls == [("web", address, None, True)]
    assert next(b for b in controller.state["services"][0]["backends"] if b["address"] == address)[
        "drain"
    ]


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"", "empty"),
        (b"  \n", "empty"),
        (b"{", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b"[]", "JSON object"),
        (b"5", "JSON object"),
        (b'"weight"', "JSON object"),
        (b"{}", "'weight' and/or 'drain'"),
        (b'{"wieght": 1}', "unknown field(s) 'wieght'"),
        (b'{"weight": 1, "up": false}', "unknown field(s) 'up'"),
        (b'{"weight": true}', "'weight' must be an integer"),
        (b'{"weight": "5"}', "'weight' must be an integer"),
        (b'{"weight": 1.0}', "'weight' must be an integer"),
        (b'{"weight": null}', "'weight' must be an integer"),
        (b'{"weight": -1}', "'weight' must be between 0 and 65535"),
        (b'{"weight": 65536}', "'weight' must be between 0 and 65535"),
        (b'{"weight": 100000000000000000000}', "'weight' must be an integer"),
        (b'{"drain": 1}', "'drain' must be true or false"),
        (b'{"drain": "yes"}', "'drain' must be true or false"),
        (b'{"drain": null}', "'drain' must be true or false"),
    ],
)
async def test_update_backend_bad_body(
    server: AdminServer,
    controller: FakeController,
    session: aiohttp.ClientSession,
    body: bytes,
    fragment: str,
) -> None:
    async with session.post(url(server, backend_path("127.0.0.1:9001")), data=body) as response:
        assert response.status == 400
        error = (await json_of(response))["error"]
    assert fragment in error
    assert "Traceback" not in error
    assert controller.calls == []


async def test_update_backend_controller_rejects_value(
    server: AdminServer, controller: FakeController, session: aiohttp.ClientSession
) -> None:
    controller.reject = "scheduler rr ignores weights"
    async with session.post(
        url(server, backend_path("127.0.0.1:9001")), data=b'{"weight": 4}'
    ) as response:
        assert response.status == 400
        assert await json_of(response) == {"error": "scheduler rr ignores weights"}


@pytest.mark.parametrize(
    ("path", "message"),
    [
        (backend_path("127.0.0.1:9001", service="nope"), "unknown service 'nope'"),
        # A KeyError's message comes out without the extra quotes str(KeyError) adds.
        (backend_path("127.0.0.1:9999"), "service 'web' has no backend '127.0.0.1:9999'"),
    ],
)
async def test_update_unknown_target(
    server: AdminServer, session: aiohttp.ClientSession, path: str, message: str
) -> None:
    async with session.post(url(server, path), data=b'{"weight": 4}') as response:
        assert response.status == 404
        assert await json_of(response) == {"error": message}


async def test_update_body_too_large(
    server: AdminServer, controller: FakeController, session: aiohttp.ClientSession
) -> None:
    body = b'{"weight": 1, "pad": "' + b"x" * 100_000 + b'"}'
    async with session.post(url(server, backend_path("127.0.0.1:9001")), data=body) as response:
        assert response.status == 413
        assert "larger than" in (await json_of(response))["error"]
    assert controller.calls == []


# --- routing errors ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "path", ["/", "/nope", "/api/v1/services/web/backends", "/api/v2/services", "/healthz/x"]
)
async def test_unknown_path(server: AdminServer, session: aiohttp.ClientSession, path: str) -> None:
    async with session.get(url(server, path)) as response:
        assert response.status == 404
        assert (await json_of(response))["error"] == f"no such resource: {path}"


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("POST", "/healthz", {"GET", "HEAD"}),
        ("DELETE", "/api/v1/services", {"GET", "HEAD"}),
        ("PUT", "/api/v1/services/web", {"GET", "HEAD"}),
        ("GET", backend_path("127.0.0.1%3A9001"), {"POST"}),
        ("PATCH", backend_path("127.0.0.1%3A9001"), {"POST"}),
    ],
)
async def test_wrong_method(
    server: AdminServer,
    controller: FakeController,
    session: aiohttp.ClientSession,
    method: str,
    path: str,
    allowed: set[str],
) -> None:
    async with session.request(method, url(server, path), data=b'{"weight": 1}') as response:
        assert response.status == 405
        assert set(response.headers["Allow"].split(",")) == allowed
        assert f"method {method} not allowed" in (await json_of(response))["error"]
    assert controller.calls == []


async def test_controller_crash_is_a_json_500(
    server: AdminServer,
    controller: FakeController,
    session: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken() -> dict[str, Any]:
        raise RuntimeError("snapshot exploded")

    controller.snapshot = broken  # type: ignore[method-assign]
    with caplog.at_level(logging.ERROR, logger="l4lb.admin"):
        async with session.get(url(server, "/api/v1/services")) as response:
            assert response.status == 500
            assert await json_of(response) == {"error": "internal error"}
    assert any(r.exc_info for r in caplog.records), "the crash must be logged"


# --- bearer token -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": ""},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer "},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": f"Bearer {TOKEN[:-1]}"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": TOKEN},
    ],
)
async def test_token_required(
    make_server: ServerFactory,
    controller: FakeController,
    session: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
    headers: dict[str, str],
) -> None:
    server = await make_server(token=TOKEN)
    with caplog.at_level(logging.DEBUG):
        async with session.post(
            url(server, backend_path("127.0.0.1:9001")), data=b'{"weight": 9}', headers=headers
        ) as response:
            assert response.status == 401
            assert response.headers["WWW-Authenticate"].startswith("Bearer")
            body = await response.read()
    assert orjson.loads(body) == {"error": "missing or invalid bearer token"}
    assert TOKEN.encode() not in body
    assert all(TOKEN not in record.getMessage() for record in caplog.records)
    assert controller.calls == []


async def test_token_checked_before_the_target(
    make_server: ServerFactory, session: aiohttp.ClientSession
) -> None:
    # An unauthenticated client must not learn which services exist.
    server = await make_server(token=TOKEN)
    async with session.post(
        url(server, backend_path("x:1", service="nope")), data=b'{"weight": 1}'
    ) as response:
        assert response.status == 401


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
async def test_token_accepted(
    make_server: ServerFactory,
    controller: FakeController,
    session: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
    scheme: str,
) -> None:
    server = await make_server(token=TOKEN)
    with caplog.at_level(logging.DEBUG):
        async with session.post(
            url(server, backend_path("127.0.0.1:9001")),
            data=b'{"weight": 9}',
            headers={"Authorization": f"{scheme} {TOKEN}"},
        ) as response:
            assert response.status == 200
            assert (await json_of(response))["weight"] == 9
    assert controller.calls == [("web", "127.0.0.1:9001", 9, None)]
    assert all(TOKEN not in record.getMessage() for record in caplog.records)


async def test_token_not_needed_for_reads(
    make_server: ServerFactory, session: aiohttp.ClientSession
) -> None:
    server = await make_server(token=TOKEN)
    for path in ("/healthz", "/metrics", "/api/v1/services", "/api/v1/services/web"):
        async with session.get(url(server, path)) as response:
            assert response.status == 200, path


async def test_no_token_configured_allows_posts(
    server: AdminServer, session: aiohttp.ClientSession
) -> None:
    async with session.post(
        url(server, backend_path("127.0.0.1:9001")),
        data=b'{"drain": true}',
        headers={"Authorization": "Bearer anything"},
    ) as response:
        assert response.status == 200


# --- OpenAPI description ----------------------------------------------------------------


async def test_openapi_served(server: AdminServer, session: aiohttp.ClientSession) -> None:
    async with session.get(url(server, "/api/v1/openapi.json")) as response:
        assert response.status == 200
        assert await json_of(response) == OPENAPI


def test_openapi_documents_every_route(controller: FakeController) -> None:
    app = make_app(controller)
    routes = {
        (resource.canonical, route.method.lower())
        for resource in app.router.resources()
        for route in resource
        if route.method != "HEAD"
    }
    documented = {
        (path, method)
        for path, item in OPENAPI["paths"].items()
        for method in item
        if method != "parameters"
    }
    assert documented == routes


def test_openapi_is_valid() -> None:
    validator = pytest.importorskip("openapi_spec_validator")
    validator.validate(OPENAPI)


def _validate(instance: Any, component: str) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = {"$ref": f"#/components/schemas/{component}", "components": OPENAPI["components"]}
    jsonschema.Draft4Validator(schema).validate(instance)


def test_openapi_schemas_match_the_snapshot() -> None:
    for service in SNAPSHOT["services"]:
        _validate(service, "Service")
    _validate({"error": "x"}, "Error")
    _validate({"weight": 3, "drain": True}, "BackendUpdate")


@pytest.mark.parametrize("body", [{}, {"weight": 70000}, {"weight": True}, {"other": 1}])
def test_openapi_update_schema_rejects_what_the_server_rejects(body: dict[str, Any]) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    with pytest.raises(jsonschema.ValidationError):
        _validate(body, "BackendUpdate")
