"""Least privilege: token-guarded admin API, strict file modes, and running as non-root.

The non-root case starts ``l4lb run`` the way ``deploy/systemd/l4lb.service`` does: another
uid, no supplementary groups, no new privileges, and only CAP_NET_ADMIN and
CAP_NET_BIND_SERVICE (inheritable, ambient and bounding sets). It runs in a namespace of its
own, so port 80 on its loopback is free and nothing on the host is touched.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from l4lb._netns import Netns, unavailable_reason
from l4lb._testbase import EchoServer, L4lbProcess, L4lbStartError, connect, dumps_toml, wait_for

from .nsthread import in_netns

TOKEN = "f3c1d9e2a7b4c6d8e0f1a2b3c4d5e6f7"
UNPRIVILEGED = 65534
CAPS = "+net_admin,+net_bind_service"
#: CAP_NET_BIND_SERVICE is bit 10, CAP_NET_ADMIN bit 12.
CAP_MASK = (1 << 10) | (1 << 12)


def _config(backend: str, **admin: Any) -> dict[str, Any]:
    return {
        "admin": {"listen": "127.0.0.1:0", **admin},
        "dataplane": {"workers": 1},
        "services": [{"name": "web", "listen": "127.0.0.1:0", "backends": [{"address": backend}]}],
    }


def _post(admin: str, path: str, body: dict[str, Any], token: str | None) -> tuple[int, bytes]:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(
        f"http://{admin}{path}", data=json.dumps(body).encode(), headers=headers, method="POST"
    )
    try:
        with urllib.request.urlopen(req, timeout=5.0) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "admin-token"
    path.write_text(TOKEN + "\n")
    path.chmod(0o600)
    return path


def test_world_writable_config_is_refused(echo: EchoServer) -> None:
    proc = L4lbProcess(_config(echo.address))
    proc.config_path.chmod(0o666)
    with pytest.raises(L4lbStartError, match="exited with 2") as exc:
        proc.start()
    proc.close()
    assert f"{proc.config_path}: refusing a world-writable config file" in str(exc.value)
    assert "Traceback" not in str(exc.value)


def test_config_made_world_writable_rejects_the_reload(echo: EchoServer) -> None:
    with L4lbProcess(_config(echo.address)) as proc:
        proc.config_path.write_text(dumps_toml(_config(echo.address) | {"services": []}))
        proc.config_path.chmod(0o646)
        os.kill(proc.pid, signal.SIGHUP)
        wait_for(lambda: "reload rejected" in proc.stderr_text(), 10, message="rejection")
        assert "refusing a world-writable config file" in proc.stderr_text()
        assert [s["name"] for s in proc.services_json()["services"]] == ["web"]


def test_admin_beyond_loopback_without_token_is_refused(echo: EchoServer) -> None:
    cfg = _config(echo.address)
    cfg["admin"]["listen"] = "0.0.0.0:0"
    proc = L4lbProcess(cfg)
    with pytest.raises(L4lbStartError, match="exited with 2") as exc:
        proc.start()
    proc.close()
    assert "admin.listen = 0.0.0.0:0 is not a loopback address: set admin.token_file" in str(
        exc.value
    )


def test_readable_token_file_is_refused(echo: EchoServer, token_file: Path) -> None:
    token_file.chmod(0o640)
    proc = L4lbProcess(_config(echo.address, token_file=str(token_file)))
    with pytest.raises(L4lbStartError, match="exited with 2") as exc:
        proc.start()
    proc.close()
    assert f"admin.token_file {token_file}: group or others have access (mode 0640)" in str(
        exc.value
    )
    assert TOKEN not in str(exc.value)


def test_state_changes_need_the_token_and_it_is_never_echoed(
    echo: EchoServer, token_file: Path
) -> None:
    with L4lbProcess(_config(echo.address, token_file=str(token_file))) as proc:
        path = f"/api/v1/services/web/backends/{echo.address}"
        answers = [
            _post(proc.admin, path, {"weight": 5}, None),
            _post(proc.admin, path, {"weight": 5}, "wrong-token-wrong-token"),
            _post(proc.admin, path, {"weight": 5}, TOKEN[:-1]),
        ]
        assert [status for status, _ in answers] == [401, 401, 401]
        assert proc.service("web")["backends"][0]["weight"] == 1
        status, body = _post(proc.admin, path, {"weight": 5}, TOKEN)
        assert status == 200, body
        assert json.loads(body)["weight"] == 5
        # Reading stays open: the token guards changes, and the reads must not reveal it.
        bodies = [body for _, body in answers]
        for route in ("/api/v1/services", "/api/v1/services/web", "/metrics", "/healthz"):
            status, body = proc.http_get(route)
            assert status == 200, route
            bodies.append(body)
        status, body = proc.http_get("/api/v1/openapi.json")
        schemes = json.loads(body)["components"]["securitySchemes"]
        assert schemes == {"bearerAuth": {"type": "http", "scheme": "bearer"}}
        bodies.append(body)
    for body in bodies:
        assert TOKEN.encode() not in body
    assert TOKEN not in proc.stderr_text()


def test_check_config_applies_the_same_file_checks(tmp_path: Path, token_file: Path) -> None:
    def check(cfg: dict[str, Any], mode: int = 0o644) -> subprocess.CompletedProcess[str]:
        path = tmp_path / "l4lb.toml"
        path.write_text(dumps_toml(cfg))
        path.chmod(mode)
        return subprocess.run(
            [sys.executable, "-m", "l4lb", "check-config", str(path)],
            capture_output=True, text=True, check=False, timeout=30,
        )  # fmt: skip

    good = _config("127.0.0.1:8080")
    assert check(good).returncode == 0
    r = check(good, 0o666)
    assert r.returncode == 1 and "refusing a world-writable config file" in r.stderr
    exposed = _config("127.0.0.1:8080")
    exposed["admin"]["listen"] = "0.0.0.0:9901"
    r = check(exposed)
    assert r.returncode == 1 and "is not a loopback address" in r.stderr
    exposed["admin"]["token_file"] = str(token_file)
    assert check(exposed).returncode == 0
    token_file.chmod(0o644)
    r = check(exposed)
    assert r.returncode == 1 and "run chmod 600" in r.stderr and TOKEN not in r.stderr
    assert "Traceback" not in r.stderr


def test_systemd_unit_grants_what_the_non_root_test_uses() -> None:
    unit = Path(__file__).resolve().parents[2] / "deploy" / "systemd" / "l4lb.service"
    settings: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.startswith("#"):
            settings.setdefault(key.strip(), []).append(value.strip())
    caps = {
        f"+{c.removeprefix('CAP_').lower()}" for c in settings["AmbientCapabilities"][0].split()
    }
    assert caps == set(CAPS.split(","))
    assert settings["CapabilityBoundingSet"] == settings["AmbientCapabilities"]
    assert settings["User"] == ["l4lb"] and settings["NoNewPrivileges"] == ["yes"]
    assert settings["ProtectSystem"] == ["strict"]


# --------------------------------------------------------------------------- non-root


def _setpriv_reason() -> str | None:
    reason = unavailable_reason()
    if reason:
        return reason
    if shutil.which("setpriv") is None:
        return "setpriv (util-linux) is not installed"
    probe = subprocess.run(
        ["setpriv", "--reuid", str(UNPRIVILEGED), "--regid", str(UNPRIVILEGED), "--clear-groups",
         f"--inh-caps=-all,{CAPS}", f"--ambient-caps={CAPS}", "true"],
        capture_output=True, text=True, check=False, timeout=10,
    )  # fmt: skip
    if probe.returncode != 0:
        return f"setpriv cannot grant ambient capabilities here: {probe.stderr.strip()}"
    return None


@pytest.fixture
def netns() -> Iterator[Netns]:
    reason = _setpriv_reason()
    if reason:
        pytest.skip(reason)
    ns = Netns.create("priv")
    yield ns
    ns.delete()


def _caps(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key.startswith("Cap"):
            fields[key] = int(value, 16)
        elif key in ("Uid", "Gid", "NoNewPrivs"):
            fields[key] = int(value.split()[0])
    return fields


def test_runs_as_non_root_with_two_capabilities(netns: Netns) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="l4lb-priv-"))
    os.chown(workdir, UNPRIVILEGED, UNPRIVILEGED)
    setpriv = [
        "setpriv", "--reuid", str(UNPRIVILEGED), "--regid", str(UNPRIVILEGED), "--clear-groups",
        f"--inh-caps=-all,{CAPS}", f"--ambient-caps={CAPS}", f"--bounding-set=-all,{CAPS}",
        "--no-new-privs",
    ]  # fmt: skip
    try:
        with in_netns(netns):
            backend = EchoServer().start()
            cfg = _config(backend.address)
            cfg["services"][0]["listen"] = "127.0.0.1:80"
            proc = L4lbProcess(
                cfg,
                workdir=workdir,
                command=[*setpriv, sys.executable, "-m", "l4lb"],
                env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
            )
            for path in workdir.iterdir():
                os.chown(path, UNPRIVILEGED, UNPRIVILEGED)
            with backend, proc:
                status = _caps(proc.pid)
                assert (status["Uid"], status["Gid"], status["NoNewPrivs"]) == (
                    UNPRIVILEGED,
                    UNPRIVILEGED,
                    1,
                )
                for key in ("CapEff", "CapPrm", "CapAmb", "CapBnd"):
                    assert status[key] == CAP_MASK, (key, hex(status[key]))
                assert proc.service_address("web") == "127.0.0.1:80"
                payload = os.urandom(256 * 1024)
                with connect("127.0.0.1:80") as sock:
                    sock.sendall(payload)
                    sock.shutdown(socket.SHUT_WR)
                    echoed = b"".join(iter(lambda: sock.recv(65536), b""))
                assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()
                assert proc.service("web")["total"] == 1
            assert proc.returncode == 0
            assert "Traceback" not in proc.stderr_text()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
