"""Persistence templates (spec §12) on the C data plane and the model.

Times are milliseconds on a clock the tests drive.  ``Both`` checks every
decision and the A/I counters; ``expire`` also checks template counts.
"""

from __future__ import annotations

import ipvs_model as m
from sched_harness import Both, CService

B0, B1, B2 = 0, 1, 2
S = 1000


def persistent(sched: str = "rr", timeout_s: int = 60, n: int = 3, **opts: int | bool) -> Both:
    s = Both(sched, flags=m.PERSISTENT, persist_timeout_ms=timeout_s * S, **opts)
    for i in range(n):
        s.add(i, 1)
    return s


def once(s: Both, ip: str, now: int = 0) -> int | None:
    """A connection that opens and ends at ``now``."""
    d, t, ct = s.connect(m.Conn(ip), now)
    if d is None:
        return None
    s.close(d.id, t, ct, now)
    return d.id


def held(s: Both, ip: str, now: int = 0) -> tuple[int, m.Template | None, int]:
    d, t, ct = s.connect(m.Conn(ip), now)
    assert d is not None
    return d.id, t, ct


CLIENTS = [f"10.0.0.{i}" for i in range(1, 11)]


def test_back_to_back_connections_stay_on_one_dest() -> None:
    s = persistent()
    got = [once(s, ip) for ip in CLIENTS for _ in range(3)]
    assert got == [[B2, B1, B0][i % 3] for i in range(10) for _ in range(3)]


def test_interleaved_rounds_repeat_the_first() -> None:
    s = persistent()
    first = [B2, B1, B0, B2, B1, B0, B2, B1, B0, B2]
    for now in (0, 5 * S, 10 * S):
        assert [once(s, ip, now) for ip in CLIENTS] == first


def test_scheduler_advances_only_on_template_creation() -> None:
    s = persistent()
    for _ in range(3):
        for ip in CLIENTS[:2]:
            once(s, ip)
    # Two templates so far (b2, b1): the cursor has moved twice.
    assert once(s, "10.0.0.99") == B0
    assert s.c.persist_count() == 3
    assert [s.c.counters(i).persist for i in (B0, B1, B2)] == [1, 1, 1]


def test_every_use_rearms() -> None:
    s = persistent(timeout_s=60)
    assert once(s, "10.0.0.1", 0) == B2
    for now in (59_999, 119_998, 179_997):
        assert once(s, "10.0.0.1", now) == B2
    s.expire(239_996)
    assert s.c.persist_count() == 1
    s.expire(239_997)
    assert s.c.persist_count() == 0
    assert once(s, "10.0.0.1", 239_997) == B1  # a new template: rr moved on


def test_expired_template_is_rescheduled_on_lookup() -> None:
    s = persistent(timeout_s=60)
    assert once(s, "10.0.0.1", 0) == B2
    assert once(s, "10.0.0.1", 60 * S) == B1  # no sweep ran: found dead on lookup
    assert s.c.persist_count() == 1


def test_sweep_frees_and_counts() -> None:
    s = persistent(timeout_s=30)
    for i, ip in enumerate(CLIENTS):
        once(s, ip, i * S)
    s.expire(29 * S)
    assert s.c.persist_count() == 10
    for k in range(10):
        s.expire(30 * S + k * S)
        assert s.c.persist_count() == 9 - k
    assert [s.c.counters(i).persist for i in (B0, B1, B2)] == [0, 0, 0]


def test_template_outlives_its_timeout_while_a_connection_is_held() -> None:
    s = persistent(timeout_s=60)
    d, t, ct = held(s, "10.0.0.1", 0)
    assert d == B2
    s.expire(200 * S)  # fired at 60, 120, 180 s: re-armed each time
    assert s.c.persist_count() == 1
    assert once(s, "10.0.0.1", 200 * S) == B2
    s.close(d, t, ct, 210 * S)
    s.expire(259_999)  # last re-arm was at 200 s + 60 s
    assert s.c.persist_count() == 1
    s.expire(260 * S)
    assert s.c.persist_count() == 0


def test_rearm_after_expiry_uses_60_s_not_the_service_timeout() -> None:
    s = persistent(timeout_s=300)
    d, t, ct = held(s, "10.0.0.1", 0)
    # 300 s: still controlling -> timer at 360 s, timeout 60 s from now on.
    s.close(d, t, ct, 330 * S)
    assert once(s, "10.0.0.1", 359 * S) == B2  # re-armed to 419 s
    assert once(s, "10.0.0.1", 418 * S) == B2  # re-armed to 478 s
    s.expire(477_999)
    assert s.c.persist_count() == 1
    assert once(s, "10.0.0.1", 478 * S) == B1  # would live to 718 s on 300 s


def test_rearm_over_several_60_s_periods_replays_every_firing() -> None:
    for lookup_at, survives in ((539_999, True), (540 * S, False)):
        s = persistent(timeout_s=300)
        d, t, ct = held(s, "10.0.0.1", 0)
        # Fires at 300, 360, 420, 480 s with the connection still held.
        s.close(d, t, ct, 500 * S)
        got = once(s, "10.0.0.1", lookup_at)
        assert got == (B2 if survives else B1), lookup_at


def test_rearm_over_several_periods_seen_by_the_sweep() -> None:
    s = persistent(timeout_s=300)
    d, t, ct = held(s, "10.0.0.1", 0)
    s.expire(450 * S)  # one sweep sees the firings at 300, 360 and 420 s
    s.close(d, t, ct, 500 * S)  # then 480 s fires with it still held
    s.expire(539_999)
    assert s.c.persist_count() == 1
    s.expire(540 * S)
    assert s.c.persist_count() == 0


def test_timeout_is_taken_when_the_template_is_created() -> None:
    s = persistent(timeout_s=60)
    assert once(s, "10.0.0.1", 0) == B2
    s.configure("rr", flags=m.PERSISTENT, persist_timeout_ms=10 * S)
    assert once(s, "10.0.0.1", 30 * S) == B2  # still on its 60 s
    assert once(s, "10.0.0.2", 30 * S) == B1
    assert once(s, "10.0.0.2", 41 * S) == B0  # the new one had 10 s


def test_sweeps_across_long_gaps_and_long_timeouts() -> None:
    s = persistent(timeout_s=3600)
    once(s, "10.0.0.1", 0)
    once(s, "10.0.0.2", 1_000 * S)
    for now in (700 * S, 1_500 * S, 3_599_999):
        s.expire(now)
        assert s.c.persist_count() == 2
    s.expire(3_600 * S)
    assert s.c.persist_count() == 1
    s.expire(10_000 * S)
    assert s.c.persist_count() == 0


def test_sweep_with_an_older_clock_is_harmless() -> None:
    s = persistent(timeout_s=10)
    once(s, "10.0.0.1", 0)
    s.expire(5 * S)
    s.expire(3 * S)  # another worker's slightly older clock
    assert s.c.persist_count() == 1
    s.expire(10 * S)
    assert s.c.persist_count() == 0


def test_netmask_24_shares_a_template() -> None:
    s = persistent(netmask4=24)
    assert once(s, "10.0.0.1") == B2
    assert once(s, "10.0.0.77") == B2
    assert once(s, "10.0.0.254") == B2
    assert once(s, "10.0.1.1") == B1
    assert s.c.persist_count() == 2


def test_netmask6_64_shares_a_template() -> None:
    s = persistent(netmask6=64)
    assert once(s, "2001:db8:0:1::1") == B2
    assert once(s, "2001:db8:0:1:ffff::2") == B2
    assert once(s, "2001:db8:0:2::1") == B1
    assert once(s, "10.0.0.1") == B0  # IPv4 and IPv6 keys never mix


def test_quiesced_dest_keeps_its_clients() -> None:
    s = persistent()
    assert once(s, "10.0.0.1") == B2
    s.edit(B2, 0)
    assert once(s, "10.0.0.1") == B2  # weight 0 ignored for templates
    assert once(s, "10.0.0.2") == B1  # new clients avoid it


def test_quiesced_dest_with_expire_quiescent_reschedules() -> None:
    s = persistent(expire_quiescent=True)
    assert once(s, "10.0.0.1") == B2
    s.edit(B2, 0)
    assert once(s, "10.0.0.1") == B1
    assert s.c.counters(B2).persist == 0
    assert s.c.counters(B1).persist == 1


def test_overloaded_dest_keeps_its_clients() -> None:
    s = Both("rr", flags=m.PERSISTENT, persist_timeout_ms=60 * S)
    s.add(B0, 1)
    s.add(B1, 1, u=1)
    assert held(s, "10.0.0.1")[0] == B1
    assert s.m.slots[B1].overload
    assert held(s, "10.0.0.1")[0] == B1  # OVERLOAD ignored for templates
    assert held(s, "10.0.0.2")[0] == B0


def test_deleted_dest_reschedules_its_clients() -> None:
    s = persistent()
    d, t, ct = held(s, "10.0.0.1")
    assert d == B2
    s.delete(B2)
    assert once(s, "10.0.0.1") == B1
    s.expire(1)
    # The old template still controls the held connection: kept, out of the table.
    assert s.c.counters(B2).persist == 1
    assert s.c.persist_count() == 1
    s.close(B2, t, ct, 2)
    s.expire(2)
    assert s.c.counters(B2).persist == 0


def test_readded_dest_does_not_revive_discarded_templates() -> None:
    s = persistent()
    assert once(s, "10.0.0.1") == B2
    s.delete(B2)
    assert once(s, "10.0.0.1") == B1
    s.add(B2, 1)
    assert once(s, "10.0.0.1") == B1


def test_invalid_template_with_no_dest_left_refuses() -> None:
    s = persistent(n=1)
    assert once(s, "10.0.0.1") == B0
    s.delete(B0)
    assert once(s, "10.0.0.1") is None
    assert s.c.persist_count() == 0


def test_templates_do_not_count_in_lc() -> None:
    s = persistent(sched="lc", n=2)
    assert once(s, "10.0.0.1") == B1  # b1 now has a template, no connection
    assert once(s, "10.0.0.2") == B1  # lc still sees two idle dests
    assert s.c.counters(B1).persist == 2


def test_wrr_cursor_moves_only_for_new_templates() -> None:
    s = Both("wrr", flags=m.PERSISTENT, persist_timeout_ms=60 * S)
    s.add(B0, 2)
    s.add(B1, 1)
    got = [once(s, ip) for ip in CLIENTS[:3] for _ in range(2)]
    assert got == [B1, B1, B0, B0, B0, B0]  # wrr alone: b1 b0 (cw 1), b0 (cw 2)


def test_many_templates_staggered_expiry() -> None:
    """Enough clients to grow the table several times, expiring one by one
    under a sweep every second, a few of them held past their timeout."""
    s = persistent(timeout_s=20)
    held_conns = []
    for i in range(600):
        ip = f"10.{i // 250}.{i % 250}.1" if i % 5 else f"2001:db8:{i:x}::1"
        now = i * 100
        if i % 50 == 0:
            held_conns.append((held(s, ip, now), now))
        else:
            once(s, ip, now)
        if i % 10 == 0:
            s.expire(now)
    assert s.c.persist_count() > 100
    now = 60 * S
    for (d, t, ct), _ in held_conns[:6]:
        s.close(d, t, ct, now)
    while now < 200 * S:
        now += S
        s.expire(now)
    assert s.c.persist_count() == len(held_conns) - 6
    for (d, t, ct), _ in held_conns[6:]:
        s.close(d, t, ct, now)
    s.expire(now + 60 * S)
    assert s.c.persist_count() == 0


def test_connect_retry_repoints_the_template() -> None:
    """A worker whose connect failed retries elsewhere; the client's template
    follows the new dest (the kernel never retries, so C only)."""
    c = CService("rr", flags=m.PERSISTENT, persist_timeout_ms=60 * S)
    for i in (B0, B1, B2):
        c.add(i, 1)
    slot, tmpl = c.connect(m.Conn("10.0.0.1"))
    assert slot == B2
    c.close(B2, tmpl)  # the failed attempt ends
    slot, again = c.connect(m.Conn("10.0.0.1"), exclude=(B2,), retry=True)
    assert (slot, again) == (B1, tmpl)
    assert [c.counters(i).persist for i in (B0, B1, B2)] == [0, 1, 0]
    c.close(B1, again)
    assert c.connect(m.Conn("10.0.0.1"))[0] == B1
    assert c.persist_count() == 1
