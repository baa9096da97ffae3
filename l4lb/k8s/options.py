"""``l4lb kube-proxy`` settings: command-line flags and a ``KubeProxyConfiguration`` file.

Flags keep kube-proxy's names and defaults. ``--config`` reads a
``kubeproxy.config.k8s.io/v1alpha1`` ``KubeProxyConfiguration`` (YAML or JSON); the fields
that mean something to a userspace proxy are applied, the ones kube-proxy has but l4lb does
not need are warned about as ignored, unknown fields are warned about as unknown, and a
field of the wrong type or value is an error naming its path. Flags given on the command
line win over the file, as in kube-proxy since v1.26.

Every problem is reported as :class:`OptionsError` with a one-line message.
"""

from __future__ import annotations

import argparse
import ipaddress
import re
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import yaml  # type: ignore[import-untyped]

from l4lb.config import KERNEL_SCHEDULERS, SCHEDULERS, Address

__all__ = [
    "CONFIG_API_VERSION",
    "KubeProxyOptions",
    "OptionsError",
    "add_arguments",
    "options_from_args",
    "parse_config_file",
    "parse_duration",
    "parse_kube_proxy_configuration",
    "parse_port_range",
]

CONFIG_API_VERSION = "kubeproxy.config.k8s.io/v1alpha1"
CONFIG_KIND = "KubeProxyConfiguration"
MODES = ("userspace", "ipvs")
_HEALTHZ = Address("0.0.0.0", 10256, socket.AF_INET)
_METRICS = Address("127.0.0.1", 10249, socket.AF_INET)
_ADMIN = Address("127.0.0.1", 9901, socket.AF_INET)


class OptionsError(Exception):
    """A flag or configuration field is invalid; ``str(e)`` is the whole message."""


@dataclass(frozen=True, slots=True)
class KubeProxyOptions:
    """Everything ``l4lb kube-proxy`` runs with, defaults resolved."""

    kubeconfig: str | None = None
    master: str | None = None
    hostname_override: str | None = None
    bind_address: str = "0.0.0.0"
    healthz_bind_address: Address = _HEALTHZ
    metrics_bind_address: Address = _METRICS
    admin_bind_address: Address = _ADMIN
    #: Listener ports for the services' wildcard listeners; None: kernel-chosen.
    proxy_port_range: tuple[int, int] | None = None
    udp_timeout: float = 0.25
    cluster_cidr: tuple[str, ...] = ()
    proxy_mode: str = "userspace"
    ipvs_scheduler: str = "rr"
    sync_period: float = 30.0
    min_sync_period: float = 0.0
    cleanup: bool = False
    workers: int | None = None
    config: str | None = None
    #: Warnings found while reading ``--config`` (unknown or ignored fields).
    warnings: tuple[str, ...] = field(default=(), compare=False)

    @property
    def offload(self) -> bool:
        """Whether services are programmed into kernel IPVS (``--proxy-mode=ipvs``)."""
        return self.proxy_mode == "ipvs"

    def as_configuration(self) -> dict[str, Any]:
        """The effective settings as a ``KubeProxyConfiguration`` (served on /configz)."""
        port_range = ""
        if self.proxy_port_range is not None:
            port_range = f"{self.proxy_port_range[0]}-{self.proxy_port_range[1]}"
        return {
            "apiVersion": CONFIG_API_VERSION,
            "kind": CONFIG_KIND,
            "bindAddress": self.bind_address,
            "healthzBindAddress": str(self.healthz_bind_address),
            "metricsBindAddress": str(self.metrics_bind_address),
            "clientConnection": {"kubeconfig": self.kubeconfig or ""},
            "hostnameOverride": self.hostname_override or "",
            "mode": self.proxy_mode,
            "portRange": port_range,
            "udpIdleTimeout": format_duration(self.udp_timeout),
            "clusterCIDR": ",".join(self.cluster_cidr),
            "ipvs": {
                "scheduler": self.ipvs_scheduler,
                "syncPeriod": format_duration(self.sync_period),
                "minSyncPeriod": format_duration(self.min_sync_period),
            },
        }


# --------------------------------------------------------------------------- values

_DURATION_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}


def parse_duration(text: str) -> float:
    """A Go duration (``"250ms"``, ``"1m30s"``, ``"0"``) in seconds; ValueError if invalid.

    Negative durations are refused: no setting here can use one.
    """
    s = text.strip()
    if s in ("0", "+0"):
        return 0.0
    if s.startswith("+"):
        s = s[1:]
    if not s or s.startswith("-"):
        raise ValueError(f"invalid duration {text!r}: must be like '250ms', '30s' or '1m'")
    total, pos = 0.0, 0
    while pos < len(s):
        m = _DURATION_RE.match(s, pos)
        if m is None:
            raise ValueError(f"invalid duration {text!r}: must be like '250ms', '30s' or '1m'")
        total += float(m[1]) * _UNITS[m[2]]
        pos = m.end()
    return total


def format_duration(seconds: float) -> str:
    """Seconds as a Go-style duration string (``0.25`` -> ``"250ms"``)."""
    if seconds == 0:
        return "0s"
    if seconds < 1:
        return f"{seconds * 1000:g}ms"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{seconds / 60:g}m"
    return f"{seconds:g}s"


def parse_port_range(text: str) -> tuple[int, int] | None:
    """kube-proxy's port range: ``begin-end``, ``begin+offset`` or one port.

    Empty, ``0`` and ``0-0`` mean "let the kernel choose" (None).
    """
    s = text.strip()
    if s in ("", "0", "0-0"):
        return None
    m = re.fullmatch(r"(\d{1,5})(?:([-+])(\d{1,5}))?", s)
    if m is None:
        raise ValueError(
            f"invalid port range {text!r}: must be 'begin-end', 'begin+offset' or a port"
        )
    begin = int(m[1])
    end = begin if m[2] is None else int(m[3]) if m[2] == "-" else begin + int(m[3])
    if not 1 <= begin <= end <= 65535:
        raise ValueError(f"invalid port range {text!r}: need 1 <= begin <= end <= 65535")
    return (begin, end)


def _bind_address(text: str, default_port: int) -> Address:
    """``IP:port``, ``[IPv6]:port`` or a bare IP (which takes ``default_port``)."""
    s = text.strip()
    try:
        ip = ipaddress.ip_address(s.strip("[]"))
    except ValueError:
        return Address.parse(s, allow_port_zero=True)
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    return Address(str(ip), default_port, family)


def _ip(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text.strip()))
    except ValueError:
        raise ValueError(f"{text!r} is not a valid IP address") from None


def _cidrs(text: str) -> tuple[str, ...]:
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            out.append(str(ipaddress.ip_network(part, strict=False)))
        except ValueError:
            raise ValueError(f"{part!r} is not a valid CIDR") from None
    if len(out) > 2:
        raise ValueError("at most one CIDR per IP family")
    return tuple(out)


# --------------------------------------------------------------------------- flags


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add kube-proxy's flags to ``p``. Defaults are None so that "given" can be told apart."""
    a = p.add_argument
    a("--kubeconfig", help="kubeconfig file (default: in-cluster, then ~/.kube/config)")
    a("--master", help="API server URL (overrides the kubeconfig's server)")
    a("--hostname-override", help="node name to use instead of the host name")
    a("--bind-address", help="IP the proxy serves on; a non-wildcard IP is the node IP")
    a("--healthz-bind-address", help="IP:port of /healthz and /livez (default 0.0.0.0:10256)")
    a("--metrics-bind-address", help="IP:port of /metrics (default 127.0.0.1:10249)")
    a("--admin-bind-address", help="IP:port of l4lb's admin API (default 127.0.0.1:9901)")
    a("--proxy-port-range", help="listener ports, 'begin-end' (default: kernel-chosen)")
    a("--udp-timeout", help="idle timeout of UDP flows, a Go duration (default 250ms)")
    a("--cluster-cidr", help="the cluster's pod CIDR(s), comma-separated")
    a("--proxy-mode", help="userspace (default) or ipvs (program kernel IPVS)")
    a("--ipvs-scheduler", help="scheduler for every service (default rr)")
    a(
        "--iptables-sync-period",
        "--ipvs-sync-period",
        dest="sync_period",
        help="full resync period (default 30s)",
    )
    a(
        "--iptables-min-sync-period",
        "--ipvs-min-sync-period",
        dest="min_sync_period",
        help="least time between syncs (default 0: every change at once)",
    )
    a("--cleanup", action="store_true", default=None, help="remove l4lb's rules and exit")
    a("--config", help="a KubeProxyConfiguration file (flags given here win over it)")
    a("--workers", help="data-plane worker threads (default: one per CPU)")
    a("--log-level", default="info", choices=["debug", "info", "warning", "error"])


# (attribute, converter of a flag's text)
_FLAG_CONVERTERS: dict[str, Callable[[str], Any]] = {
    "kubeconfig": str,
    "master": str,
    "hostname_override": lambda s: s.strip().lower(),
    "bind_address": _ip,
    "healthz_bind_address": lambda s: _bind_address(s, 10256),
    "metrics_bind_address": lambda s: _bind_address(s, 10249),
    "admin_bind_address": lambda s: _bind_address(s, 9901),
    "proxy_port_range": parse_port_range,
    "udp_timeout": parse_duration,
    "cluster_cidr": _cidrs,
    "proxy_mode": str,
    "ipvs_scheduler": str,
    "sync_period": parse_duration,
    "min_sync_period": parse_duration,
    "cleanup": bool,
    "workers": int,
    "config": str,
}


def options_from_args(args: argparse.Namespace) -> KubeProxyOptions:
    """Resolve parsed flags (and ``--config``) into checked options."""
    opts = parse_config_file(args.config) if args.config else KubeProxyOptions()
    changes: dict[str, Any] = {}
    for name, convert in _FLAG_CONVERTERS.items():
        value = getattr(args, name, None)
        if value is None:
            continue
        flag = "--" + name.replace("_", "-")
        if name in ("sync_period", "min_sync_period"):
            flag = "--iptables-" + name.replace("_", "-")
        try:
            changes[name] = convert(value)
        except ValueError as e:
            reason = str(e) if name != "workers" else f"must be an integer, got {value!r}"
            raise OptionsError(f"{flag}: {reason}") from None
    return _checked(replace(opts, **changes), "--")


def _checked(opts: KubeProxyOptions, where: str) -> KubeProxyOptions:
    """The rules that tie settings together; ``where`` prefixes the setting's name."""

    def bad(name: str, reason: str) -> OptionsError:
        return OptionsError(f"{where}{name}: {reason}")

    flag = where == "--"
    if opts.proxy_mode not in MODES:
        raise bad(
            "proxy-mode" if flag else "mode",
            f"must be 'userspace' or 'ipvs', got {opts.proxy_mode!r}",
        )
    allowed = KERNEL_SCHEDULERS if opts.offload else SCHEDULERS
    if opts.ipvs_scheduler not in allowed:
        extra = " (kernel-only schedulers need --proxy-mode=ipvs)" if not opts.offload else ""
        if opts.ipvs_scheduler in KERNEL_SCHEDULERS and not opts.offload:
            reason = f"{opts.ipvs_scheduler!r} is a kernel-only scheduler{extra}"
        else:
            reason = (
                f"unknown scheduler {opts.ipvs_scheduler!r} (one of {', '.join(sorted(allowed))})"
            )
        raise bad("ipvs-scheduler" if flag else "ipvs.scheduler", reason)
    if opts.workers is not None and not 1 <= opts.workers <= 256:
        raise bad("workers", f"must be from 1 to 256, got {opts.workers}")
    if not 0 < opts.udp_timeout <= 86400:
        raise bad(
            "udp-timeout" if flag else "udpIdleTimeout",
            "must be greater than 0 and at most 24h",
        )
    if not 0 < opts.sync_period <= 86400:
        raise bad("iptables-sync-period" if flag else "syncPeriod", "must be greater than 0")
    if opts.min_sync_period > opts.sync_period:
        raise bad(
            "iptables-min-sync-period" if flag else "minSyncPeriod",
            "must not exceed the sync period",
        )
    if opts.healthz_bind_address == opts.metrics_bind_address and opts.metrics_bind_address.port:
        raise bad("metrics-bind-address", "must differ from the healthz bind address")
    return opts


# --------------------------------------------------------------------------- config file

# KubeProxyConfiguration fields kube-proxy has and l4lb accepts without using: warned about.
_IGNORED = frozenset(
    {
        "bindAddressHardFail",
        "configSyncPeriod",
        "conntrack",
        "detectLocal",
        "detectLocalMode",
        "enableProfiling",
        "featureGates",
        "iptables.localhostNodePorts",
        "iptables.masqueradeAll",
        "iptables.masqueradeBit",
        "ipvs.excludeCIDRs",
        "ipvs.strictARP",
        "ipvs.tcpFinTimeout",
        "ipvs.tcpTimeout",
        "ipvs.udpTimeout",
        "logging",
        "nftables",
        "nodePortAddresses",
        "oomScoreAdj",
        "showHiddenMetricsForVersion",
        "winkernel",
        "clientConnection.acceptContentTypes",
        "clientConnection.burst",
        "clientConnection.contentType",
        "clientConnection.qps",
        "healthzBindAddress.port",
    }
)
_SECTIONS = ("clientConnection", "iptables", "ipvs")


def parse_config_file(path: str) -> KubeProxyOptions:
    """Read a KubeProxyConfiguration file; raise OptionsError naming the file on problems."""
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
    except OSError as e:
        raise OptionsError(f"{path}: cannot read: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise OptionsError(f"{path}: not UTF-8 text") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        raise OptionsError(f"{path}: {where}invalid YAML: {problem}") from None
    try:
        opts = parse_kube_proxy_configuration(data)
    except OptionsError as e:
        raise OptionsError(f"{path}: {e}") from None
    return replace(opts, config=path)


def _typed(kind: type, name: str) -> Callable[[object, str], Any]:
    def check(value: object, path: str) -> Any:
        if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kind):
            raise OptionsError(f"{path}: must be {name}, got {type(value).__name__} {value!r}")
        return value

    return check


_string = _typed(str, "a string")
_integer = _typed(int, "an integer")


def _converted(convert: Callable[[str], Any]) -> Callable[[object, str], Any]:
    def check(value: object, path: str) -> Any:
        text = _string(value, path)
        try:
            return convert(text)
        except ValueError as e:
            raise OptionsError(f"{path}: {e}") from None

    return check


def _empty_is_none(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    return lambda s: convert(s) if s.strip() else None


# path in the document -> (attribute, checker)
_APPLIED: dict[str, tuple[str, Callable[[object, str], Any]]] = {
    "bindAddress": ("bind_address", _converted(_ip)),
    "healthzBindAddress": (
        "healthz_bind_address",
        _converted(_empty_is_none(lambda s: _bind_address(s, 10256))),
    ),
    "metricsBindAddress": (
        "metrics_bind_address",
        _converted(_empty_is_none(lambda s: _bind_address(s, 10249))),
    ),
    "clientConnection.kubeconfig": ("kubeconfig", _converted(lambda s: s or None)),
    "hostnameOverride": ("hostname_override", _converted(lambda s: s.strip().lower() or None)),
    "mode": ("proxy_mode", _converted(lambda s: s or "userspace")),
    "portRange": ("proxy_port_range", _converted(parse_port_range)),
    "udpIdleTimeout": ("udp_timeout", _converted(_empty_is_none(parse_duration))),
    "clusterCIDR": ("cluster_cidr", _converted(_cidrs)),
    "ipvs.scheduler": ("ipvs_scheduler", _converted(lambda s: s or "rr")),
    "ipvs.syncPeriod": ("sync_period", _converted(_empty_is_none(parse_duration))),
    "ipvs.minSyncPeriod": ("min_sync_period", _converted(_empty_is_none(parse_duration))),
    "iptables.syncPeriod": ("sync_period", _converted(_empty_is_none(parse_duration))),
    "iptables.minSyncPeriod": ("min_sync_period", _converted(_empty_is_none(parse_duration))),
    "syncPeriod": ("sync_period", _converted(_empty_is_none(parse_duration))),
    "minSyncPeriod": ("min_sync_period", _converted(_empty_is_none(parse_duration))),
}


def parse_kube_proxy_configuration(data: object) -> KubeProxyOptions:
    """Options from a parsed KubeProxyConfiguration document (see the module docstring)."""
    if not isinstance(data, Mapping):
        raise OptionsError(f"must be a {CONFIG_KIND} object, got {type(data).__name__}")
    api_version = data.get("apiVersion")
    if api_version != CONFIG_API_VERSION:
        raise OptionsError(f"apiVersion: must be {CONFIG_API_VERSION!r}, got {api_version!r}")
    if data.get("kind") != CONFIG_KIND:
        raise OptionsError(f"kind: must be {CONFIG_KIND!r}, got {data.get('kind')!r}")
    warnings: list[str] = []
    changes: dict[str, Any] = {}
    for key, value in data.items():
        if key in ("apiVersion", "kind"):
            continue
        if not isinstance(key, str):
            warnings.append(f"unknown field {key!r}")
            continue
        if key in _SECTIONS and value is not None:
            if not isinstance(value, Mapping):
                raise OptionsError(f"{key}: must be an object, got {type(value).__name__}")
            items: Sequence[tuple[str, object]] = [(f"{key}.{k}", v) for k, v in value.items()]
        else:
            items = [(key, value)]
        for path, v in items:
            if path in _APPLIED:
                attr, check = _APPLIED[path]
                if v is None:
                    continue
                result = check(v, path)
                if result is not None or attr in (
                    "kubeconfig",
                    "hostname_override",
                    "proxy_port_range",
                ):
                    changes[attr] = result
            elif path in _IGNORED or path.split(".")[0] in _IGNORED:
                warnings.append(f"{path}: has no effect in l4lb, ignored")
            else:
                warnings.append(f"unknown field {path}, ignored")
    try:
        opts = replace(KubeProxyOptions(), **changes, warnings=tuple(warnings))
    except TypeError as e:  # pragma: no cover - the table names only real attributes
        raise OptionsError(str(e)) from None
    return _checked(opts, "")


def option_names() -> list[str]:
    """Attribute names of :class:`KubeProxyOptions` (for tests and docs)."""
    return [f.name for f in fields(KubeProxyOptions)]
