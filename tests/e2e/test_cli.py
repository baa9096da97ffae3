"""The command line as an operator meets it: check-config, run, status, --version."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from l4lb import __version__
from l4lb._testbase import connect_name

from .conftest import lb_config

GOOD = """
[admin]
listen = "127.0.0.1:9901"
[[services]]
name = "web"
listen = "127.0.0.1:8080"
[[services.backends]]
address = "127.0.0.1:9001"
"""

# (what is wrong, config text, text that must appear in the message)
BAD = [
    (
        "unknown key",
        GOOD.replace('name = "web"', 'name = "web"\nsheduler = "rr"'),
        "services[0].sheduler: unknown key (did you mean 'scheduler'?)",
    ),
    (
        "wrong type",
        GOOD.replace('address = "127.0.0.1:9001"', 'address = "127.0.0.1:9001"\nweight = "2"'),
        "services[0].backends[0].weight",
    ),
    (
        "bad address",
        GOOD.replace("127.0.0.1:9001", "127.0.0.300:9001"),
        "services[0].backends[0].address",
    ),
    (
        "hostname",
        GOOD.replace("127.0.0.1:9001", "backend.local:9001"),
        "services[0].backends[0].address",
    ),
    (
        "port out of range",
        GOOD.replace("127.0.0.1:9001", "127.0.0.1:70000"),
        "services[0].backends[0].address",
    ),
    (
        "duplicate listen",
        GOOD + GOOD[GOOD.index("[[services]]") :].replace('"web"', '"api"'),
        "services[1].listen",
    ),
    (
        "unknown scheduler",
        GOOD.replace('name = "web"', 'name = "web"\nscheduler = "fastest"'),
        "services[0].scheduler",
    ),
    (
        "weight out of range",
        GOOD.replace('address = "127.0.0.1:9001"', 'address = "127.0.0.1:9001"\nweight = 70000'),
        "services[0].backends[0].weight",
    ),
    (
        "negative timeout",
        GOOD.replace('name = "web"', 'name = "web"\nconnect_timeout = -1'),
        "services[0].connect_timeout",
    ),
    ("missing listen", GOOD.replace('listen = "127.0.0.1:8080"\n', ""), "services[0].listen"),
    ("toml syntax", GOOD.replace('name = "web"', 'name = "web'), "line "),
    (
        "lower above upper",
        GOOD.replace(
            'address = "127.0.0.1:9001"',
            'address = "127.0.0.1:9001"\nupper_threshold = 5\nlower_threshold = 9',
        ),
        "services[0].backends[0].lower_threshold",
    ),
]


def _l4lb(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "l4lb", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def test_version():
    r = _l4lb("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"l4lb {__version__}"


def test_check_config_accepts_a_good_file(tmp_path: Path):
    f = tmp_path / "good.toml"
    f.write_text(GOOD)
    r = _l4lb("check-config", str(f))
    assert r.returncode == 0, r.stderr
    assert "ok (1 service(s))" in r.stdout


def test_the_bundled_example_is_valid():
    example = Path(__file__).resolve().parents[2] / "examples" / "demo.toml"
    assert _l4lb("check-config", str(example)).returncode == 0


@pytest.mark.parametrize(("kind", "text", "expected"), BAD, ids=[b[0] for b in BAD])
def test_check_config_names_file_key_and_problem(tmp_path: Path, kind, text, expected):
    f = tmp_path / "bad.toml"
    f.write_text(text)
    r = _l4lb("check-config", str(f))
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    assert str(f) in r.stderr and expected in r.stderr, r.stderr


@pytest.mark.parametrize(("kind", "text", "expected"), BAD[:4], ids=[b[0] for b in BAD[:4]])
def test_run_refuses_a_bad_config(tmp_path: Path, kind, text, expected):
    f = tmp_path / "bad.toml"
    f.write_text(text)
    r = _l4lb("run", "--config", str(f))
    assert r.returncode != 0
    assert "Traceback" not in r.stderr and expected in r.stderr, r.stderr


def test_run_with_a_missing_file(tmp_path: Path):
    r = _l4lb("run", "--config", str(tmp_path / "nope.toml"))
    assert r.returncode != 0 and "cannot read" in r.stderr and "Traceback" not in r.stderr


def test_a_taken_listen_address_fails_that_service_only(l4lb, named_backends):
    (b0,) = named_backends(1)
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    with taken:
        cfg = lb_config([b0.address])
        cfg["services"].append(
            {
                "name": "clash",
                "listen": f"127.0.0.1:{taken.getsockname()[1]}",
                "backends": [{"address": b0.address}],
            }
        )
        lb = l4lb(cfg)
        assert connect_name(lb.service_address("web")) == "b0"
        assert "service clash:" in lb.stderr_text()
        assert "Address already in use" in lb.stderr_text()


def test_status_prints_an_ipvsadm_like_table(l4lb, named_backends):
    b0, b1 = named_backends(2)
    lb = l4lb(lb_config([b0.address, b1.address]))
    for _ in range(4):
        connect_name(lb.service_address("web"))
    r = _l4lb("status", "--admin", lb.admin)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    svc_line = next(line for line in lines if line.startswith("TCP"))
    assert lb.service_address("web") in svc_line and "rr" in svc_line
    rows = [line.split() for line in lines if line.strip().startswith("->") and "127.0.0.1" in line]
    # Weight ActiveConn InActConn Conns: two connections each, all closed.
    assert sorted((r[1], r[2], r[5]) for r in rows) == sorted(
        [(b0.address, "1", "2"), (b1.address, "1", "2")]
    )
    doc = json.loads(_l4lb("status", "--admin", lb.admin, "--json").stdout)
    assert [b["total"] for b in doc["services"][0]["backends"]] == [2, 2]


def test_status_without_a_server_fails_cleanly():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    with s:
        r = _l4lb("status", "--admin", f"127.0.0.1:{s.getsockname()[1]}")
    assert r.returncode == 1 and "l4lb status:" in r.stderr and "Traceback" not in r.stderr
