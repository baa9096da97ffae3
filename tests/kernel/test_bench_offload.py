"""The offload benchmark's measurement at a small size: assertions on guest/case_bench.py."""

from __future__ import annotations

from typing import Any

import pytest

pytestmark = pytest.mark.timeout(3600)


@pytest.fixture(scope="module")
def obs(vm: Any) -> dict[str, Any]:
    data: dict[str, Any] = vm.case("case_bench")
    assert data.get("done")
    return data


def test_sink_programs_exactly_what_ipvsadm_restore_does(obs):
    assert obs["errors"] == {}
    assert obs["same_rules_as_restore"]
    assert obs["rules"] == obs["services"] * (1 + obs["dests_per_service"])


def test_trusted_endpoint_change_reaches_the_kernel(obs):
    assert obs["endpoint_change_applied"]


def test_every_figure_is_measured(obs):
    for key in ("ipvsadm_restore_s", "program_s", "endpoint_change_ms", "noop_reconcile_ms"):
        assert obs[key] > 0
