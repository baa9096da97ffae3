"""VIP portal planning: specs + bound listeners -> portals, rule comparison, admission."""

from __future__ import annotations

import dataclasses
import json
import socket
from collections.abc import Sequence

import pytest

from l4lb.config import Address
from l4lb.portals import CommandResult, Portal
from l4lb.state import ServiceSpec
from l4lb.vips import (
    VipRules,
    VipService,
    build_portals,
    expected_lines,
    owned_lines,
    proxy_port,
    vip_families,
    vip_services,
)

A = Address.parse
NODES = {4: "192.0.2.5", 6: "2001:db8::5"}
BASE = ServiceSpec(
    name="web",
    listen=None,
    protocol="tcp",
    scheduler="rr",
    flags=0,
    persist_timeout=0.0,
    persist_netmask=32,
    persist_netmask6=128,
    expire_quiescent=False,
    connect_timeout=5.0,
    idle_timeout=900.0,
    drain_timeout=10.0,
    retries=-1,
    dests=(),
)


def spec(name: str = "web", **kw: object) -> ServiceSpec:
    return dataclasses.replace(BASE, name=name, **kw)  # type: ignore[arg-type]


def svc(name: str, protocol: str, vips: list[str], listeners: list[str]) -> VipService:
    return VipService(name, protocol, tuple(map(A, vips)), tuple(map(A, listeners)))


# --------------------------------------------------------------------------- selection


def test_vip_families_skip_offload_and_plain_services():
    assert vip_families(spec(vips=(A("10.96.0.1:80"), A("[fd00::1]:80")))) == {4, 6}
    assert vip_families(spec(vips=(A("[fd00::1]:80"),))) == {6}
    assert vip_families(spec(listen=A("127.0.0.1:80"))) == set()
    assert vip_families(spec(vips=(A("10.96.0.1:80"),), mode="offload")) == set()


def test_vip_services_keeps_only_splice_services_with_vips_sorted_by_name():
    applied = {
        "web": spec("web", vips=(A("10.96.0.1:80"),)),
        "plain": spec("plain", listen=A("127.0.0.1:80")),
        "kernel": spec("kernel", vips=(A("10.96.0.2:80"),), mode="offload"),
        "dns": spec("dns", protocol="udp", vips=(A("10.96.0.10:53"),)),
    }
    bound = {"web": (A("0.0.0.0:4001"),), "dns": (A("0.0.0.0:4002"),)}
    got = vip_services(applied, lambda n: bound[n])
    assert got == (
        svc("dns", "udp", ["10.96.0.10:53"], ["0.0.0.0:4002"]),
        svc("web", "tcp", ["10.96.0.1:80"], ["0.0.0.0:4001"]),
    )


def test_proxy_port_is_the_wildcard_listener_of_the_family():
    ls = [A("10.0.0.1:80"), A("0.0.0.0:4001"), A("[::]:4002")]
    assert proxy_port(ls, 4) == 4001
    assert proxy_port(ls, 6) == 4002
    assert proxy_port([A("10.0.0.1:80"), A("[::1]:80")], 6) is None
    assert proxy_port([Address("0.0.0.0", 0, socket.AF_INET)], 4) is None  # not bound yet


# --------------------------------------------------------------------------- portals


def test_build_portals_points_each_vip_at_its_family_listener_and_node():
    services = [
        svc("web", "tcp", ["10.96.0.1:80", "[fd00::1]:80"], ["0.0.0.0:4001", "[::]:4002"]),
        svc("dns", "udp", ["10.96.0.10:53"], ["0.0.0.0:4003"]),
    ]
    portals, problems = build_portals(services, NODES)
    assert problems == []
    assert portals == [
        Portal(A("10.96.0.1:80"), "tcp", 4001, "192.0.2.5", None, "web"),
        Portal(A("[fd00::1]:80"), "tcp", 4002, None, "2001:db8::5", "web"),
        Portal(A("10.96.0.10:53"), "udp", 4003, "192.0.2.5", None, "dns"),
    ]


def test_build_portals_without_node_address_tcp_redirects_udp_is_refused():
    services = [
        svc("web", "tcp", ["[fd00::1]:80"], ["[::]:4002"]),
        svc("dns", "udp", ["[fd00::10]:53"], ["[::]:4003"]),
    ]
    portals, problems = build_portals(services, {4: "192.0.2.5", 6: None})
    assert portals == [Portal(A("[fd00::1]:80"), "tcp", 4002, None, None, "web")]
    assert problems == [
        "service dns: UDP VIP [fd00::10]:53 needs a global IPv6 address on this node for "
        "host-originated traffic; there is none"
    ]


def test_build_portals_reports_a_vip_without_wildcard_listener():
    portals, problems = build_portals([svc("web", "tcp", ["10.96.0.1:80"], ["10.0.0.1:80"])], NODES)
    assert portals == []
    assert problems == ["service web: VIP 10.96.0.1:80 has no 0.0.0.0 listener to go to"]


# --------------------------------------------------------------------------- rule comparison

HOOKS4 = [
    '-A PREROUTING -m comment --comment "l4lb portals" -j L4LB-PORTALS-CONTAINER',
    '-A OUTPUT -m comment --comment "l4lb portals" -j L4LB-PORTALS-HOST',
]
WEB4 = Portal(A("10.96.0.1:80"), "tcp", 4001, "192.0.2.5", None, "web")
RULES4 = [
    '-A L4LB-PORTALS-CONTAINER -d 10.96.0.1/32 -p tcp -m tcp --dport 80 -m comment --comment "l4lb web" -j REDIRECT --to-ports 4001',  # noqa: E501
    '-A L4LB-PORTALS-HOST -d 10.96.0.1/32 -p tcp -m tcp --dport 80 -m comment --comment "l4lb web" -j DNAT --to-destination 192.0.2.5:4001',  # noqa: E501
]


def listing(*extra: str, hooks: Sequence[str] = HOOKS4, rules: Sequence[str] = RULES4) -> str:
    """``iptables -t nat -S`` as iptables prints it, with a foreign rule."""
    lines = ["-P PREROUTING ACCEPT", "-P OUTPUT ACCEPT", "-N FOREIGN"]
    lines += ["-N L4LB-PORTALS-CONTAINER", "-N L4LB-PORTALS-HOST"]
    lines += [hooks[0], "-A PREROUTING -p tcp -m tcp --dport 9 -j FOREIGN", *hooks[1:]]
    lines += [*rules, *extra]
    return "".join(ln + "\n" for ln in lines)


def test_expected_lines_match_the_listing_of_synced_rules():
    assert owned_lines(listing()) == expected_lines([WEB4], 4)
    assert expected_lines([WEB4], 6) == sorted(
        ["-N L4LB-PORTALS-CONTAINER", "-N L4LB-PORTALS-HOST", *HOOKS4]
    )


@pytest.mark.parametrize(
    "text",
    [
        listing(hooks=HOOKS4[1:]),  # PREROUTING hook deleted
        listing(hooks=[HOOKS4[0], HOOKS4[0], HOOKS4[1]]),  # hook twice
        listing(rules=RULES4[:1]),  # HOST chain flushed
        listing(rules=[RULES4[0], RULES4[1].replace("4001", "4009")]),  # stale port
    ],
)
def test_owned_lines_differ_when_rules_were_tampered_with(text: str):
    assert owned_lines(text) != expected_lines([WEB4], 4)


# --------------------------------------------------------------------------- VipRules


class FakeRunner:
    """Answers iptables/ip commands from fixed data and records what ran."""

    def __init__(self, listings: dict[str, str], *, missing: Sequence[str] = ()) -> None:
        self.listings = listings
        self.missing = set(missing)
        self.calls: list[list[str]] = []

    def __call__(self, argv: Sequence[str], *, stdin: str | None, timeout: float) -> CommandResult:
        self.calls.append(list(argv))
        tool = argv[0]
        if tool in self.missing:
            raise FileNotFoundError(2, "not found", tool)
        if tool == "ip":
            fam = argv[2]
            addr = {"-4": ("inet", "192.0.2.5"), "-6": ("inet6", "2001:db8::5")}[fam]
            link = {"ifname": "eth0", "addr_info": [{"family": addr[0], "local": addr[1]}]}
            link["addr_info"][0]["scope"] = "global"
            return CommandResult(0, json.dumps([link]), "")
        if tool in self.listings and "-S" in argv:
            return CommandResult(0, self.listings[tool], "")
        return CommandResult(0, "", "")

    def restores(self) -> list[list[str]]:
        return [c for c in self.calls if c[0].endswith("-restore") and "--test" not in c]


WEB_SVC = (svc("web", "tcp", ["10.96.0.1:80"], ["0.0.0.0:4001"]),)
EMPTY6 = listing(rules=())  # ip6tables: chains and hooks, no portals


def test_reconcile_leaves_matching_rules_alone():
    run = FakeRunner({"iptables": listing(), "ip6tables": EMPTY6})
    rules = VipRules(runner=run)
    assert rules._reconcile_once(WEB_SVC) is None
    assert run.restores() == []


def test_reconcile_resyncs_when_a_hook_is_gone():
    run = FakeRunner({"iptables": listing(hooks=HOOKS4[1:]), "ip6tables": EMPTY6})
    rules = VipRules(runner=run)
    assert rules._reconcile_once(WEB_SVC) == "synced 1 portal(s) (IPv4)"
    assert [c[0] for c in run.restores()] == ["iptables-restore", "ip6tables-restore"]


def test_reconcile_without_vips_touches_nothing_until_something_was_installed():
    run = FakeRunner({})
    rules = VipRules(runner=run)
    assert rules._reconcile_once(()) is None
    assert run.calls == []


def test_admit_holds_vip_services_when_iptables_is_missing(caplog: pytest.LogCaptureFixture):
    run = FakeRunner({}, missing=["iptables", "iptables-restore"])
    rules = VipRules(runner=run)
    desired = {
        "web": spec("web", vips=(A("10.96.0.1:80"),)),
        "v6": spec("v6", vips=(A("[fd00::1]:80"),)),
        "plain": spec("plain", listen=A("127.0.0.1:80")),
    }
    keep, held = rules.admit(desired)
    assert list(keep) == ["v6", "plain"]
    assert held == {
        "web": "VIPs cannot be served: IPv4 VIPs need iptables, which was not found "
        "(install iptables)"
    }
    # The verdict is remembered, and logged once, until a reload asks again.
    n = len(run.calls)
    rules.admit(desired)
    assert len(run.calls) == n
    logged = [r.getMessage() for r in caplog.records if r.name == "l4lb.vips"]
    assert logged == [f"service web: {held['web']}"]
    rules.recheck()
    rules.admit(desired)
    assert len(run.calls) > n
