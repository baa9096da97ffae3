"""sh and dh (spec §10, §11): 256-bucket tables, checked source by source on
the C schedulers and the model, against tables derived by hand here."""

from __future__ import annotations

import ipaddress

import ipvs_model as m
import pytest
from sched_harness import Both

B0, B1, B2 = 0, 1, 2
# The 256 sources 10.1.0.1 .. 10.1.1.0 (several share a bucket).
SOURCES = [str(ipaddress.IPv4Address(0x0A010000 + i)) for i in range(1, 257)]


def bucket_of(ip: str, port: int = 0) -> int:
    return m.hash_32((m.addr_key(ip) + port) & 0xFFFFFFFF)


def sh_table(order: list[int], weights: dict[int, int]) -> list[int]:
    """§10 rebuild: each dest takes max(weight, 1) consecutive buckets per round."""
    run: list[int] = []
    for d in order:
        run += [d] * max(weights[d], 1)
    return [run[i % len(run)] for i in range(256)]


def setup(sched: str, weights: list[int], flags: int = 0) -> Both:
    s = Both(sched, flags=flags)
    for i, w in enumerate(weights):
        s.add(i, w)
    return s


def fallback(table: list[int], usable: set[int], h: int) -> int | None:
    """§10's probe: the home bucket, then (2h + off) mod 256."""
    if table[h] in usable:
        return table[h]
    for off in range(256):
        d = table[(2 * h + off) % 256]
        if d in usable:
            return d
    return None


# ---------------------------------------------------------------------- sh


def test_sh_equal_weights_take_buckets_in_turn() -> None:
    s = setup("sh", [1, 1, 1])
    order = [B2, B1, B0]
    for ip in SOURCES:
        assert s.pick(ip) == order[bucket_of(ip) % 3], ip


def test_sh_weights_are_runs_of_buckets() -> None:
    s = setup("sh", [1, 2, 3])
    run = [B2, B2, B2, B1, B1, B0]
    for ip in SOURCES:
        assert s.pick(ip) == run[bucket_of(ip) % 6], ip


def test_sh_weight_zero_refuses_its_buckets_without_fallback() -> None:
    s = setup("sh", [1, 0, 1])
    got = [s.pick(ip) for ip in SOURCES]
    assert got.count(None) == 79  # as recorded on the reference kernel
    for ip, d in zip(SOURCES, got, strict=True):
        assert (d is None) == (bucket_of(ip) % 3 == 1)


@pytest.mark.parametrize(
    "weights",
    [[1, 0, 3], [0, 2, 3], [1, 2, 0], [1, 2, 3, 0, 5], [0, 2, 3, 4, 0], [1, 1, 1]],
)
def test_sh_fallback_probes_from_2h(weights: list[int]) -> None:
    s = setup("sh", weights, flags=m.SH_FALLBACK)
    order = list(reversed(range(len(weights))))
    table = sh_table(order, dict(enumerate(weights)))
    usable = {i for i, w in enumerate(weights) if w > 0}
    for ip in SOURCES:
        assert s.pick(ip) == fallback(table, usable, bucket_of(ip)), ip


def test_sh_fallback_start_is_not_h_plus_1() -> None:
    """The weights of §10's check: a naive h + 1 probe would differ."""
    weights = [1, 2, 3, 4, 5]
    weights[2] = 0
    s = setup("sh", weights, flags=m.SH_FALLBACK)
    table = sh_table([4, 3, 2, 1, 0], dict(enumerate(weights)))
    usable = {0, 1, 3, 4}

    def naive(h: int) -> int | None:
        return next(table[(h + o) % 256] for o in range(256) if table[(h + o) % 256] in usable)

    h = {ip: bucket_of(ip) for ip in SOURCES}
    differ = [ip for ip in SOURCES if fallback(table, usable, h[ip]) != naive(h[ip])]
    assert differ
    for ip in differ:
        assert s.pick(ip) == fallback(table, usable, h[ip])


def test_sh_fallback_skips_overloaded_dest() -> None:
    s = Both("sh", flags=m.SH_FALLBACK)
    s.add(B0, 1)
    s.add(B1, 1, u=1)  # order b1, b0: buckets alternate
    home = next(ip for ip in SOURCES if bucket_of(ip) % 2 == 0)
    assert s.pick(home) == B1  # now overloaded
    table = sh_table([B1, B0], {B0: 1, B1: 1})
    for ip in SOURCES[:64]:
        assert s.pick(ip) == fallback(table, {B0}, bucket_of(ip))


def test_sh_without_fallback_refuses_overloaded_dest() -> None:
    s = Both("sh")
    s.add(B0, 1)
    s.add(B1, 1, u=1)
    home = next(ip for ip in SOURCES if bucket_of(ip) % 2 == 0)
    assert s.pick(home) == B1
    assert s.pick(home) is None


def test_sh_port_joins_the_key() -> None:
    s = setup("sh", [1, 1, 1], flags=m.SH_PORT)
    order = [B2, B1, B0]
    ip = "192.168.1.10"
    seen = set()
    for port in range(1, 300):
        want = order[bucket_of(ip, port) % 3]
        assert s.pick(ip, cport=port) == want, port
        seen.add(want)
    assert seen == {B0, B1, B2}


def test_sh_ignores_the_port_without_the_flag() -> None:
    s = setup("sh", [1, 1, 1])
    first = s.pick("192.168.1.10", cport=1)
    assert all(s.pick("192.168.1.10", cport=p) == first for p in range(2, 50))


def test_sh_ignores_connection_counts() -> None:
    s = setup("sh", [1, 1, 1])
    ip = SOURCES[0]
    want = [B2, B1, B0][bucket_of(ip) % 3]
    assert [s.pick(ip) for _ in range(20)] == [want] * 20


def test_sh_ipv6_clients() -> None:
    s = setup("sh", [1, 2, 3])
    run = [B2, B2, B2, B1, B1, B0]
    for i in range(300):
        ip = f"2001:db8:{i:x}::{(i * 7919) & 0xFFFF:x}"
        assert s.pick(ip) == run[bucket_of(ip) % 6], ip


def test_sh_table_rebuilt_on_edit_delete_and_add() -> None:
    s = setup("sh", [1, 1, 1])
    s.edit(B1, 2)
    run = [B2, B1, B1, B0]
    for ip in SOURCES:
        assert s.pick(ip) == run[bucket_of(ip) % 4]
    s.delete(B2)
    for ip in SOURCES:
        assert s.pick(ip) == [B1, B1, B0][bucket_of(ip) % 3]
    s.add(B2, 1)  # back at the head
    for ip in SOURCES:
        assert s.pick(ip) == run[bucket_of(ip) % 4]


def test_sh_empty_service_refuses() -> None:
    s = Both("sh", flags=m.SH_FALLBACK)
    assert s.pick(SOURCES[0]) is None
    s.add(B0, 1)
    s.delete(B0)
    assert s.pick(SOURCES[0]) is None


# ---------------------------------------------------------------------- dh

VIPS4 = [str(ipaddress.IPv4Address(0x0A640000 + i)) for i in range(1, 301)]
VIPS6 = [f"fd00:{i:x}::{i * 31:x}" for i in range(1, 301)]


@pytest.mark.parametrize("weights", [[1, 1, 1], [1, 2, 3]])
@pytest.mark.parametrize("vips", [VIPS4, VIPS6], ids=["ipv4", "ipv6"])
def test_dh_buckets_ignore_weights(weights: list[int], vips: list[str]) -> None:
    s = setup("dh", weights)
    order = [B2, B1, B0]
    client = "2001:db8::1" if ":" in vips[0] else "10.9.9.9"
    for vip in vips:
        assert s.pick(client, daddr=vip) == order[bucket_of(vip) % 3], vip


def test_dh_hashes_the_destination_not_the_client() -> None:
    s = setup("dh", [1, 1, 1])
    vip = VIPS4[0]
    want = [B2, B1, B0][bucket_of(vip) % 3]
    assert {s.pick(ip, daddr=vip) for ip in SOURCES[:50]} == {want}


def test_dh_weight_zero_share_refused_no_fallback() -> None:
    s = setup("dh", [1, 0, 1])
    for vip in VIPS4:
        d = s.pick("10.9.9.9", daddr=vip)
        assert (d is None) == (bucket_of(vip) % 3 == 1)


def test_dh_table_follows_list_changes() -> None:
    s = setup("dh", [1, 1, 1])
    s.delete(B1)
    for vip in VIPS4[:100]:
        assert s.pick("10.9.9.9", daddr=vip) == [B2, B0][bucket_of(vip) % 2]
    s.add(B1, 5)
    for vip in VIPS4[:100]:
        assert s.pick("10.9.9.9", daddr=vip) == [B1, B2, B0][bucket_of(vip) % 3]
