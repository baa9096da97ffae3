"""Tests for l4lb._testbase: the backends, clients, TOML writer and process runner.

The process runner is exercised against a stand-in program that honours the same command line,
ready-file, admin-API and signal contract as ``l4lb run``, so these tests need no data plane.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import tomllib
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pytest

from l4lb._testbase import (
    CLIENT_SEED,
    SERVER_SEED,
    EchoServer,
    L4lbProcess,
    L4lbStartError,
    NamedServer,
    SinkSourceServer,
    bulk_client,
    connect,
    connect_name,
    dumps_toml,
    format_address,
    open_name,
    parse_address,
    pattern_sha256,
    wait_for,
)


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


pytest_plugins = ["pytester"]

needs_ipv6 = pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback")


def _recv_all(sock: socket.socket) -> bytes:
    chunks = []
    while data := sock.recv(65536):
        chunks.append(data)
    return b"".join(chunks)


# --------------------------------------------------------------------------- addresses


@pytest.mark.parametrize(
    ("text", "parsed"),
    [("127.0.0.1:80", ("127.0.0.1", 80)), ("[::1]:8080", ("::1", 8080))],
)
def test_parse_and_format_address_round_trip(text: str, parsed: tuple[str, int]) -> None:
    assert parse_address(text) == parsed
    assert format_address(*parsed) == text


@pytest.mark.parametrize("text", ["127.0.0.1", "::1:80", "host:", "1.2.3.4:x"])
def test_parse_address_rejects_malformed(text: str) -> None:
    with pytest.raises(ValueError, match="address"):
        parse_address(text)


def test_wait_for_returns_the_truthy_value() -> None:
    values = iter([0, None, "", 7])
    assert wait_for(lambda: next(values), timeout=5, interval=0) == 7


def test_wait_for_times_out_naming_what_it_waited_for() -> None:
    with pytest.raises(TimeoutError, match=r"the moon.*last: False"):
        wait_for(lambda: False, timeout=0.05, interval=0.01, message="the moon")


# --------------------------------------------------------------------------- echo


def test_echo_server_echoes_then_closes_after_half_close() -> None:
    payload = os.urandom(3 * 1024 * 1024)  # over the echo high-water mark: exercises backpressure
    with EchoServer() as srv:
        with connect(srv.address) as sock:

            def send() -> None:
                sock.sendall(payload)
                sock.shutdown(socket.SHUT_WR)

            sender = threading.Thread(target=send)
            sender.start()
            echoed = _recv_all(sock)  # returns only once the server has sent its FIN
            sender.join()
        assert echoed == payload
        assert srv.accepted == 1
        wait_for(lambda: srv.active == 0, 5, message="the server to close its side")
        assert srv.bytes_received == len(payload)


def test_echo_server_counts_concurrent_connections_and_peers() -> None:
    with EchoServer() as srv:
        socks = [connect(srv.address) for _ in range(20)]
        try:
            wait_for(lambda: srv.active == 20, 5)
            for i, sock in enumerate(socks):
                sock.sendall(b"%d" % i)
                assert sock.recv(16) == b"%d" % i
            assert srv.accepted == 20
            assert sorted(srv.peers) == sorted(format_address(*s.getsockname()) for s in socks)
        finally:
            for sock in socks:
                sock.close()
        wait_for(lambda: srv.active == 0, 5)


def test_echo_server_counts_a_reset() -> None:
    with EchoServer() as srv:
        sock = connect(srv.address)
        wait_for(lambda: srv.active == 1, 5)
        # SO_LINGER 0 turns close() into a RST.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.close()
        wait_for(lambda: srv.resets == 1, 5)
        assert srv.active == 0


@needs_ipv6
def test_echo_server_on_ipv6() -> None:
    with EchoServer("::1") as srv:
        assert srv.address == f"[::1]:{srv.port}"
        with connect(srv.address) as sock:
            sock.sendall(b"six")
            sock.shutdown(socket.SHUT_WR)
            assert _recv_all(sock) == b"six"


def test_stop_closes_open_connections_and_joins() -> None:
    before = threading.active_count()
    srv = EchoServer().start()
    sock = connect(srv.address)
    wait_for(lambda: srv.active == 1, 5)
    srv.stop()
    assert sock.recv(1) == b""  # the server's close reached the client
    sock.close()
    assert threading.active_count() == before
    with pytest.raises(OSError):
        connect(srv.address, timeout=1)


# --------------------------------------------------------------------------- named


def test_named_server_sends_its_name_then_echoes() -> None:
    with NamedServer("alpha") as srv:
        sock, name = open_name(srv.address)
        with sock:
            assert name == "alpha"
            sock.sendall(b"ping")
            sock.shutdown(socket.SHUT_WR)
            assert _recv_all(sock) == b"ping"
        assert connect_name(srv.address) == "alpha"
        assert srv.accepted == 2


def test_connect_name_binds_the_source_address() -> None:
    with NamedServer("b") as srv:
        assert connect_name(srv.address, source="127.0.0.5") == "b"
        assert parse_address(srv.peers[0])[0] == "127.0.0.5"


def test_named_server_hold_keeps_connections_without_echo() -> None:
    with NamedServer("held", hold=True) as srv:
        socks = [open_name(srv.address)[0] for _ in range(5)]
        try:
            socks[0].sendall(b"ignored")
            wait_for(lambda: srv.bytes_received == 7, 5)
            socks[0].settimeout(0.2)
            with pytest.raises(TimeoutError):
                socks[0].recv(16)  # nothing is echoed
            assert srv.active == 5
        finally:
            for sock in socks:
                sock.close()
        wait_for(lambda: srv.active == 0, 5, message="held connections to close with the client")


def test_named_server_rejects_a_newline_in_the_name() -> None:
    with pytest.raises(ValueError, match="newline"):
        NamedServer("a\nb")


# --------------------------------------------------------------------------- bulk


def test_pattern_hash_matches_the_generator() -> None:
    size = (1 << 20) + 12345  # crosses the 1 MiB block boundary
    first = pattern_sha256(size, seed=CLIENT_SEED)
    assert first == pattern_sha256(size, seed=CLIENT_SEED)
    assert first != pattern_sha256(size, seed=SERVER_SEED)
    assert pattern_sha256(0) == hashlib.sha256().hexdigest()


@pytest.mark.parametrize(("up", "down"), [(0, 0), (1, 0), (0, 1), (5 << 20, 3 << 20 | 7)])
def test_bulk_exchange_hashes_agree(up: int, down: int) -> None:
    with SinkSourceServer() as srv:
        result = bulk_client(srv.address, up, down)
        (transfer,) = srv.wait_transfers(1)
    assert transfer.error is None
    assert (result.sent, transfer.received) == (up, up)
    assert result.sent_sha256 == transfer.received_sha256 == pattern_sha256(up, CLIENT_SEED)
    assert (result.announced, result.received, transfer.sent) == (down, down, down)
    assert result.complete
    assert result.received_sha256 == transfer.sent_sha256 == pattern_sha256(down, SERVER_SEED)


def test_bulk_exchange_with_slow_reads_on_both_sides() -> None:
    with SinkSourceServer(read_delay=0.001, chunk=16384) as srv:
        result = bulk_client(srv.address, 1 << 20, 1 << 20, slow_read=0.001, chunk=16384)
        (transfer,) = srv.wait_transfers(1)
    assert result.sent_sha256 == transfer.received_sha256
    assert result.received_sha256 == transfer.sent_sha256
    assert result.complete


def test_sink_records_a_truncated_upload_as_an_error() -> None:
    with SinkSourceServer() as srv:
        with connect(srv.address) as sock:
            sock.sendall((100).to_bytes(8, "big") + (0).to_bytes(8, "big") + b"x" * 10)
            sock.shutdown(socket.SHUT_WR)
            assert _recv_all(sock) == b""
        (transfer,) = srv.wait_transfers(1)
    assert transfer.received == 10
    assert transfer.error is not None and "EOF after 10 of 100" in transfer.error


def test_sink_does_not_record_connect_and_close_probes() -> None:
    with SinkSourceServer() as srv:
        connect(srv.address).close()
        wait_for(lambda: srv.probes == 1, 5)
        bulk_client(srv.address, 1, 1)
        assert len(srv.wait_transfers(1)) == 1
        assert srv.accepted == 2


def test_sink_stop_interrupts_a_stalled_transfer() -> None:
    srv = SinkSourceServer().start()
    sock = connect(srv.address)
    sock.sendall((1 << 30).to_bytes(8, "big") + (0).to_bytes(8, "big"))
    wait_for(lambda: srv.accepted == 1, 5)
    srv.stop()  # must not wait for the missing gigabyte
    sock.close()
    (transfer,) = srv.transfers
    assert transfer.error is not None


# --------------------------------------------------------------------------- TOML


def test_dumps_toml_round_trips_an_l4lb_config() -> None:
    config: dict[str, Any] = {
        "admin": {"listen": "127.0.0.1:0"},
        "dataplane": {"workers": 2, "splice": True, "ratio": 0.5},
        "services": [
            {
                "name": "web",
                "listen": "[::1]:0",
                "scheduler": "wrr",
                "tags": ["a", 'b "quoted"\n'],
                "backends": [
                    {"address": "127.0.0.1:9001", "weight": 3},
                    {"address": "127.0.0.1:9002", "weight": 0, "extra": {"x": 1}},
                ],
            },
            {"name": "udp", "listen": "127.0.0.1:0", "backends": []},
        ],
        "odd key": "ok",
    }
    assert tomllib.loads(dumps_toml(config)) == config


def test_dumps_toml_rejects_unsupported_values() -> None:
    with pytest.raises(TypeError, match="bytes"):
        dumps_toml({"x": b"raw"})


# --------------------------------------------------------------------------- process runner

# Honours the `l4lb run` contract: --config/--ready-file/--workers, a JSON ready file written
# atomically, GET /healthz and /api/v1/services, SIGHUP reloads, SIGTERM exits 0.
_STANDIN = textwrap.dedent(
    """
    import argparse, json, os, signal, socket, sys, threading, time, tomllib
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    p = argparse.ArgumentParser()
    p.add_argument("cmd")
    p.add_argument("--config")
    p.add_argument("--ready-file")
    p.add_argument("--workers", type=int)
    args = p.parse_args()
    if os.environ.get("STANDIN_FAIL"):
        sys.exit("refusing to start: " + os.environ["STANDIN_FAIL"])
    state = {}
    listeners = {}

    def load():
        state["cfg"] = tomllib.load(open(args.config, "rb"))
        for svc in state["cfg"].get("services", []):
            if svc["name"] not in listeners:
                s = socket.socket()
                s.bind(("127.0.0.1", 0))
                s.listen()
                listeners[svc["name"]] = s

    class H(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/healthz":
                body = b"ok"
            elif self.path == "/api/v1/services":
                body = json.dumps({"services": [
                    {"name": s["name"], "listen": s["listen"], "backends": [
                        {"address": b["address"], "weight": b.get("weight", 1)}
                        for b in s.get("backends", [])]}
                    for s in state["cfg"].get("services", [])]}).encode()
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    def write_ready():
        ready = {"pid": os.getpid(), "admin": "127.0.0.1:%d" % http.server_port,
                 "workers": args.workers,
                 "services": {n: "127.0.0.1:%d" % s.getsockname()[1]
                              for n, s in listeners.items()}}
        tmp = args.ready_file + ".tmp"
        with open(tmp, "w") as f:
            json.dump(ready, f)
        os.replace(tmp, args.ready_file)

    def on_hup(*_):
        load()
        write_ready()
        print("reloaded", file=sys.stderr, flush=True)

    load()
    http = ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    signal.signal(signal.SIGHUP, on_hup)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    if os.environ.get("STANDIN_IGNORE_TERM"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    write_ready()
    print("serving", file=sys.stderr, flush=True)
    while True:  # not signal.pause(): the signal may land on the HTTP thread
        time.sleep(0.05)
    """
)


@pytest.fixture
def standin(tmp_path: Path) -> list[str]:
    script = tmp_path / "standin.py"
    script.write_text(_STANDIN, encoding="utf-8")
    return [sys.executable, str(script)]


def _config(*backends: str) -> dict[str, Any]:
    return {
        "admin": {"listen": "127.0.0.1:0"},
        "services": [
            {
                "name": "web",
                "listen": "127.0.0.1:0",
                "scheduler": "rr",
                "backends": [{"address": b, "weight": 1} for b in backends],
            }
        ],
    }


def test_process_start_ready_and_admin_api(standin: list[str], tmp_path: Path) -> None:
    proc = L4lbProcess(
        _config("127.0.0.1:9001"), workers=3, command=standin, workdir=tmp_path / "w"
    )
    assert proc.argv()[-4:] == ["--ready-file", str(proc.ready_path), "--workers", "3"]
    with proc:
        assert proc.running
        assert proc.ready["pid"] == proc.pid
        assert proc.ready["workers"] == 3
        host, port = parse_address(proc.service_address("web"))
        assert (host, port > 0) == ("127.0.0.1", True)
        assert proc.http_get("/healthz") == (200, b"ok")
        assert proc.http_get("/nope")[0] == 404
        (svc,) = proc.services_json()["services"]
        assert svc["backends"] == [{"address": "127.0.0.1:9001", "weight": 1}]
        assert proc.service("web")["name"] == "web"
        with pytest.raises(KeyError, match="nope"):
            proc.service_address("nope")
        assert "serving" in proc.stderr_text()
        assert proc.stop() == 0
        assert not proc.running
        assert proc.stop() == 0  # idempotent
    assert (tmp_path / "w" / "stderr.log").exists()  # a caller's workdir is left in place


def test_process_reload_waits_for_the_new_backends(standin: list[str]) -> None:
    with L4lbProcess(_config("127.0.0.1:9001"), command=standin) as proc:
        new = _config("127.0.0.1:9001", "127.0.0.1:9002")
        new["services"].append({"name": "api", "listen": "127.0.0.1:0", "backends": []})
        proc.reload(new)
        assert len(proc.service("web")["backends"]) == 2
        assert proc.service_address("api") != proc.service_address("web")
        assert "reloaded" in proc.stderr_text()
        workdir = proc.workdir
    assert not workdir.exists()  # a private workdir is removed
    assert "reloaded" in proc.stderr_text()  # still readable after close()


def test_process_accepts_toml_text(standin: list[str]) -> None:
    with L4lbProcess(dumps_toml(_config("[::1]:9001")), command=standin) as proc:
        assert proc.config["services"][0]["backends"][0]["address"] == "[::1]:9001"
        assert proc.service("web")["backends"][0]["address"] == "[::1]:9001"


def test_process_start_failure_reports_stderr(standin: list[str]) -> None:
    proc = L4lbProcess(_config(), command=standin, env={**os.environ, "STANDIN_FAIL": "no-go"})
    with pytest.raises(L4lbStartError, match=r"exited with 1(.|\n)*refusing to start: no-go"):
        proc.start()
    proc.close()


def test_process_ready_timeout_reports_and_kills(tmp_path: Path) -> None:
    script = tmp_path / "mute.py"
    script.write_text(
        "import sys, time\nprint('stuck', file=sys.stderr, flush=True)\ntime.sleep(60)\n",
        encoding="utf-8",
    )
    proc = L4lbProcess(_config(), command=[sys.executable, str(script)], ready_timeout=0.5)
    with pytest.raises(L4lbStartError, match=r"not ready after 0.5s(.|\n)*stuck"):
        proc.start()
    assert proc.returncode == -signal.SIGTERM
    proc.close()


def test_process_stop_kills_when_sigterm_is_ignored(standin: list[str]) -> None:
    env = {**os.environ, "STANDIN_IGNORE_TERM": "1"}
    with L4lbProcess(_config(), command=standin, env=env) as proc:
        assert proc.stop(timeout=0.3) == -signal.SIGKILL
        assert not proc.running


def test_process_rejects_malformed_toml(tmp_path: Path) -> None:
    with pytest.raises(tomllib.TOMLDecodeError):
        L4lbProcess("[admin\n", workdir=tmp_path)


# --------------------------------------------------------------------------- pytest plugin


_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def plugin_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let pytester's subprocess import this checkout's l4lb."""
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [str(_ROOT), os.environ.get("PYTHONPATH")]))
    )


def _plugin_args() -> list[str]:
    # An installed l4lb registers the plugin itself; loading it twice would be an error.
    installed = any(ep.name == "l4lb" for ep in entry_points(group="pytest11"))
    return ["-p", "no:cacheprovider"] + ([] if installed else ["-p", "l4lb.pytest_plugin"])


@pytest.mark.usefixtures("plugin_env")
def test_plugin_fixtures_start_and_stop_everything(
    pytester: pytest.Pytester, standin: list[str]
) -> None:
    pytester.makepyfile(
        f"""
        import socket
        from l4lb._testbase import connect_name, connect

        COMMAND = {standin!r}
        SEEN = []

        def test_use(l4lb_factory, echo_backend_factory, named_backend_factory,
                     sink_source_backend_factory):
            echo = echo_backend_factory()
            named = named_backend_factory("n1", hold=True)
            sink = sink_source_backend_factory(read_delay=0.0)
            assert connect_name(named.address) == "n1"
            cfg = {{"services": [{{"name": "web", "listen": "127.0.0.1:0",
                                   "backends": [{{"address": echo.address}}]}}]}}
            lb = l4lb_factory(cfg, workers=2, command=COMMAND)
            assert lb.ready["workers"] == 2
            SEEN.extend([lb, echo, named, sink])

        def test_after():
            lb, echo, named, sink = SEEN
            assert not lb.running and lb.returncode == 0
            for server in (echo, named, sink):
                try:
                    connect(server.address, timeout=1).close()
                except OSError:
                    continue
                raise AssertionError(f"{{server.address}} still accepts")
        """
    )
    result = pytester.runpytest_subprocess(*_plugin_args())
    result.assert_outcomes(passed=2)


@pytest.mark.usefixtures("plugin_env")
def test_plugin_fails_teardown_when_l4lb_does_not_exit_cleanly(
    pytester: pytest.Pytester, tmp_path: Path
) -> None:
    script = tmp_path / "bad_exit.py"
    script.write_text(
        textwrap.dedent(
            """
            import json, os, signal, sys, time
            ready = sys.argv[sys.argv.index("--ready-file") + 1]
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(3))
            with open(ready, "w") as f:
                json.dump({"pid": os.getpid(), "admin": "127.0.0.1:1", "services": {}}, f)
            print("about to fail", file=sys.stderr, flush=True)
            while True:
                time.sleep(0.05)
            """
        ),
        encoding="utf-8",
    )
    pytester.makepyfile(
        f"""
        def test_use(l4lb_factory):
            l4lb_factory("", command={[sys.executable, str(script)]!r})
        """
    )
    result = pytester.runpytest_subprocess(*_plugin_args())
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*exited with 3 on SIGTERM*", "*about to fail*"])


def test_plugin_imports_nothing_heavy() -> None:
    code = (
        "import sys, pytest\n"
        "before = set(sys.modules)\n"
        "import l4lb.pytest_plugin\n"
        "heavy = {'l4lb._testbase', 'l4lb._dataplane', 'l4lb.app', 'uvloop', 'aiohttp',"
        " 'asyncio', 'kubernetes', 'pyroute2', 'prometheus_client', 'orjson'}\n"
        "print(sorted(heavy & (set(sys.modules) - before)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=_ROOT
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


# --------------------------------------------------------------------------- the real l4lb


def _dataplane_built() -> bool:
    try:
        import l4lb._dataplane  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _dataplane_built(), reason="data plane not built (make build)")
def test_runner_drives_the_real_l4lb(tmp_path: Path) -> None:
    with NamedServer("a") as a, NamedServer("b") as b:
        config = _config(a.address)
        with L4lbProcess(config, workers=1, workdir=tmp_path) as proc:
            web = proc.service_address("web")
            assert {connect_name(web) for _ in range(3)} == {"a"}
            proc.reload(_config(a.address, b.address))
            assert {connect_name(web) for _ in range(4)} == {"a", "b"}
            wait_for(lambda: proc.service("web")["total"] == 7, 5, message="7 connections counted")
            assert proc.stop() == 0
