"""IPv6 and UDP offload against a real kernel: assertions on guest/case_v6_udp.py."""

from __future__ import annotations

from typing import Any

import pytest

# The first test also waits for the one VM boot that the whole batch shares.
pytestmark = pytest.mark.timeout(3600)


@pytest.fixture(scope="module")
def obs(vm: Any) -> dict[str, Any]:
    data: dict[str, Any] = vm.case("case_v6_udp")
    assert data.get("done"), data["steps"]
    return data


def mine(lines: list[str]) -> set[str]:
    """Saved lines without the foreign service the other case leaves behind on failure."""
    return {line for line in lines if "192.0.2.1" not in line}


def test_services_are_programmed_exactly(obs):
    assert obs["apply_errors"] == {}
    b1, b2 = (f"[{a}]:8080" for a in obs["backends"].values())
    expected = {
        "-A -t [fd00::1]:80 -s rr",
        f"-a -t [fd00::1]:80 -r {b1} -m -w 1",
        f"-a -t [fd00::1]:80 -r {b2} -m -w 1",
        # The IPv6 affinity prefix went through the host-order netmask encoding.
        "-A -t [fd00::1]:81 -s rr -p 30 -M 64",
        f"-a -t [fd00::1]:81 -r {b1} -m -w 1",
        f"-a -t [fd00::1]:81 -r {b2} -m -w 1",
        "-A -u 10.0.0.2:53 -s sh -b sh-fallback,sh-port",
        "-a -u 10.0.0.2:53 -r 10.20.0.1:53 -m -w 1",
        "-a -u 10.0.0.2:53 -r 10.20.0.2:53 -m -w 1",
        "-A -t 10.0.0.2:80 -s mh",
        "-a -t 10.0.0.2:80 -r 10.20.0.1:80 -m -w 1",
    }
    assert mine(obs["save"]) == expected


def test_ipv6_vip_and_masquerade(obs):
    assert "fd00::1/128" in obs["link_addrs"] and "10.0.0.2/32" in obs["link_addrs"]
    assert "--vaddr fd00::1 " in obs["masq6"] and "-j MASQUERADE" in obs["masq6"]


def test_ipv6_rr_traffic(obs):
    assert obs["traffic_v6"] == ["b2", "b1", "b2", "b1"]


def test_reapply_changes_nothing(obs):
    assert obs["reapply_errors"] == {}
    assert obs["save_after_reapply"] == obs["save"]


def test_unknown_scheduler_is_a_clear_per_service_error(obs):
    assert list(obs["bad_errors"]) == ["bad"]
    assert "ip_vs_nosuch" in obs["bad_errors"]["bad"]


def test_cleanup_removes_everything(obs):
    assert mine(obs["cleanup_save"]) == set()
    assert "L4LB" not in obs["cleanup_nat6"]
