"""The raw IPVS wire format against pyroute2's own decoder, and the raw dump decoders."""

from __future__ import annotations

import socket
import struct

import pytest

from l4lb import ipvs, netlink
from l4lb.ipvs import Command, RealServer, VsKey, VsSettings

TCP = socket.IPPROTO_TCP
FAMILY = 0x42


def encode(cmd: Command) -> bytes:
    kernel = object.__new__(ipvs._NetlinkKernel)
    kernel._family = FAMILY
    return kernel._encode(cmd, 7)


def decoded(raw: bytes):
    """Our message through pyroute2's decoder: (header, ipvsmsg)."""
    ipvs_msg = pytest.importorskip("pyroute2.netlink.generic.ipvs").ipvsmsg
    size, kind, flags, seq, _ = struct.unpack_from("=IHHII", raw)
    assert size == len(raw) and kind == FAMILY and seq == 7
    msg = ipvs_msg(raw)
    msg.decode()
    return flags, msg


def test_attribute_numbers_are_pyroute2s():
    ipvs_msg = pytest.importorskip("pyroute2.netlink.generic.ipvs").ipvsmsg
    svc = [n for n, _ in ipvs_msg.service.nla_map]
    dest = [n for n, _ in ipvs_msg.dest.nla_map]
    assert svc.index("IPVS_SVC_ATTR_NETMASK") == netlink.SVC_NETMASK
    assert svc.index("IPVS_SVC_ATTR_SCHED_NAME") == netlink.SVC_SCHED_NAME
    assert dest.index("IPVS_DEST_ATTR_STATS64") == netlink.DEST_STATS64
    assert dest.index("IPVS_DEST_ATTR_ADDR_FAMILY") == netlink.DEST_ADDR_FAMILY
    assert dest.index("IPVS_DEST_ATTR_PERSIST_CONNS") == netlink.DEST_PERSIST


def test_add_service_carries_every_setting():
    key = VsKey(socket.AF_INET, TCP, "10.0.0.1", 80)
    flags, msg = decoded(encode(Command("add_service", key, settings=VsSettings("wrr", 1, 60, 24))))
    assert flags == netlink.NLM_F_REQUEST | netlink.NLM_F_ACK
    assert msg["cmd"] == 1 and msg["version"] == 1
    svc = msg.get_attr("IPVS_CMD_ATTR_SERVICE")
    assert svc.get_attr("IPVS_SVC_ATTR_AF") == socket.AF_INET
    assert svc.get_attr("IPVS_SVC_ATTR_PROTOCOL") == TCP
    assert svc.get_attr("IPVS_SVC_ATTR_ADDR") == "10.0.0.1"
    assert svc.get_attr("IPVS_SVC_ATTR_PORT") == 80
    assert svc.get_attr("IPVS_SVC_ATTR_SCHED_NAME") == "wrr"
    assert svc.get_attr("IPVS_SVC_ATTR_FLAGS")["flags"] == 1
    assert svc.get_attr("IPVS_SVC_ATTR_TIMEOUT") == 60
    assert svc.get_attr("IPVS_SVC_ATTR_NETMASK") == "255.255.255.0"
    # And our own decoder reads what we wrote.
    raw = netlink.parse_attrs(
        encode(Command("add_service", key, settings=VsSettings("wrr", 1, 60, 24))), 20
    )
    back = ipvs._raw_service(netlink.parse_attrs(raw[netlink.CMD_ATTR_SERVICE]))
    assert back.key == key and back.settings == VsSettings("wrr", 1, 60, 24)


def test_ipv6_dest_add_is_masquerading_with_weight_and_thresholds():
    key = VsKey(socket.AF_INET6, TCP, "fd00::1", 443)
    dest = RealServer("fd02::5", 8443, 3, 100, 50)
    _, msg = decoded(encode(Command("add_dest", key, dest=dest)))
    assert msg["cmd"] == 5
    assert msg.get_attr("IPVS_CMD_ATTR_SERVICE").get_attr("IPVS_SVC_ATTR_ADDR") == "fd00::1"
    d = msg.get_attr("IPVS_CMD_ATTR_DEST")
    assert d.get_attr("IPVS_DEST_ATTR_ADDR") == "fd02::5"
    assert d.get_attr("IPVS_DEST_ATTR_PORT") == 8443
    assert d.get_attr("IPVS_DEST_ATTR_FWD_METHOD") == ipvs.FWD_MASQ
    assert d.get_attr("IPVS_DEST_ATTR_WEIGHT") == 3
    assert (d.get_attr("IPVS_DEST_ATTR_U_THRESH"), d.get_attr("IPVS_DEST_ATTR_L_THRESH")) == (
        100,
        50,
    )
    raw = netlink.parse_attrs(encode(Command("add_dest", key, dest=dest)), 20)
    assert (
        ipvs._raw_dest(socket.AF_INET6, netlink.parse_attrs(raw[netlink.CMD_ATTR_DEST])).server
        == dest
    )


def test_del_dest_names_only_the_key():
    key = VsKey(socket.AF_INET, TCP, "10.0.0.1", 80)
    _, msg = decoded(encode(Command("del_dest", key, dest=RealServer("10.2.0.1", 8080, 1))))
    assert msg["cmd"] == 7
    d = msg.get_attr("IPVS_CMD_ATTR_DEST")
    assert d.get_attr("IPVS_DEST_ATTR_WEIGHT") is None
    assert d.get_attr("IPVS_DEST_ATTR_ADDR") == "10.2.0.1"


def test_raw_dest_reads_counters_from_stats64():
    stats = netlink.nla(netlink.STATS_CONNS, struct.pack("=Q", 7)) + netlink.nla(
        netlink.STATS_INBYTES, struct.pack("=Q", 100)
    )
    attrs = netlink.parse_attrs(
        netlink.dest_attrs(socket.AF_INET, "10.2.0.1", 8080, (0, 2, 0, 0))
        + netlink.nla(netlink.DEST_STATS64, stats)
    )
    inner = netlink.parse_attrs(attrs[netlink.CMD_ATTR_DEST])
    inner[netlink.DEST_STATS64] = attrs[netlink.DEST_STATS64]
    inner[netlink.DEST_ACTIVE] = struct.pack("=I", 4)
    d = ipvs._raw_dest(socket.AF_INET, inner)
    assert (d.server.weight, d.active, d.conns, d.inbytes, d.outbytes) == (2, 4, 7, 100, 0)


def test_addr_message_is_a_host_address_without_dad_for_ipv6():
    raw = netlink.addr_message(True, 9, "fd00::1", seq=3)
    size, kind, flags, seq, _ = struct.unpack_from("=IHHII", raw)
    assert (size, kind, seq) == (len(raw), netlink.RTM_NEWADDR, 3)
    assert flags & netlink.NLM_F_CREATE and flags & netlink.NLM_F_EXCL
    family, prefix, _, _, index = struct.unpack_from("=BBBBI", raw, 16)
    assert (family, prefix, index) == (socket.AF_INET6, 128, 9)
    attrs = netlink.parse_attrs(raw, 24)
    assert attrs[netlink.IFA_LOCAL] == socket.inet_pton(socket.AF_INET6, "fd00::1")
    assert struct.unpack("=I", attrs[netlink.IFA_FLAGS]) == (2,)
    delete = netlink.addr_message(False, 9, "10.0.0.1", seq=4)
    assert struct.unpack_from("=IHH", delete)[1:] == (netlink.RTM_DELADDR, 0x5)
