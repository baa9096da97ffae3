"""The C prober behind the tcp health checks (``l4lb._dataplane.Prober``), on real sockets."""

from __future__ import annotations

import errno
import os
import select
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from l4lb._dataplane import PROBE_MAX_TIMEOUT_MS, PROBE_TIMEOUT, Prober

LOOPBACK = socket.inet_pton(socket.AF_INET, "127.0.0.1")


@pytest.fixture
def prober() -> Iterator[Prober]:
    p = Prober()
    yield p
    p.close()


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(4096)
    yield ls
    ls.close()


@pytest.fixture
def refused_port() -> Iterator[int]:
    """Bound, never listening: connects are refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


@pytest.fixture
def blackhole_port() -> Iterator[int]:
    """A listener with a full accept queue: SYNs are dropped, connects hang."""
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(0)
    filler = socket.create_connection(ls.getsockname(), timeout=5)
    try:
        yield ls.getsockname()[1]
    finally:
        filler.close()
        ls.close()


def port_of(s: socket.socket) -> int:
    return int(s.getsockname()[1])


def collect_all(p: Prober, count: int, timeout: float = 10.0) -> dict[int, tuple[int, float]]:
    """Wait on the prober's fd, as the event loop does, until ``count`` results came."""
    got: dict[int, tuple[int, float]] = {}
    ep = select.epoll()
    ep.register(p.fileno(), select.EPOLLIN)
    try:
        deadline = time.monotonic() + timeout
        while len(got) < count and time.monotonic() < deadline:
            ep.poll(0.05)
            for probe_id, err, seconds in p.collect():
                assert probe_id not in got, f"probe {probe_id} reported twice"
                got[probe_id] = (err, seconds)
    finally:
        ep.close()
    assert len(got) == count, f"{len(got)} of {count} results"
    return got


def test_accepted_refused_and_timed_out(
    prober: Prober, listener: socket.socket, refused_port: int, blackhole_port: int
) -> None:
    assert (
        prober.submit(
            [
                (1, socket.AF_INET, LOOPBACK, port_of(listener), 1000),
                (2, socket.AF_INET, LOOPBACK, refused_port, 1000),
                (3, socket.AF_INET, LOOPBACK, blackhole_port, 50),
            ]
        )
        == 0
    )  # nothing failed at once: every result comes through the fd
    assert prober.inflight == 3
    got = collect_all(prober, 3)
    assert {k: err for k, (err, _) in got.items()} == {
        1: 0,
        2: errno.ECONNREFUSED,
        3: PROBE_TIMEOUT,
    }
    assert got[3][1] >= 0.05  # a timeout never fires early
    assert prober.inflight == 0


def test_a_probe_ends_with_a_reset(prober: Prober, listener: socket.socket) -> None:
    prober.submit([(7, socket.AF_INET, LOOPBACK, port_of(listener), 1000)])
    assert collect_all(prober, 1)[7][0] == 0
    conn, _ = listener.accept()
    with conn:
        conn.settimeout(5)
        with pytest.raises(ConnectionResetError):  # no FIN: no TIME_WAIT at the checker
            conn.recv(10)


def test_ipv6(prober: Prober) -> None:
    with socket.socket(socket.AF_INET6) as ls:
        try:
            ls.bind(("::1", 0))
        except OSError as exc:
            pytest.skip(f"no ::1 on this host: {exc}")
        ls.listen(16)
        packed = socket.inet_pton(socket.AF_INET6, "::1")
        prober.submit([(1, socket.AF_INET6, packed, port_of(ls), 1000)])
        assert collect_all(prober, 1)[1][0] == 0


def test_an_immediate_failure_is_ready_without_waiting(prober: Prober) -> None:
    broadcast = socket.inet_pton(socket.AF_INET, "255.255.255.255")
    assert prober.submit([(5, socket.AF_INET, broadcast, 80, 1000)]) == 1
    [(probe_id, err, _)] = prober.collect()
    assert probe_id == 5 and err == errno.ENETUNREACH
    assert prober.inflight == 0


def test_collect_limit_leaves_the_rest_readable(prober: Prober, refused_port: int) -> None:
    prober.submit([(i, socket.AF_INET, LOOPBACK, refused_port, 1000) for i in range(10)])
    ep = select.epoll()
    ep.register(prober.fileno(), select.EPOLLIN)
    try:
        got: list[int] = []
        for _ in range(200):
            if len(got) == 10:
                break
            assert ep.poll(1.0), "results left behind but the fd is not readable"
            batch = prober.collect(3)
            assert 1 <= len(batch) <= 3
            got += [probe_id for probe_id, _, _ in batch]
    finally:
        ep.close()
    assert sorted(got) == list(range(10))


def test_many_at_once_reuse_their_sockets(
    prober: Prober, listener: socket.socket, refused_port: int, blackhole_port: int
) -> None:
    """Each probe reports once with its own outcome, round after round, whatever socket it
    got; sockets are reused, so rounds do not add open files."""
    accepted = 0

    def accept_all() -> None:
        nonlocal accepted
        listener.settimeout(0.5)
        while True:
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                return
            conn.close()
            accepted += 1

    acceptor = threading.Thread(target=accept_all)
    acceptor.start()
    ports = {port_of(listener): 0, refused_port: errno.ECONNREFUSED}
    fds_after_first = 0
    next_id = 0
    try:
        for rnd in range(5):
            batch = []
            wanted = {}
            for _ in range(100):
                for port, err in ports.items():
                    next_id += 1
                    batch.append((next_id, socket.AF_INET, LOOPBACK, port, 2000))
                    wanted[next_id] = err
            next_id += 1
            batch.append((next_id, socket.AF_INET, LOOPBACK, blackhole_port, 20))
            wanted[next_id] = PROBE_TIMEOUT
            prober.submit(batch)
            got = collect_all(prober, len(wanted))
            assert {k: err for k, (err, _) in got.items()} == wanted
            if rnd == 0:
                fds_after_first = len(os.listdir("/proc/self/fd"))
            else:
                assert len(os.listdir("/proc/self/fd")) <= fds_after_first
    finally:
        acceptor.join()
    assert accepted == 500


@pytest.mark.parametrize(
    ("probe", "message"),
    [
        ((1, 99, LOOPBACK, 80, 100), "probe 1: family must be AF_INET or AF_INET6, got 99"),
        ((1, socket.AF_INET, b"\x7f\0\0", 80, 100), "probe 1: address must be 4 packed bytes"),
        ((1, socket.AF_INET6, LOOPBACK, 80, 100), "probe 1: address must be 16 packed bytes"),
        ((1, socket.AF_INET, "127.0.0.1", 80, 100), "probe 1: address must be 4 packed bytes"),
        ((1, socket.AF_INET, LOOPBACK, 0, 100), "probe 1: port must be 1..65535, got 0"),
        ((1, socket.AF_INET, LOOPBACK, 65536, 100), "probe 1: port must be 1..65535"),
        ((1, socket.AF_INET, LOOPBACK, 80, 0), "probe 1: timeout_ms must be 1..86400000, got 0"),
        (
            (1, socket.AF_INET, LOOPBACK, 80, PROBE_MAX_TIMEOUT_MS + 1),
            "probe 1: timeout_ms must be 1..86400000",
        ),
        (("x", socket.AF_INET, LOOPBACK, 80, 100), "probe 1: id, family, port and timeout_ms"),
        ((1, socket.AF_INET, LOOPBACK, 80.5, 100), "probe 1: id, family, port and timeout_ms"),
        ((1, socket.AF_INET, LOOPBACK, 80), "probe 1: expected (id, family, address, port,"),
        ([1, socket.AF_INET, LOOPBACK, 80, 100], "probe 1: expected (id, family, address,"),
    ],
)
def test_bad_input_is_refused_whole(
    prober: Prober, listener: socket.socket, probe: object, message: str
) -> None:
    good = (0, socket.AF_INET, LOOPBACK, port_of(listener), 100)
    with pytest.raises(ValueError) as info:
        prober.submit([good, probe])
    assert str(info.value).startswith(message), str(info.value)
    assert prober.inflight == 0  # the good probe before it did not start either
    assert prober.collect() == []


def test_submit_wants_a_list(prober: Prober) -> None:
    with pytest.raises(ValueError, match="probes must be a list, got tuple"):
        prober.submit(((1, socket.AF_INET, LOOPBACK, 80, 100),))  # type: ignore[arg-type]
    assert prober.submit([]) == 0


def test_close_abandons_probes_in_flight(blackhole_port: int) -> None:
    p = Prober()
    p.submit([(1, socket.AF_INET, LOOPBACK, blackhole_port, 10_000)])
    assert p.inflight == 1
    before = len(os.listdir("/proc/self/fd"))
    p.close()
    assert len(os.listdir("/proc/self/fd")) < before  # its socket, epoll and timer fds
    with pytest.raises(ValueError, match="the prober is closed"):
        p.collect()
    with pytest.raises(ValueError, match="the prober is closed"):
        p.submit([])
    p.close()  # twice is fine
