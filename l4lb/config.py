"""Configuration: TOML file -> validated, immutable :class:`Config`.

The file is read with :mod:`tomllib` and checked against a small table of field specs per
section. Validation stops at the first mistake and reports it as one line naming the file,
the key path and what is wrong, for example::

    web.toml: services[0].backends[1].weight: must be an integer from 0 to 65535, got 70000

Unknown keys are errors (with a "did you mean" hint), because a misspelt optional key would
otherwise silently fall back to its default. Unknown keys are reported before missing
required ones for the same reason: ``nmae = "web"`` should say so, not "name is missing".

Addresses must be literal IPs: the load balancer never resolves names, so a reload cannot
hang on DNS or change meaning when a record changes.

Whatever the input, :func:`parse_config` and :func:`load_config` raise only
:class:`ConfigError`.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import math
import os
import re
import socket
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "KERNEL_SCHEDULERS",
    "SCHEDULERS",
    "Address",
    "AdminConfig",
    "BackendConfig",
    "Config",
    "ConfigError",
    "DataplaneConfig",
    "HealthConfig",
    "ServiceConfig",
    "load_config",
    "parse_config",
]

SCHEDULERS: frozenset[str] = frozenset({"rr", "wrr", "lc", "wlc", "sh", "dh", "sed", "nq"})
#: Further schedulers of the Linux kernel, accepted for ``mode = "offload"`` services only.
KERNEL_SCHEDULERS: frozenset[str] = SCHEDULERS | frozenset(
    {"lblc", "lblcr", "fo", "ovf", "mh", "twos"}
)
#: Schedulers whose two flags are ``sh_fallback`` and ``sh_port`` (IP_VS_SVC_F_SCHED1/2).
_FLAGGED_SCHEDULERS = frozenset({"sh", "mh"})

_MAX_PORT = 65535
_MAX_WEIGHT = 65535
_MAX_THRESHOLD = 65535
_DAY = 86400.0
_HEALTH_INTERVAL = 2.0
_HEALTH_TIMEOUT = 1.0
#: Default ``udp_idle_timeout``: conntrack's own (``nf_conntrack_udp_timeout``), long
#: enough for request/response protocols that pause, short enough to free flows.
UDP_IDLE_TIMEOUT = 30.0


class ConfigError(Exception):
    """The configuration is invalid; ``str(e)`` is the complete one-line message."""


# --------------------------------------------------------------------------- values


@dataclass(frozen=True, slots=True)
class Address:
    """A literal ``IP:PORT`` (IPv4) or ``[IPv6]:PORT`` socket address."""

    host: str
    port: int
    family: int

    def __str__(self) -> str:
        if self.family == socket.AF_INET6:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"

    @classmethod
    def parse(cls, text: str, *, allow_port_zero: bool = False) -> Address:
        """Parse ``"1.2.3.4:80"`` or ``"[::1]:80"``; raise ValueError saying what is wrong.

        The host is normalised (``"[0:0::1]:80"`` becomes ``::1``). Port 0 ("any free
        port") is accepted only with ``allow_port_zero``, which is meant for listeners.
        """
        if not isinstance(text, str):
            raise TypeError(f"address must be a string, got {type(text).__name__}")
        host, port_text = _split_host_port(text)
        ip = _parse_ip(text, host)
        low = 0 if allow_port_zero else 1
        if not (port_text.isascii() and port_text.isdigit()) or len(port_text) > 5:
            raise ValueError(f"invalid address {_show_str(text)}: port must be a number")
        port = int(port_text)
        if not low <= port <= _MAX_PORT:
            if port == 0:
                reason = "port 0 (any free port) is only allowed for listen addresses"
            else:
                reason = f"port must be from {low} to {_MAX_PORT}"
            raise ValueError(f"invalid address {_show_str(text)}: {reason}")
        family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
        return cls(host=str(ip), port=port, family=family)


def _split_host_port(text: str) -> tuple[str, str]:
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or not text.startswith(":", end + 1):
            raise ValueError(f"invalid address {_show_str(text)}: expected '[IPv6]:PORT'")
        return text[1:end], text[end + 2 :]
    host, sep, port = text.rpartition(":")
    if not sep:
        raise ValueError(f"invalid address {_show_str(text)}: expected 'IP:PORT' (port missing)")
    if ":" in host:
        raise ValueError(
            f"invalid address {_show_str(text)}: IPv6 addresses must be in brackets, "
            "like '[::1]:80'"
        )
    return host, port


def _parse_ip(text: str, host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        if _looks_like_hostname(host):
            reason = (
                f"{_show_str(host)} is a hostname; use an IP address "
                "(names are not resolved, so reloads never depend on DNS)"
            )
        else:
            reason = f"{_show_str(host)} is not a valid IP address"
        raise ValueError(f"invalid address {_show_str(text)}: {reason}") from None
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id is not None:
        raise ValueError(
            f"invalid address {_show_str(text)}: scoped IPv6 addresses (%zone) are not supported"
        )
    if text.startswith("[") and ip.version == 4:
        raise ValueError(f"invalid address {_show_str(text)}: brackets are only for IPv6")
    return ip


_HOSTNAME_RE = re.compile(
    r"(?=.*[A-Za-z])[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9-]+)*\.?"
)


def _looks_like_hostname(host: str) -> bool:
    return len(host) <= 253 and _HOSTNAME_RE.fullmatch(host) is not None


# --------------------------------------------------------------------------- config types


_DEFAULT_ADMIN_LISTEN = Address("127.0.0.1", 9901, socket.AF_INET)


@dataclass(frozen=True, slots=True)
class AdminConfig:
    """The ``[admin]`` table: where the admin HTTP API listens."""

    listen: Address = _DEFAULT_ADMIN_LISTEN
    token_file: str | None = None


@dataclass(frozen=True, slots=True)
class DataplaneConfig:
    """The ``[dataplane]`` table: worker and resource settings shared by all services."""

    workers: int = 0
    pipe_size: int = 65536
    max_pipes: int = 0
    max_connections: int = 0
    drain_timeout: float = 30.0
    inactive_timeout: float = 120.0
    reset_inactive_timeout: float = 10.0


@dataclass(frozen=True, slots=True)
class BackendConfig:
    """One ``[[services.backends]]`` entry (an IPVS destination)."""

    address: Address
    weight: int = 1
    upper_threshold: int = 0
    lower_threshold: int = 0


@dataclass(frozen=True, slots=True)
class HealthConfig:
    """A ``[services.health]`` table: how backends are checked and what "down" does.

    Its presence turns health checking on for the service; without it every backend is
    always up. See :mod:`l4lb.health` for the semantics of each setting.
    """

    kind: str = "tcp"
    interval: float = _HEALTH_INTERVAL
    timeout: float = _HEALTH_TIMEOUT
    rise: int = 2
    fall: int = 3
    port: int | None = None
    jitter: float = 0.1
    initial: str = "up"
    http_path: str = "/"
    http_host: str | None = None
    http_method: str = "GET"
    expect_status: tuple[int, int] = (200, 399)
    expect_body: str | None = None
    passive: bool = True
    inhibit_on_failure: bool = True
    slowstart: float = 0.0
    on_down: str = "keep"
    all_down: str = "reject"


@dataclass(frozen=True, slots=True)
class ServiceConfig:
    """One ``[[services]]`` entry (an IPVS virtual service).

    ``listen`` is where the splicer accepts; it may be None when ``vips`` is set, since
    then the traffic arrives through iptables REDIRECT on an automatic wildcard listener.
    For ``mode = "offload"`` the VIPs (or ``listen`` when there are none) become IPVS
    virtual services instead.
    """

    name: str
    listen: Address | None = None
    vips: tuple[Address, ...] = ()
    protocol: str = "tcp"
    mode: str = "splice"
    scheduler: str = "rr"
    affinity_timeout: float = 0.0
    affinity_netmask: int = 32
    affinity_netmask6: int = 128
    expire_quiescent: bool = False
    sh_fallback: bool = False
    sh_port: bool = False
    connect_timeout: float = 3.0
    idle_timeout: float = 900.0
    drain_timeout: float | None = None
    retries: int | None = None
    udp_idle_timeout: float = UDP_IDLE_TIMEOUT
    send_proxy: str | None = None
    max_connections: int = 0
    backends: tuple[BackendConfig, ...] = ()
    health: HealthConfig | None = None


@dataclass(frozen=True, slots=True)
class Config:
    """A complete, validated configuration."""

    source: str
    admin: AdminConfig
    dataplane: DataplaneConfig
    services: tuple[ServiceConfig, ...]
    # Lookups by name are O(1): kube-proxy looks up single services among thousands.
    _by_name: dict[str, ServiceConfig] = dataclasses.field(
        init=False, repr=False, compare=False, hash=False, default_factory=dict
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_name", {svc.name: svc for svc in self.services})

    def service(self, name: str) -> ServiceConfig:
        """Return the service called ``name``; raise KeyError if there is none."""
        return self._by_name[name]

    def get(self, name: str) -> ServiceConfig | None:
        """Return the service called ``name``, or None if there is none."""
        return self._by_name.get(name)


# --------------------------------------------------------------------------- loading


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate the TOML file at ``path``; raise ConfigError on any problem."""
    source = os.fsdecode(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ConfigError(f"{source}: cannot read: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line, col = _line_col(raw, e.start)
        raise ConfigError(f"{source}: line {line}, column {col}: invalid UTF-8") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: {_toml_error(e)}") from None
    except RecursionError:
        raise ConfigError(f"{source}: arrays or tables are nested too deeply") from None
    return parse_config(data, source=source)


def _line_col(raw: bytes, offset: int) -> tuple[int, int]:
    line_start = raw.rfind(b"\n", 0, offset) + 1
    return raw.count(b"\n", 0, offset) + 1, offset - line_start + 1


_TOML_POS_RE = re.compile(
    r"(.*) \((?:at line (\d+), column (\d+)|at (end of document))\)", re.DOTALL
)


def _toml_error(e: tomllib.TOMLDecodeError) -> str:
    msg = str(e)
    m = _TOML_POS_RE.fullmatch(msg)
    if m is None:
        return msg
    where = m[4] if m[4] else f"line {m[2]}, column {m[3]}"
    return f"{where}: {m[1]}"


def parse_config(data: Mapping[str, Any], *, source: str) -> Config:
    """Validate already-parsed TOML data; ``source`` names the file in error messages."""
    try:
        return _parse_root(data, source)
    except _Invalid as e:
        raise ConfigError(f"{source}: {e.path}: {e.reason}") from None


# --------------------------------------------------------------------------- machinery


class _Invalid(Exception):
    """The first mistake found: where it is and what is wrong."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(path, reason)
        self.path = path
        self.reason = reason


_BARE_KEY_RE = re.compile(r"[A-Za-z0-9_-]+")


def _key(parent: str, key: object) -> str:
    """Append ``key`` to a dotted key path, quoting it the TOML way when needed."""
    text = key if isinstance(key, str) and _BARE_KEY_RE.fullmatch(key) else _quote_key(key)
    return f"{parent}.{text}" if parent else text


def _quote_key(key: object) -> str:
    text = key if isinstance(key, str) else repr(key)
    escaped = text[:60].encode("unicode_escape").decode("ascii").replace('"', '\\"')
    return f'"{escaped}{"..." if len(text) > 60 else ""}"'


def _show_str(text: str) -> str:
    return repr(text) if len(text) <= 60 else repr(text[:57]) + "..."


_TYPE_NAMES: dict[type, str] = {
    bool: "boolean",
    int: "integer",
    float: "float",
    str: "string",
    list: "array",
    tuple: "array",
    dict: "table",
}


def _type_name(value: object) -> str:
    for kind, name in _TYPE_NAMES.items():
        if isinstance(value, kind):
            return name
    if isinstance(value, Mapping):
        return "table"
    return type(value).__name__


def _show(value: object) -> str:
    """Render a value for a message: short, single-line and in TOML spelling."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value) if value.bit_length() <= 200 else "a very large integer"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        return _show_str(value)
    return f"a value of type {_type_name(value)}"


def _got(value: object) -> str:
    """``got ...`` for a value of the wrong type (the type is named as well)."""
    if isinstance(value, bool | int | float | str):
        return f"got {_type_name(value)} {_show(value)}"
    return f"got {_type_name(value)}"


# A field checker turns a raw TOML value into the dataclass value or raises _Invalid.
_Check = Callable[[object, str], Any]


@dataclass(frozen=True, slots=True)
class _Field:
    key: str
    check: _Check
    required: bool = False


def _integer(low: int, high: int, *, power_of_two: bool = False) -> _Check:
    what = "a power of two" if power_of_two else "an integer"
    expected = f"must be {what} from {low} to {high}"

    def check(value: object, path: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Invalid(path, f"{expected}, {_got(value)}")
        if not low <= value <= high or (power_of_two and value & (value - 1)):
            raise _Invalid(path, f"{expected}, got {_show(value)}")
        return value

    return check


def _seconds(high: float, *, positive: bool = False) -> _Check:
    """Seconds as a TOML integer or float; ``positive`` excludes 0."""
    limit = f"{high:.0f}" if high.is_integer() else repr(high)
    bounds = f"greater than 0 and at most {limit}" if positive else f"from 0 to {limit}"
    expected = f"must be a number of seconds {bounds}"

    def check(value: object, path: str) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _Invalid(path, f"{expected}, {_got(value)}")
        # Range-check before float(): an enormous int would overflow it.
        ok = (value > 0 if positive else value >= 0) and value <= high
        if not ok or (isinstance(value, float) and not math.isfinite(value)):
            raise _Invalid(path, f"{expected}, got {_show(value)}")
        return float(value)

    return check


def _boolean(value: object, path: str) -> bool:
    if not isinstance(value, bool):
        raise _Invalid(path, f"must be true or false, {_got(value)}")
    return value


def _string(value: object, path: str) -> str:
    if not isinstance(value, str):
        raise _Invalid(path, f"must be a string, {_got(value)}")
    return value


def _nonempty_string(value: object, path: str) -> str:
    text = _string(value, path)
    if not text or "\0" in text:
        raise _Invalid(
            path, f"must be a non-empty string without NUL characters, got {_show(text)}"
        )
    return text


def _address(*, allow_port_zero: bool) -> _Check:
    def check(value: object, path: str) -> Address:
        text = _string(value, path)
        try:
            return Address.parse(text, allow_port_zero=allow_port_zero)
        except ValueError as e:
            raise _Invalid(path, str(e)) from None

    return check


def _optional(check: _Check) -> _Check:
    # TOML has no null; None only arrives from callers building the mapping themselves.
    def optional(value: object, path: str) -> Any:
        return None if value is None else check(value, path)

    return optional


_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")


def _service_name(value: object, path: str) -> str:
    name = _string(value, path)
    if _NAME_RE.fullmatch(name) is None:
        raise _Invalid(
            path,
            "must be 1 to 63 characters of letters, digits, '_', '.' or '-', "
            f"starting with a letter or digit, got {_show(name)}",
        )
    return name


def _scheduler(value: object, path: str) -> str:
    name = _string(value, path)
    if name not in KERNEL_SCHEDULERS:
        choices = ", ".join(sorted(SCHEDULERS))
        hint = _did_you_mean(name, KERNEL_SCHEDULERS) or f" (expected one of: {choices})"
        raise _Invalid(path, f"unknown scheduler {_show(name)}{hint}")
    return name


def _vips(value: object, path: str) -> tuple[Address, ...]:
    if not isinstance(value, list | tuple):
        raise _Invalid(path, f"must be an array of 'IP:PORT' strings, {_got(value)}")
    vips: list[Address] = []
    for i, item in enumerate(value):
        vip = _address(allow_port_zero=False)(item, f"{path}[{i}]")
        ip = ipaddress.ip_address(vip.host)
        if ip.is_unspecified or ip.is_multicast or ip.is_loopback:
            kind = (
                "unspecified"
                if ip.is_unspecified
                else "multicast"
                if ip.is_multicast
                else "loopback"
            )
            raise _Invalid(f"{path}[{i}]", f"a VIP must be a unicast address, {vip.host} is {kind}")
        if vip in vips:
            raise _Invalid(f"{path}[{i}]", f"duplicate VIP {vip} (also {path}[{vips.index(vip)}])")
        vips.append(vip)
    return tuple(vips)


def _netmask4(value: object, path: str) -> int:
    expected = "must be a prefix length from 0 to 32 or a dotted mask like '255.255.255.0'"
    if isinstance(value, str):
        try:
            mask = int(ipaddress.IPv4Address(value))
        except ValueError:
            raise _Invalid(path, f"{expected}, got {_show(value)}") from None
        prefix = mask.bit_count()
        if mask != (0xFFFFFFFF << (32 - prefix)) & 0xFFFFFFFF:
            raise _Invalid(path, f"{_show(value)} is not a contiguous netmask")
        return prefix
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Invalid(path, f"{expected}, {_got(value)}")
    if not 0 <= value <= 32:
        raise _Invalid(path, f"{expected}, got {_show(value)}")
    return value


def _choice(*choices: str) -> _Check:
    """One of a few fixed strings."""
    shown = ", ".join(repr(c) for c in choices[:-1]) + f" or {choices[-1]!r}"

    def check(value: object, path: str) -> str:
        text = _string(value, path)
        if text not in choices:
            raise _Invalid(
                path, f"must be {shown}, got {_show(text)}{_did_you_mean(text, choices)}"
            )
        return text

    return check


def _fraction(high: float) -> _Check:
    expected = f"must be a number from 0 to {high:g}"

    def check(value: object, path: str) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _Invalid(path, f"{expected}, {_got(value)}")
        if not 0 <= value <= high or (isinstance(value, float) and not math.isfinite(value)):
            raise _Invalid(path, f"{expected}, got {_show(value)}")
        return float(value)

    return check


_STATUS_EXPECTED = "must be [low, high] with HTTP status codes from 100 to 599, or one such code"


def _status_code(value: object, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Invalid(path, f"{_STATUS_EXPECTED}, {_got(value)}")
    if not 100 <= value <= 599:
        raise _Invalid(path, f"{_STATUS_EXPECTED}, got {_show(value)}")
    return value


def _status_range(value: object, path: str) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        code = _status_code(value, path)
        return (code, code)
    if not isinstance(value, list | tuple):
        raise _Invalid(path, f"{_STATUS_EXPECTED}, {_got(value)}")
    if len(value) != 2:
        raise _Invalid(path, f"{_STATUS_EXPECTED}, got an array of {len(value)}")
    low, high = (_status_code(v, f"{path}[{i}]") for i, v in enumerate(value))
    if low > high:
        raise _Invalid(path, f"low must not exceed high, got [{low}, {high}]")
    return (low, high)


# Request-line and header text: visible ASCII only, so nothing can end a line early.
_TOKEN_RE = re.compile(r"[\x21-\x7e]{1,1024}")


def _http_path(value: object, path: str) -> str:
    text = _string(value, path)
    if not text.startswith("/") or _TOKEN_RE.fullmatch(text) is None:
        raise _Invalid(
            path,
            "must start with '/' and contain only visible ASCII characters (no spaces), "
            f"got {_show(text)}",
        )
    return text


def _http_host(value: object, path: str) -> str:
    text = _string(value, path)
    if _TOKEN_RE.fullmatch(text) is None or len(text) > 255:
        raise _Invalid(
            path,
            f"must be 1 to 255 visible ASCII characters (no spaces), got {_show(text)}",
        )
    return text


def _did_you_mean(word: str, choices: Sequence[str] | frozenset[str]) -> str:
    close = difflib.get_close_matches(word, sorted(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _table(value: object, path: str) -> Mapping[Any, Any]:
    if not isinstance(value, Mapping):
        raise _Invalid(path, f"must be a table, {_got(value)}")
    return value


def _array_of_tables(value: object, path: str) -> list[Mapping[Any, Any]]:
    if not isinstance(value, list | tuple):
        header = re.sub(r"\[\d+\]", "", path)
        raise _Invalid(path, f"must be an array of tables ([[{header}]]), {_got(value)}")
    for i, item in enumerate(value):
        _table(item, f"{path}[{i}]")
    return list(value)


def _fields(
    table: Mapping[Any, Any], path: str, spec: Sequence[_Field], extra: Sequence[str] = ()
) -> dict[str, Any]:
    """Check ``table`` against ``spec``; return the checked values of the keys present.

    Keys in ``extra`` are allowed but left to the caller (nested tables).
    """
    known = [f.key for f in spec] + list(extra)
    for key in table:
        if key not in known:
            hint = _did_you_mean(key, known) if isinstance(key, str) else ""
            raise _Invalid(_key(path, key), f"unknown key{hint}")
    values: dict[str, Any] = {}
    for field in spec:
        if field.key in table:
            values[field.key] = field.check(table[field.key], _key(path, field.key))
        elif field.required:
            raise _Invalid(_key(path, field.key), "required key is missing")
    return values


# --------------------------------------------------------------------------- schema

_ADMIN_FIELDS = (
    _Field("listen", _address(allow_port_zero=True)),
    _Field("token_file", _optional(_nonempty_string)),
)

_DATAPLANE_FIELDS = (
    _Field("workers", _integer(0, 256)),
    _Field("pipe_size", _integer(4096, 16 << 20, power_of_two=True)),
    _Field("max_pipes", _integer(0, 1 << 20)),
    _Field("max_connections", _integer(0, 1 << 30)),
    _Field("drain_timeout", _seconds(_DAY)),
    _Field("inactive_timeout", _seconds(_DAY)),
    _Field("reset_inactive_timeout", _seconds(_DAY)),
)

_BACKEND_FIELDS = (
    _Field("address", _address(allow_port_zero=False), required=True),
    _Field("weight", _integer(0, _MAX_WEIGHT)),
    _Field("upper_threshold", _integer(0, _MAX_THRESHOLD)),
    _Field("lower_threshold", _integer(0, _MAX_THRESHOLD)),
)

_SERVICE_FIELDS = (
    _Field("name", _service_name, required=True),
    _Field("listen", _address(allow_port_zero=True)),
    _Field("vips", _vips),
    _Field("protocol", _choice("tcp", "udp")),
    _Field("mode", _choice("splice", "offload")),
    _Field("scheduler", _scheduler),
    _Field("affinity_timeout", _seconds(_DAY * 30)),
    _Field("affinity_netmask", _netmask4),
    _Field("affinity_netmask6", _integer(0, 128)),
    _Field("expire_quiescent", _boolean),
    _Field("sh_fallback", _boolean),
    _Field("sh_port", _boolean),
    _Field("connect_timeout", _seconds(3600.0, positive=True)),
    _Field("idle_timeout", _seconds(_DAY * 7, positive=True)),
    _Field("drain_timeout", _optional(_seconds(_DAY))),
    _Field("retries", _optional(_integer(0, 100))),
    _Field("udp_idle_timeout", _seconds(_DAY, positive=True)),
    _Field("send_proxy", _optional(_choice("v1", "v2"))),
    _Field("max_connections", _integer(0, 1 << 30)),
)

_HEALTH_FIELDS = (
    _Field("kind", _choice("tcp", "http")),
    _Field("interval", _seconds(3600.0, positive=True)),
    _Field("timeout", _seconds(3600.0, positive=True)),
    _Field("rise", _integer(1, 100)),
    _Field("fall", _integer(1, 100)),
    _Field("port", _optional(_integer(1, _MAX_PORT))),
    _Field("jitter", _fraction(0.5)),
    _Field("initial", _choice("up", "down")),
    _Field("http_path", _http_path),
    _Field("http_host", _optional(_http_host)),
    _Field("http_method", _choice("GET", "HEAD")),
    _Field("expect_status", _status_range),
    _Field("expect_body", _optional(_nonempty_string)),
    _Field("passive", _boolean),
    _Field("inhibit_on_failure", _boolean),
    _Field("slowstart", _seconds(3600.0)),
    _Field("on_down", _choice("keep", "reset")),
    _Field("all_down", _choice("reject", "all")),
)
_HTTP_ONLY_KEYS = ("http_path", "http_host", "http_method", "expect_status", "expect_body")

_ROOT_KEYS = ("admin", "dataplane", "services")


def _parse_root(data: object, source: str) -> Config:
    if not isinstance(data, Mapping):
        raise _Invalid("(top level)", f"must be a table, {_got(data)}")
    _fields(data, "", (), extra=_ROOT_KEYS)
    admin = AdminConfig(**_fields(_table(data.get("admin", {}), "admin"), "admin", _ADMIN_FIELDS))
    dataplane = DataplaneConfig(
        **_fields(_table(data.get("dataplane", {}), "dataplane"), "dataplane", _DATAPLANE_FIELDS)
    )
    tables = _array_of_tables(data.get("services", []), "services")
    services = tuple(_parse_service(t, f"services[{i}]") for i, t in enumerate(tables))
    _check_unique_services(services, admin)
    return Config(source=source, admin=admin, dataplane=dataplane, services=services)


def _parse_service(table: Mapping[Any, Any], path: str) -> ServiceConfig:
    values = _fields(table, path, _SERVICE_FIELDS, extra=("backends", "health"))
    tables = _array_of_tables(table.get("backends", []), f"{path}.backends")
    backends = tuple(_parse_backend(t, f"{path}.backends[{i}]") for i, t in enumerate(tables))
    health = None
    if "health" in table:
        health = _parse_health(_table(table["health"], f"{path}.health"), f"{path}.health")
    svc = ServiceConfig(**values, backends=backends, health=health)
    _check_service(svc, table, path)
    seen: dict[Address, int] = {}
    for i, backend in enumerate(backends):
        first = seen.setdefault(backend.address, i)
        if first != i:
            raise _Invalid(
                f"{path}.backends[{i}].address",
                f"duplicate backend {backend.address} (also {path}.backends[{first}])",
            )
    return svc


def _check_service(svc: ServiceConfig, table: Mapping[Any, Any], path: str) -> None:
    """The rules that tie a service's keys together."""
    if svc.listen is None and not svc.vips:
        raise _Invalid(f"{path}.listen", "required key is missing (or give vips)")
    if svc.scheduler not in SCHEDULERS and svc.mode != "offload":
        raise _Invalid(
            f"{path}.scheduler",
            f"{svc.scheduler!r} is a kernel-only scheduler: it needs mode = 'offload'",
        )
    for flag in ("sh_fallback", "sh_port"):
        if getattr(svc, flag) and svc.scheduler not in _FLAGGED_SCHEDULERS:
            raise _Invalid(
                f"{path}.{flag}",
                f"only meaningful with scheduler = 'sh' or 'mh' (scheduler is {svc.scheduler!r})",
            )
    if svc.protocol != "udp" and "udp_idle_timeout" in table:
        raise _Invalid(f"{path}.udp_idle_timeout", "only meaningful with protocol = 'udp'")
    if svc.send_proxy is not None:
        if svc.protocol != "tcp":
            raise _Invalid(f"{path}.send_proxy", "the PROXY protocol is only sent over TCP")
        if svc.mode == "offload":
            raise _Invalid(
                f"{path}.send_proxy", "an offloaded service never sees the stream to prefix it"
            )
    if svc.mode == "offload":
        if svc.listen is not None and not svc.vips:
            ip = ipaddress.ip_address(svc.listen.host)
            if ip.is_unspecified or svc.listen.port == 0:
                raise _Invalid(
                    f"{path}.listen",
                    "an offloaded service needs a concrete IP and port as its VIP "
                    f"(or vips), got {svc.listen}",
                )
        if svc.max_connections:
            raise _Invalid(
                f"{path}.max_connections",
                "not available with mode = 'offload' (use the backends' upper_threshold)",
            )
    families = {v.family for v in svc.vips}
    for i, backend in enumerate(svc.backends):
        if svc.mode == "offload" and families and backend.address.family not in families:
            raise _Invalid(
                f"{path}.backends[{i}].address",
                f"{backend.address} is of another address family than every VIP "
                "(IPVS masquerading does not translate between IPv4 and IPv6)",
            )


def _parse_health(table: Mapping[Any, Any], path: str) -> HealthConfig:
    values = _fields(table, path, _HEALTH_FIELDS)
    if "timeout" not in values:
        # An unset timeout follows a short interval down instead of contradicting it.
        values["timeout"] = min(_HEALTH_TIMEOUT, values.get("interval", _HEALTH_INTERVAL))
    health = HealthConfig(**values)
    if health.timeout > health.interval:
        raise _Invalid(
            f"{path}.timeout",
            f"must not exceed interval ({health.interval:g} s), got {health.timeout:g}",
        )
    if health.kind != "http":
        for key in _HTTP_ONLY_KEYS:
            if key in table:
                raise _Invalid(
                    f"{path}.{key}",
                    f"only meaningful with kind = 'http' (kind is {health.kind!r})",
                )
    if health.expect_body is not None and health.http_method == "HEAD":
        raise _Invalid(
            f"{path}.expect_body", "a HEAD response has no body: use http_method = 'GET'"
        )
    return health


def _parse_backend(table: Mapping[Any, Any], path: str) -> BackendConfig:
    backend = BackendConfig(**_fields(table, path, _BACKEND_FIELDS))
    if backend.upper_threshold and backend.lower_threshold > backend.upper_threshold:
        raise _Invalid(
            f"{path}.lower_threshold",
            f"must not exceed upper_threshold ({backend.upper_threshold}), "
            f"got {backend.lower_threshold}",
        )
    return backend


def _check_unique_services(services: Sequence[ServiceConfig], admin: AdminConfig) -> None:
    names: dict[str, int] = {}
    listens: dict[tuple[str, Address], str] = {}
    vips: dict[tuple[str, Address], str] = {}
    # Port 0 asks the kernel for a fresh port per socket, so it cannot collide.
    if admin.listen.port:
        listens[("tcp", admin.listen)] = "admin.listen"
    for i, svc in enumerate(services):
        first = names.setdefault(svc.name, i)
        if first != i:
            raise _Invalid(
                f"services[{i}].name",
                f"duplicate service name {svc.name!r} (also services[{first}])",
            )
        for j, vip in enumerate(svc.vips):
            where = f"services[{i}].vips[{j}]"
            owner = vips.get((svc.protocol, vip))
            if owner is not None:
                raise _Invalid(where, f"{svc.protocol} {vip} is already used by {owner}")
            vips[(svc.protocol, vip)] = f"service {svc.name!r} ({where})"
        if svc.listen is None or not svc.listen.port:
            continue
        key = (svc.protocol, svc.listen)
        owner = listens.get(key)
        if owner is not None:
            raise _Invalid(f"services[{i}].listen", f"{svc.listen} is already used by {owner}")
        listens[key] = f"service {svc.name!r} (services[{i}].listen)"
