"""IPVS offload against a real kernel: assertions on what guest/case_offload.py saw.

Expected pick orders follow the kernel's algorithms: IPVS lists destinations newest
first (b3, b2, b1 after adding b1, b2, b3), rr walks that list from the head, and wrr
restarts its cycle at the head on every destination edit.
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

import pytest

from l4lb import ipvs

VIP = "10.0.0.1:80"


# The first test also waits for the one VM boot that the whole batch shares.
pytestmark = pytest.mark.timeout(3600)


@pytest.fixture(scope="module")
def obs(vm: Any) -> dict[str, Any]:
    data: dict[str, Any] = vm.case("case_offload")
    assert data.get("done"), data["steps"]
    return data


def ours(listing: list[dict[str, Any]]) -> dict[str, Any]:
    found = [s for s in listing if s["vip"] == VIP]
    assert len(found) == 1, listing
    return found[0]


def saved(lines: list[str]) -> set[str]:
    return {line for line in lines if f"-t {VIP}" in line}


def addr(obs: dict[str, Any], name: str) -> str:
    return f"{obs['backends'][name]}:8080"


def test_service_is_programmed_exactly(obs):
    assert obs["check_available"] == "ok"
    assert obs["apply_rr_errors"] == {}
    svc = ours(obs["list_rr"])
    assert (svc["proto"], svc["sched"], svc["rest"]) == ("TCP", "rr", [])
    assert svc["dests"] == [
        {"addr": addr(obs, n), "fwd": "Masq", "weight": 1} for n in ("b1", "b2", "b3")
    ]
    assert saved(obs["save_rr"]) == {f"-A -t {VIP} -s rr"} | {
        f"-a -t {VIP} -r {addr(obs, n)} -m -w 1" for n in ("b1", "b2", "b3")
    }


def test_vip_interface_rules_and_sysctls(obs):
    assert " l4lb-ipvs0 " in obs["link_addrs"] and "10.0.0.1/32" in obs["link_addrs"]
    assert "--vaddr 10.0.0.1 " in obs["masq_chain"] and "-j MASQUERADE" in obs["masq_chain"]
    assert f"-A POSTROUTING -j {ipvs.CHAIN}" in obs["postrouting"]
    assert obs["sysctls"] == {
        "conntrack": "1",
        "expire_nodest_conn": "1",
        "expire_quiescent_template": "0",
    }


def test_rr_traffic_walks_the_kernel_list(obs):
    # Backends have no route to the client: these replies came back masqueraded.
    assert obs["traffic_rr"] == ["b3", "b2", "b1", "b3", "b2", "b1"]


def test_second_reconcile_issues_nothing(obs):
    assert obs["apply_rr_commands"], "the first apply must have programmed something"
    assert obs["reapply_errors"] == {}
    assert obs["reapply_commands"] == []
    assert obs["save_after_reapply"] == obs["save_rr"]


def test_restart_issues_nothing_and_keeps_connections(obs):
    assert obs["restart_errors"] == {}
    assert obs["restart_commands"] == []
    assert obs["held_backend"] in {"b1", "b2", "b3"}
    assert obs["held_ping_after_restart"] == "ping"


def test_drift_is_repaired(obs):
    assert saved(obs["save_after_manual_delete"]) == set()
    assert obs["repair_errors"] == {}
    assert saved(obs["save_after_repair"]) == saved(obs["save_rr"])
    assert saved(obs["save_after_weight_repair"]) == saved(obs["save_rr"])


def test_wrr_distribution_follows_weights(obs):
    assert obs["apply_wrr_errors"] == {}
    svc = ours(obs["list_wrr"])
    assert svc["sched"] == "wrr"
    assert [(d["addr"], d["weight"]) for d in svc["dests"]] == [
        (addr(obs, "b1"), 1),
        (addr(obs, "b2"), 2),
        (addr(obs, "b3"), 3),
    ]
    # cw starts at 1 (the edits keep it), then 3, 2, 1, ...: two full cycles.
    assert obs["traffic_wrr"] == (["b3", "b2", "b1", "b3", "b3", "b2"] * 2)
    assert Counter(obs["traffic_wrr"]) == {"b1": 2, "b2": 4, "b3": 6}


def test_persistence_pins_the_client(obs):
    assert obs["apply_persist_errors"] == {}
    svc = ours(obs["list_persist"])
    assert svc["rest"] == ["persistent", "60", "mask", "255.255.255.0"]
    assert f"-A -t {VIP} -s rr -p 60 -M 255.255.255.0" in obs["save_persist"]
    assert len(set(obs["traffic_persist"])) == 1, obs["traffic_persist"]


def test_removed_backend_is_drained_then_deleted(obs):
    gone = obs["drain_backend"]
    assert obs["drain_apply_errors"] == {}
    during = {d["addr"]: d["weight"] for d in ours(obs["drain_list_during"])["dests"]}
    assert during == {addr(obs, n): (0 if n == gone else 1) for n in ("b1", "b2", "b3")}
    assert obs["drain_pending"] is True
    counters = obs["drain_counters"]["web"]["backends"][addr(obs, gone)]
    assert counters["weight"] == 0 and counters["active"] >= 1
    assert obs["drain_ping"] == "ping"
    assert obs["drain_active_zero"] is True
    after = {d["addr"] for d in ours(obs["drain_list_after"])["dests"]}
    assert after == {addr(obs, n) for n in ("b1", "b2", "b3") if n != gone}
    assert obs["drain_pending_after"] is False


def test_cleanup_leaves_only_foreign_state(obs):
    assert obs["cleanup_save"] == ["-A -t 192.0.2.1:80 -s rr"]
    assert obs["cleanup_link"] == ""
    assert "L4LB" not in obs["cleanup_nat"]


@pytest.mark.skipif(os.path.exists("/proc/net/ip_vs"), reason="this kernel has IPVS")
def test_check_available_explains_a_kernel_without_ipvs():
    sink = ipvs.IpvsSink()
    try:
        with pytest.raises(ipvs.IpvsUnavailable, match=r"IPVS|root"):
            sink.check_available()
    finally:
        sink.close()
