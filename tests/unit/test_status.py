"""Tests for l4lb.status: the table, fetching from a real admin API, and failures."""

from __future__ import annotations

import asyncio
import copy
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import orjson
import pytest
from aiohttp import web

from l4lb import status
from l4lb.admin import AdminServer
from l4lb.status import StatusError, fetch_services, render_table


def backend(
    address: str,
    counts: tuple[int, int, int, int, int, int],
    *,
    drain: bool = False,
    up: bool = True,
) -> dict[str, Any]:
    weight, active, inactive, total, bytes_in, bytes_out = counts
    return {
        "address": address,
        "weight": weight,
        "effective_weight": 0 if drain or not up else weight,
        "drain": drain,
        "up": up,
        "active": active,
        "inactive": inactive,
        "total": total,
        "bytes_in": bytes_in,
        "bytes_out": bytes_out,
        "connect_errors": 0,
    }


def service(
    name: str, listen: str, protocol: str, scheduler: str, affinity: float, backends: list[Any]
) -> dict[str, Any]:
    return {
        "name": name,
        "listen": listen,
        "protocol": protocol,
        "scheduler": scheduler,
        "affinity_timeout": affinity,
        "active": sum(b["active"] for b in backends),
        "total": sum(b["total"] for b in backends),
        "bytes_in": sum(b["bytes_in"] for b in backends),
        "bytes_out": sum(b["bytes_out"] for b in backends),
        "rejected": 0,
        "limit_rejected": 0,
        "backends": backends,
    }


DOC: dict[str, Any] = {
    "services": [
        service(
            "web",
            "127.0.0.1:8080",
            "tcp",
            "wrr",
            0.0,
            [
                backend("[::1]:9002", (2, 1, 0, 60, 500, 2500)),
                backend("127.0.0.1:9001", (1, 12, 3, 1234, 567890, 12345678), drain=True, up=False),
            ],
        ),
        service(
            "dns",
            "127.0.0.1:5353",
            "udp",
            "sh",
            300.0,
            [backend("127.0.0.2:53", (65535, 0, 0, 0, 0, 0), up=False)],
        ),
        service("v6", "[::1]:80", "tcp", "rr", 2.5, []),
    ]
}

TABLE_STATS = """\
Prot LocalAddress:Port Scheduler Flags
  -> RemoteAddress:Port Weight ActiveConn InActConn Conns InBytes OutBytes
TCP  127.0.0.1:8080 wrr
  -> [::1]:9002              2          1         0    60     500     2500
  -> 127.0.0.1:9001          1         12         3  1234  567890 12345678 DRAIN DOWN
UDP  127.0.0.1:5353 sh persistent 300
  -> 127.0.0.2:53        65535          0         0     0       0        0 DOWN
TCP  [::1]:80 rr persistent 2.5
"""

TABLE_PLAIN = """\
Prot LocalAddress:Port Scheduler Flags
  -> RemoteAddress:Port Weight ActiveConn InActConn
TCP  127.0.0.1:8080 wrr
  -> [::1]:9002              2          1         0
  -> 127.0.0.1:9001          1         12         3 DRAIN DOWN
UDP  127.0.0.1:5353 sh persistent 300
  -> 127.0.0.2:53        65535          0         0 DOWN
TCP  [::1]:80 rr persistent 2.5
"""

HEADER = (
    "Prot LocalAddress:Port Scheduler Flags\n"
    "  -> RemoteAddress:Port Weight ActiveConn InActConn Conns InBytes OutBytes\n"
)


# --- render_table -----------------------------------------------------------------------


def test_render_table_with_stats() -> None:
    assert render_table(DOC) == TABLE_STATS


def test_render_table_without_stats() -> None:
    assert render_table(DOC, stats=False) == TABLE_PLAIN


def test_render_table_no_services() -> None:
    assert render_table({"services": []}) == HEADER


def test_render_table_widens_columns_for_long_values() -> None:
    doc = {
        "services": [
            service(
                "big",
                "127.0.0.1:1",
                "tcp",
                "lc",
                0.0,
                [backend("[fd00:1234::abcd]:65535", (1, 1, 0, 10**12, 10**15, 7))],
            )
        ]
    }
    lines = render_table(doc).splitlines()
    assert lines[1] == (
        "  -> RemoteAddress:Port      Weight ActiveConn InActConn         Conns          InBytes"
        " OutBytes"
    )
    assert lines[3] == (
        "  -> [fd00:1234::abcd]:65535      1          1         0 1000000000000 1000000000000000"
        "        7"
    )


def test_render_table_is_deterministic_and_keeps_backend_order() -> None:
    reordered = copy.deepcopy(DOC)
    reordered["services"][0]["backends"].reverse()
    lines = render_table(reordered).splitlines()
    assert lines[3].startswith("  -> 127.0.0.1:9001 ")
    assert lines[4].startswith("  -> [::1]:9002 ")
    assert render_table(DOC) == render_table(copy.deepcopy(DOC))


def _health(state: str, detail: str | None) -> dict[str, Any]:
    last = None if detail is None else {"ok": state == "up", "detail": detail, "duration": 0.001}
    return {"state": state, "reason": "x", "since": 0.0, "last_check": last, "transitions": 1}


def test_render_table_shows_the_last_check_of_checked_backends() -> None:
    checked = backend("127.0.0.1:9001", (1, 0, 0, 5, 0, 0), up=False)
    checked["health"] = _health("down", "connect refused")
    fresh = backend("127.0.0.1:9002", (1, 0, 0, 5, 0, 0))
    fresh["health"] = _health("up", None)
    unchecked = backend("127.0.0.1:9003", (1, 0, 0, 5, 0, 0), drain=True)
    doc = {"services": [service("web", "127.0.0.1:80", "tcp", "rr", 0.0, [checked, fresh])]}
    doc["services"][0]["backends"].append(unchecked)
    assert render_table(doc, stats=False) == (
        "Prot LocalAddress:Port Scheduler Flags\n"
        "  -> RemoteAddress:Port Weight ActiveConn InActConn LastCheck\n"
        "TCP  127.0.0.1:80 rr\n"
        "  -> 127.0.0.1:9001          1          0         0 connect refused DOWN\n"
        "  -> 127.0.0.1:9002          1          0         0 -\n"
        "  -> 127.0.0.1:9003          1          0         0 -               DRAIN\n"
    )


def test_render_table_without_health_has_no_check_column() -> None:
    doc = copy.deepcopy(DOC)
    for svc in doc["services"]:
        for b in svc["backends"]:
            b["health"] = None
    assert render_table(doc) == TABLE_STATS


# --- against a real admin API -----------------------------------------------------------


class Controller:
    def __init__(self, doc: dict[str, Any]) -> None:
        self.doc = doc

    def snapshot(self) -> dict[str, Any]:
        return {"version": "0", "uptime": 0.0, "dataplane": {}, **copy.deepcopy(self.doc)}

    def is_serving(self) -> bool:
        return True

    def set_backend(
        self, service: str, address: str, *, weight: int | None = None, drain: bool | None = None
    ) -> dict[str, Any]:
        raise LookupError(service)


@pytest.fixture
async def admin() -> AsyncIterator[str]:
    async with AdminServer(Controller(DOC), "127.0.0.1", 0) as server:
        yield f"127.0.0.1:{server.port}"


async def test_fetch_services(admin: str) -> None:
    # The server runs on this loop, so the blocking client must run in a thread.
    assert await asyncio.to_thread(fetch_services, admin) == DOC


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback")
async def test_fetch_services_ipv6() -> None:
    async with AdminServer(Controller(DOC), "::1", 0) as server:
        assert await asyncio.to_thread(fetch_services, f"[::1]:{server.port}") == DOC


async def test_main_prints_the_table(admin: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert await asyncio.to_thread(status.main, admin) == 0
    captured = capsys.readouterr()
    assert captured.out == TABLE_STATS
    assert captured.err == ""


async def test_main_prints_json(admin: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert await asyncio.to_thread(lambda: status.main(admin, as_json=True)) == 0
    assert orjson.loads(capsys.readouterr().out) == DOC


async def test_main_reports_a_document_it_cannot_render(
    capsys: pytest.CaptureFixture[str],
) -> None:
    async with AdminServer(Controller({"services": [{"name": "x"}]}), "127.0.0.1", 0) as server:
        assert await asyncio.to_thread(status.main, f"127.0.0.1:{server.port}") == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("l4lb status: admin API at 127.0.0.1:")
    assert "unexpected document" in captured.err


# --- failures ---------------------------------------------------------------------------


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port that is bound (so nobody else takes it) but refuses connections."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def test_main_unreachable(closed_port: int, capsys: pytest.CaptureFixture[str]) -> None:
    assert status.main(f"127.0.0.1:{closed_port}") == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        f"l4lb status: cannot reach admin API at 127.0.0.1:{closed_port}: Connection refused\n"
    )


def test_fetch_unreachable_raises(closed_port: int) -> None:
    with pytest.raises(StatusError, match="cannot reach admin API"):
        fetch_services(f"127.0.0.1:{closed_port}")


@pytest.mark.parametrize(
    "address", ["", "localhost", "::1:9000", "[::1]", "host:99999", "host:80/x", "u@host:80"]
)
def test_invalid_address(address: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert status.main(address) == 1
    assert capsys.readouterr().err == (
        f"l4lb status: invalid admin address {address!r}: expected host:port or [v6]:port\n"
    )


def test_silent_server_times_out() -> None:
    # Listening but never accepted: the connection opens, no reply ever comes.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        address = f"127.0.0.1:{sock.getsockname()[1]}"
        with pytest.raises(StatusError) as info:
            fetch_services(address, timeout=0.2)
    assert str(info.value) == f"admin API at {address} did not answer within 0.2s"


Reply = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def _serve(reply: Reply) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_get("/api/v1/services", reply)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"127.0.0.1:{runner.addresses[0][1]}"


async def _bad_json(request: web.Request) -> web.Response:
    return web.Response(text="<html>hello</html>")


async def _no_services(request: web.Request) -> web.Response:
    return web.json_response({"servers": []})


async def _http_error(request: web.Request) -> web.Response:
    return web.json_response({"error": "controller is restarting"}, status=503)


async def _http_error_text(request: web.Request) -> web.Response:
    return web.Response(text="nope", status=502)


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (_bad_json, "admin API at {} did not answer with JSON"),
        (_no_services, "admin API at {} answered without a 'services' list"),
        (_http_error, "admin API at {} answered 503 Service Unavailable: controller is restarting"),
        (_http_error_text, "admin API at {} answered 502 Bad Gateway"),
    ],
)
async def test_bad_replies(reply: Reply, message: str) -> None:
    runner, address = await _serve(reply)
    try:
        with pytest.raises(StatusError) as info:
            await asyncio.to_thread(fetch_services, address)
    finally:
        await runner.cleanup()
    assert str(info.value) == message.format(address)


def test_offloaded_service_shows_one_line_per_vip_with_kernel_totals():
    svc = service(
        "k", "10.0.0.1:80", "tcp", "mh", 0.0, [backend("10.2.0.1:8080", (1, 4, 2, 9, 100, 900))]
    )
    svc.update(
        mode="offload",
        vips=["10.0.0.1:80", "[fd00::1]:80"],
        kernel_vips={"10.0.0.1:80": {"total": 9, "bytes_in": 100, "bytes_out": 900}},
    )
    lines = render_table({"services": [svc]}).splitlines()
    assert lines[2] == "TCP  10.0.0.1:80 mh offload  Conns 9 InBytes 100 OutBytes 900"
    assert lines[3] == "TCP  [fd00::1]:80 mh offload"
    assert lines[4].split() == ["->", "10.2.0.1:8080", "1", "4", "2", "9", "100", "900"]
