"""The App's offload glue over a fake kernel: partition, passes, drift repair, draining."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

import pytest

from l4lb.config import BackendConfig, ServiceConfig
from l4lb.ipvs import IpvsSink, IpvsUnavailable
from l4lb.offload import Offload, partition
from l4lb.state import Override
from tests.unit.test_ipvs import KEY, FakeKernel, spec


class FakeSink(IpvsSink):
    """The real sink over a fake kernel; ``unavailable`` makes check_available fail."""

    def __init__(self, kernel: FakeKernel, unavailable: str | None = None) -> None:
        super().__init__(kernel_factory=lambda: kernel)
        self.unavailable = unavailable

    def check_available(self) -> None:
        if self.unavailable:
            raise IpvsUnavailable(self.unavailable)


class NoHealth:
    def get(self, service: str, address: str) -> Any:
        return None

    def is_up(self, service: str, address: str) -> bool:
        return True


def offload_spec(**kw: Any) -> Any:
    return replace(spec(**kw), mode="offload")


async def until(pred: Any, timeout: float = 5.0) -> bool:
    for _ in range(int(timeout / 0.02)):
        if pred():
            return True
        await asyncio.sleep(0.02)
    return bool(pred())


@pytest.fixture
def kernel() -> FakeKernel:
    return FakeKernel()


def make(kernel: FakeKernel, **kw: Any) -> tuple[Offload, list[int]]:
    results: list[int] = []
    off = Offload(lambda: results.append(1), sink_factory=lambda: FakeSink(kernel), **kw)
    return off, results


def test_partition_keeps_order_and_splits_by_mode():
    a, b, c = spec(name="a"), offload_spec(name="b"), spec(name="c")
    splice, offload = partition({"a": a, "b": b, "c": c})
    assert list(splice) == ["a", "c"] and list(offload) == ["b"]


async def test_take_returns_splice_specs_and_programs_offload_ones(kernel):
    off, results = make(kernel)
    off.start()
    try:
        splice = off.take({"s": spec(name="s", listen="10.0.0.5:80"), "web": offload_spec()})
        assert list(splice) == ["s"]
        await off.settle()
        assert set(kernel.services) == {KEY}
        assert list(off.applied) == ["web"] and off.failed == {} and results
        assert set(off.counters["web"]["backends"]) == {"10.2.0.1:8080", "10.2.0.2:8080"}
        # The service leaving offload mode leaves the kernel too.
        assert off.take({"web": spec()}) == {"web": spec()}
        await off.settle()
        assert kernel.services == {} and off.applied == {}
    finally:
        await off.close()


async def test_no_offload_service_never_opens_the_sink():
    opened: list[int] = []

    def factory() -> IpvsSink:
        opened.append(1)
        return FakeSink(FakeKernel())

    off = Offload(lambda: None, sink_factory=factory)
    off.start()
    try:
        off.take({"s": spec()})
        await off.settle()
        assert opened == []
    finally:
        await off.close()


async def test_without_ipvs_every_offload_service_fails_with_the_reason(kernel):
    why = "IPVS is not available in the running kernel (6.1.0): offload mode needs CONFIG_IP_VS"
    off = Offload(lambda: None, sink_factory=lambda: FakeSink(kernel, unavailable=why))
    off.start()
    try:
        splice = off.take(
            {
                "a": offload_spec(name="a"),
                "s": spec(name="s"),
                "b": offload_spec(name="b", listen="10.0.0.2:80"),
            }
        )
        assert list(splice) == ["s"]
        await off.settle()
        assert off.failed == {"a": why, "b": why}
        assert off.applied == {} and kernel.services == {}
    finally:
        await off.close()


async def test_a_failing_service_does_not_stop_the_others(kernel):
    off, _ = make(kernel)
    off.start()
    try:
        bad = offload_spec(name="bad", listen="10.0.0.2:80", scheduler="nope")
        off.take({"web": offload_spec(), "bad": bad})
        await off.settle()
        assert list(off.failed) == ["bad"] and "ip_vs_nope" in off.failed["bad"]
        assert list(off.applied) == ["web"]
    finally:
        await off.close()


async def test_drift_is_repaired_by_the_periodic_full_pass(kernel):
    off, _ = make(kernel, repair_interval=0.1)
    off.start()
    try:
        off.take({"web": offload_spec()})
        await off.settle()
        del kernel.services[KEY]
        assert await until(lambda: KEY in kernel.services)
        assert len(kernel.services[KEY].dests) == 2
    finally:
        await off.close()


async def test_draining_backend_is_deleted_once_idle_without_another_change(kernel):
    off, _ = make(kernel, drain_poll=0.05, repair_interval=60)
    off.start()
    try:
        off.take({"web": offload_spec()})
        await off.settle()
        kernel.active[(KEY, "10.2.0.2", 8080)] = 1
        off.take({"web": offload_spec(backends=(("10.2.0.1:8080", 1),))})
        await off.settle()
        weights = {d.server.addr: d.server.weight for d in kernel.services[KEY].dests}
        assert weights == {"10.2.0.1": 1, "10.2.0.2": 0}
        kernel.active[(KEY, "10.2.0.2", 8080)] = 0
        assert await until(lambda: len(kernel.services[KEY].dests) == 1)
        assert kernel.services[KEY].dests[0].server.addr == "10.2.0.1"
    finally:
        await off.close()


async def test_close_leaves_the_kernel_state(kernel):
    off, _ = make(kernel)
    off.start()
    off.take({"web": offload_spec()})
    await off.settle()
    await off.close()
    assert set(kernel.services) == {KEY} and kernel.addrs == {"10.0.0.1"}


async def test_service_doc_shows_mode_and_kernel_counters(kernel):
    off, _ = make(kernel)
    off.start()
    try:
        off.take({"web": offload_spec()})
        await off.settle()
        kernel.active[(KEY, "10.2.0.1", 8080)] = 3
        await off._read_counters()  # now, not at the next tick
        cfg = ServiceConfig(
            name="web",
            backends=tuple(BackendConfig(d.address, weight=1) for d in offload_spec().dests),
        )
        ov = {("web", "10.2.0.2:8080"): Override(weight=7)}
        doc = off.service_doc("web", cfg, ov, NoHealth())
        assert doc["mode"] == "offload" and doc["listen"] == "10.0.0.1:80"
        assert doc["vips"] == ["10.0.0.1:80"]
        b1, b2 = doc["backends"]
        assert (b1["address"], b1["active"], b1["kernel_weight"]) == ("10.2.0.1:8080", 3, 1)
        assert b2["weight"] == 7 and b2["effective_weight"] == 1
        assert set(b1) >= {"active", "inactive", "total", "bytes_in", "bytes_out"}
        assert doc["active"] == 3 and doc["kernel_vips"]["10.0.0.1:80"]["active"] == 3
    finally:
        await off.close()
