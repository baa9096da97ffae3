"""IPVS sink without a kernel: spec <-> netlink conversion, the diff, errors, draining."""

from __future__ import annotations

import errno
import socket
import struct
import sys
from dataclasses import replace
from typing import Any

import pytest

from l4lb import ipvs
from l4lb.config import Address
from l4lb.ipvs import (
    Command,
    IpvsConfigError,
    IpvsSink,
    KernelDest,
    KernelService,
    RealServer,
    VsKey,
    VsSettings,
)
from l4lb.state import FLAG_PERSISTENT, FLAG_SH_FALLBACK, FLAG_SH_PORT, DestSpec, ServiceSpec

TCP, UDP = socket.IPPROTO_TCP, socket.IPPROTO_UDP


def spec(
    name: str = "web",
    listen: str = "10.0.0.1:80",
    backends: tuple[tuple[str, int], ...] = (("10.2.0.1:8080", 1), ("10.2.0.2:8080", 1)),
    **kw: Any,
) -> ServiceSpec:
    fields: dict[str, Any] = {
        "name": name,
        "listen": Address.parse(listen),
        "protocol": "tcp",
        "scheduler": "rr",
        "flags": 0,
        "persist_timeout": 0.0,
        "persist_netmask": 32,
        "persist_netmask6": 128,
        "expire_quiescent": False,
        "connect_timeout": 5.0,
        "idle_timeout": 300.0,
        "drain_timeout": 30.0,
        "retries": -1,
        "dests": tuple(
            DestSpec(Address.parse(a), weight=w, upper_threshold=0, lower_threshold=0)
            for a, w in backends
        ),
    }
    fields.update(kw)
    return ServiceSpec(**fields)


# ------------------------------------------------------------------ a fake kernel


class FakeKernel:
    """Models what the sink relies on: head insertion, EEXIST/ENOENT/ESRCH, counters."""

    def __init__(self, schedulers: frozenset[str] = frozenset({"rr", "wrr", "sh", "mh"})):
        self.services: dict[VsKey, KernelService] = {}
        self.addrs: set[str] = set()
        self.link = False
        self.masq: set[str] | None = None
        self.sysctls: dict[str, int] = {}
        self.log: list[Command] = []
        self.schedulers = schedulers
        self.active: dict[tuple[VsKey, str, int], int] = {}
        self.dumps = 0
        self.dest_dumps = 0

    def dump(self) -> list[KernelService]:
        self.dumps += 1
        out = []
        for s in self.services.values():
            dests = tuple(
                replace(d, active=self.active.get((s.key, *d.server.ident), 0)) for d in s.dests
            )
            out.append(replace(s, dests=dests))
        return out

    def dump_dests(self, key: VsKey) -> tuple[KernelDest, ...] | None:
        self.dest_dumps += 1
        self.dumps -= 1  # one service's dests are not a full dump
        for s in self.dump():
            if s.key == key:
                return s.dests
        return None

    def execute_many(self, cmds: list[Command]) -> list[int]:
        codes = []
        for cmd in cmds:
            try:
                self.execute(cmd)
                codes.append(0)
            except OSError as e:
                codes.append(e.errno or 0)
        return codes

    def execute(self, cmd: Command) -> None:
        self.log.append(cmd)
        svc = self.services.get(cmd.key)
        if cmd.verb in ("add_service", "set_service"):
            assert cmd.settings is not None
            if cmd.settings.sched not in self.schedulers:
                raise OSError(errno.ENOENT, "no scheduler")
            if cmd.verb == "add_service":
                if svc is not None:
                    raise OSError(errno.EEXIST, "exists")
                self.services[cmd.key] = KernelService(cmd.key, cmd.settings)
            else:
                if svc is None:
                    raise OSError(errno.ESRCH, "no service")
                self.services[cmd.key] = replace(svc, settings=cmd.settings)
            return
        if svc is None:
            raise OSError(errno.ESRCH, "no service")
        if cmd.verb == "del_service":
            del self.services[cmd.key]
            return
        assert cmd.dest is not None
        dests = list(svc.dests)
        idx = next((i for i, d in enumerate(dests) if d.server.ident == cmd.dest.ident), None)
        if cmd.verb == "add_dest":
            if idx is not None:
                raise OSError(errno.EEXIST, "exists")
            dests.insert(0, KernelDest(cmd.dest))  # IPVS inserts at the head
        elif idx is None:
            raise OSError(errno.ENOENT, "no dest")
        elif cmd.verb == "set_dest":
            dests[idx] = replace(dests[idx], server=cmd.dest)
        else:
            del dests[idx]
        self.services[cmd.key] = replace(svc, dests=tuple(dests))

    def link_addrs(self) -> set[str]:
        return set(self.addrs)

    def sync_addrs(self, addrs: set[str]) -> None:
        if addrs:
            self.link = True
        self.addrs = set(addrs)

    def remove_link(self) -> bool:
        had, self.link = self.link, False
        self.addrs.clear()
        return had

    def sync_masq(self, vips: set[str]) -> None:
        self.masq = set(vips)

    def remove_masq(self) -> list[str]:
        had, self.masq = self.masq, None
        return [] if had is None else ["iptables: nat chain L4LB-IPVS-MASQ"]

    def sysctl(self, name: str, value: int) -> None:
        self.sysctls[name] = value

    def close(self) -> None:
        pass


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def kernel() -> FakeKernel:
    return FakeKernel()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def sink(kernel: FakeKernel, clock: Clock):
    s = IpvsSink(kernel_factory=lambda: kernel, clock=clock)
    yield s
    s.close()


KEY = VsKey(socket.AF_INET, TCP, "10.0.0.1", 80)


# ------------------------------------------------------------------ conversion


def test_desired_service_defaults_to_masquerading_and_host_mask():
    d = ipvs.desired_service(spec())
    assert d.key == KEY
    assert d.settings == VsSettings("rr", 0, 0, 32)
    assert [r.fwd for r in d.dests] == [0, 0]
    assert [r.ident for r in d.dests] == [("10.2.0.1", 8080), ("10.2.0.2", 8080)]


def test_desired_service_persistence_rounds_timeout_up_and_keeps_netmask():
    d = ipvs.desired_service(
        spec(flags=FLAG_PERSISTENT, persist_timeout=59.2, persist_netmask=24, protocol="udp")
    )
    assert d.key.protocol == UDP
    assert d.settings == VsSettings("rr", FLAG_PERSISTENT, 60, 24)


def test_desired_service_sh_flags_pass_through():
    flags = FLAG_SH_FALLBACK | FLAG_SH_PORT
    d = ipvs.desired_service(spec(scheduler="sh", flags=flags))
    assert d.settings.flags == 0x18
    assert d.settings.sched == "sh"


def test_desired_service_ipv6_uses_prefix6():
    s = spec(
        listen="[fd00::1]:443",
        backends=(("[fd00:2::1]:8443", 3),),
        flags=FLAG_PERSISTENT,
        persist_timeout=10,
        persist_netmask6=64,
    )
    d = ipvs.desired_service(s)
    assert d.key == VsKey(socket.AF_INET6, TCP, "fd00::1", 443)
    assert d.settings.netmask == 64
    assert d.dests == (RealServer("fd00:2::1", 8443, 3),)


def _at(listen: str, **kw: Any) -> ServiceSpec:
    return replace(spec(**kw), listen=Address.parse(listen, allow_port_zero=True))


@pytest.mark.parametrize(
    ("bad", "fragment"),
    [
        (_at("0.0.0.0:80"), "concrete VIP"),
        (_at("10.0.0.1:0"), "fixed listen port"),
        (spec(backends=(("[fd00::2]:80", 1),)), "address family"),
        (
            _at(
                "[fd00::1]:80",
                backends=(),
                flags=FLAG_PERSISTENT,
                persist_timeout=5,
                persist_netmask6=0,
            ),
            "1..128",
        ),
    ],
)
def test_desired_service_rejects_what_ipvs_cannot_express(bad, fragment):
    with pytest.raises(IpvsConfigError, match=fragment):
        ipvs.desired_service(bad)


@pytest.mark.parametrize(
    ("prefix", "dotted"),
    [(32, "255.255.255.255"), (24, "255.255.255.0"), (0, "0.0.0.0"), (17, "255.255.128.0")],
)
def test_netmask_ipv4_is_dotted(prefix, dotted):
    assert ipvs.netmask_to_wire(socket.AF_INET, prefix) == dotted
    assert ipvs.netmask_from_wire(socket.AF_INET, dotted) == prefix


@pytest.mark.parametrize("prefix", [1, 64, 128])
def test_netmask_ipv6_is_host_order_prefix_length(prefix):
    wire = ipvs.netmask_to_wire(socket.AF_INET6, prefix)
    # The kernel reads the 4 bytes pyroute2 packs from this string as a native u32.
    assert struct.unpack("=I", socket.inet_aton(wire))[0] == prefix
    if sys.byteorder == "little":
        assert wire == f"{prefix}.0.0.0"
    assert ipvs.netmask_from_wire(socket.AF_INET6, wire) == prefix


def test_service_fields_always_carry_sched_flags_timeout_netmask():
    f = ipvs.service_fields(KEY, VsSettings("wrr", FLAG_PERSISTENT, 60, 24))
    assert f == {
        "af": socket.AF_INET,
        "protocol": TCP,
        "addr": "10.0.0.1",
        "port": 80,
        "sched_name": "wrr",
        "flags": {"flags": 1, "mask": 0xFFFF},
        "timeout": 60,
        "netmask": "255.255.255.0",
    }


def test_ipv6_service_key_carries_a_valid_netmask():
    key = VsKey(socket.AF_INET6, TCP, "fd00::1", 80)
    assert ipvs.service_fields(key)["netmask"] == ipvs.netmask_to_wire(socket.AF_INET6, 128)


def test_dest_fields_always_carry_fwd_method_masq():
    f = ipvs.dest_fields(RealServer("10.2.0.1", 8080, 4, u_thresh=100, l_thresh=50))
    assert f == {
        "addr": "10.2.0.1",
        "port": 8080,
        "fwd_method": 0,
        "weight": 4,
        "u_thresh": 100,
        "l_thresh": 50,
    }
    assert ipvs.dest_fields(RealServer("10.2.0.1", 8080, 4), key_only=True) == {
        "addr": "10.2.0.1",
        "port": 8080,
    }


class Attrs:
    def __init__(self, **attrs: Any) -> None:
        self.attrs = attrs

    def get_attr(self, name: str) -> Any:
        return self.attrs.get(name)


def test_decode_service_reads_attributes_and_drops_hashed_flag():
    raw = Attrs(
        IPVS_SVC_ATTR_AF=socket.AF_INET6,
        IPVS_SVC_ATTR_PROTOCOL=UDP,
        IPVS_SVC_ATTR_ADDR="fd00:0::1",
        IPVS_SVC_ATTR_PORT=53,
        IPVS_SVC_ATTR_SCHED_NAME="mh",
        IPVS_SVC_ATTR_FLAGS={"flags": 0x2 | 0x1, "mask": 0xFFFFFFFF},
        IPVS_SVC_ATTR_TIMEOUT=300,
        IPVS_SVC_ATTR_NETMASK=ipvs.netmask_to_wire(socket.AF_INET6, 48),
    )
    stats = Attrs(IPVS_STATS_ATTR_CONNS=7, IPVS_STATS_ATTR_INBYTES=100, IPVS_STATS_ATTR_OUTBYTES=9)
    dest = Attrs(
        IPVS_DEST_ATTR_ADDR="fd00:2::5",
        IPVS_DEST_ATTR_PORT=5353,
        IPVS_DEST_ATTR_FWD_METHOD=0,
        IPVS_DEST_ATTR_WEIGHT=2,
        IPVS_DEST_ATTR_U_THRESH=10,
        IPVS_DEST_ATTR_L_THRESH=5,
        IPVS_DEST_ATTR_ACTIVE_CONNS=3,
        IPVS_DEST_ATTR_INACT_CONNS=4,
        IPVS_DEST_ATTR_PERSIST_CONNS=1,
        IPVS_DEST_ATTR_STATS64=stats,
    )
    s = ipvs.decode_service(raw, [dest])
    assert s.key == VsKey(socket.AF_INET6, UDP, "fd00::1", 53)
    assert s.settings == VsSettings("mh", 0x1, 300, 48)
    assert s.dests == (KernelDest(RealServer("fd00:2::5", 5353, 2, 10, 5, 0), 3, 4, 1, 7, 100, 9),)


def test_pyroute2_encodes_what_the_kernel_expects():
    """The fields go through pyroute2's real encoder: netmask bytes and fwd_method."""
    pyroute2 = pytest.importorskip("pyroute2")
    from pyroute2.netlink.generic.ipvs import ipvsmsg

    key = VsKey(socket.AF_INET6, TCP, "fd00::1", 80)
    svc = pyroute2.IPVSService(**ipvs.service_fields(key, VsSettings("rr", 1, 60, 64)))
    msg = ipvsmsg()
    msg["cmd"] = 1
    msg["version"] = 1
    msg["attrs"] = [("IPVS_CMD_ATTR_SERVICE", svc.dump_nla())]
    msg.encode()
    back = ipvsmsg(msg.data)
    back.decode()
    raw = back.get_attr("IPVS_CMD_ATTR_SERVICE")
    decoded = ipvs.decode_service(raw)
    assert decoded.key == key
    assert decoded.settings == VsSettings("rr", 1, 60, 64)
    dest = pyroute2.IPVSDest(**ipvs.dest_fields(RealServer("fd00::2", 8080, 5)))
    assert dest["fwd_method"] == 0


# ------------------------------------------------------------------ the diff


RR = VsSettings("rr", 0, 0, 32)


def _cur(*dests: tuple[str, int, int], settings: VsSettings = RR) -> KernelService:
    """A kernel service; ``dests`` given in kernel order as (addr, weight, active)."""
    return KernelService(
        KEY,
        settings,
        tuple(KernelDest(RealServer(a, 8080, w), active=act) for a, w, act in dests),
    )


def _diff(desired, current, drains=None, now=0.0, owned=lambda k: True):
    return ipvs.diff(desired, current, owned=owned, drains=drains or {}, now=now)


def test_diff_new_service_adds_dests_in_spec_order():
    cmds, drains = _diff([ipvs.desired_service(spec())], [])
    assert [c.verb for c in cmds] == ["add_service", "add_dest", "add_dest"]
    assert [c.dest.addr for c in cmds[1:]] == ["10.2.0.1", "10.2.0.2"]
    assert drains == {}


def test_diff_no_change_is_empty():
    # Kernel order is newest first: b2 then b1.
    current = [_cur(("10.2.0.2", 1, 5), ("10.2.0.1", 1, 0))]
    cmds, _ = _diff([ipvs.desired_service(spec())], current)
    assert cmds == []


def test_diff_settings_drift_is_one_set_with_everything():
    current = [_cur(("10.2.0.2", 1, 0), ("10.2.0.1", 1, 0), settings=VsSettings("wrr", 0, 0, 32))]
    cmds, _ = _diff([ipvs.desired_service(spec())], current)
    assert cmds == [Command("set_service", KEY, settings=VsSettings("rr", 0, 0, 32))]


def test_diff_weight_change_is_one_set_dest_with_fwd():
    current = [_cur(("10.2.0.2", 1, 0), ("10.2.0.1", 1, 0))]
    s = spec(backends=(("10.2.0.1:8080", 1), ("10.2.0.2:8080", 5)))
    cmds, _ = _diff([ipvs.desired_service(s)], current)
    assert cmds == [Command("set_dest", KEY, dest=RealServer("10.2.0.2", 8080, 5))]


def test_diff_direct_routing_dest_is_switched_to_masq():
    cur = _cur(("10.2.0.2", 1, 0), ("10.2.0.1", 1, 0))
    dr = replace(cur.dests[0], server=replace(cur.dests[0].server, fwd=3))
    cmds, _ = _diff([ipvs.desired_service(spec())], [replace(cur, dests=(dr, cur.dests[1]))])
    assert cmds == [Command("set_dest", KEY, dest=RealServer("10.2.0.2", 8080, 1, fwd=0))]


def test_diff_deletes_only_owned_services():
    other = KernelService(VsKey(socket.AF_INET, TCP, "192.0.2.1", 80), VsSettings("rr", 0, 0, 32))
    mine = _cur()
    cmds, _ = _diff([], [other, mine], owned=lambda k: k == KEY)
    assert cmds == [Command("del_service", KEY)]


def test_diff_removed_dest_with_connections_is_quiesced_then_deleted_later():
    desired = [ipvs.desired_service(spec(backends=(("10.2.0.1:8080", 1),), drain_timeout=30))]
    current = [_cur(("10.2.0.2", 1, 3), ("10.2.0.1", 1, 0))]
    cmds, drains = _diff(desired, current, now=100.0)
    assert cmds == [Command("set_dest", KEY, dest=RealServer("10.2.0.2", 8080, 0))]
    assert drains == {(KEY, "10.2.0.2", 8080): 130.0}
    # Still busy, before the deadline: nothing to do.
    current = [_cur(("10.2.0.2", 0, 2), ("10.2.0.1", 1, 0))]
    cmds, drains = _diff(desired, current, drains=drains, now=120.0)
    assert cmds == []
    assert drains == {(KEY, "10.2.0.2", 8080): 130.0}
    # Deadline passed: deleted even with connections left.
    cmds, drains = _diff(desired, current, drains=drains, now=130.0)
    assert cmds == [Command("del_dest", KEY, dest=RealServer("10.2.0.2", 8080, 0))]
    assert drains == {}


def test_diff_removed_idle_dest_goes_to_weight_zero_then_is_deleted():
    desired = [ipvs.desired_service(spec(backends=(("10.2.0.1:8080", 1),)))]
    current = [_cur(("10.2.0.2", 4, 0), ("10.2.0.1", 1, 0))]
    cmds, drains = _diff(desired, current)
    assert [c.verb for c in cmds] == ["set_dest", "del_dest"]
    assert cmds[0].dest.weight == 0
    assert drains == {}


def test_diff_draining_dest_that_returns_gets_its_weight_back():
    desired = [ipvs.desired_service(spec())]
    current = [_cur(("10.2.0.2", 0, 3), ("10.2.0.1", 1, 0))]
    cmds, drains = _diff(desired, current, drains={(KEY, "10.2.0.2", 8080): 50.0}, now=10.0)
    assert cmds == [Command("set_dest", KEY, dest=RealServer("10.2.0.2", 8080, 1))]
    assert drains == {}


def test_diff_order_deletes_then_adds_in_spec_order_then_edits():
    s = spec(backends=(("10.2.0.9:8080", 1), ("10.2.0.1:8080", 2), ("10.2.0.8:8080", 1)))
    current = [_cur(("10.2.0.2", 1, 0), ("10.2.0.1", 1, 0))]
    cmds, _ = _diff([ipvs.desired_service(s)], current)
    got = [(c.verb, c.dest.addr) for c in cmds]
    assert got == [
        ("set_dest", "10.2.0.2"),
        ("del_dest", "10.2.0.2"),
        ("add_dest", "10.2.0.9"),
        ("add_dest", "10.2.0.8"),
        ("set_dest", "10.2.0.1"),
    ]


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    ("verb", "code"),
    [
        ("add_service", errno.EEXIST),
        ("add_dest", errno.EEXIST),
        ("del_service", errno.ESRCH),
        ("del_dest", errno.ENOENT),
        ("set_dest", errno.ENOENT),
    ],
)
def test_already_done_errors_count_as_success(verb, code):
    dest = RealServer("10.2.0.1", 80, 1) if verb.endswith("dest") else None
    settings = VsSettings("rr", 0, 0, 32) if verb.endswith("service") else None
    assert ipvs.error_message(Command(verb, KEY, settings, dest), code) is None


def test_unknown_scheduler_message_names_the_module():
    cmd = Command("add_service", KEY, settings=VsSettings("nope", 0, 0, 32))
    msg = ipvs.error_message(cmd, errno.ENOENT)
    assert msg is not None and "ip_vs_nope" in msg and "tcp/10.0.0.1:80" in msg


@pytest.mark.parametrize(
    ("code", "fragment"),
    [(errno.ERANGE, "out of range"), (errno.EPERM, "CAP_NET_ADMIN"), (errno.EINVAL, "EINVAL")],
)
def test_other_errors_are_explained(code, fragment):
    cmd = Command("set_dest", KEY, dest=RealServer("10.2.0.1", 80, 1))
    msg = ipvs.error_message(cmd, code)
    assert msg is not None and fragment in msg and "10.2.0.1:80" in msg


def test_masq_restore_is_one_atomic_chain_rewrite():
    text = ipvs.masq_restore({"10.0.0.2", "10.0.0.1"}, v6=False)
    lines = text.splitlines()
    assert lines[:2] == ["*nat", ":L4LB-IPVS-MASQ - [0:0]"]
    assert lines[-1] == "COMMIT"
    assert "--vaddr 10.0.0.1/32 --vdir ORIGINAL --vmethod MASQ" in lines[2]
    assert "10.0.0.2/32" in lines[3]
    listing = "-N L4LB-IPVS-MASQ\n" + "\n".join(
        line.replace('"', "") if i else line for i, line in enumerate(lines[2:4])
    )
    assert ipvs._masq_vips(listing) == {"10.0.0.1", "10.0.0.2"}
    assert "/128" in ipvs.masq_restore({"fd00::1"}, v6=True)


# ------------------------------------------------------------------ the sink


def test_sink_programs_then_reconciles_to_zero_commands(sink, kernel):
    assert sink.apply({"web": spec()}) == {}
    assert kernel.addrs == {"10.0.0.1"}
    assert kernel.masq == {"10.0.0.1"}
    assert kernel.sysctls == {
        "conntrack": 1,
        "expire_nodest_conn": 1,
        "expire_quiescent_template": 0,
    }
    # Kernel order is the reverse of addition, as in the splicer.
    assert [d.server.addr for d in kernel.services[KEY].dests] == ["10.2.0.2", "10.2.0.1"]
    kernel.log.clear()
    assert sink.apply({"web": spec()}) == {}
    assert kernel.log == []


def test_sink_survives_restart_without_commands(kernel, clock):
    first = IpvsSink(kernel_factory=lambda: kernel, clock=clock)
    first.apply({"web": spec()})
    first.close()
    kernel.log.clear()
    second = IpvsSink(kernel_factory=lambda: kernel, clock=clock)
    try:
        assert second.apply({"web": spec()}) == {}
        assert kernel.log == []
        # The restarted sink still owns the service (its VIP is on the interface).
        second.apply({})
        assert kernel.services == {}
        assert kernel.addrs == set()
    finally:
        second.close()


def test_sink_repairs_a_service_deleted_by_hand(sink, kernel):
    sink.apply({"web": spec()})
    del kernel.services[KEY]
    kernel.log.clear()
    sink.apply({"web": spec()})
    assert [c.verb for c in kernel.log] == ["add_service", "add_dest", "add_dest"]
    assert [d.server.addr for d in kernel.services[KEY].dests] == ["10.2.0.2", "10.2.0.1"]


def test_sink_graceful_removal_end_to_end(sink, kernel, clock):
    sink.apply({"web": spec()})
    kernel.active[(KEY, "10.2.0.2", 8080)] = 2
    one = spec(backends=(("10.2.0.1:8080", 1),), drain_timeout=10)
    sink.apply({"web": one})
    assert sink.draining
    weights = {d.server.addr: d.server.weight for d in kernel.services[KEY].dests}
    assert weights == {"10.2.0.1": 1, "10.2.0.2": 0}
    kernel.active[(KEY, "10.2.0.2", 8080)] = 0
    clock.now += 1
    sink.apply({"web": one})
    assert not sink.draining
    assert [d.server.addr for d in kernel.services[KEY].dests] == ["10.2.0.1"]


def test_sink_reports_unknown_scheduler_and_keeps_others(sink, kernel):
    bad = spec(name="bad", listen="10.0.0.2:80", scheduler="nope")
    errors = sink.apply({"web": spec(), "bad": bad})
    assert list(errors) == ["bad"]
    assert "ip_vs_nope" in errors["bad"]
    assert set(kernel.services) == {KEY}
    # The failing service's dests were not attempted.
    assert all(c.key == KEY for c in kernel.log if c.verb == "add_dest")


def test_sink_passes_other_kernel_schedulers_through(sink, kernel):
    assert sink.apply({"web": spec(scheduler="mh")}) == {}
    assert kernel.services[KEY].settings.sched == "mh"


def test_sink_config_error_is_reported_per_service(sink, kernel):
    bad = replace(spec(name="any"), listen=Address.parse("0.0.0.0:80"))
    errors = sink.apply({"any": bad, "web": spec()})
    assert "concrete VIP" in errors["any"]
    assert set(kernel.services) == {KEY}


def test_sink_expire_quiescent_sysctl_follows_specs(sink, kernel):
    sink.apply({"web": spec(expire_quiescent=True)})
    assert kernel.sysctls["expire_quiescent_template"] == 1


def test_sink_counters_by_name(sink, kernel):
    sink.apply({"web": spec()})
    kernel.active[(KEY, "10.2.0.1", 8080)] = 4
    c = sink.counters()["web"]["backends"]
    assert c["10.2.0.1:8080"]["active"] == 4
    assert c["10.2.0.2:8080"]["weight"] == 1
    assert set(c["10.2.0.1:8080"]) == {
        "weight",
        "active",
        "inactive",
        "persistent",
        "conns",
        "inbytes",
        "outbytes",
    }


def test_sink_cleanup_removes_only_its_own(sink, kernel):
    foreign = VsKey(socket.AF_INET, TCP, "192.0.2.1", 80)
    kernel.services[foreign] = KernelService(foreign, VsSettings("rr", 0, 0, 32))
    sink.apply({"web": spec(), "v6": spec(name="v6", listen="[fd00::1]:80", backends=())})
    removed = sink.cleanup()
    assert removed == [
        "virtual service tcp/10.0.0.1:80",
        "virtual service tcp/[fd00::1]:80",
        "interface l4lb-ipvs0 with its addresses",
        "iptables: nat chain L4LB-IPVS-MASQ",
    ]
    assert set(kernel.services) == {foreign}
    assert kernel.addrs == set() and not kernel.link
    assert kernel.masq is None


async def test_apply_async_runs_on_the_sink_thread(kernel, clock):
    import threading

    seen: list[str] = []
    orig = kernel.dump

    def dump() -> list[KernelService]:
        seen.append(threading.current_thread().name)
        return orig()

    kernel.dump = dump  # type: ignore[method-assign]
    s = IpvsSink(kernel_factory=lambda: kernel, clock=clock)
    try:
        assert await s.apply_async({"web": spec()}) == {}
    finally:
        s.close()
    assert seen and all(n.startswith("l4lb-ipvs") for n in seen)


def test_importing_l4lb_ipvs_does_not_import_pyroute2():
    import subprocess

    code = "import sys, l4lb.ipvs; print('pyroute2' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "False"


# ------------------------------------------------------------------ several VIPs


def multi(**kw: Any) -> ServiceSpec:
    """A service with an IPv4 and an IPv6 VIP and a backend of each family."""
    fields: dict[str, Any] = {
        "backends": (("10.2.0.1:8080", 1), ("[fd02::1]:8080", 2), ("10.2.0.2:8080", 3)),
        "vips": (Address.parse("10.0.0.1:80"), Address.parse("[fd00::1]:443")),
    }
    return spec(**{**fields, **kw})


KEY6 = VsKey(socket.AF_INET6, TCP, "fd00::1", 443)


def test_desired_services_one_per_vip_with_the_backends_of_its_family():
    # With vips, listen (here the splicer's wildcard) is not a VIP.
    wildcard = Address.parse("0.0.0.0:0", allow_port_zero=True)
    v4, v6 = ipvs.desired_services(replace(multi(), listen=wildcard))
    assert (v4.key, v6.key) == (KEY, KEY6)
    assert [(d.addr, d.weight) for d in v4.dests] == [("10.2.0.1", 1), ("10.2.0.2", 3)]
    assert [(d.addr, d.weight) for d in v6.dests] == [("fd02::1", 2)]
    assert v6.settings.netmask == 128 and v4.settings.netmask == 32


def test_desired_services_rejects_a_backend_no_vip_can_reach():
    bad = spec(backends=(("[fd02::1]:8080", 1),), vips=(Address.parse("10.0.0.1:80"),))
    with pytest.raises(IpvsConfigError, match=r"fd02::1.*address family"):
        ipvs.desired_services(bad)


def test_sink_programs_every_vip_udp_too(sink, kernel):
    assert sink.apply({"dns": multi(protocol="udp")}) == {}
    keys = {replace(KEY, protocol=UDP), replace(KEY6, protocol=UDP)}
    assert set(kernel.services) == keys
    assert kernel.addrs == {"10.0.0.1", "fd00::1"}
    # Dropping a VIP removes just its virtual service and address.
    one = multi(
        protocol="udp", vips=(Address.parse("[fd00::1]:443"),), backends=(("[fd02::1]:8080", 2),)
    )
    assert sink.apply({"dns": one}) == {}
    assert set(kernel.services) == {replace(KEY6, protocol=UDP)}
    assert kernel.addrs == {"fd00::1"}


def test_counters_sum_backends_over_vips_and_total_each_vip(sink, kernel):
    both = spec(vips=(Address.parse("10.0.0.1:80"), Address.parse("10.0.0.9:80")))
    sink.apply({"web": both})
    other = VsKey(socket.AF_INET, TCP, "10.0.0.9", 80)
    kernel.active[(KEY, "10.2.0.1", 8080)] = 2
    kernel.active[(other, "10.2.0.1", 8080)] = 3
    kernel.active[(other, "10.2.0.2", 8080)] = 5
    c = sink.counters()["web"]
    assert c["backends"]["10.2.0.1:8080"]["active"] == 5
    assert c["backends"]["10.2.0.2:8080"]["active"] == 5
    assert c["vips"]["10.0.0.1:80"]["active"] == 2
    assert c["vips"]["10.0.0.9:80"]["active"] == 8


# ------------------------------------------------------------------ trusting the cache


def many(n: int) -> dict[str, ServiceSpec]:
    return {
        f"s{i}": spec(name=f"s{i}", listen=f"10.0.{i // 250}.{i % 250 + 1}:80") for i in range(n)
    }


def test_trusted_apply_diffs_only_what_changed_without_dumping(sink, kernel):
    specs = many(50)
    sink.apply(specs)
    kernel.log.clear()
    dumps = kernel.dumps
    assert sink.apply(specs, trust_cache=True) == {}
    assert kernel.log == [] and kernel.dumps == dumps
    changed = dict(
        specs, s7=spec(name="s7", listen="10.0.0.8:80", backends=(("10.2.0.1:8080", 4),))
    )
    assert sink.apply(changed, trust_cache=True) == {}
    assert kernel.dumps == dumps
    key = VsKey(socket.AF_INET, TCP, "10.0.0.8", 80)
    assert [(c.verb, c.key) for c in kernel.log] == [
        ("set_dest", key),  # 10.2.0.2 quiesced; idle (its dests were read), so deleted
        ("del_dest", key),
        ("set_dest", key),  # 10.2.0.1 to weight 4
    ]
    assert [(d.server.addr, d.server.weight) for d in kernel.services[key].dests] == [
        ("10.2.0.1", 4)
    ]
    # A service that leaves is deleted, still without a dump.
    del changed["s3"]
    kernel.log.clear()
    sink.apply(changed, trust_cache=True)
    assert [c.verb for c in kernel.log] == ["del_service"] and kernel.dumps == dumps


def test_trusted_apply_reads_counters_of_draining_services_only(sink, kernel, clock):
    sink.apply({"web": spec()})
    kernel.active[(KEY, "10.2.0.2", 8080)] = 1
    one = spec(backends=(("10.2.0.1:8080", 1),), drain_timeout=10)
    sink.apply({"web": one})
    assert sink.draining
    dumps = kernel.dumps
    kernel.active[(KEY, "10.2.0.2", 8080)] = 0
    sink.apply({"web": one}, trust_cache=True)
    assert not sink.draining
    assert kernel.dumps == dumps and kernel.dest_dumps == 1
    assert [d.server.addr for d in kernel.services[KEY].dests] == ["10.2.0.1"]


def test_trusted_apply_falls_back_to_a_dump_after_a_surprise(sink, kernel):
    sink.apply({"web": spec()})
    del kernel.services[KEY]  # behind the sink's back
    two = spec(backends=(("10.2.0.1:8080", 2), ("10.2.0.2:8080", 1)))
    errors = sink.apply({"web": two}, trust_cache=True)
    assert "does not exist" in errors["web"]
    # The failed command invalidated the cache: the next trusted apply repairs in full.
    assert sink.apply({"web": two}, trust_cache=True) == {}
    assert [(d.server.addr, d.server.weight) for d in kernel.services[KEY].dests] == [
        ("10.2.0.2", 1),
        ("10.2.0.1", 2),
    ]


def test_full_apply_repairs_what_a_trusted_one_cannot_see(sink, kernel):
    sink.apply({"web": spec()})
    del kernel.services[KEY]
    sink.apply({"web": spec()}, trust_cache=True)
    assert KEY not in kernel.services
    sink.apply({"web": spec()})
    assert KEY in kernel.services
