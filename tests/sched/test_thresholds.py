"""OVERLOAD and its hysteresis (spec §2), seen through the schedulers."""

from __future__ import annotations

from sched_harness import Both

B0, B1 = 0, 1


def loaded(u: int, lo: int = 0) -> Both:
    """rr over b0 (thresholds u/lo, first in the list) and b1 (no limit)."""
    s = Both("rr")
    s.add(B1, 1)
    s.add(B0, 1, u=u, lo=lo)
    return s


def test_set_when_total_reaches_upper() -> None:
    s = loaded(u=2, lo=1)
    s.edit(B1, 0)
    assert s.pick() == B0
    assert not s.m.slots[B0].overload
    assert s.pick() == B0  # T == u
    assert s.m.slots[B0].overload
    assert s.pick() is None  # b1 quiesced, b0 overloaded


def test_upper_2_lower_1_stays_overloaded_at_1() -> None:
    s = Both("rr")
    s.add(B1, 0)
    s.add(B0, 1, u=2, lo=1)
    assert [s.pick(), s.pick()] == [B0, B0]
    s.close(B0)  # T 2 -> 1: T_before is not l_val
    assert s.m.slots[B0].overload
    assert s.pick() is None
    s.close(B0)  # T 1 -> 0 crosses l_val = 1
    assert not s.m.slots[B0].overload
    assert s.pick() == B0


def test_upper_4_default_lower_is_3() -> None:
    s = Both("rr")
    s.add(B1, 0)
    s.add(B0, 1, u=4)  # l_val = 4 - (4 >> 2) = 3
    for _ in range(4):
        assert s.pick() == B0
    assert s.pick() is None
    s.close(B0)  # T 3: still overloaded
    assert s.m.slots[B0].overload
    s.close(B0)  # T 2 < 3: cleared
    assert not s.m.slots[B0].overload
    assert s.pick() == B0  # T 3: not == u, stays clear
    assert not s.m.slots[B0].overload


def test_inactive_connections_count_towards_the_limit() -> None:
    s = Both("rr")
    s.add(B1, 0)
    s.add(B0, 1, u=2)
    assert s.pick() == B0
    s.deactivate(B0)  # inactive, still in T
    assert s.pick() == B0
    assert s.m.slots[B0].overload


def test_edit_without_thresholds_clears_the_limit() -> None:
    s = Both("rr")
    s.add(B1, 0)
    s.add(B0, 1, u=1)
    assert s.pick() == B0
    assert s.m.slots[B0].overload
    s.edit(B0, 1)  # u = l = 0
    assert not s.m.slots[B0].overload
    assert s.pick() == B0


def test_threshold_change_rules() -> None:
    s = Both("rr")
    s.add(B1, 0)
    s.add(B0, 1)
    for _ in range(5):
        assert s.pick() == B0
    s.edit(B0, 1, u=5)  # T >= u: set
    assert s.m.slots[B0].overload
    s.edit(B0, 1, u=8)  # l_val 6, T 5 < 6: cleared
    assert not s.m.slots[B0].overload
    s.edit(B0, 1, u=5)
    s.edit(B0, 1, u=6, lo=4)  # T 5 between l and u: unchanged (set)
    assert s.m.slots[B0].overload
    s.edit(B0, 1, u=6, lo=4)  # same values: no change either way
    assert s.m.slots[B0].overload
    s.edit(B0, 1, u=7, lo=6)  # T 5 < 6: cleared
    assert not s.m.slots[B0].overload


def test_bind_sets_only_on_reaching_upper_exactly() -> None:
    s = Both("rr")
    s.add(B1, 0)
    s.add(B0, 1)
    for _ in range(3):
        assert s.pick() == B0
    s.edit(B0, 1, u=8, lo=2)  # T 3 between 2 and 8: stays clear
    for _ in range(5):
        assert s.pick() == B0  # T reaches 8 on the last
    assert s.m.slots[B0].overload
