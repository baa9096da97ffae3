"""Translated services -> l4lb Config: names, listeners, NodePorts, Local split, conflicts."""

from __future__ import annotations

import socket

import pytest
from k8s_objects import endpoint_slice, service

from l4lb.config import _NAME_RE, Address, ServiceConfig
from l4lb.k8s.proxy import node_info
from l4lb.k8s.reconcile import (
    CONNECT_RETRIES,
    CONNECT_TIMEOUT,
    BuildSettings,
    PortAllocator,
    build_config,
    config_name,
)
from l4lb.k8s.translate import translate
from l4lb.state import desired_state, listeners

V4 = socket.AF_INET
NODE = node_info(
    "node-a", {"status": {"addresses": [{"type": "InternalIP", "address": "10.0.0.5"}]}}, "0.0.0.0"
)
WEB_PORTS = [{"name": "http", "port": 80, "targetPort": 8080}]
SLICE_PORTS = [{"name": "http", "port": 8080}]


def build(
    services: list[dict], slices: list[dict], settings: BuildSettings | None = None, **kw: object
) -> tuple[dict[str, ServiceConfig], list[str]]:
    t = translate(services, slices, NODE)
    assert not t.errors, t.errors
    cfg, errors = build_config(t.services, settings or BuildSettings(), **kw)  # type: ignore[arg-type]
    return {s.name: s for s in cfg.services}, [str(e) for e in errors]


def addr(text: str) -> Address:
    return Address.parse(text)


def test_cluster_ip_service() -> None:
    svcs, errors = build(
        [service("web", "10.96.0.10", WEB_PORTS)],
        [endpoint_slice("web", [{"ip": "10.244.1.2"}, {"ip": "10.244.1.3"}], SLICE_PORTS)],
    )
    assert errors == []
    svc = svcs["default_web_http_tcp"]
    assert svc.listen is None  # a kernel-chosen port on the wildcard listener
    assert svc.vips == (addr("10.96.0.10:80"),)
    assert [str(b.address) for b in svc.backends] == ["10.244.1.2:8080", "10.244.1.3:8080"]
    assert svc.protocol == "tcp" and svc.mode == "splice" and svc.scheduler == "rr"
    assert (svc.connect_timeout, svc.retries) == (CONNECT_TIMEOUT, CONNECT_RETRIES)
    # What the App will serve: one wildcard listener, the VIP redirected to it.
    spec = desired_state_of(svc)
    assert listeners(spec) == (Address("0.0.0.0", 0, V4),)


def desired_state_of(svc: ServiceConfig):  # type: ignore[no-untyped-def]
    from l4lb.config import AdminConfig, Config, DataplaneConfig

    cfg = Config("t", AdminConfig(), DataplaneConfig(), (svc,))
    return desired_state(cfg)[svc.name]


def test_node_port_is_held_by_a_wildcard_listener_and_external_ips_join() -> None:
    svcs, _ = build(
        [
            service(
                "web",
                "10.96.0.10",
                [{**WEB_PORTS[0], "nodePort": 30080}],
                type_="NodePort",
                external_ips=["192.0.2.7"],
                affinity_timeout=600,
            )
        ],
        [endpoint_slice("web", [{"ip": "10.244.1.2"}], SLICE_PORTS)],
    )
    svc = svcs["default_web_http_tcp"]
    assert svc.listen == Address("0.0.0.0", 30080, V4)
    assert svc.vips == (addr("10.96.0.10:80"), addr("192.0.2.7:80"))
    assert svc.affinity_timeout == 600.0
    assert listeners(desired_state_of(svc)) == (Address("0.0.0.0", 30080, V4),)


def test_local_policy_splits_external_traffic_into_its_own_service() -> None:
    svcs, _ = build(
        [
            service(
                "web",
                "10.96.0.10",
                [{**WEB_PORTS[0], "nodePort": 30080}],
                type_="NodePort",
                external_ips=["192.0.2.7"],
                externalTrafficPolicy="Local",
            )
        ],
        [
            endpoint_slice(
                "web",
                [{"ip": "10.244.1.2", "node": "node-a"}, {"ip": "10.244.2.2", "node": "node-b"}],
                SLICE_PORTS,
            )
        ],
    )
    cluster, external = svcs["default_web_http_tcp"], svcs["default_web_http_tcp_external"]
    assert cluster.listen is None and cluster.vips == (addr("10.96.0.10:80"),)
    assert len(cluster.backends) == 2
    assert external.listen == Address("0.0.0.0", 30080, V4)
    assert external.vips == (addr("192.0.2.7:80"),)
    assert [str(b.address) for b in external.backends] == ["10.244.1.2:8080"]


def test_offload_uses_node_addresses_as_vips() -> None:
    svcs, _ = build(
        [service("web", "10.96.0.10", [{**WEB_PORTS[0], "nodePort": 30080}], type_="NodePort")],
        [],
        BuildSettings(offload=True),
    )
    svc = svcs["default_web_http_tcp"]
    assert svc.mode == "offload" and svc.listen is None
    assert svc.vips == (addr("10.96.0.10:80"), addr("10.0.0.5:30080"))


def test_udp_gets_the_udp_timeout() -> None:
    svcs, _ = build(
        [service("dns", "10.96.0.53", [{"name": "dns", "port": 53, "protocol": "UDP"}])],
        [
            endpoint_slice(
                "dns", [{"ip": "10.244.1.9"}], [{"name": "dns", "port": 53, "protocol": "UDP"}]
            )
        ],
        BuildSettings(udp_timeout=0.25),
    )
    svc = svcs["default_dns_dns_udp"]
    assert svc.protocol == "udp" and svc.udp_idle_timeout == 0.25


def test_names_are_valid_config_names() -> None:
    assert config_name("default/web:http/tcp") == "default_web_http_tcp"
    assert config_name("default/web:http/tcp/ipv6") == "default_web_http_tcp_ipv6"
    long = "a-very-long-namespace-name-for-testing/" + "s" * 60 + ":80/tcp"
    name = config_name(long)
    assert len(name) == 63 and _NAME_RE.fullmatch(name)
    assert name.startswith("a-very-long-namespace-name-for-testing_sss")
    assert config_name(long) == name and config_name(long + "x") != name


def test_conflicting_vips_and_node_ports_drop_the_later_one() -> None:
    svcs, errors = build(
        [
            service(
                "a",
                "10.96.0.10",
                [{"port": 80, "nodePort": 30080}],
                type_="NodePort",
                external_ips=["192.0.2.7"],
            ),
            service("b", "10.96.0.11", [{"port": 80}], external_ips=["192.0.2.7", "127.0.0.1"]),
            service("c", "10.96.0.12", [{"port": 81, "nodePort": 30080}], type_="NodePort"),
        ],
        [],
    )
    assert svcs["default_a_80_tcp"].vips == (addr("10.96.0.10:80"), addr("192.0.2.7:80"))
    assert svcs["default_b_80_tcp"].vips == (addr("10.96.0.11:80"),)
    assert "default_c_81_tcp" not in svcs
    assert errors == [
        "Service default/b: default/b:80/tcp: VIP 192.0.2.7:80/tcp is already used by "
        "default_a_80_tcp, skipped",
        "Service default/b: default/b:80/tcp: VIP 127.0.0.1:80 is not a unicast address, skipped",
        "Service default/c: default/c:81/tcp: node port 30080/tcp is already used by "
        "default_a_80_tcp",
    ]


def test_port_range_is_stable_and_recycled() -> None:
    ports = PortAllocator(40000, 40001)
    one = [service("a", "10.96.0.10", [{"port": 80}]), service("b", "10.96.0.11", [{"port": 80}])]
    svcs, errors = build(one, [], ports=ports)
    assert errors == []
    assert svcs["default_a_80_tcp"].listen == Address("0.0.0.0", 40000, V4)
    assert svcs["default_b_80_tcp"].listen == Address("0.0.0.0", 40001, V4)
    # A third service finds the range full; the first two keep their ports.
    three = [*one, service("c", "10.96.0.12", [{"port": 80}])]
    svcs, errors = build(three, [], ports=ports)
    assert "default_c_80_tcp" not in svcs
    assert errors == [
        "Service default/c: default/c:80/tcp: no free port left in the proxy port range 40000-40001"
    ]
    assert svcs["default_b_80_tcp"].listen == Address("0.0.0.0", 40001, V4)
    # Once "a" is gone its port goes to "c".
    svcs, errors = build(three[1:], [], ports=ports)
    assert errors == [] and svcs["default_c_80_tcp"].listen == Address("0.0.0.0", 40000, V4)


def test_port_allocator_rejects_bad_ranges() -> None:
    with pytest.raises(ValueError):
        PortAllocator(10, 5)


def test_node_info_from_the_node_object() -> None:
    node = {
        "metadata": {"labels": {"topology.kubernetes.io/zone": "zone-a"}},
        "status": {
            "addresses": [
                {"type": "InternalIP", "address": "10.0.0.5"},
                {"type": "ExternalIP", "address": "203.0.113.5"},
                {"type": "Hostname", "address": "node-a"},
                "garbage",
            ]
        },
    }
    info = node_info("node-a", node, "0.0.0.0")
    assert info.addresses == ("10.0.0.5", "203.0.113.5", "0.0.0.0", "::")
    assert info.zone == "zone-a"
    assert node_info("n", None, "10.1.1.1").addresses == ("10.1.1.1", "0.0.0.0", "::")
    assert node_info("n", {"status": "broken"}, "0.0.0.0").zone is None
