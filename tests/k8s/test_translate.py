"""Service/EndpointSlice translation, rule by rule, against kubectl-shaped objects."""

from __future__ import annotations

import copy
import socket
from typing import Any

import pytest

from l4lb.config import Address
from l4lb.k8s.translate import (
    KubeVirtualService,
    NodeInfo,
    Translation,
    translate,
    translate_service,
)

NODE = NodeInfo(name="node-a", addresses=("192.168.1.10", "fd00:1::10"), zone="zone-a")
V4 = socket.AF_INET
V6 = socket.AF_INET6

Obj = dict[str, Any]


def a(text: str) -> Address:
    return Address.parse(text)


def by_name(t: Translation) -> dict[str, KubeVirtualService]:
    return {s.name: s for s in t.services}


def backends(svc: KubeVirtualService, *, external: bool = False) -> list[str]:
    chosen = svc.external_backends if external else svc.backends
    assert all(b.weight == 1 for b in chosen)
    return [str(b.address) for b in chosen]


def one(svc: Obj, slices: list[Obj], node: NodeInfo = NODE, **kw: Any) -> Translation:
    return translate_service(svc, slices, node, **kw)


def web_slices(slices: dict[str, Obj]) -> list[Obj]:
    return [slices["web-v4k8p"], slices["web-z2n9c"], slices["web-6hq2w"]]


def endpoint(ip: str, *, node: str = "node-b", zone: str | None = None, **cond: bool) -> Obj:
    ep: Obj = {"addresses": [ip], "conditions": cond or {"ready": True}, "nodeName": node}
    if zone is not None:
        ep["hints"] = {"forZones": [{"name": zone}]}
    return ep


def simple_service(**spec: Any) -> Obj:
    base: Obj = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "s", "namespace": "ns", "resourceVersion": "1"},
        "spec": {
            "clusterIP": "10.96.1.1",
            "clusterIPs": ["10.96.1.1"],
            "ports": [{"name": "p", "port": 80, "protocol": "TCP", "targetPort": 8080}],
            "type": "ClusterIP",
        },
    }
    base["spec"].update(spec)
    return base


def simple_slice(*endpoints: Obj, name: str = "s-1", port: int = 8080, **extra: Any) -> Obj:
    sl: Obj = {
        "addressType": "IPv4",
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": "ns",
            "labels": {"kubernetes.io/service-name": "s"},
        },
        "endpoints": list(endpoints),
        "ports": [{"name": "p", "port": port, "protocol": "TCP"}],
    }
    sl.update(extra)
    return sl


# --------------------------------------------------------------------------- whole snapshot


def test_fixture_snapshot(services: dict[str, Obj], slices: dict[str, Obj]) -> None:
    t = translate(services.values(), slices.values(), NODE)
    assert t.errors == ()
    assert [s.name for s in t.services] == [
        "default/kubernetes:https/tcp",
        "shop/dns:dns-tcp/tcp",
        "shop/dns:dns/udp",
        "shop/gateway:tls/tcp",
        "shop/web:http/tcp",
        "shop/web:http/tcp/ipv6",
        "shop/web:metrics/tcp",
        "shop/web:metrics/tcp/ipv6",
    ]
    k = by_name(t)["default/kubernetes:https/tcp"]
    assert k.service == "default/kubernetes" and k.port_name == "https" and k.protocol == "tcp"
    assert k.cluster_vips == (a("10.96.0.1:443"),)
    assert k.external_vips == () and k.node_port_vips == ()
    assert backends(k) == ["172.18.0.2:6443"]
    assert (k.scheduler, k.affinity_timeout, k.sh_port, k.sh_fallback) == ("rr", 0, False, False)


def test_headless_and_external_name_are_skipped_silently(services: dict[str, Obj]) -> None:
    for key in ("shop/db", "shop/mail"):
        t = one(services[key], [])
        assert t == Translation((), ())


def test_empty_cluster_ip_is_headless() -> None:
    assert one(simple_service(clusterIP="", clusterIPs=[]), []).services == ()


@pytest.mark.parametrize(
    "label", ["service.kubernetes.io/service-proxy-name", "service.kubernetes.io/headless"]
)
def test_labelled_services_are_left_to_others(label: str) -> None:
    svc = simple_service()
    svc["metadata"]["labels"] = {label: "other"}
    assert one(svc, [simple_slice(endpoint("10.0.0.1"))]) == Translation((), ())


def test_headless_slices_are_ignored(slices: dict[str, Obj]) -> None:
    t = translate([], [slices["db-8f3kq"]], NODE)
    assert t.errors == ()


# --------------------------------------------------------------------------- VIPs


def test_dual_stack_cluster_ips_and_node_ports(
    services: dict[str, Obj], slices: dict[str, Obj]
) -> None:
    t = by_name(one(services["shop/web"], web_slices(slices)))
    v4, v6 = t["shop/web:http/tcp"], t["shop/web:http/tcp/ipv6"]
    assert (v4.family, v6.family) == (V4, V6)
    assert v4.cluster_vips == (a("10.96.10.20:80"),)
    assert v6.cluster_vips == (a("[fd00:10:96::a14]:80"),)
    assert v4.node_port_vips == (a("192.168.1.10:30080"),)
    assert v6.node_port_vips == (a("[fd00:1::10]:30080"),)
    # Backends follow the family; the not-ready pod on node-b is left out.
    assert backends(v4) == ["10.244.1.5:8080", "10.244.3.9:8080"]
    assert backends(v6) == ["[fd00:10:244:1::5]:8080"]
    assert v4.vips == v4.cluster_vips + v4.node_port_vips


def test_cluster_ip_only_without_cluster_ips_list() -> None:
    svc = simple_service()
    del svc["spec"]["clusterIPs"]
    (s,) = one(svc, []).services
    assert s.cluster_vips == (a("10.96.1.1:80"),)
    assert s.backends == ()


def test_load_balancer_external_ips_and_ingress(
    services: dict[str, Obj], slices: dict[str, Obj]
) -> None:
    (s,) = one(services["shop/gateway"], [slices["gateway-h7d2k"]]).services
    assert s.cluster_vips == (a("10.96.44.7:443"),)
    # externalIPs, then ingress IPs; hostname-only and ipMode Proxy entries get no VIP.
    assert s.external_vips == (a("192.0.2.50:443"), a("203.0.113.10:443"))
    assert s.node_port_vips == (a("192.168.1.10:30443"),)


def test_external_ips_work_on_cluster_ip_services() -> None:
    (s,) = one(simple_service(externalIPs=["198.51.100.7", "198.51.100.7"]), []).services
    assert s.external_vips == (a("198.51.100.7:80"),)


def test_node_port_ignored_on_cluster_ip_type() -> None:
    svc = simple_service()
    svc["spec"]["ports"][0]["nodePort"] = 30001
    (s,) = one(svc, []).services
    assert s.node_port_vips == ()


def test_unnamed_port_is_named_by_number() -> None:
    svc = simple_service(ports=[{"port": 80, "protocol": "TCP", "targetPort": 8080}])
    sl = simple_slice(endpoint("10.0.0.1"))
    sl["ports"] = [{"name": "", "port": 8080, "protocol": "TCP"}]
    (s,) = one(svc, [sl]).services
    assert s.name == "ns/s:80/tcp" and s.port_name == ""
    assert backends(s) == ["10.0.0.1:8080"]


# --------------------------------------------------------------------------- ports and protocols


def test_same_port_two_protocols(services: dict[str, Obj], slices: dict[str, Obj]) -> None:
    t = by_name(one(services["shop/dns"], [slices["dns-m4x8r"]]))
    udp, tcp = t["shop/dns:dns/udp"], t["shop/dns:dns-tcp/tcp"]
    assert (udp.protocol, tcp.protocol) == ("udp", "tcp")
    assert udp.cluster_vips == tcp.cluster_vips == (a("10.96.0.10:53"),)
    assert backends(udp) == backends(tcp) == ["10.244.1.20:53", "10.244.2.21:53"]


def test_target_port_resolved_through_slice_port_name() -> None:
    svc = simple_service(ports=[{"name": "p", "port": 80, "protocol": "TCP", "targetPort": "web"}])
    (s,) = one(svc, [simple_slice(endpoint("10.0.0.1"), port=3000)]).services
    assert backends(s) == ["10.0.0.1:3000"]


def test_slice_port_must_match_name_and_protocol() -> None:
    sl = simple_slice(endpoint("10.0.0.1"))
    sl["ports"] = [
        {"name": "p", "port": 8080, "protocol": "UDP"},
        {"name": "q", "port": 1, "protocol": "TCP"},
    ]
    (s,) = one(simple_service(), [sl]).services
    assert s.backends == ()


def test_protocol_defaults_to_tcp() -> None:
    svc = simple_service(ports=[{"name": "p", "port": 80}])
    sl = simple_slice(endpoint("10.0.0.1"))
    del sl["ports"][0]["protocol"]
    (s,) = one(svc, [sl]).services
    assert s.protocol == "tcp" and backends(s) == ["10.0.0.1:8080"]


# --------------------------------------------------------------------------- affinity and tuning


def test_client_ip_affinity(services: dict[str, Obj]) -> None:
    assert {s.affinity_timeout for s in one(services["shop/dns"], []).services} == {600}


def test_client_ip_affinity_default_timeout() -> None:
    (s,) = one(simple_service(sessionAffinity="ClientIP"), []).services
    assert s.affinity_timeout == 10800


def test_annotations_choose_scheduler_and_flags(services: dict[str, Obj]) -> None:
    (s,) = one(services["shop/gateway"], []).services
    assert (s.scheduler, s.sh_port, s.sh_fallback) == ("sh", True, False)
    svc = simple_service()
    svc["metadata"]["annotations"] = {
        "l4lb.io/scheduler": "wlc",
        "l4lb.io/sh-fallback": "True",
        "l4lb.io/affinity-netmask": "24",
        "l4lb.io/affinity-netmask6": "64",
    }
    (s,) = one(svc, []).services
    assert (s.scheduler, s.sh_fallback, s.affinity_netmask, s.affinity_netmask6) == (
        "wlc",
        True,
        24,
        64,
    )


def test_default_scheduler_and_netmasks() -> None:
    (s,) = one(simple_service(), [], default_scheduler="lc").services
    assert (s.scheduler, s.affinity_netmask, s.affinity_netmask6) == ("lc", 32, 128)


# --------------------------------------------------------------------------- endpoint selection


def test_terminating_fallback_only_when_nothing_is_ready() -> None:
    term = endpoint("10.0.0.2", ready=False, serving=True, terminating=True)
    dead = endpoint("10.0.0.3", ready=False, serving=False, terminating=True)
    (s,) = one(simple_service(), [simple_slice(term, dead)]).services
    assert backends(s) == ["10.0.0.2:8080"]
    (s,) = one(simple_service(), [simple_slice(term, dead, endpoint("10.0.0.9"))]).services
    assert backends(s) == ["10.0.0.9:8080"]


def test_unset_conditions_mean_ready() -> None:
    ep = endpoint("10.0.0.4")
    ep["conditions"] = {}
    (s,) = one(simple_service(), [simple_slice(ep)]).services
    assert backends(s) == ["10.0.0.4:8080"]


def test_slices_are_merged_and_deduplicated() -> None:
    first = simple_slice(endpoint("10.0.0.2", ready=False, serving=True, terminating=True),
                         endpoint("10.0.0.1"), name="s-a")  # fmt: skip
    second = simple_slice(endpoint("10.0.0.2"), endpoint("10.0.0.1"), name="s-b")
    (s,) = one(simple_service(), [second, first]).services
    assert backends(s) == ["10.0.0.1:8080", "10.0.0.2:8080"]


def test_same_ip_different_ports_across_slices() -> None:
    # A named targetPort can resolve to different container ports; the controller then
    # splits slices by port, and each address keeps its own port.
    a_ = simple_slice(endpoint("10.0.0.1"), name="s-a", port=8080)
    b_ = simple_slice(endpoint("10.0.0.2"), endpoint("10.0.0.1"), name="s-b", port=9090)
    (s,) = one(simple_service(), [b_, a_]).services
    assert backends(s) == ["10.0.0.1:8080", "10.0.0.1:9090", "10.0.0.2:9090"]


def test_bad_node_address_reported_once() -> None:
    t = translate(
        [simple_service(), simple_service(type="NodePort")], [], NodeInfo("n", ("x", "10.1.1.1"))
    )
    assert [str(e) for e in t.errors] == ["Node n: addresses[0] 'x' is not a valid IP address"]


def test_slices_of_other_services_are_ignored() -> None:
    other = simple_slice(endpoint("10.0.0.7"))
    other["metadata"]["labels"]["kubernetes.io/service-name"] = "t"
    elsewhere = simple_slice(endpoint("10.0.0.8"))
    elsewhere["metadata"]["namespace"] = "other"
    (s,) = one(simple_service(), [other, elsewhere]).services
    assert s.backends == ()


def test_internal_traffic_policy_local() -> None:
    sl = simple_slice(endpoint("10.0.0.1", node="node-a"), endpoint("10.0.0.2", node="node-b"))
    (s,) = one(simple_service(internalTrafficPolicy="Local"), [sl]).services
    assert backends(s) == ["10.0.0.1:8080"]
    assert backends(s, external=True) == ["10.0.0.1:8080", "10.0.0.2:8080"]


def test_external_traffic_policy_local(services: dict[str, Obj], slices: dict[str, Obj]) -> None:
    (s,) = one(services["shop/gateway"], [slices["gateway-h7d2k"]]).services
    assert backends(s) == ["10.244.1.30:8443", "10.244.2.31:8443"]
    assert backends(s, external=True) == ["10.244.1.30:8443"]
    (s,) = one(services["shop/gateway"], [slices["gateway-h7d2k"]], NodeInfo("node-x")).services
    assert s.external_backends == () and len(s.backends) == 2


def test_local_policy_falls_back_to_local_terminating() -> None:
    sl = simple_slice(
        endpoint("10.0.0.1", node="node-a", ready=False, serving=True, terminating=True),
        endpoint("10.0.0.2", node="node-b"),
    )
    (s,) = one(simple_service(internalTrafficPolicy="Local"), [sl]).services
    assert backends(s) == ["10.0.0.1:8080"]


@pytest.mark.parametrize(
    ("spec", "annotations"),
    [
        ({"trafficDistribution": "PreferClose"}, {}),
        ({}, {"service.kubernetes.io/topology-mode": "Auto"}),
    ],
)
def test_topology_prefers_hinted_zone(spec: Obj, annotations: Obj) -> None:
    svc = simple_service(**spec)
    svc["metadata"]["annotations"] = annotations
    sl = simple_slice(endpoint("10.0.0.1", zone="zone-a"), endpoint("10.0.0.2", zone="zone-b"))
    (s,) = one(svc, [sl]).services
    assert backends(s) == ["10.0.0.1:8080"]
    assert backends(s, external=True) == ["10.0.0.1:8080"]


def test_topology_ignored_without_opt_in_or_full_hints() -> None:
    hinted = [endpoint("10.0.0.1", zone="zone-a"), endpoint("10.0.0.2", zone="zone-b")]
    (s,) = one(simple_service(), [simple_slice(*hinted)]).services
    assert len(s.backends) == 2  # no opt-in
    partial = [*hinted, endpoint("10.0.0.3")]
    (s,) = one(simple_service(trafficDistribution="PreferClose"), [simple_slice(*partial)]).services
    assert len(s.backends) == 3  # one endpoint without hints disables them
    other_zone = [endpoint("10.0.0.2", zone="zone-b")]
    (s,) = one(
        simple_service(trafficDistribution="PreferClose"), [simple_slice(*other_zone)]
    ).services
    assert len(s.backends) == 1  # no hint for our zone: use all
    (s,) = one(
        simple_service(trafficDistribution="PreferClose"),
        [simple_slice(*hinted)],
        NodeInfo("node-a"),
    ).services
    assert len(s.backends) == 2  # node zone unknown


def test_local_policy_ignores_topology() -> None:
    sl = simple_slice(
        endpoint("10.0.0.1", node="node-a", zone="zone-b"), endpoint("10.0.0.2", zone="zone-a")
    )
    svc = simple_service(internalTrafficPolicy="Local", trafficDistribution="PreferClose")
    (s,) = one(svc, [sl]).services
    assert backends(s) == ["10.0.0.1:8080"]
    assert backends(s, external=True) == ["10.0.0.2:8080"]  # cluster policy: zone-a hint wins


def test_single_stack_ipv6_has_no_family_suffix() -> None:
    svc = simple_service(clusterIP="fd00::a", clusterIPs=["fd00::a"], ipFamilies=["IPv6"])
    sl = simple_slice(endpoint("fd00:1::5"), endpoint("10.0.0.1"), addressType="IPv6")
    t = one(svc, [sl, simple_slice(endpoint("10.0.0.9"), name="s-v4")])
    (s,) = t.services
    assert (s.name, s.family) == ("ns/s:p/tcp", V6)
    assert backends(s) == ["[fd00:1::5]:8080"]
    assert s.node_port_vips == ()
    (err,) = t.errors  # the IPv4 address inside the IPv6 slice
    assert "does not match" in err.message


def test_fqdn_slices_are_ignored() -> None:
    sl = simple_slice(
        {"addresses": ["db.example.net"], "conditions": {"ready": True}}, addressType="FQDN"
    )
    t = one(simple_service(), [sl])
    assert t.errors == () and t.services[0].backends == ()


# --------------------------------------------------------------------------- bad objects


def _errors(t: Translation) -> list[str]:
    return [str(e) for e in t.errors]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda s: s.pop("metadata"), "metadata.namespace is missing"),
        (lambda s: s["metadata"].pop("name"), "metadata.name is missing"),
        (lambda s: s.__setitem__("spec", []), "spec must be an object"),
        (lambda s: s["spec"].__setitem__("clusterIP", 17), "spec.clusterIP must be a string"),
        (lambda s: s["spec"].__setitem__("clusterIPs", ["10.96.300.1"]), "not a valid IP address"),
        (lambda s: s["spec"].__setitem__("ports", "80"), "spec.ports must be a list"),
        (lambda s: s["spec"].__setitem__("type", "Magic"), "unknown spec.type"),
        (
            lambda s: s["spec"].__setitem__("sessionAffinity", "Cookie"),
            "unknown spec.sessionAffinity",
        ),
        (
            lambda s: s["spec"].update(
                sessionAffinity="ClientIP",
                sessionAffinityConfig={"clientIP": {"timeoutSeconds": 86401}},
            ),
            "timeoutSeconds 86401 is out of range",
        ),
        (
            lambda s: s["spec"].__setitem__("internalTrafficPolicy", "Nearby"),
            "internalTrafficPolicy",
        ),
        (
            lambda s: s["metadata"].__setitem__("annotations", {"l4lb.io/scheduler": "mh"}),
            "unknown 'mh'",
        ),
        (
            lambda s: s["metadata"].__setitem__("annotations", {"l4lb.io/sh-port": "yes"}),
            "true or false",
        ),
        (
            lambda s: s["metadata"].__setitem__("annotations", {"l4lb.io/affinity-netmask": "33"}),
            "must be 1-32",
        ),
    ],
)
def test_bad_service_is_skipped_with_one_error(mutate: Any, message: str) -> None:
    bad = simple_service()
    mutate(bad)
    t = translate([bad, simple_service(), "junk"], [simple_slice(endpoint("10.0.0.1"))], NODE)  # type: ignore[list-item]
    assert len(t.errors) == 2, t.errors
    assert message in str(t.errors[0]) and t.errors[0].kind == "Service"
    assert "must be an object" in str(t.errors[1])
    (s,) = t.services  # the good copy still translates, with its backend
    assert backends(s) == ["10.0.0.1:8080"]


@pytest.mark.parametrize(
    ("port", "message"),
    [
        ({"name": "p", "port": 80, "protocol": "SCTP"}, "protocol SCTP is not supported"),
        ({"name": "p", "port": 0, "protocol": "TCP"}, "port 0 is out of range"),
        ({"name": "p", "port": 65536, "protocol": "TCP"}, "port 65536 is out of range"),
        ({"name": "p", "port": "80", "protocol": "TCP"}, "port must be an integer"),
        ({"name": "p", "protocol": "TCP"}, "port is missing"),
        ("80/tcp", "must be an object"),
    ],
)
def test_bad_port_is_skipped_others_kept(port: Any, message: str) -> None:
    svc = simple_service(ports=[port, {"name": "q", "port": 81, "protocol": "UDP"}])
    t = one(svc, [])
    (err,) = t.errors
    assert message in err.message and err.key == "ns/s"
    assert [s.name for s in t.services] == ["ns/s:q/udp"]


def test_bad_ips_are_dropped_one_by_one() -> None:
    svc = simple_service(externalIPs=["198.51.100.1", "198.51.100.300", "::ffff:1.2.3.4"])
    svc["status"] = {"loadBalancer": {"ingress": [{"ip": "lb.example"}, {"ip": "203.0.113.9"}]}}
    t = one(svc, [], NodeInfo("node-a", ("192.168.1.1", "garbage")))
    assert len(t.errors) == 4, t.errors
    (s,) = t.services
    assert s.external_vips == (a("198.51.100.1:80"), a("203.0.113.9:80"))


@pytest.mark.parametrize(
    ("ep", "message"),
    [
        ({"addresses": [], "conditions": {}}, "addresses is empty"),
        ({"addresses": ["10.0.0.999"]}, "not a valid IP address"),
        ({"addresses": ["fd00::1"]}, "does not match the slice's addressType"),
        ({"addresses": ["10.0.0.5"], "conditions": {"ready": "yes"}}, "ready must be a boolean"),
        ({"addresses": "10.0.0.5"}, "addresses must be a list"),
        ("10.0.0.5", "endpoints[0] must be an object"),
    ],
)
def test_bad_endpoint_is_skipped_others_kept(ep: Any, message: str) -> None:
    sl = simple_slice(ep, endpoint("10.0.0.1"))
    t = one(simple_service(), [sl])
    (err,) = t.errors
    assert err.kind == "EndpointSlice" and err.key == "ns/s-1" and message in err.message
    assert backends(t.services[0]) == ["10.0.0.1:8080"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"addressType": "IPX"}, "unknown addressType"),
        ({"addressType": None}, "addressType is missing"),
        ({"ports": [{"name": "p", "port": 70000}]}, "out of range"),
        ({"endpoints": {"a": 1}}, "endpoints must be a list"),
    ],
)
def test_bad_slice_is_skipped_others_kept(extra: Obj, message: str) -> None:
    bad = simple_slice(endpoint("10.0.0.2"), name="s-bad", **extra)
    t = one(simple_service(), [bad, simple_slice(endpoint("10.0.0.1"))])
    (err,) = t.errors
    assert err.key == "ns/s-bad" and message in err.message
    assert backends(t.services[0]) == ["10.0.0.1:8080"]


def test_slice_without_service_label_is_reported() -> None:
    sl = simple_slice(endpoint("10.0.0.1"))
    sl["metadata"]["labels"] = {}
    t = translate([simple_service()], [sl, 42], NODE)  # type: ignore[list-item]
    assert [e.key for e in t.errors] == ["ns/s-1", "?/?"]


def test_translation_does_not_mutate_input(
    services: dict[str, Obj], slices: dict[str, Obj]
) -> None:
    before = copy.deepcopy((services, slices))
    translate(services.values(), slices.values(), NODE)
    assert (services, slices) == before
