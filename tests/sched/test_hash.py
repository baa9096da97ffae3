"""The hash primitive of sh and dh (spec §9), in C and in the model."""

import ipvs_model as m
import pytest

from l4lb import _dataplane as dp

EXAMPLES = [
    ("10.1.0.1", 174),
    ("10.1.0.2", 15),
    ("127.0.0.1", 154),
    ("192.168.1.10", 248),
]


@pytest.mark.parametrize(("ip", "bucket"), EXAMPLES)
def test_hash_32_examples(ip: str, bucket: int) -> None:
    assert dp._testhelper_hash_32(dp._testhelper_addr_key(ip), 8) == bucket
    assert m.hash_32(m.addr_key(ip)) == bucket


def test_addr_key_ipv4_is_host_order() -> None:
    assert dp._testhelper_addr_key("10.1.0.1") == 0x0A010001
    assert m.addr_key("10.1.0.1") == 0x0A010001


@pytest.mark.parametrize(
    ("ip", "key"),
    [
        ("2001:db8::1", 0x20010DB8 ^ 0x00000001),
        ("::1", 1),
        ("fe80::1:2:3:4", 0xFE800000 ^ 0x00000000 ^ 0x00010002 ^ 0x00030004),
        ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 0),
    ],
)
def test_addr_key_ipv6_xor_folds_big_endian_words(ip: str, key: int) -> None:
    assert dp._testhelper_addr_key(ip) == key
    assert m.addr_key(ip) == key


def test_hash_32_is_the_golden_ratio_multiply() -> None:
    for v in (0, 1, 0xFFFFFFFF, 0x12345678):
        for bits in (1, 8, 16, 32):
            want = ((v * 0x61C88647) & 0xFFFFFFFF) >> (32 - bits)
            assert dp._testhelper_hash_32(v, bits) == want
