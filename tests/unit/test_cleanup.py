"""``l4lb cleanup``: portal rules and IPVS state, each reported or skipped with its reason."""

from __future__ import annotations

import pytest

from l4lb import cleanup
from l4lb.ipvs import IpvsUnavailable
from l4lb.portals import CleanupResult, PortalError


class FakeManager:
    def __init__(self, result: CleanupResult | Exception) -> None:
        self.result = result

    def cleanup(self) -> CleanupResult:
        if isinstance(self.result, Exception):
            raise self.result
        return self.result


def patch(
    monkeypatch: pytest.MonkeyPatch,
    portals: CleanupResult | Exception,
    ipvs: list[str] | Exception,
) -> None:
    monkeypatch.setattr(cleanup, "PortalManager", lambda: FakeManager(portals))

    def kernel() -> list[str]:
        if isinstance(ipvs, Exception):
            raise ipvs
        return ipvs

    monkeypatch.setattr(cleanup, "cleanup_kernel", kernel)


def test_prints_what_both_parts_removed(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    rules = CleanupResult(removed=["IPv4: removed chain L4LB-PORTALS-HOST (2 rule(s))"])
    patch(monkeypatch, rules, ["removed IPVS service tcp 10.96.0.1:80"])
    assert cleanup.main() == 0
    assert capsys.readouterr().out.splitlines() == [
        "IPv4: removed chain L4LB-PORTALS-HOST (2 rule(s))",
        "removed IPVS service tcp 10.96.0.1:80",
    ]


def test_kernel_without_ipvs_is_skipped_not_an_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    rules = CleanupResult(skipped=["IPv6 VIPs need ip6tables, which was not found"])
    patch(monkeypatch, rules, IpvsUnavailable("IPVS is not available in the running kernel"))
    assert cleanup.main() == 0
    assert capsys.readouterr().out.splitlines() == [
        "skipped: IPv6 VIPs need ip6tables, which was not found",
        "skipped: IPVS: IPVS is not available in the running kernel",
        "nothing to remove",
    ]


def test_a_failing_part_exits_1_and_the_other_part_still_runs(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    patch(monkeypatch, PortalError("IPv4 VIPs need root (CAP_NET_ADMIN)"), ["removed x"])
    assert cleanup.main() == 1
    out, err = capsys.readouterr()
    assert out == "removed x\n"
    assert err == "l4lb cleanup: portal rules: IPv4 VIPs need root (CAP_NET_ADMIN)\n"
