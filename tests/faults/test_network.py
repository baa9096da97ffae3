"""Fault cases on the network path, inside a namespace the test creates.

l4lb, its backends and the clients all run in one fresh network namespace, on its loopback;
iptables rules in that namespace drop a backend's packets (a blackhole) or a share of them
(loss). ``tc netem`` adds delay when the kernel has it; without it the loss case runs alone
and says so.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from l4lb._netns import Netns, unavailable_reason
from l4lb._testbase import L4lbProcess, wait_for

from .conftest import HEALTH, backend_stats, lb_config
from .nsthread import in_netns
from .record import FaultResult
from .traffic import BackendProcess, Load, Session, run_exchanges

pytestmark = pytest.mark.timeout(120)

Fault = Callable[..., FaultResult]
Start = Callable[..., L4lbProcess]


@pytest.fixture
def netns() -> Iterator[Netns]:
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    ns = Netns.create("fault")
    probe = ns.run(["iptables", "-L", "INPUT", "-n"], check=False)
    if probe.returncode != 0:
        ns.delete()
        pytest.skip(f"iptables does not work in a namespace: {probe.stderr.strip()}")
    yield ns
    ns.delete()


def _port(address: str) -> str:
    return address.rsplit(":", 1)[1]


def _netem(ns: Netns, *args: str) -> str | None:
    """Add a netem qdisc on the namespace's loopback; return why not, or None."""
    proc = ns.run(["tc", "qdisc", "add", "dev", "lo", "root", "netem", *args], check=False)
    return None if proc.returncode == 0 else " ".join(proc.stderr.split())


def test_blackholed_backend(l4lb: Start, fault: Fault, netns: Netns) -> None:
    r = fault(
        "backend blackholed",
        "iptables DROP of every packet to one of 2 backends, 10 sessions and load in flight",
        "sessions on it are cut at idle_timeout; new connects to it time out and are "
        "retried; health marks it down",
    )
    with in_netns(netns), BackendProcess("a") as a, BackendProcess("b") as b:
        lb = l4lb(
            lb_config(
                [a.address, b.address],
                connect_timeout=0.3,
                retries=2,
                idle_timeout=3.0,
                health=HEALTH,
            )
        )
        addr = lb.service_address("web")
        sessions = [Session(addr, 256 * 1024) for _ in range(10)]
        with Load(addr, threads=4) as load:
            load.wait_count(40)
            dropped = time.monotonic()
            netns.run(["iptables", "-A", "INPUT", "-p", "tcp", "--dport", _port(a.address),
                       "-j", "DROP"])  # fmt: skip
            in_force = time.monotonic()
            wait_for(lambda: not backend_stats(lb, a.address)["up"], 10, message="a down")
            detected = time.monotonic()
            # At once, so the sessions on the healthy backend are not idle for long.
            with ThreadPoolExecutor(max_workers=len(sessions)) as pool:
                outcomes = list(pool.map(Session.finish, sessions))
            load.wait_count(200)
        errors = backend_stats(lb, a.address)["connect_errors"]
    assert {s.backend for s in sessions} == {"a", "b"}
    r.count(outcomes, broken=frozenset({"a"}))
    r.count(load.tally.outcomes, broken=frozenset({"a"}), fault_at=[(dropped, in_force)])
    r.recover_s, r.recovery = detected - dropped, "until marked down"
    r.notes.append(f"{errors} connect timeouts retried")
    r.check(min_completed=200, max_failed=20)


@pytest.mark.xfail(
    strict=False,
    reason=(
        "about one run in three, one transfer stalls until the client's 60 s timeout: "
        "l4lb's backend socket is established and idle while the backend's side of the "
        "handshake never completed (its final ACK was dropped); not yet resolved"
    ),
)
def test_packet_loss_and_delay_on_the_backend_link(l4lb: Start, fault: Fault, netns: Netns) -> None:
    delay = _netem(netns, "delay", "5ms", "2ms")
    r = fault(
        "packet loss on the backend link",
        "iptables drops 5 % of the backend's packets both ways"
        + (", netem adds 5 ms +- 2 ms" if delay is None else " (no netem in this kernel)"),
        "TCP retransmits: every transfer completes byte-exact",
    )
    with in_netns(netns), BackendProcess("a") as a:
        lb = l4lb(lb_config([a.address]))
        port = _port(a.address)
        for chain, match in (("INPUT", "--dport"), ("OUTPUT", "--sport")):
            netns.run(["iptables", "-A", chain, "-p", "tcp", match, port, "-m", "statistic",
                       "--mode", "random", "--probability", "0.05", "-j", "DROP"])  # fmt: skip
        started = time.monotonic()
        tally = run_exchanges(
            lb.service_address("web"), 60, size=128 * 1024, concurrency=12, timeout=60
        )
        elapsed = time.monotonic() - started
        counters = netns.run(["iptables", "-L", "-v", "-x", "-n"]).stdout
    drops = sum(int(line.split()[0]) for line in counters.splitlines() if "statistic" in line)
    r.count(tally.outcomes)
    r.notes.append(f"{drops} packets dropped; {elapsed:.1f} s")
    if delay is not None:
        r.notes.append(f"netem unavailable: {delay}")
    assert drops > 0, "no packet was dropped: the case tests nothing"
    r.check(min_completed=60)
