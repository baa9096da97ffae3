"""Tests for l4lb.config: every field's happy path, every kind of mistake, and fuzzing."""

from __future__ import annotations

import dataclasses
import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from l4lb.config import (
    SCHEDULERS,
    Address,
    AdminConfig,
    BackendConfig,
    Config,
    ConfigError,
    DataplaneConfig,
    HealthConfig,
    ServiceConfig,
    load_config,
    parse_config,
)

FULL = """
[admin]
listen = "[::1]:9999"
token_file = "/etc/l4lb/token"

[dataplane]
workers = 4
pipe_size = 1048576
max_pipes = 512
max_connections = 10000
drain_timeout = 5
inactive_timeout = 60.5
reset_inactive_timeout = 2

[[services]]
name = "web"
listen = "127.0.0.1:8080"
protocol = "tcp"
scheduler = "sh"
affinity_timeout = 300
affinity_netmask = "255.255.255.0"
affinity_netmask6 = 64
expire_quiescent = true
sh_fallback = true
sh_port = true
connect_timeout = 1.5
idle_timeout = 60
drain_timeout = 7.5
retries = 2

[[services.backends]]
address = "127.0.0.1:9001"
weight = 3
upper_threshold = 100
lower_threshold = 50

[[services.backends]]
address = "[::1]:9002"
weight = 0

[[services]]
name = "api.v2_x-1"
listen = "[::]:0"
affinity_netmask = 20
"""

MINIMAL_SERVICE = """
[[services]]
name = "web"
listen = "127.0.0.1:8080"
"""


def write(tmp_path: Path, text: str, name: str = "l4lb.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- happy paths


def test_full_config_sets_every_field(tmp_path: Path) -> None:
    path = write(tmp_path, FULL)
    cfg = load_config(path)

    assert cfg.source == str(path)
    assert cfg.admin == AdminConfig(
        listen=Address("::1", 9999, socket.AF_INET6), token_file="/etc/l4lb/token"
    )
    assert cfg.dataplane == DataplaneConfig(
        workers=4,
        pipe_size=1048576,
        max_pipes=512,
        max_connections=10000,
        drain_timeout=5.0,
        inactive_timeout=60.5,
        reset_inactive_timeout=2.0,
    )
    web = cfg.service("web")
    assert web == ServiceConfig(
        name="web",
        listen=Address("127.0.0.1", 8080, socket.AF_INET),
        protocol="tcp",
        scheduler="sh",
        affinity_timeout=300.0,
        affinity_netmask=24,
        affinity_netmask6=64,
        expire_quiescent=True,
        sh_fallback=True,
        sh_port=True,
        connect_timeout=1.5,
        idle_timeout=60.0,
        drain_timeout=7.5,
        retries=2,
        backends=(
            BackendConfig(Address("127.0.0.1", 9001, socket.AF_INET), 3, 100, 50),
            BackendConfig(Address("::1", 9002, socket.AF_INET6), 0, 0, 0),
        ),
    )
    other = cfg.service("api.v2_x-1")
    assert other.listen == Address("::", 0, socket.AF_INET6)
    assert other.affinity_netmask == 20
    assert other.backends == ()
    assert [s.name for s in cfg.services] == ["web", "api.v2_x-1"]


def test_seconds_given_as_integers_become_floats(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, FULL))
    assert type(cfg.dataplane.drain_timeout) is float
    assert type(cfg.service("web").idle_timeout) is float
    assert type(cfg.service("web").affinity_timeout) is float


def test_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, MINIMAL_SERVICE))
    assert cfg.admin == AdminConfig()
    assert cfg.admin.listen == Address("127.0.0.1", 9901, socket.AF_INET)
    assert cfg.admin.token_file is None
    assert cfg.dataplane == DataplaneConfig()
    assert cfg.dataplane.pipe_size == 65536
    svc = cfg.service("web")
    assert svc == ServiceConfig(name="web", listen=Address("127.0.0.1", 8080, socket.AF_INET))
    assert (svc.protocol, svc.scheduler, svc.affinity_timeout) == ("tcp", "rr", 0.0)
    assert (svc.affinity_netmask, svc.affinity_netmask6) == (32, 128)
    assert (svc.connect_timeout, svc.idle_timeout) == (3.0, 900.0)
    assert (svc.drain_timeout, svc.retries, svc.backends) == (None, None, ())
    assert not (svc.expire_quiescent or svc.sh_fallback or svc.sh_port)


HEALTH_FULL = """
[[services]]
name = "web"
listen = "127.0.0.1:8080"
[services.health]
kind = "http"
interval = 5
timeout = 0.5
rise = 1
fall = 4
port = 8081
jitter = 0.25
initial = "down"
http_path = "/healthz?full=1"
http_host = "web.example"
http_method = "HEAD"
expect_status = [200, 204]
passive = false
slowstart = 30
on_down = "reset"
all_down = "all"
"""


def test_health_table_sets_every_field(tmp_path: Path) -> None:
    health = load_config(write(tmp_path, HEALTH_FULL)).service("web").health
    assert health == HealthConfig(
        kind="http",
        interval=5.0,
        timeout=0.5,
        rise=1,
        fall=4,
        port=8081,
        jitter=0.25,
        initial="down",
        http_path="/healthz?full=1",
        http_host="web.example",
        http_method="HEAD",
        expect_status=(200, 204),
        expect_body=None,
        passive=False,
        slowstart=30.0,
        on_down="reset",
        all_down="all",
    )


def test_health_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, MINIMAL_SERVICE + "[services.health]\n"))
    health = cfg.service("web").health
    assert health == HealthConfig()
    assert (health.kind, health.interval, health.timeout, health.rise, health.fall) == (
        "tcp",
        2.0,
        1.0,
        2,
        3,
    )
    assert (health.port, health.jitter, health.initial, health.passive) == (None, 0.1, "up", True)
    assert (health.http_path, health.http_host, health.http_method) == ("/", None, "GET")
    assert (health.expect_status, health.expect_body, health.slowstart) == ((200, 399), None, 0.0)
    assert (health.on_down, health.all_down) == ("keep", "reject")


def test_no_health_table_means_no_checking(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, MINIMAL_SERVICE)).service("web").health is None


def test_unset_health_timeout_follows_a_short_interval(tmp_path: Path) -> None:
    text = MINIMAL_SERVICE + "[services.health]\ninterval = 0.2\n"
    health = load_config(write(tmp_path, text)).service("web").health
    assert health is not None and (health.interval, health.timeout) == (0.2, 0.2)


def test_health_expect_status_single_code_and_body(tmp_path: Path) -> None:
    text = MINIMAL_SERVICE + (
        '[services.health]\nkind = "http"\nexpect_status = 204\nexpect_body = "ready"\n'
    )
    health = load_config(write(tmp_path, text)).service("web").health
    assert health is not None
    assert (health.expect_status, health.expect_body) == ((204, 204), "ready")


def test_health_as_inline_table() -> None:
    svc = {"name": "a", "listen": "127.0.0.1:1", "health": {"kind": "tcp", "fall": 1}}
    health = parse_config({"services": [svc]}, source="t").service("a").health
    assert health == HealthConfig(fall=1)


def test_empty_file_is_a_valid_config(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, ""))
    assert cfg.services == ()
    assert cfg.dataplane == DataplaneConfig()


def test_documented_shape(tmp_path: Path) -> None:
    text = """
[admin]
listen = "127.0.0.1:9901"
[dataplane]
workers = 2
[[services]]
name = "web"
listen = "127.0.0.1:8080"
protocol = "tcp"
scheduler = "rr"
affinity_timeout = 0
[[services.backends]]
address = "127.0.0.1:9001"
weight = 1
"""
    cfg = load_config(write(tmp_path, text))
    assert cfg.dataplane.workers == 2
    assert cfg.service("web").backends == (
        BackendConfig(Address("127.0.0.1", 9001, socket.AF_INET), weight=1),
    )


def test_inline_tables_are_accepted(tmp_path: Path) -> None:
    text = (
        'services = [{name = "a", listen = "127.0.0.1:1", backends = [{address = "10.0.0.1:2"}]}]'
    )
    cfg = load_config(write(tmp_path, text))
    assert cfg.service("a").backends[0].address == Address("10.0.0.1", 2, socket.AF_INET)


@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
def test_every_scheduler_is_accepted(scheduler: str) -> None:
    cfg = parse_config(
        {"services": [{"name": "s", "listen": "127.0.0.1:1", "scheduler": scheduler}]},
        source="x.toml",
    )
    assert cfg.service("s").scheduler == scheduler


@pytest.mark.parametrize(
    ("mask", "prefix"),
    [("0.0.0.0", 0), ("128.0.0.0", 1), ("255.255.255.0", 24), ("255.255.255.255", 32), (0, 0)],
)
def test_netmask_forms(mask: object, prefix: int) -> None:
    data = {"services": [{"name": "s", "listen": "127.0.0.1:1", "affinity_netmask": mask}]}
    assert parse_config(data, source="x.toml").service("s").affinity_netmask == prefix


def test_lower_threshold_may_exceed_zero_upper() -> None:
    # upper 0 means "no limit", so the lower threshold is not compared with it.
    backend = {"address": "127.0.0.1:2", "lower_threshold": 5}
    data = {"services": [{"name": "s", "listen": "127.0.0.1:1", "backends": [backend]}]}
    assert parse_config(data, source="x.toml").service("s").backends[0].lower_threshold == 5


def test_port_zero_listeners_do_not_collide() -> None:
    data = {
        "admin": {"listen": "127.0.0.1:0"},
        "services": [
            {"name": "a", "listen": "127.0.0.1:0"},
            {"name": "b", "listen": "127.0.0.1:0"},
        ],
    }
    assert len(parse_config(data, source="x.toml").services) == 2


def test_same_backend_in_two_services_is_fine() -> None:
    backends = [{"address": "127.0.0.1:9"}]
    data = {
        "services": [
            {"name": "a", "listen": "127.0.0.1:1", "backends": backends},
            {"name": "b", "listen": "127.0.0.1:2", "backends": backends},
        ]
    }
    assert len(parse_config(data, source="x.toml").services) == 2


def test_vip_service_needs_no_listen() -> None:
    data = {
        "services": [{"name": "s", "vips": ["10.96.0.10:53", "[fd00::10]:53"], "protocol": "udp"}]
    }
    svc = parse_config(data, source="x.toml").service("s")
    assert svc.listen is None
    assert [str(v) for v in svc.vips] == ["10.96.0.10:53", "[fd00::10]:53"]
    assert svc.udp_idle_timeout == 30.0
    assert svc.mode == "splice"


def test_same_address_for_tcp_and_udp_is_fine() -> None:
    data = {
        "services": [
            {"name": "a", "listen": "127.0.0.1:53", "vips": ["10.0.0.1:53"]},
            {"name": "b", "listen": "127.0.0.1:53", "vips": ["10.0.0.1:53"], "protocol": "udp"},
        ]
    }
    assert len(parse_config(data, source="x.toml").services) == 2


def test_udp_proxy_offload_and_limit_keys() -> None:
    data = {
        "services": [
            {"name": "dns", "listen": "127.0.0.1:53", "protocol": "udp", "udp_idle_timeout": 0.25},
            {"name": "web", "listen": "127.0.0.1:80", "send_proxy": "v2", "max_connections": 7},
            {
                "name": "kern",
                "vips": ["10.0.0.1:80"],
                "mode": "offload",
                "scheduler": "mh",
                "sh_port": True,
                "health": {"inhibit_on_failure": False},
            },
        ]
    }
    cfg = parse_config(data, source="x.toml")
    assert cfg.service("dns").udp_idle_timeout == 0.25
    assert (cfg.service("web").send_proxy, cfg.service("web").max_connections) == ("v2", 7)
    kern = cfg.service("kern")
    assert (kern.mode, kern.scheduler, kern.sh_port) == ("offload", "mh", True)
    assert kern.health is not None and not kern.health.inhibit_on_failure


def test_service_lookup_raises_key_error() -> None:
    cfg = parse_config({}, source="x.toml")
    with pytest.raises(KeyError):
        cfg.service("nope")


def test_values_are_frozen(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, FULL))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.services[0].name = "other"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.admin.listen = Address("127.0.0.1", 1, socket.AF_INET)  # type: ignore[misc]


def test_load_config_accepts_str_path(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL_SERVICE)
    assert load_config(str(path)).source == str(path)


# ----------------------------------------------------------------------------- Address


@pytest.mark.parametrize(
    ("text", "host", "port", "family", "shown"),
    [
        ("127.0.0.1:80", "127.0.0.1", 80, socket.AF_INET, "127.0.0.1:80"),
        ("[::1]:443", "::1", 443, socket.AF_INET6, "[::1]:443"),
        ("[0:0:0::0:1]:1", "::1", 1, socket.AF_INET6, "[::1]:1"),
        ("[2001:DB8::A]:65535", "2001:db8::a", 65535, socket.AF_INET6, "[2001:db8::a]:65535"),
        ("0.0.0.0:8080", "0.0.0.0", 8080, socket.AF_INET, "0.0.0.0:8080"),
    ],
)
def test_address_parse(text: str, host: str, port: int, family: int, shown: str) -> None:
    addr = Address.parse(text)
    assert (addr.host, addr.port, addr.family) == (host, port, family)
    assert str(addr) == shown
    assert Address.parse(str(addr)) == addr


def test_address_port_zero_needs_permission() -> None:
    assert Address.parse("127.0.0.1:0", allow_port_zero=True).port == 0
    with pytest.raises(ValueError, match="only allowed for listen"):
        Address.parse("127.0.0.1:0")


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("localhost:80", "'localhost' is a hostname; use an IP address"),
        ("db.example.com:5432", "'db.example.com' is a hostname"),
        ("[web]:80", "'web' is a hostname"),
        ("::1:80", "IPv6 addresses must be in brackets"),
        ("127.0.0.1", "expected 'IP:PORT' (port missing)"),
        ("127.0.0.1:", "port must be a number"),
        ("127.0.0.1:+80", "port must be a number"),
        ("127.0.0.1:٨٠", "port must be a number"),
        ("127.0.0.1:65536", "port must be from 1 to 65535"),
        ("127.0.0.1:000000080", "port must be a number"),
        ("[::1]", "expected '[IPv6]:PORT'"),
        ("[::1:80", "expected '[IPv6]:PORT'"),
        ("[127.0.0.1]:80", "brackets are only for IPv6"),
        ("[fe80::1%eth0]:80", "scoped IPv6 addresses"),
        ("256.1.1.1:80", "'256.1.1.1' is not a valid IP address"),
        ("01.2.3.4:80", "'01.2.3.4' is not a valid IP address"),
        (" 127.0.0.1:80", "is not a valid IP address"),
        ("", "port missing"),
    ],
)
def test_address_parse_errors(text: str, reason: str) -> None:
    with pytest.raises(ValueError) as info:
        Address.parse(text)
    assert str(info.value).startswith(f"invalid address {text!r}: ")
    assert reason in str(info.value)


# ----------------------------------------------------------------------------- mistakes

SVC = '[[services]]\nname = "web"\nlisten = "127.0.0.1:8080"\n'
BACKEND = '[[services.backends]]\naddress = "127.0.0.1:9001"\n'

MISTAKES: list[tuple[str, str, str]] = [
    # (id, TOML text, expected message after "FILE: ")
    (
        "unknown-key",
        (
            '[[services]]\nname = "web"\nlisten = "127.0.0.1:80"\n[[services]]\nname = "b"\n'
            'listen = "127.0.0.1:81"\nsheduler = "rr"\n'
        ),
        "services[1].sheduler: unknown key (did you mean 'scheduler'?)",
    ),
    (
        "unknown-key-before-missing-required",
        '[[services]]\nnmae = "web"\nlisten = "127.0.0.1:80"\n',
        "services[0].nmae: unknown key (did you mean 'name'?)",
    ),
    (
        "unknown-key-no-hint",
        SVC + "colour = 1\n",
        "services[0].colour: unknown key",
    ),
    (
        "unknown-key-quoted",
        SVC + '"odd key" = 1\n',
        'services[0]."odd key": unknown key',
    ),
    (
        "unknown-top-level-table",
        "[dataplain]\nworkers = 1\n",
        "dataplain: unknown key (did you mean 'dataplane'?)",
    ),
    (
        "unknown-backend-key",
        SVC + BACKEND + "wieght = 2\n",
        "services[0].backends[0].wieght: unknown key (did you mean 'weight'?)",
    ),
    (
        "unknown-admin-key",
        '[admin]\ntoken = "x"\n',
        "admin.token: unknown key (did you mean 'token_file'?)",
    ),
    (
        "wrong-type-string-for-integer",
        '[dataplane]\nworkers = "2"\n',
        "dataplane.workers: must be an integer from 0 to 256, got string '2'",
    ),
    (
        "wrong-type-float-for-integer",
        SVC + BACKEND + "weight = 1.5\n",
        "services[0].backends[0].weight: must be an integer from 0 to 65535, got float 1.5",
    ),
    (
        "wrong-type-integer-for-string",
        "[[services]]\nname = 5\nlisten = '127.0.0.1:80'\n",
        "services[0].name: must be a string, got integer 5",
    ),
    (
        "wrong-type-string-for-bool",
        SVC + 'sh_port = "yes"\n',
        "services[0].sh_port: must be true or false, got string 'yes'",
    ),
    (
        "wrong-type-table-for-scalar",
        SVC + "[services.connect_timeout]\n",
        (
            "services[0].connect_timeout: must be a number of seconds greater than 0 and at most"
            " 3600, got table"
        ),
    ),
    (
        "admin-not-a-table",
        'admin = "127.0.0.1:1"\n',
        "admin: must be a table, got string '127.0.0.1:1'",
    ),
    (
        "services-not-an-array",
        '[services]\nname = "web"\n',
        "services: must be an array of tables ([[services]]), got table",
    ),
    (
        "backends-not-an-array",
        SVC + "backends = 3\n",
        "services[0].backends: must be an array of tables ([[services.backends]]), got integer 3",
    ),
    (
        "backend-not-a-table",
        SVC + "backends = [1]\n",
        "services[0].backends[0]: must be a table, got integer 1",
    ),
    (
        "bad-address",
        '[[services]]\nname = "web"\nlisten = "127.0.0.1-80"\n',
        "services[0].listen: invalid address '127.0.0.1-80': expected 'IP:PORT' (port missing)",
    ),
    (
        "hostname",
        SVC + '[[services.backends]]\naddress = "backend.local:9001"\n',
        (
            "services[0].backends[0].address: invalid address 'backend.local:9001': "
            "'backend.local' is a hostname; use an IP address (names are not resolved, "
            "so reloads never depend on DNS)"
        ),
    ),
    (
        "ipv6-without-brackets",
        '[admin]\nlisten = "::1:9901"\n',
        (
            "admin.listen: invalid address '::1:9901': IPv6 addresses must be in brackets, "
            "like '[::1]:80'"
        ),
    ),
    (
        "port-out-of-range",
        '[[services]]\nname = "web"\nlisten = "127.0.0.1:65536"\n',
        "services[0].listen: invalid address '127.0.0.1:65536': port must be from 0 to 65535",
    ),
    (
        "backend-port-zero",
        SVC + '[[services.backends]]\naddress = "127.0.0.1:0"\n',
        (
            "services[0].backends[0].address: invalid address '127.0.0.1:0': "
            "port 0 (any free port) is only allowed for listen addresses"
        ),
    ),
    (
        "duplicate-listen",
        SVC + '[[services]]\nname = "api"\nlisten = "127.0.0.1:8080"\n',
        "services[1].listen: 127.0.0.1:8080 is already used by service 'web' (services[0].listen)",
    ),
    (
        "duplicate-listen-normalised",
        (
            '[[services]]\nname = "a"\nlisten = "[::1]:80"\n'
            '[[services]]\nname = "b"\nlisten = "[0::1]:80"\n'
        ),
        "services[1].listen: [::1]:80 is already used by service 'a' (services[0].listen)",
    ),
    (
        "listen-collides-with-admin",
        '[admin]\nlisten = "127.0.0.1:8080"\n' + SVC,
        "services[0].listen: 127.0.0.1:8080 is already used by admin.listen",
    ),
    (
        "duplicate-backend",
        SVC + BACKEND + '[[services.backends]]\naddress = "127.0.0.1:9002"\n' + BACKEND,
        (
            "services[0].backends[2].address: duplicate backend 127.0.0.1:9001 "
            "(also services[0].backends[0])"
        ),
    ),
    (
        "duplicate-service-name",
        SVC + '[[services]]\nname = "web"\nlisten = "127.0.0.1:8081"\n',
        "services[1].name: duplicate service name 'web' (also services[0])",
    ),
    (
        "bad-name",
        '[[services]]\nname = "-web"\nlisten = "127.0.0.1:80"\n',
        (
            "services[0].name: must be 1 to 63 characters of letters, digits, '_', '.' or '-', "
            "starting with a letter or digit, got '-web'"
        ),
    ),
    (
        "empty-name",
        '[[services]]\nname = ""\nlisten = "127.0.0.1:80"\n',
        (
            "services[0].name: must be 1 to 63 characters of letters, digits, '_', '.' or '-', "
            "starting with a letter or digit, got ''"
        ),
    ),
    (
        "name-too-long",
        f'[[services]]\nname = "{"a" * 64}"\nlisten = "127.0.0.1:80"\n',
        (
            "services[0].name: must be 1 to 63 characters of letters, digits, '_', '.' or '-', "
            f"starting with a letter or digit, got '{'a' * 57}'..."
        ),
    ),
    (
        "missing-name",
        '[[services]]\nlisten = "127.0.0.1:80"\n',
        "services[0].name: required key is missing",
    ),
    (
        "missing-backend-address",
        SVC + "[[services.backends]]\nweight = 1\n",
        "services[0].backends[0].address: required key is missing",
    ),
    (
        "unknown-scheduler-close",
        SVC + 'scheduler = "wrrr"\n',
        "services[0].scheduler: unknown scheduler 'wrrr' (did you mean 'wrr'?)",
    ),
    (
        "unknown-scheduler",
        SVC + 'scheduler = "maglev"\n',
        (
            "services[0].scheduler: unknown scheduler 'maglev' "
            "(expected one of: dh, lc, nq, rr, sed, sh, wlc, wrr)"
        ),
    ),
    (
        "weight-out-of-range",
        SVC + BACKEND + '[[services.backends]]\naddress = "127.0.0.1:9002"\nweight = 70000\n',
        "services[0].backends[1].weight: must be an integer from 0 to 65535, got 70000",
    ),
    (
        "negative-weight",
        SVC + BACKEND + "weight = -1\n",
        "services[0].backends[0].weight: must be an integer from 0 to 65535, got -1",
    ),
    (
        "threshold-out-of-range",
        SVC + BACKEND + "upper_threshold = 65536\n",
        "services[0].backends[0].upper_threshold: must be an integer from 0 to 65535, got 65536",
    ),
    (
        "lower-above-upper",
        SVC + BACKEND + "upper_threshold = 10\nlower_threshold = 11\n",
        "services[0].backends[0].lower_threshold: must not exceed upper_threshold (10), got 11",
    ),
    (
        "bad-netmask",
        SVC + 'affinity_netmask = "255.255.255"\n',
        (
            "services[0].affinity_netmask: must be a prefix length from 0 to 32 or a dotted mask "
            "like '255.255.255.0', got '255.255.255'"
        ),
    ),
    (
        "netmask-prefix-out-of-range",
        SVC + "affinity_netmask = 33\n",
        (
            "services[0].affinity_netmask: must be a prefix length from 0 to 32 or a dotted mask "
            "like '255.255.255.0', got 33"
        ),
    ),
    (
        "non-contiguous-mask",
        SVC + 'affinity_netmask = "255.0.255.0"\n',
        "services[0].affinity_netmask: '255.0.255.0' is not a contiguous netmask",
    ),
    (
        "netmask6-out-of-range",
        SVC + "affinity_netmask6 = 129\n",
        "services[0].affinity_netmask6: must be an integer from 0 to 128, got 129",
    ),
    (
        "negative-timeout",
        SVC + "affinity_timeout = -1\n",
        "services[0].affinity_timeout: must be a number of seconds from 0 to 2592000, got -1",
    ),
    (
        "zero-connect-timeout",
        SVC + "connect_timeout = 0\n",
        (
            "services[0].connect_timeout: must be a number of seconds greater than 0 and at most "
            "3600, got 0"
        ),
    ),
    (
        "idle-timeout-too-long",
        SVC + "idle_timeout = 604800.5\n",
        (
            "services[0].idle_timeout: must be a number of seconds greater than 0 and at most "
            "604800, got 604800.5"
        ),
    ),
    (
        "nan-timeout",
        "[dataplane]\ndrain_timeout = nan\n",
        "dataplane.drain_timeout: must be a number of seconds from 0 to 86400, got nan",
    ),
    (
        "infinite-timeout",
        SVC + "drain_timeout = inf\n",
        "services[0].drain_timeout: must be a number of seconds from 0 to 86400, got inf",
    ),
    (
        "udp-idle-timeout-on-tcp",
        SVC + "udp_idle_timeout = 5\n",
        "services[0].udp_idle_timeout: only meaningful with protocol = 'udp'",
    ),
    (
        "other-protocol",
        SVC + 'protocol = "TCP"\n',
        "services[0].protocol: must be 'tcp' or 'udp', got 'TCP'",
    ),
    (
        "no-listen-no-vips",
        '[[services]]\nname = "web"\n',
        "services[0].listen: required key is missing (or give vips)",
    ),
    (
        "vip-unspecified",
        SVC + 'vips = ["0.0.0.0:80"]\n',
        "services[0].vips[0]: a VIP must be a unicast address, 0.0.0.0 is unspecified",
    ),
    (
        "vip-port-zero",
        SVC + 'vips = ["10.0.0.1:0"]\n',
        (
            "services[0].vips[0]: invalid address '10.0.0.1:0': "
            "port 0 (any free port) is only allowed for listen addresses"
        ),
    ),
    (
        "vip-duplicate",
        SVC + 'vips = ["10.0.0.1:80", "10.0.0.1:80"]\n',
        "services[0].vips[1]: duplicate VIP 10.0.0.1:80 (also services[0].vips[0])",
    ),
    (
        "vip-not-array",
        SVC + 'vips = "10.0.0.1:80"\n',
        "services[0].vips: must be an array of 'IP:PORT' strings, got string '10.0.0.1:80'",
    ),
    (
        "vip-shared",
        SVC + 'vips = ["10.0.0.1:80"]\n' + '[[services]]\nname = "b"\nvips = ["10.0.0.1:80"]\n',
        (
            "services[1].vips[0]: tcp 10.0.0.1:80 is already used by service 'web' "
            "(services[0].vips[0])"
        ),
    ),
    (
        "kernel-scheduler-in-splice-mode",
        SVC + 'scheduler = "mh"\n',
        "services[0].scheduler: 'mh' is a kernel-only scheduler: it needs mode = 'offload'",
    ),
    (
        "send-proxy-udp",
        SVC + 'protocol = "udp"\nsend_proxy = "v2"\n',
        "services[0].send_proxy: the PROXY protocol is only sent over TCP",
    ),
    (
        "send-proxy-bad",
        SVC + 'send_proxy = "v3"\n',
        "services[0].send_proxy: must be 'v1' or 'v2', got 'v3'",
    ),
    (
        "offload-wildcard",
        '[[services]]\nname = "web"\nlisten = "0.0.0.0:80"\nmode = "offload"\n',
        (
            "services[0].listen: an offloaded service needs a concrete IP and port as its VIP "
            "(or vips), got 0.0.0.0:80"
        ),
    ),
    (
        "offload-mixed-family",
        '[[services]]\nname = "web"\nvips = ["10.0.0.1:80"]\nmode = "offload"\n'
        + '[[services.backends]]\naddress = "[fd00::1]:80"\n',
        (
            "services[0].backends[0].address: [fd00::1]:80 is of another address family than "
            "every VIP (IPVS masquerading does not translate between IPv4 and IPv6)"
        ),
    ),
    (
        "offload-max-connections",
        '[[services]]\nname = "web"\nvips = ["10.0.0.1:80"]\nmode = "offload"\n'
        + "max_connections = 5\n",
        (
            "services[0].max_connections: not available with mode = 'offload' "
            "(use the backends' upper_threshold)"
        ),
    ),
    (
        "bool-as-int",
        SVC + BACKEND + "weight = true\n",
        "services[0].backends[0].weight: must be an integer from 0 to 65535, got boolean true",
    ),
    (
        "bool-as-seconds",
        SVC + "idle_timeout = false\n",
        (
            "services[0].idle_timeout: must be a number of seconds greater than 0 and at most "
            "604800, got boolean false"
        ),
    ),
    (
        "sh-fallback-without-sh",
        SVC + "sh_fallback = true\n",
        (
            "services[0].sh_fallback: only meaningful with scheduler = 'sh' or 'mh' "
            "(scheduler is 'rr')"
        ),
    ),
    (
        "sh-port-without-sh",
        SVC + 'scheduler = "wrr"\nsh_port = true\n',
        "services[0].sh_port: only meaningful with scheduler = 'sh' or 'mh' (scheduler is 'wrr')",
    ),
    (
        "health-not-a-table",
        SVC + 'health = "tcp"\n',
        "services[0].health: must be a table, got string 'tcp'",
    ),
    (
        "health-unknown-key",
        SVC + "[services.health]\nintervall = 2\n",
        "services[0].health.intervall: unknown key (did you mean 'interval'?)",
    ),
    (
        "health-unknown-kind",
        SVC + '[services.health]\nkind = "icmp"\n',
        "services[0].health.kind: must be 'tcp' or 'http', got 'icmp'",
    ),
    (
        "health-misspelt-kind",
        SVC + '[services.health]\nkind = "htp"\n',
        "services[0].health.kind: must be 'tcp' or 'http', got 'htp' (did you mean 'http'?)",
    ),
    (
        "health-negative-interval",
        SVC + "[services.health]\ninterval = -1\n",
        (
            "services[0].health.interval: must be a number of seconds greater than 0 and at "
            "most 3600, got -1"
        ),
    ),
    (
        "health-zero-interval",
        SVC + "[services.health]\ninterval = 0\n",
        (
            "services[0].health.interval: must be a number of seconds greater than 0 and at "
            "most 3600, got 0"
        ),
    ),
    (
        "health-timeout-over-interval",
        SVC + "[services.health]\ninterval = 1\ntimeout = 1.5\n",
        "services[0].health.timeout: must not exceed interval (1 s), got 1.5",
    ),
    (
        "health-explicit-timeout-over-short-interval",
        SVC + "[services.health]\ninterval = 0.5\ntimeout = 1\n",
        "services[0].health.timeout: must not exceed interval (0.5 s), got 1",
    ),
    (
        "health-rise-zero",
        SVC + "[services.health]\nrise = 0\n",
        "services[0].health.rise: must be an integer from 1 to 100, got 0",
    ),
    (
        "health-fall-zero",
        SVC + "[services.health]\nfall = 0\n",
        "services[0].health.fall: must be an integer from 1 to 100, got 0",
    ),
    (
        "health-fall-float",
        SVC + "[services.health]\nfall = 2.5\n",
        "services[0].health.fall: must be an integer from 1 to 100, got float 2.5",
    ),
    (
        "health-port-out-of-range",
        SVC + "[services.health]\nport = 65536\n",
        "services[0].health.port: must be an integer from 1 to 65535, got 65536",
    ),
    (
        "health-port-zero",
        SVC + "[services.health]\nport = 0\n",
        "services[0].health.port: must be an integer from 1 to 65535, got 0",
    ),
    (
        "health-jitter-too-large",
        SVC + "[services.health]\njitter = 0.6\n",
        "services[0].health.jitter: must be a number from 0 to 0.5, got 0.6",
    ),
    (
        "health-jitter-negative",
        SVC + "[services.health]\njitter = -0.1\n",
        "services[0].health.jitter: must be a number from 0 to 0.5, got -0.1",
    ),
    (
        "health-initial",
        SVC + '[services.health]\ninitial = "unknown"\n',
        "services[0].health.initial: must be 'up' or 'down', got 'unknown'",
    ),
    (
        "health-http-key-with-tcp",
        SVC + '[services.health]\nhttp_path = "/health"\n',
        "services[0].health.http_path: only meaningful with kind = 'http' (kind is 'tcp')",
    ),
    (
        "health-expect-status-with-tcp",
        SVC + '[services.health]\nkind = "tcp"\nexpect_status = [200, 299]\n',
        "services[0].health.expect_status: only meaningful with kind = 'http' (kind is 'tcp')",
    ),
    (
        "health-http-method",
        SVC + '[services.health]\nkind = "http"\nhttp_method = "POST"\n',
        "services[0].health.http_method: must be 'GET' or 'HEAD', got 'POST'",
    ),
    (
        "health-http-path-relative",
        SVC + '[services.health]\nkind = "http"\nhttp_path = "health"\n',
        (
            "services[0].health.http_path: must start with '/' and contain only visible ASCII "
            "characters (no spaces), got 'health'"
        ),
    ),
    (
        "health-http-path-injection",
        SVC + '[services.health]\nkind = "http"\nhttp_path = "/ HTTP/1.1\\r\\nX: y"\n',
        (
            "services[0].health.http_path: must start with '/' and contain only visible ASCII "
            "characters (no spaces), got '/ HTTP/1.1\\r\\nX: y'"
        ),
    ),
    (
        "health-http-host-space",
        SVC + '[services.health]\nkind = "http"\nhttp_host = "a b"\n',
        (
            "services[0].health.http_host: must be 1 to 255 visible ASCII characters "
            "(no spaces), got 'a b'"
        ),
    ),
    (
        "health-expect-status-reversed",
        SVC + '[services.health]\nkind = "http"\nexpect_status = [399, 200]\n',
        "services[0].health.expect_status: low must not exceed high, got [399, 200]",
    ),
    (
        "health-expect-status-out-of-range",
        SVC + '[services.health]\nkind = "http"\nexpect_status = [200, 600]\n',
        (
            "services[0].health.expect_status[1]: must be [low, high] with HTTP status codes "
            "from 100 to 599, or one such code, got 600"
        ),
    ),
    (
        "health-expect-status-three",
        SVC + '[services.health]\nkind = "http"\nexpect_status = [200, 300, 400]\n',
        (
            "services[0].health.expect_status: must be [low, high] with HTTP status codes "
            "from 100 to 599, or one such code, got an array of 3"
        ),
    ),
    (
        "health-expect-body-with-head",
        SVC + '[services.health]\nkind = "http"\nhttp_method = "HEAD"\nexpect_body = "ok"\n',
        "services[0].health.expect_body: a HEAD response has no body: use http_method = 'GET'",
    ),
    (
        "health-expect-body-empty",
        SVC + '[services.health]\nkind = "http"\nexpect_body = ""\n',
        (
            "services[0].health.expect_body: must be a non-empty string without NUL "
            "characters, got ''"
        ),
    ),
    (
        "health-passive-not-bool",
        SVC + "[services.health]\npassive = 1\n",
        "services[0].health.passive: must be true or false, got integer 1",
    ),
    (
        "health-slowstart-negative",
        SVC + "[services.health]\nslowstart = -5\n",
        "services[0].health.slowstart: must be a number of seconds from 0 to 3600, got -5",
    ),
    (
        "health-on-down",
        SVC + '[services.health]\non_down = "rst"\n',
        "services[0].health.on_down: must be 'keep' or 'reset', got 'rst' (did you mean 'reset'?)",
    ),
    (
        "health-all-down",
        SVC + '[services.health]\nall_down = "fail"\n',
        "services[0].health.all_down: must be 'reject' or 'all', got 'fail'",
    ),
    (
        "workers-out-of-range",
        "[dataplane]\nworkers = 257\n",
        "dataplane.workers: must be an integer from 0 to 256, got 257",
    ),
    (
        "pipe-size-not-power-of-two",
        "[dataplane]\npipe_size = 100000\n",
        "dataplane.pipe_size: must be a power of two from 4096 to 16777216, got 100000",
    ),
    (
        "pipe-size-too-small",
        "[dataplane]\npipe_size = 2048\n",
        "dataplane.pipe_size: must be a power of two from 4096 to 16777216, got 2048",
    ),
    (
        "retries-out-of-range",
        SVC + "retries = 101\n",
        "services[0].retries: must be an integer from 0 to 100, got 101",
    ),
    (
        "empty-token-file",
        '[admin]\ntoken_file = ""\n',
        "admin.token_file: must be a non-empty string without NUL characters, got ''",
    ),
    (
        "toml-syntax",
        "[dataplane]\nworkers = 2\npipe_size = = 3\n",
        "line 3, column 13: Invalid value",
    ),
    (
        "toml-syntax-at-end",
        "[dataplane]\nworkers = ",
        "end of document: Invalid value",
    ),
    (
        "toml-duplicate-key",
        "[dataplane]\nworkers = 1\nworkers = 2\n",
        "line 3, column 12: Cannot overwrite a value",
    ),
]


@pytest.mark.parametrize(
    ("text", "expected"), [m[1:] for m in MISTAKES], ids=[m[0] for m in MISTAKES]
)
def test_mistakes(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: {expected}"


def test_mistake_ids_are_unique() -> None:
    assert len({m[0] for m in MISTAKES}) == len(MISTAKES)


def test_first_error_wins(tmp_path: Path) -> None:
    # Two mistakes: the one in the earlier section is reported.
    path = write(tmp_path, "[dataplane]\nworkers = -1\n" + SVC + "retries = -1\n")
    with pytest.raises(ConfigError, match=r"dataplane\.workers: "):
        load_config(path)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: cannot read: No such file or directory"


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    assert str(info.value) == f"{tmp_path}: cannot read: Is a directory"


def _load_error_as_nobody(path: Path) -> str:
    """load_config's error message in a child process that has dropped root."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no pytest machinery from here on
        os.close(r)
        message = "no error"
        try:
            os.setgid(65534)
            os.setuid(65534)
            load_config(path)
        except ConfigError as e:
            message = str(e)
        except BaseException as e:  # report anything else as a failure
            message = f"unexpected {e!r}"
        os.write(w, message.encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        message = f.read().decode()
    os.waitpid(pid, 0)
    return message


def test_unreadable_file(tmp_path: Path) -> None:
    path = write(tmp_path, SVC)
    path.chmod(0)
    if os.geteuid() == 0:  # root reads any file: check as an ordinary user instead
        message = _load_error_as_nobody(path)
    else:
        with pytest.raises(ConfigError) as info:
            load_config(path)
        message = str(info.value)
    assert message == f"{path}: cannot read: Permission denied"


def test_invalid_utf8(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_bytes(b'[admin]\nlisten = "\xff"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: line 2, column 11: invalid UTF-8"


def test_deeply_nested_arrays(tmp_path: Path) -> None:
    path = write(tmp_path, "x = " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: arrays or tables are nested too deeply"


def test_messages_from_parse_config_use_source() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"dataplane": {"workers": 300}}, source="from-api")
    assert (
        str(info.value) == "from-api: dataplane.workers: must be an integer from 0 to 256, got 300"
    )


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ([], "(top level): must be a table, got array"),
        ({"dataplane": {"drain_timeout": 10**5000}}, "got a very large integer"),
        ({"dataplane": {"workers": None}}, "got NoneType"),
        ({1: 2}, '"1": unknown key'),
        ({"admin": {"listen": "x" * 500}}, "..."),
        ({"a\nb": 1}, '"a\\nb": unknown key'),
        ({"services": ({"name": "s", "listen": "127.0.0.1:1"},)}, None),
    ],
)
def test_parse_config_odd_python_values(data: Any, expected: str | None) -> None:
    # Callers other than the TOML reader may hand in any Python values.
    if expected is None:
        assert isinstance(parse_config(data, source="x"), Config)
        return
    with pytest.raises(ConfigError) as info:
        parse_config(data, source="x")
    assert expected in str(info.value)
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------- fuzzing

_SERVICE_KEYS = [
    "name",
    "listen",
    "protocol",
    "scheduler",
    "affinity_timeout",
    "affinity_netmask",
    "affinity_netmask6",
    "expire_quiescent",
    "sh_fallback",
    "sh_port",
    "connect_timeout",
    "idle_timeout",
    "drain_timeout",
    "retries",
    "vips",
    "mode",
    "udp_idle_timeout",
    "send_proxy",
    "max_connections",
    "backends",
]
_HEALTH_KEYS = [
    "kind",
    "interval",
    "timeout",
    "rise",
    "fall",
    "port",
    "jitter",
    "initial",
    "http_path",
    "expect_status",
    "expect_body",
    "passive",
    "inhibit_on_failure",
    "slowstart",
    "on_down",
    "all_down",
]
_DATAPLANE_KEYS = [
    "workers",
    "pipe_size",
    "max_pipes",
    "max_connections",
    "drain_timeout",
    "inactive_timeout",
    "reset_inactive_timeout",
]
_BACKEND_KEYS = ["address", "weight", "upper_threshold", "lower_threshold"]
_KNOWN_KEYS = sorted(
    {"admin", "dataplane", "services", "listen", "token_file"}
    | set(_SERVICE_KEYS + _DATAPLANE_KEYS + _BACKEND_KEYS + _HEALTH_KEYS)
)
_PLAUSIBLE_STRINGS = [
    "127.0.0.1:80",
    "127.0.0.1:0",
    "[::1]:80",
    "[::]:0",
    "localhost:80",
    "[::1]",
    "255.255.255.0",
    "255.0.255.0",
    "web",
    "tcp",
    "udp",
    "rr",
    "sh",
    "",
]

_keys = st.sampled_from(_KNOWN_KEYS) | st.text(max_size=8)
_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-2, max_value=70000)
    | st.floats()
    | st.text(max_size=20)
    | st.sampled_from(_PLAUSIBLE_STRINGS)
)
_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_keys, inner, max_size=5),
    max_leaves=25,
)


@st.composite
def _plausible_configs(draw: st.DrawFn) -> dict[str, Any]:
    """Mostly well-formed configs with random values, to reach the deeper checks."""

    def section(keys: list[str]) -> dict[str, Any]:
        chosen = draw(st.lists(st.sampled_from(keys), max_size=len(keys), unique=True))
        return {k: draw(_scalars) for k in chosen}

    def backend() -> dict[str, Any]:
        b = section(_BACKEND_KEYS[1:])
        b["address"] = draw(st.sampled_from(["127.0.0.1:1", "127.0.0.1:2", "[::1]:1"]))
        return b

    def service() -> dict[str, Any]:
        s = section(_SERVICE_KEYS[2:-1])
        s["name"] = draw(st.sampled_from(["a", "b", "c"]))
        s["listen"] = draw(st.sampled_from(["127.0.0.1:1", "127.0.0.1:0", "[::1]:1"]))
        s["backends"] = [backend() for _ in range(draw(st.integers(0, 3)))]
        if draw(st.booleans()):
            s["health"] = section(_HEALTH_KEYS)
        return s

    cfg: dict[str, Any] = {
        "admin": section(["listen", "token_file"]),
        "dataplane": section(_DATAPLANE_KEYS),
        "services": [service() for _ in range(draw(st.integers(0, 3)))],
    }
    if draw(st.booleans()):
        cfg[draw(_keys)] = draw(_values)
    return cfg


def _check_outcome(data: Any) -> Config | None:
    try:
        cfg = parse_config(data, source="fuzz.toml")
    except ConfigError as e:
        message = str(e)
        assert message.startswith("fuzz.toml: ")
        assert "\n" not in message and "\r" not in message
        return None
    assert isinstance(cfg, Config)
    return cfg


@settings(max_examples=400, deadline=None, database=None)
@given(st.dictionaries(_keys, _values, max_size=5) | _values)
def test_fuzz_random_values_only_raise_config_error(data: Any) -> None:
    _check_outcome(data)


@settings(max_examples=400, deadline=None, database=None)
@given(_plausible_configs())
def test_fuzz_plausible_configs(data: dict[str, Any]) -> None:
    cfg = _check_outcome(data)
    if cfg is None:
        return
    # Whatever got through satisfies the cross-field rules.
    assert len({s.name for s in cfg.services}) == len(cfg.services)
    for svc in cfg.services:
        assert len({b.address for b in svc.backends}) == len(svc.backends)
        assert svc.scheduler in ("sh", "mh") or not (svc.sh_fallback or svc.sh_port)
        assert svc.listen is not None or svc.vips
        for b in svc.backends:
            assert 0 <= b.weight <= 65535
            assert not b.upper_threshold or b.lower_threshold <= b.upper_threshold
        if svc.health is not None:
            assert 0 < svc.health.timeout <= svc.health.interval
            assert svc.health.rise >= 1 and svc.health.fall >= 1
            assert svc.health.expect_status[0] <= svc.health.expect_status[1]


@pytest.fixture(scope="module")
def fuzz_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as d:
        yield Path(d)


_TOML_ALPHABET = st.sampled_from([*"[]{}=\".,#\n 'ab1:-_tfnie", "services", "true"])


@settings(
    max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(
    st.binary(max_size=60)
    | st.lists(_TOML_ALPHABET, max_size=40).map(lambda p: "".join(p).encode())
)
def test_fuzz_file_contents(fuzz_dir: Path, raw: bytes) -> None:
    path = fuzz_dir / "fuzz.toml"
    path.write_bytes(raw)
    try:
        load_config(path)
    except ConfigError as e:
        assert str(e).startswith(f"{path}: ")
        assert "\n" not in str(e)
