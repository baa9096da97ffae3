"""The watcher and client against the API-server double, over real HTTP on loopback."""

from __future__ import annotations

import asyncio
import copy
import logging
import random
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from k8s_apiserver import TOKEN, FakeApiServer
from k8s_objects import load_items

from l4lb.k8s.client import (
    ENDPOINT_SLICES,
    SERVICES,
    Gone,
    KubeClient,
    KubeError,
    load_api_client,
)
from l4lb.k8s.translate import NodeInfo, ObjectError, translate
from l4lb.k8s.watcher import Backoff, ChangeSignal, Discovery, ErrorLog, Watcher

FAST = Backoff(initial=0.02, factor=2.0, cap=0.2, jitter=0.5)


async def eventually(cond: Callable[[], bool], what: str, *, timeout: float = 15.0) -> None:
    """Wait (bounded) until ``cond()`` holds."""
    for _ in range(int(timeout / 0.01)):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
async def server() -> AsyncIterator[FakeApiServer]:
    srv = FakeApiServer()
    for svc in load_items("services.json"):
        srv.add("Service", svc)
    for sl in load_items("endpointslices.json"):
        srv.add("EndpointSlice", sl)
    await srv.start()
    yield srv
    await srv.stop()


@pytest.fixture
async def client(server: FakeApiServer, tmp_path: Path) -> AsyncIterator[KubeClient]:
    api = load_api_client(str(server.write_kubeconfig(tmp_path / "kubeconfig")))
    yield KubeClient(api, page_size=3, connect_timeout=2.0, read_timeout=10.0)
    api.close()


class Running:
    """A watcher task that is cancelled and awaited on exit."""

    def __init__(self, watcher: Watcher | Discovery) -> None:
        self.watcher = watcher
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Running:
        self.task = asyncio.create_task(self.watcher.run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.task is not None
        self.task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await self.task


def watcher(client: KubeClient, resource: Any = SERVICES, **kw: Any) -> Watcher:
    return Watcher(client, resource, backoff=copy.copy(FAST), watch_timeout=30, **kw)


def svc(name: str, ip: str = "10.96.7.7") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "t"},
        "spec": {"clusterIP": ip, "ports": [{"name": "p", "port": 80, "protocol": "TCP"}]},
    }


def watch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("k8s-watch-")]


def watches(server: FakeApiServer, kind: str = "Service") -> list[Any]:
    return [r for r in server.requests if r.kind == kind and r.watch]


# --------------------------------------------------------------------------- client


async def test_list_pages_and_watch_parameters(server: FakeApiServer, client: KubeClient) -> None:
    result = await client.list(SERVICES)
    assert sorted(o["metadata"]["name"] for o in result.items) == [
        "db", "dns", "gateway", "kubernetes", "mail", "web",
    ]  # fmt: skip
    assert result.resource_version == str(server.rv)
    lists = [r for r in server.requests if not r.watch]
    assert [r.query.get("continue") for r in lists] == [None, "3"]  # page_size 3, 6 objects
    assert all(r.authorization == f"Bearer {TOKEN}" for r in lists)
    assert lists[0].query["labelSelector"] == (
        "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless"
    )
    server.add("Service", svc("new"))
    stream = client.watch(SERVICES, result.resource_version, timeout_seconds=5)
    event = await anext(stream)
    await stream.aclose()
    assert (event.type, event.object["metadata"]["name"]) == ("ADDED", "new")
    (w,) = watches(server)
    assert w.query["resourceVersion"] == result.resource_version
    assert w.query["allowWatchBookmarks"] == "true"
    assert w.query["timeoutSeconds"] == "5"
    await eventually(lambda: not watch_threads(), "the reading thread to end")


async def test_client_errors(server: FakeApiServer, client: KubeClient) -> None:
    server.fail_next = [503, 410]
    with pytest.raises(KubeError, match="503") as info:
        await client.list(SERVICES)
    assert not isinstance(info.value, Gone)
    with pytest.raises(Gone):
        await client.list(SERVICES)
    server.compact()
    with pytest.raises(Gone, match="too old"):
        async for _ in client.watch(SERVICES, "1"):
            pass
    await server.stop()
    with pytest.raises(KubeError):
        await client.list(SERVICES)


async def test_kubeconfig_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(KubeError, match="configuration"):
        load_api_client(str(tmp_path / "missing"))
    (tmp_path / "bad").write_text("clusters: 7\n")
    with pytest.raises(KubeError):
        load_api_client(str(tmp_path / "bad"))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "6443")
    with pytest.raises(KubeError):  # no service-account token in this test environment
        load_api_client()


async def test_wrong_token_is_an_error(server: FakeApiServer, tmp_path: Path) -> None:
    path = server.write_kubeconfig(tmp_path / "kubeconfig")
    path.write_text(path.read_text().replace(TOKEN, "wrong"))
    api = load_api_client(str(path))
    with pytest.raises(KubeError, match="401"):
        await KubeClient(api).list(SERVICES)
    api.close()


# --------------------------------------------------------------------------- watcher


async def test_list_then_watch_follows_changes(server: FakeApiServer, client: KubeClient) -> None:
    changed = ChangeSignal()
    w = watcher(client, changed=changed)
    listed = str(server.rv)
    async with Running(w):
        await asyncio.wait_for(w.synced.wait(), 15)
        assert set(w.objects) == {f"shop/{n}" for n in ("web", "dns", "gateway", "db", "mail")} | {
            "default/kubernetes"
        }
        assert await changed.wait() >= 1
        assert "managedFields" not in w.objects["shop/web"]["metadata"]
        fat = svc("a")
        fat["metadata"]["managedFields"] = [{"manager": "kubectl", "operation": "Update"}]
        server.add("Service", fat)
        await eventually(lambda: "t/a" in w.objects, "ADDED")
        assert "managedFields" not in w.objects["t/a"]["metadata"]
        server.add("Service", svc("a", ip="10.96.7.8"))
        await eventually(lambda: w.objects["t/a"]["spec"]["clusterIP"] == "10.96.7.8", "MODIFIED")
        server.delete("Service", "shop/db")
        await eventually(lambda: "shop/db" not in w.objects, "DELETED")
        assert w.resource_version == str(server.rv)
        assert (w.lists, w.failures) == (1, 0)
        assert watches(server)[0].query["resourceVersion"] == listed


async def test_bookmark_advances_resource_version(
    server: FakeApiServer, client: KubeClient
) -> None:
    w = watcher(client)
    async with Running(w):
        await asyncio.wait_for(w.synced.wait(), 15)
        await eventually(lambda: server.open_watches == 1, "a watch")
        before = dict(w.objects)
        rv = server.bookmark("Service")
        await eventually(lambda: w.resource_version == str(rv), "the bookmark")
        assert dict(w.objects) == before
        server.drop_watches()
        await eventually(lambda: len(watches(server)) == 2, "a second watch")
        assert watches(server)[1].query["resourceVersion"] == str(rv)
        assert w.lists == 1


@pytest.mark.parametrize("as_http", [False, True], ids=["error-event", "http-410"])
async def test_gone_relists(server: FakeApiServer, client: KubeClient, as_http: bool) -> None:
    server.gone_as_http = as_http
    w = watcher(client)
    async with Running(w):
        await asyncio.wait_for(w.synced.wait(), 15)
        await eventually(lambda: server.open_watches == 1, "a watch")
        # Changes the watcher never sees as events, then history is compacted away.
        server.delete("Service", "shop/web", silent=True)
        server.add("Service", svc("late"), silent=True)
        server.compact()
        server.drop_watches()
        await eventually(lambda: w.lists == 2, "a relist")
        await eventually(lambda: "t/late" in w.objects, "the relisted state")
        assert "shop/web" not in w.objects
        server.add("Service", svc("after"))
        await eventually(lambda: "t/after" in w.objects, "watching again after the relist")


async def test_dropped_connection_resumes_without_relist(
    server: FakeApiServer, client: KubeClient
) -> None:
    w = watcher(client)
    async with Running(w):
        await asyncio.wait_for(w.synced.wait(), 15)
        await eventually(lambda: server.open_watches == 1, "a watch")
        server.drop_watches()
        server.add("Service", svc("while-dropped"))  # replayed from history on re-watch
        await eventually(lambda: "t/while-dropped" in w.objects, "the missed event")
        assert w.lists == 1 and len(watches(server)) >= 2


async def test_garbage_line_rewatches_from_last_version(
    server: FakeApiServer, client: KubeClient, caplog: pytest.LogCaptureFixture
) -> None:
    w = watcher(client)
    async with Running(w):
        await asyncio.wait_for(w.synced.wait(), 15)
        await eventually(lambda: server.open_watches == 1, "a watch")
        with caplog.at_level(logging.WARNING, logger="l4lb.k8s.watcher"):
            server.send_raw("Service", b"<html>proxy error</html>\n")
            await eventually(lambda: w.failures == 1, "the garbage to be rejected")
        assert [r.getMessage() for r in caplog.records if "malformed" in r.getMessage()]
        server.add("Service", svc("next"))
        await eventually(lambda: "t/next" in w.objects, "events after the garbage")
        assert w.lists == 1 and len(watches(server)) >= 2


@pytest.mark.parametrize(
    "line",
    [
        b'{"type":"ERROR","object":{"kind":"Status","code":500,"reason":"InternalError"}}\n',
        b'{"type":"SURPRISE","object":{}}\n',
        b'["not", "an", "event"]\n',
    ],
    ids=["error-500", "unknown-type", "not-an-object"],
)
async def test_bad_events_rewatch_without_relist(
    server: FakeApiServer, client: KubeClient, line: bytes
) -> None:
    w = watcher(client)
    async with Running(w):
        await asyncio.wait_for(w.synced.wait(), 15)
        await eventually(lambda: server.open_watches == 1, "a watch")
        server.send_raw("Service", line)
        await eventually(lambda: w.failures == 1, "the event to be rejected")
        server.add("Service", svc("next"))
        await eventually(lambda: "t/next" in w.objects, "events after the bad one")
        assert w.lists == 1


async def test_slow_responses_and_split_lines(server: FakeApiServer, client: KubeClient) -> None:
    server.delay = 0.3
    w = watcher(client)
    async with Running(w):
        await asyncio.wait_for(w.synced.wait(), 15)
        await eventually(lambda: server.open_watches == 1, "a watch")
        obj = svc("split")
        obj["metadata"]["resourceVersion"] = str(server.rv + 1)
        server.send_raw("Service", b'{"type":"ADDED","object":' + _json(obj) + b"}\n", split=True)
        await eventually(lambda: "t/split" in w.objects, "an event written in two halves")
        assert w.failures == 0


async def test_unexpected_failure_is_retried(
    server: FakeApiServer, client: KubeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = client.list
    calls: list[int] = []

    async def flaky(resource: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("unforeseen")
        return await real(resource)

    monkeypatch.setattr(client, "list", flaky)
    w = watcher(client)
    async with Running(w):
        await asyncio.wait_for(w.synced.wait(), 15)
    assert (w.failures, w.lists) == (1, 1)


async def test_http_errors_back_off_and_recover(server: FakeApiServer, client: KubeClient) -> None:
    server.fail_next = [500, 503, 429]
    w = watcher(client)
    async with Running(w):
        await asyncio.wait_for(w.synced.wait(), 15)
        assert w.failures == 3 and w.lists == 1


async def test_last_known_state_is_kept_while_down(
    server: FakeApiServer, client: KubeClient
) -> None:
    disco = Discovery(client, backoff=FAST, watch_timeout=30)
    async with Running(disco):
        await asyncio.wait_for(disco.wait_synced(), 15)
        services, slices = disco.snapshot()
        node = NodeInfo("node-a", ("192.168.1.10",), "zone-a")
        before = translate(services, slices, node)
        assert len(before.services) == 8
        await server.stop()
        await eventually(lambda: disco.services.failures >= 3, "failed reconnects")
        await eventually(lambda: disco.slices.failures >= 3, "failed reconnects")
        assert translate(*disco.snapshot(), node) == before
        # The server comes back having lost its watch history, and with changes.
        server.delete("Service", "shop/dns", silent=True)
        server.compact()
        await server.start()
        await eventually(lambda: "shop/dns" not in disco.services.objects, "the relist")
        names = {s.name for s in translate(*disco.snapshot(), node).services}
        assert names == {s.name for s in before.services} - {
            "shop/dns:dns/udp",
            "shop/dns:dns-tcp/tcp",
        }


async def test_empty_watches_back_off(server: FakeApiServer, client: KubeClient) -> None:
    w = Watcher(client, ENDPOINT_SLICES, backoff=copy.copy(FAST), watch_timeout=0)
    async with Running(w):
        await eventually(lambda: len(watches(server, "EndpointSlice")) >= 4, "several watches")
    # Every stream ended at once with nothing in it; each one counted as a failure.
    assert w._backoff.failures >= 3
    assert w.lists == 1


# --------------------------------------------------------------------------- pieces


def test_backoff_grows_to_cap_with_jitter_and_resets() -> None:
    b = Backoff(initial=1.0, factor=2.0, cap=8.0, jitter=0.25, rng=random.Random(7))
    delays = [b.next() for _ in range(8)]
    bases = [1, 2, 4, 8, 8, 8, 8, 8]
    assert all(0.75 * base <= d <= base for d, base in zip(delays, bases, strict=True))
    assert len(set(delays)) == len(delays)  # jittered, not identical
    b.reset()
    assert 0.75 <= b.next() <= 1.0


async def test_change_signal_coalesces() -> None:
    sig = ChangeSignal()
    for _ in range(5):
        sig.notify()
    assert await sig.wait() == 5
    waiter = asyncio.create_task(sig.wait())
    for _ in range(3):
        await asyncio.sleep(0)
    assert not waiter.done()
    sig.notify()
    assert await waiter == 6


def test_error_log_reports_each_error_once(caplog: pytest.LogCaptureFixture) -> None:
    a, b = ObjectError("Service", "ns/a", "bad"), ObjectError("Service", "ns/b", "worse")
    errors = ErrorLog(logging.getLogger("test.k8s"))
    with caplog.at_level(logging.WARNING, logger="test.k8s"):
        assert errors.report([a, a]) == [a]
        assert errors.report([a, b]) == [b]
        assert errors.report([b]) == []
        assert errors.report([a, b]) == [a]  # fixed, then broken again
    assert [r.getMessage() for r in caplog.records] == [
        "skipping Service ns/a: bad",
        "skipping Service ns/b: worse",
        "skipping Service ns/a: bad",
    ]


def _json(obj: dict[str, Any]) -> bytes:
    import orjson

    return orjson.dumps(obj)
