"""An offload service on a kernel without IPVS: it fails clearly, the rest keep serving."""

from __future__ import annotations

import os

import pytest

from l4lb._testbase import connect_name, wait_for

from .conftest import lb_config

pytestmark = pytest.mark.skipif(
    os.path.exists("/proc/net/ip_vs"), reason="this kernel has IPVS (tests/kernel covers it)"
)


def test_offload_service_fails_and_splice_services_run(l4lb, named_backends):
    (b0,) = named_backends(1)
    cfg = lb_config([b0.address])
    cfg["services"].append(
        {
            "name": "kernel",
            "mode": "offload",
            "vips": ["10.0.0.1:80"],
            "scheduler": "mh",
            "backends": [{"address": "10.2.0.1:8080"}],
        }
    )
    lb = l4lb(cfg)
    assert connect_name(lb.service_address("web")) == "b0"
    wait_for(
        lambda: "offload services are not programmed" in lb.stderr_text(),
        10,
        message="the offload failure to be logged",
    )
    text = lb.stderr_text()
    assert "IPVS is not available in the running kernel" in text or "needs root" in text
    # Listed as failed, not as a service; the spliced one is unaffected by reloads too.
    assert [s["name"] for s in lb.services_json()["services"]] == ["web"]
    cfg["services"][0]["backends"][0]["weight"] = 3
    lb.reload(cfg, wait=False)
    wait_for(lambda: lb.service("web")["backends"][0]["weight"] == 3, 10, message="the reload")
    assert connect_name(lb.service_address("web")) == "b0"
    assert lb.running
