"""Raw netlink for bulk IPVS work: batched requests, and the IPVS wire format.

pyroute2 waits for each request's answer before it sends the next one and decodes every
reply through its generic machinery; programming ten thousand virtual services that way
costs seconds. Here many requests go out in one ``sendmsg`` and their acknowledgements
are read back together, and dumps are decoded with :mod:`struct` alone.

Only what :mod:`l4lb.ipvs` needs is covered: IPVS service and destination commands and
dumps (generic netlink family ``IPVS``, ``include/uapi/linux/ip_vs.h``) and address
add/delete (rtnetlink). The family id is resolved by the caller (pyroute2 knows it).
"""

from __future__ import annotations

import itertools
import os
import socket
import struct
from collections.abc import Iterator, Sequence
from typing import Any

__all__ = [
    "CMD",
    "Attrs",
    "NetlinkSocket",
    "addr_message",
    "dest_attrs",
    "genl_message",
    "parse_attrs",
    "service_attrs",
]

NETLINK_ROUTE = 0
NETLINK_GENERIC = 16
_SO_RCVBUFFORCE = 33
_SOL_NETLINK = 270
_NETLINK_CAP_ACK = 10

NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_ACK = 0x4
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
NLM_F_DUMP = 0x300
NLMSG_ERROR = 2
NLMSG_DONE = 3
RTM_NEWADDR = 20
RTM_DELADDR = 21

_IPVS_GENL_VERSION = 1
#: IPVS_CMD_* numbers by :class:`l4lb.ipvs.Command` verb (and the dumps).
CMD = {
    "add_service": 1,
    "set_service": 2,
    "del_service": 3,
    "get_service": 4,
    "add_dest": 5,
    "set_dest": 6,
    "del_dest": 7,
    "get_dest": 8,
}
# IPVS_CMD_ATTR_*, IPVS_SVC_ATTR_*, IPVS_DEST_ATTR_*, IPVS_STATS_ATTR_*.
CMD_ATTR_SERVICE, CMD_ATTR_DEST = 1, 2
SVC_AF, SVC_PROTOCOL, SVC_ADDR, SVC_PORT, SVC_FWMARK = 1, 2, 3, 4, 5
SVC_SCHED_NAME, SVC_FLAGS, SVC_TIMEOUT, SVC_NETMASK = 6, 7, 8, 9
DEST_ADDR, DEST_PORT, DEST_FWD_METHOD, DEST_WEIGHT = 1, 2, 3, 4
DEST_U_THRESH, DEST_L_THRESH, DEST_ACTIVE, DEST_INACTIVE, DEST_PERSIST = 5, 6, 7, 8, 9
DEST_ADDR_FAMILY, DEST_STATS64 = 11, 12
STATS_CONNS, STATS_INBYTES, STATS_OUTBYTES = 1, 4, 5
IFA_ADDRESS, IFA_LOCAL, IFA_FLAGS = 1, 2, 8

_NLA = struct.Struct("=HH")
_NLMSGHDR = struct.Struct("=IHHII")
_GENLHDR = struct.Struct("=BBH")
_IFADDRMSG = struct.Struct("=BBBBI")
_U16 = struct.Struct("=H")
_BE16 = struct.Struct("!H")
_U32 = struct.Struct("=I")
_U64 = struct.Struct("=Q")
_FLAGS = struct.Struct("=II")
#: Requests per sendmsg: their acks (one skb each) must fit the receive buffer.
BATCH = 256


def nla(kind: int, payload: bytes) -> bytes:
    """One netlink attribute, padded to 4 bytes."""
    size = 4 + len(payload)
    return _NLA.pack(size, kind) + payload + b"\0" * (-size % 4)


def _addr16(af: int, addr: str) -> bytes:
    raw = socket.inet_pton(af, addr)
    return raw + b"\0" * (16 - len(raw))  # union nf_inet_addr


def service_attrs(
    af: int,
    protocol: int,
    addr: str,
    port: int,
    settings: tuple[str, int, int, bytes] | None = None,
) -> bytes:
    """An ``IPVS_CMD_ATTR_SERVICE`` nest: the key, plus (sched, flags, timeout,
    netmask wire bytes) for add/set, which the kernel wants complete."""
    body = (
        nla(SVC_AF, _U16.pack(af))
        + nla(SVC_PROTOCOL, _U16.pack(protocol))
        + nla(SVC_ADDR, _addr16(af, addr))
        + nla(SVC_PORT, _BE16.pack(port))
    )
    if settings is not None:
        sched, flags, timeout, netmask = settings
        body += (
            nla(SVC_SCHED_NAME, sched.encode() + b"\0")
            + nla(SVC_FLAGS, _FLAGS.pack(flags, 0xFFFF))
            + nla(SVC_TIMEOUT, _U32.pack(timeout))
            + nla(SVC_NETMASK, netmask)
        )
    return nla(CMD_ATTR_SERVICE, body)


def dest_attrs(
    af: int, addr: str, port: int, full: tuple[int, int, int, int] | None = None
) -> bytes:
    """An ``IPVS_CMD_ATTR_DEST`` nest: the key, plus (fwd, weight, u_thresh, l_thresh)
    for add/set, which the kernel wants complete."""
    body = (
        nla(DEST_ADDR, _addr16(af, addr))
        + nla(DEST_PORT, _BE16.pack(port))
        + nla(DEST_ADDR_FAMILY, _U16.pack(af))
    )
    if full is not None:
        fwd, weight, u_thresh, l_thresh = full
        body += (
            nla(DEST_FWD_METHOD, _U32.pack(fwd))
            + nla(DEST_WEIGHT, _U32.pack(weight))
            + nla(DEST_U_THRESH, _U32.pack(u_thresh))
            + nla(DEST_L_THRESH, _U32.pack(l_thresh))
        )
    return nla(CMD_ATTR_DEST, body)


def genl_message(family: int, cmd: int, attrs: bytes, *, flags: int, seq: int) -> bytes:
    """A generic netlink request of ``family`` (IPVS's version 1 header)."""
    size = _NLMSGHDR.size + _GENLHDR.size + len(attrs)
    return (
        _NLMSGHDR.pack(size, family, flags, seq, 0)
        + _GENLHDR.pack(cmd, _IPVS_GENL_VERSION, 0)
        + attrs
    )


def addr_message(add: bool, index: int, addr: str, *, seq: int) -> bytes:
    """RTM_NEWADDR / RTM_DELADDR for a host address (/32, /128; IPv6 without DAD)."""
    af = socket.AF_INET6 if ":" in addr else socket.AF_INET
    raw = socket.inet_pton(af, addr)
    prefix = 128 if af == socket.AF_INET6 else 32
    body = _IFADDRMSG.pack(af, prefix, 0, 0, index) + nla(IFA_LOCAL, raw) + nla(IFA_ADDRESS, raw)
    if af == socket.AF_INET6:
        body += nla(IFA_FLAGS, _U32.pack(0x2))  # IFA_F_NODAD
    flags = NLM_F_REQUEST | NLM_F_ACK | (NLM_F_CREATE | NLM_F_EXCL if add else 0)
    kind = RTM_NEWADDR if add else RTM_DELADDR
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), kind, flags, seq, 0) + body


Attrs = dict[int, bytes]


def parse_attrs(data: bytes | memoryview, offset: int = 0, end: int | None = None) -> Attrs:
    """Attributes from ``offset`` to ``end`` as {type: payload}; nested ones stay bytes."""
    out: Attrs = {}
    end = len(data) if end is None else end
    while offset + 4 <= end:
        size, kind = _NLA.unpack_from(data, offset)
        if size < 4:
            break
        out[kind & 0x3FFF] = bytes(data[offset + 4 : offset + size])
        offset += (size + 3) & ~3
    return out


def u16(raw: bytes) -> int:
    return int(_U16.unpack_from(raw)[0]) if raw else 0


def be16(raw: bytes) -> int:
    return int(_BE16.unpack_from(raw)[0]) if raw else 0


def u32(raw: bytes) -> int:
    return int(_U32.unpack_from(raw)[0]) if raw else 0


def u64(raw: bytes) -> int:
    return int(_U64.unpack_from(raw)[0]) if raw else 0


def flags(raw: bytes) -> int:
    return int(_FLAGS.unpack_from(raw)[0]) if raw else 0


def inet(af: int, raw: bytes) -> str:
    """An address attribute (16 bytes for both families) as text."""
    return socket.inet_ntop(af, raw[: 16 if af == socket.AF_INET6 else 4])


class NetlinkSocket:
    """A raw netlink socket that sends requests in batches and collects their answers."""

    def __init__(self, protocol: int) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, protocol)
        try:
            self._sock.bind((0, 0))
            # Acks only, not an echo of each request; room for a whole batch of them.
            self._sock.setsockopt(_SOL_NETLINK, _NETLINK_CAP_ACK, 1)
            try:
                self._sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, 8 << 20)
            except OSError:
                self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        except OSError:
            self._sock.close()
            raise
        self._seq = itertools.count(1)
        self._buf = bytearray(1 << 20)  # one receive buffer, not a fresh MiB per recv

    def close(self) -> None:
        self._sock.close()

    def next_seq(self) -> int:
        return next(self._seq)

    def request_many(self, build: Sequence[Any], encode: Any) -> list[int]:
        """Send ``encode(item, seq)`` for every item, ``BATCH`` per sendmsg; returns each
        item's errno (0 for success), in order."""
        results: list[int] = []
        for start in range(0, len(build), BATCH):
            chunk = build[start : start + BATCH]
            seqs = [self.next_seq() for _ in chunk]
            self._sock.sendall(
                b"".join(encode(item, seq) for item, seq in zip(chunk, seqs, strict=True))
            )
            answers = self._acks(set(seqs))
            results += [answers[s] for s in seqs]
        return results

    def _acks(self, pending: set[int]) -> dict[int, int]:
        answers: dict[int, int] = {}
        while pending:
            data = self._recv()
            for kind, _flags, seq, payload in _messages(data):
                if kind == NLMSG_ERROR and seq in pending:
                    code = struct.unpack_from("=i", payload)[0]
                    answers[seq] = -code
                    pending.discard(seq)
        return answers

    def _recv(self) -> bytes:
        n = self._sock.recv_into(self._buf)
        return bytes(self._buf[:n])

    def dump(self, message: bytes, seq: int) -> Iterator[memoryview]:
        """Send one dump request; yield each reply's payload (after the netlink header)."""
        self._sock.sendall(message)
        while True:
            data = self._recv()
            for kind, _flags, rseq, payload in _messages(data):
                if rseq != seq:
                    continue
                if kind == NLMSG_DONE:
                    return
                if kind == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", payload)[0]
                    if code:
                        raise OSError(code, os.strerror(code))
                    return
                yield payload


def _messages(data: bytes) -> Iterator[tuple[int, int, int, memoryview]]:
    view = memoryview(data)
    offset = 0
    while offset + _NLMSGHDR.size <= len(view):
        size, kind, fl, seq, _pid = _NLMSGHDR.unpack_from(view, offset)
        if size < _NLMSGHDR.size:
            break
        yield kind, fl, seq, view[offset + _NLMSGHDR.size : offset + size]
        offset += (size + 3) & ~3
