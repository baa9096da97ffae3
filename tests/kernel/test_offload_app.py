"""``l4lb run`` with offload services in the VM: assertions on guest/case_app.py.

Expected pick orders follow the kernel's algorithms (see test_offload.py): IPVS lists
destinations newest first and rr walks that list from its head.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

pytestmark = pytest.mark.timeout(3600)

WEB = "10.0.0.1:80"
DH = [f"10.0.0.{x}:80" for x in range(4, 12)]


@pytest.fixture(scope="module")
def obs(vm: Any) -> dict[str, Any]:
    data: dict[str, Any] = vm.case("case_app")
    assert data.get("done"), data["steps"]
    return data


def seen(obs: dict[str, Any], key: str) -> Any:
    """One observation; a step that raised fails here with its traceback."""
    if key not in obs:
        pytest.fail(f"step {key} did not complete:\n{obs['errors'].get(key, obs['errors'])}")
    return obs[key]


def rs(obs: dict[str, Any], name: str, port: int = 8080) -> str:
    return f"{obs['backends'][name]}:{port}"


def test_every_step_ran_without_error(obs):
    assert obs["errors"] == {}, "\n".join(f"{k}:\n{v}" for k, v in obs["errors"].items())
    assert seen(obs, "stderr_has_traceback") is False


def test_ipvsadm_shows_exactly_the_configured_virtual_services(obs):
    listing = seen(obs, "list")
    assert sorted((s["proto"], s["vip"], s["sched"]) for s in listing) == sorted(
        [
            ("TCP", WEB, "rr"),
            ("TCP", "[fd00::1]:80", "rr"),
            ("UDP", "10.0.0.2:53", "rr"),
            ("TCP", "10.0.0.3:80", "rr"),
            ("TCP", "10.0.0.30:80", "mh"),
            ("TCP", "10.0.0.20:80", "sh"),
            ("TCP", "10.0.0.21:80", "rr"),
            ("TCP", "10.0.0.22:80", "wrr"),
            *(("TCP", vip, "dh") for vip in DH),
            ("TCP", "192.0.2.1:80", "rr"),  # not l4lb's
        ]
    )
    by_vip = {(s["proto"], s["vip"]): s for s in listing}
    three = {rs(obs, n) for n in ("b1", "b2", "b3")}
    web = by_vip[("TCP", WEB)]
    assert web["rest"] == []
    assert {d["addr"] for d in web["dests"]} == three
    assert all(d["fwd"] == "Masq" and d["weight"] == 1 for d in web["dests"])
    # Backends of a family serve the VIPs of that family: the IPv6 VIP has none here.
    assert by_vip[("TCP", "[fd00::1]:80")]["dests"] == []
    udp = by_vip[("UDP", "10.0.0.2:53")]
    assert {d["addr"] for d in udp["dests"]} == {rs(obs, n, 5353) for n in ("b1", "b2")}
    assert by_vip[("TCP", "10.0.0.3:80")]["rest"] == ["persistent", "60", "mask", "255.255.255.0"]
    flags = " ".join(by_vip[("TCP", "10.0.0.30:80")]["rest"])
    assert "fallback" in flags and "port" in flags, flags
    wrr = {d["addr"]: d["weight"] for d in by_vip[("TCP", "10.0.0.22:80")]["dests"]}
    assert wrr == {rs(obs, "b1"): 1, rs(obs, "b2"): 2, rs(obs, "b3"): 3}
    save = set(seen(obs, "save"))
    assert f"-A -t {WEB} -s rr" in save
    assert {f"-a -t {WEB} -r {a} -m -w 1" for a in three} <= save


def test_vips_live_on_the_dummy_interface_with_masquerading(obs):
    addrs = seen(obs, "link_addrs")
    for vip in ("10.0.0.1/32", "10.0.0.2/32", "10.0.0.30/32", "fd00::1/128"):
        assert vip in addrs
    assert "--vaddr 10.0.0.1 " in seen(obs, "masq4")
    assert "--vaddr fd00::1 " in seen(obs, "masq6")


def test_traffic_follows_the_schedulers(obs):
    assert seen(obs, "traffic_web") == ["b3", "b2", "b1"] * 2
    assert seen(obs, "traffic_dns") == ["b2", "b1"] * 2
    assert len(set(seen(obs, "traffic_sticky"))) == 1
    maglev = seen(obs, "traffic_maglev")
    assert len(maglev) == 12 and set(maglev) <= {"b1", "b2", "b3"}
    # mh with the port flag hashes each connection's source port: they spread.
    assert len(set(maglev)) >= 2


@pytest.mark.parametrize("sched", ["rr", "wrr", "sh", "dh"])
def test_offload_and_splice_choose_the_same_backends(obs, sched):
    offload, splice = seen(obs, "same_choice")[sched]
    assert offload == splice
    if sched == "rr":
        assert offload == ["b3", "b2", "b1"] * 2
    if sched == "wrr":
        assert Counter(offload) == {"b1": 2, "b2": 4, "b3": 6}
    if sched == "sh":
        # 8 source addresses twice over: the same client gets the same backend.
        assert offload[:8] == offload[8:]


def test_kernel_counters_reach_ipvsadm_the_api_and_status(obs):
    stats = seen(obs, "stats")
    assert stats[f"TCP {WEB}"]["conns"] == 6
    assert stats["UDP 10.0.0.2:53"]["conns"] == 4
    for n in ("b1", "b2", "b3"):
        assert stats[f"TCP {WEB} -> {rs(obs, n)}"]["conns"] == 2
    web = seen(obs, "api_web")
    assert web["mode"] == "offload"
    assert web["vips"] == [WEB, "[fd00::1]:80"]
    assert {b["address"]: b["total"] for b in web["backends"]} == {
        rs(obs, n): 2 for n in ("b1", "b2", "b3")
    }
    assert all(b["bytes_in"] > 0 and b["bytes_out"] > 0 for b in web["backends"])
    assert web["kernel_vips"][WEB]["total"] == 6
    names = set(seen(obs, "api_names"))
    assert {"web", "dns", "sticky", "maglev", "o-rr", "s-rr", "o-dh", "s-dh0"} <= names
    text = seen(obs, "status_text")
    assert f"TCP  {WEB} rr offload" in text
    assert "TCP  [fd00::1]:80 rr offload" in text
    assert "UDP  10.0.0.2:53 rr offload" in text


def test_weight_changes_by_sighup_and_admin_api(obs):
    assert seen(obs, "sighup_weight")[rs(obs, "b1")] == 5
    api = seen(obs, "api_weight")
    assert api["reply"]["weight"] == 4
    assert api["kernel"][rs(obs, "b2")] == 4
    assert seen(obs, "api_drain")[rs(obs, "b3")] == 0
    assert seen(obs, "after_reload") == {rs(obs, n): 1 for n in ("b1", "b2", "b3")}


def test_removed_backend_drains_then_goes(obs):
    r = seen(obs, "removal")
    gone = rs(obs, r["gone"])
    assert r["quiesced"] and r["during"][gone] == 0
    assert r["ping"] == "ping"
    assert r["deleted"] and gone not in r["after"] and len(r["after"]) == 2
    assert r["back"]


def test_health_failure_inhibits_or_removes(obs):
    h = seen(obs, "health_failure")
    b3 = rs(obs, "b3")
    assert h["down"] and h["seen"]["web"][b3] == 0
    assert h["removed_from_sticky"] and b3 not in h["seen"]["sticky"]
    (api,) = h["api_b3"]
    assert api["up"] is False and api["effective_weight"] == 0
    assert h["up_again"]


def test_a_virtual_service_deleted_by_hand_comes_back(obs):
    assert seen(obs, "drift") == {"gone": True, "back": True}


def test_restart_keeps_rules_and_connections(obs):
    r = seen(obs, "restart")
    assert r["rc"] == 0
    assert r["same_after_stop"] and r["same_after_start"] and r["same_after_pass"]
    assert r["ping_stopped"] == "ping" and r["ping_restarted"] == "ping"
    # The service was not re-created: its counters carry on (ipvsadm's totals lag by up
    # to the estimator's 2 s, so the held connection may show only afterwards).
    assert r["conns_after"] >= max(r["conns_before"], 1)
    assert seen(obs, "stop_rc") == 0


def test_cleanup_leaves_nothing_of_l4lb(obs):
    c = seen(obs, "cleanup")
    assert c["rc"] == 0, c["stderr"]
    assert c["save"] == ["-A -t 192.0.2.1:80 -s rr"]
    assert c["link"] == ""
    assert "L4LB-IPVS" not in c["nat4"] and "L4LB-IPVS" not in c["nat6"]
    assert f"virtual service tcp/{WEB}" in c["stdout"]
    assert "interface l4lb-ipvs0" in c["stdout"]
    assert "iptables: nat POSTROUTING jump to L4LB-IPVS-MASQ" in c["stdout"]
