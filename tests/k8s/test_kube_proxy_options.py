"""``l4lb kube-proxy`` flags, Go durations, port ranges and KubeProxyConfiguration files."""

from __future__ import annotations

import argparse
import socket
from dataclasses import replace
from pathlib import Path

import pytest

from l4lb.config import Address
from l4lb.k8s.options import (
    KubeProxyOptions,
    OptionsError,
    add_arguments,
    options_from_args,
    parse_config_file,
    parse_duration,
    parse_kube_proxy_configuration,
    parse_port_range,
)


def parse(*argv: str) -> KubeProxyOptions:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return options_from_args(p.parse_args(list(argv)))


def test_defaults_are_kube_proxys() -> None:
    opts = parse()
    assert opts.healthz_bind_address == Address("0.0.0.0", 10256, socket.AF_INET)
    assert opts.metrics_bind_address == Address("127.0.0.1", 10249, socket.AF_INET)
    assert opts.udp_timeout == 0.25
    assert opts.proxy_port_range is None
    assert opts.proxy_mode == "userspace" and not opts.offload
    assert opts.ipvs_scheduler == "rr"
    assert opts.sync_period == 30.0


def test_flags() -> None:
    opts = parse(
        "--kubeconfig=/k",
        "--master=https://10.0.0.1:6443",
        "--hostname-override=Node-1",
        "--bind-address=10.1.2.3",
        "--healthz-bind-address=[::]:1234",
        "--metrics-bind-address=127.0.0.2",
        "--proxy-port-range=30000+99",
        "--udp-timeout=1m30s",
        "--cluster-cidr=10.244.0.0/16,fd00:244::/56",
        "--proxy-mode=ipvs",
        "--ipvs-scheduler=mh",
        "--workers=2",
        "--cleanup",
    )
    assert opts.kubeconfig == "/k" and opts.master == "https://10.0.0.1:6443"
    assert opts.hostname_override == "node-1"  # kube-proxy lower-cases node names
    assert opts.bind_address == "10.1.2.3"
    assert opts.healthz_bind_address == Address("::", 1234, socket.AF_INET6)
    assert opts.metrics_bind_address == Address("127.0.0.2", 10249, socket.AF_INET)
    assert opts.proxy_port_range == (30000, 30099)
    assert opts.udp_timeout == 90.0
    assert opts.cluster_cidr == ("10.244.0.0/16", "fd00:244::/56")
    assert opts.offload and opts.ipvs_scheduler == "mh"
    assert opts.workers == 2 and opts.cleanup


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--udp-timeout=fast"], "--udp-timeout: invalid duration 'fast'"),
        (["--udp-timeout=0s"], "--udp-timeout: must be greater than 0"),
        (["--proxy-mode=nftables"], "--proxy-mode: must be 'userspace' or 'ipvs'"),
        (["--ipvs-scheduler=mh"], "--ipvs-scheduler: 'mh' is a kernel-only scheduler"),
        (["--ipvs-scheduler=fastest"], "--ipvs-scheduler: unknown scheduler 'fastest'"),
        (["--proxy-port-range=2000-1000"], "--proxy-port-range: invalid port range"),
        (["--bind-address=node1"], "--bind-address: 'node1' is not a valid IP address"),
        (["--metrics-bind-address=1.2.3.4:99999"], "--metrics-bind-address: invalid address"),
        (["--cluster-cidr=10.0.0.0/33"], "--cluster-cidr: '10.0.0.0/33' is not a valid CIDR"),
        (["--workers=many"], "--workers: must be an integer"),
        (["--workers=0"], "--workers: must be from 1 to 256"),
    ],
)
def test_bad_flags_name_the_flag(argv: list[str], message: str) -> None:
    with pytest.raises(OptionsError, match="^" + message.replace("(", r"\(").replace("+", r"\+")):
        parse(*argv)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("250ms", 0.25),
        ("1m", 60.0),
        ("1h2m3.5s", 3723.5),
        ("0", 0.0),
        ("1.5s", 1.5),
        ("10us", 1e-5),
    ],
)
def test_go_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "5", "-1s", "1d", "s", "1m-2s", "1.2.3s"])
def test_bad_go_durations(text: str) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(text)


def test_port_ranges() -> None:
    assert parse_port_range("") is None
    assert parse_port_range("0-0") is None
    assert parse_port_range("8080") == (8080, 8080)
    assert parse_port_range("100-200") == (100, 200)
    assert parse_port_range("100+5") == (100, 105)
    for bad in ("0-10", "1-70000", "a-b", "65535+1"):
        with pytest.raises(ValueError):
            parse_port_range(bad)


CONFIG = """\
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
bindAddress: 0.0.0.0
healthzBindAddress: 0.0.0.0:10266
metricsBindAddress: 127.0.0.1:10259
clientConnection:
  kubeconfig: /var/lib/kube-proxy/kubeconfig
  qps: 5
hostnameOverride: ""
mode: ipvs
portRange: "40000-40999"
udpIdleTimeout: 2s
clusterCIDR: 10.244.0.0/16
ipvs:
  scheduler: wlc
  syncPeriod: 10s
  minSyncPeriod: 100ms
  strictARP: true
conntrack:
  maxPerCore: 32768
shinyNewField: 1
"""


def test_config_file(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG)
    opts = parse_config_file(str(path))
    assert opts.healthz_bind_address.port == 10266
    assert opts.metrics_bind_address.port == 10259
    assert opts.kubeconfig == "/var/lib/kube-proxy/kubeconfig"
    assert opts.hostname_override is None
    assert opts.offload and opts.ipvs_scheduler == "wlc"
    assert opts.proxy_port_range == (40000, 40999)
    assert opts.udp_timeout == 2.0
    assert (opts.sync_period, opts.min_sync_period) == (10.0, 0.1)
    assert opts.cluster_cidr == ("10.244.0.0/16",)
    assert opts.warnings == (
        "clientConnection.qps: has no effect in l4lb, ignored",
        "ipvs.strictARP: has no effect in l4lb, ignored",
        "conntrack: has no effect in l4lb, ignored",
        "unknown field shinyNewField, ignored",
    )
    # The effective configuration round-trips through the parser (it is what /configz shows).
    again = parse_kube_proxy_configuration(opts.as_configuration())
    assert again == replace(opts, config=None)


def test_flags_given_win_over_the_file(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG)
    opts = parse(f"--config={path}", "--udp-timeout=5s", "--ipvs-scheduler=sh")
    assert opts.udp_timeout == 5.0 and opts.ipvs_scheduler == "sh"
    assert opts.offload  # from the file
    assert opts.config == str(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("mode: [ipvs]\n", "mode: must be a string, got list"),
        ("ipvs:\n  scheduler: 3\n", "ipvs.scheduler: must be a string, got int 3"),
        ("ipvs: fast\n", "ipvs: must be an object, got str"),
        ("udpIdleTimeout: 10\n", "udpIdleTimeout: must be a string, got int 10"),
        ("udpIdleTimeout: soon\n", "udpIdleTimeout: invalid duration 'soon'"),
        ("portRange: 1-2-3\n", "portRange: invalid port range"),
        ("mode: iptables\n", "mode: must be 'userspace' or 'ipvs'"),
        ("bindAddress: true\n", "bindAddress: must be a string, got bool True"),
    ],
)
def test_config_file_errors_name_the_field(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n" + text
    )
    with pytest.raises(OptionsError) as e:
        parse_config_file(str(path))
    assert str(e.value).startswith(f"{path}: {message}"), str(e.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("kind: KubeProxyConfiguration\n", "apiVersion: must be"),
        ("apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: Pod\n", "kind: must be"),
        ("- a\n- b\n", "must be a KubeProxyConfiguration object, got list"),
        ("mode: [\n", "line 2, column 1: invalid YAML"),
    ],
)
def test_config_file_shape_errors(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(OptionsError, match=message):
        parse_config_file(str(path))


def test_unreadable_config_file(tmp_path: Path) -> None:
    with pytest.raises(OptionsError, match="cannot read"):
        parse_config_file(str(tmp_path / "missing.yaml"))


def test_cli_reports_bad_flags_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    from l4lb.cli import main

    assert main(["kube-proxy", "--udp-timeout=soon"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "l4lb kube-proxy: --udp-timeout: invalid duration 'soon': must be like '250ms', "
        "'30s' or '1m'\n"
    )
