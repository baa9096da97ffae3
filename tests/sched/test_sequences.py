"""Hand-derived decision sequences from the spec (§3-§8), checked on the C
schedulers and on the reference model at once (``Both`` compares every step,
counters included)."""

from __future__ import annotations

from sched_harness import Both

B0, B1, B2 = 0, 1, 2


def setup(sched: str, weights: list[int], **opts: int | bool) -> Both:
    """Add b0, b1, ... in that order, so the list is ..., b1, b0."""
    s = Both(sched, **opts)
    for i, w in enumerate(weights):
        s.add(i, w)
    return s


def picks(s: Both, n: int) -> list[int | None]:
    """n new connections, all held open."""
    return [s.pick() for _ in range(n)]


# ---------------------------------------------------------------------- rr


def test_rr_order_is_newest_first() -> None:
    s = setup("rr", [1, 1, 1])
    assert s.c.order() == [B2, B1, B0]
    assert picks(s, 12) == [B2, B1, B0] * 4


def test_rr_readded_dest_goes_to_the_head() -> None:
    s = setup("rr", [1, 1, 1])
    picks(s, 12)  # cursor on b0
    s.delete(B1)
    s.add(B1, 1)
    assert s.c.order() == [B1, B2, B0]
    assert picks(s, 6) == [B1, B2, B0] * 2


def test_rr_deleting_the_cursor_moves_it_to_its_predecessor() -> None:
    s = setup("rr", [1, 1, 1])
    assert picks(s, 2) == [B2, B1]  # cursor on b1
    s.delete(B1)
    assert picks(s, 3) == [B0, B2, B0]


def test_rr_skips_weight_zero() -> None:
    s = setup("rr", [1, 0, 1])
    assert picks(s, 4) == [B2, B0, B2, B0]
    s.edit(B0, 0)
    s.edit(B2, 0)
    assert picks(s, 2) == [None, None]


# --------------------------------------------------------------------- wrr


def test_wrr_432_added_one_by_one_starts_at_a_small_cw() -> None:
    s = setup("wrr", [4, 3, 2])
    cycle = [B2, B1, B0, B0, B1, B0, B2, B1, B0]  # cw 1, 4, 3, 2
    assert picks(s, 27) == cycle * 3


def test_wrr_510_never_picks_weight_zero() -> None:
    s = setup("wrr", [5, 1, 0])
    assert picks(s, 18) == [B1, B0, B0, B0, B0, B0] * 3


def test_wrr_426_gcd_two() -> None:
    s = setup("wrr", [4, 2, 6])  # gcd 2, mw 5, cw 5, 3, 1
    assert picks(s, 18) == [B2, B1, B0, B2, B2, B0] * 3


def test_wrr_init_when_switching_from_rr() -> None:
    s = setup("rr", [4, 3, 2])
    s.configure("wrr")  # init over the populated list: cw = mw = 4
    assert picks(s, 18) == [B0, B1, B0, B2, B1, B0, B2, B1, B0] * 2


def test_wrr_same_scheduler_keeps_its_state() -> None:
    s = setup("wrr", [4, 3, 2])
    assert picks(s, 4) == [B2, B1, B0, B0]
    s.configure("wrr")  # no re-init: the sequence goes on
    assert picks(s, 5) == [B1, B0, B2, B1, B0]


def test_wrr_edit_realigns_cw_to_the_new_gcd() -> None:
    s = setup("wrr", [4, 3, 2])
    assert picks(s, 4) == [B2, B1, B0, B0]  # cw is 4 now
    s.edit(B1, 6)  # weights 4, 6, 2: di 2, mw 5, cw (4 // 2) * 2 + 1 = 5
    # cw 5: b1; cw 3: b1 b0; cw 1: b2 b1 b0
    assert picks(s, 12) == [B1, B1, B0, B2, B1, B0] * 2


def test_wrr_all_weights_zero_refuses_then_resumes() -> None:
    s = setup("wrr", [1, 1])
    assert picks(s, 3) == [B1, B0, B1]
    s.edit(B0, 0)
    s.edit(B1, 0)  # mw 0
    assert picks(s, 2) == [None, None]
    s.edit(B1, 1)  # back at the head, cw 1
    assert picks(s, 2) == [B1, B1]
    s.edit(B0, 1)
    assert picks(s, 4) == [B1, B0, B1, B0]


def test_wrr_skips_overloaded_dest() -> None:
    s = Both("wrr")
    s.add(B0, 2, u=1)
    s.add(B1, 1)  # order b1, b0; cw 1 after the adds
    assert picks(s, 2) == [B1, B0]
    assert s.m.slots[B0].overload  # T reached u = 1
    # cw 2 finds nobody (b0 overloaded), cw 1 only b1.
    assert picks(s, 3) == [B1, B1, B1]
    s.close(B0)  # T 1 -> 0 crosses l_val = 1: overload clears
    assert not s.m.slots[B0].overload
    # b0 (cw 2) takes one connection and is overloaded again.
    assert picks(s, 3) == [B0, B1, B1]


def test_wrr_all_overloaded_refuses_and_keeps_its_place() -> None:
    """With every dest overloaded the last pass stops where it began (cl
    stays on b1), so the next pick resumes after b1, not at the head."""
    s = Both("wrr")
    for i in (B0, B1, B2):
        s.add(i, 1, u=1)
    assert picks(s, 3) == [B2, B1, B0]  # all overloaded now
    s.close(B1)
    assert s.pick() == B1  # cl = b1, everyone overloaded again
    assert s.pick() is None
    s.close(B0)
    s.close(B2)
    assert s.pick() == B0


# ------------------------------------------------------- lc / wlc / sed / nq


def test_lc_held_connections_spread_in_list_order() -> None:
    s = setup("lc", [1, 2, 3])
    assert picks(s, 9) == [B2, B1, B0] * 3


def test_lc_closed_connections_no_longer_count() -> None:
    s = setup("lc", [1, 1, 1])
    assert picks(s, 3) == [B2, B1, B0]
    s.close(B1)  # b1 back to zero
    assert s.pick() == B1
    s.close(B2)
    s.close(B1)
    assert picks(s, 2) == [B2, B1]


def test_lc_weight_only_matters_as_zero() -> None:
    s = setup("lc", [100, 0, 1])
    assert picks(s, 4) == [B2, B0, B2, B0]


def test_lc_one_active_outweighs_256_inactive() -> None:
    """(A << 8) + T: 1 active = 257 > 256 inactive = 256.  The older
    (A << 8) + I formula ties them (256 each) and keeps the first, b1."""
    s = Both("lc")
    s.add(B0, 1)
    for _ in range(256):
        assert s.pick() == B0
        s.deactivate(B0)  # inactive, still counted in T
    s.add(B1, 1)  # order b1, b0
    assert s.pick() == B1  # b1 has overhead 0
    assert s.pick() == B0  # 256 < 257


def test_wlc_one_active_at_128_against_two_inactive_at_1() -> None:
    """257 * 1 > 2 * 128 picks b0; with (A << 8) + I, 256 * 1 > 2 * 128 fails."""
    s = Both("wlc")
    s.add(B0, 1)
    for _ in range(2):
        assert s.pick() == B0
        s.deactivate(B0)
    s.add(B1, 128)
    assert s.pick() == B1
    assert s.pick() == B0


def test_wlc_123_held() -> None:
    s = setup("wlc", [1, 2, 3])
    assert picks(s, 24) == [B2, B1, B0, B2, B1, B2] * 4


def test_wlc_inactive_connections_count_once() -> None:
    s = setup("wlc", [1, 1])  # order b1, b0
    assert s.pick() == B1
    s.deactivate(B1)  # b1: A 0, T 1 -> overhead 1
    assert s.pick() == B0  # 1 * 1 > 0 * 1
    s.deactivate(B0)  # b0: overhead 1 too
    assert s.pick() == B1  # a tie keeps the first
    s.close(B1)  # the active one ends: b1 back to A 0, T 1
    assert s.pick() == B1  # 1 vs 1 again


def test_sed_123_held() -> None:
    s = setup("sed", [1, 2, 3])
    assert picks(s, 24) == [B2, B1, B2, B2, B1, B0] * 4


def test_sed_ignores_inactive_connections() -> None:
    s = setup("sed", [1, 1])
    for _ in range(5):
        assert s.pick() == B1
        s.deactivate(B1)  # only A matters: b1 stays at A + 1 = 1
    assert s.m.slots[B1].inactive == 5


def test_nq_123_held() -> None:
    s = setup("nq", [1, 2, 3])
    want = [B2, B1, B0, B2, B2, B1, B2, B1, B2, B2, B1, B0]
    want += [B2, B1, B2, B2, B1, B0, B2, B1, B2, B2, B1, B0]
    assert picks(s, 24) == want


def test_nq_idle_dest_wins_outright() -> None:
    s = setup("nq", [1, 100])  # order b1 (100), b0 (1)
    assert s.pick() == B1
    assert s.pick() == B0  # idle, although b1's ratio 2/100 is lower
    s.close(B0)
    assert s.pick() == B0


def test_overloaded_and_zero_weight_skipped_by_every_least_scheduler() -> None:
    for sched in ("lc", "wlc", "sed", "nq"):
        s = Both(sched)
        s.add(B0, 1, u=1)
        s.add(B1, 0)
        s.add(B2, 1)
        assert picks(s, 3) == [B2, B0, B2], sched
        s.edit(B2, 0)
        assert s.pick() is None, sched
