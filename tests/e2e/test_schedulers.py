"""IPVS-exact scheduling end to end: real connections through ``l4lb run``.

Expected decisions never come from l4lb itself: they are hand tables quoted from the
scheduler specification (docs/ipvs-schedulers.md) where it gives them, and otherwise the
reference model in tests/sched/ipvs_model.py, which was written from that document and is
driven here in lock step with the real process (:class:`Lockstep`). Every service runs with
two workers: scheduler state is shared by them, so each sequence must hold whichever worker
accepts a connection.

The helpers at the top are shared with test_affinity.py and test_runtime_changes.py.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import random
import socket
import struct
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from l4lb._testbase import L4lbProcess, NamedServer, format_address, parse_address, wait_for

# --------------------------------------------------------------------------- the oracle


def load_model() -> ModuleType:
    """The reference model of the IPVS schedulers, imported from tests/sched by path."""
    name = "ipvs_model"
    if name in sys.modules:
        return sys.modules[name]
    path = Path(__file__).resolve().parent.parent / "sched" / "ipvs_model.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses look the module up while being built
    spec.loader.exec_module(module)
    return module


M = load_model()

#: Gracefully closed connections stay inactive (counted in T) for the whole test.
INACTIVE = 60.0
#: Reset connections are gone again soon: the way to bring a backend's T down.
RESET_INACTIVE = 0.2
WAIT = 5.0


def make_config(*services: dict[str, Any], **dataplane: Any) -> dict[str, Any]:
    """A config with these services, two workers and the test's inactive timeouts."""
    dp: dict[str, Any] = {
        "workers": 2,
        "inactive_timeout": INACTIVE,
        "reset_inactive_timeout": RESET_INACTIVE,
        "drain_timeout": 0.5,
    }
    dp.update(dataplane)
    return {"admin": {"listen": "127.0.0.1:0"}, "dataplane": dp, "services": list(services)}


def table(text: str, times: int = 1) -> list[str]:
    """A hand table written as ``"b2 b1 b0"``, repeated ``times`` times."""
    return text.split() * times


# --------------------------------------------------------------------------- traffic


def dial(
    address: str, *, source: str | None = None, timeout: float = 5.0
) -> tuple[socket.socket | None, str | None, tuple[str, int]]:
    """Connect and read the backend's name; ``(None, None, local)`` when l4lb resets.

    ``local`` is the client's own address and port, which sh hashes. On loopback the
    reset of a refused client can arrive before ``connect()`` has even returned.
    """
    host, port = parse_address(address)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    try:
        sock.settimeout(timeout)
        if source is not None:
            sock.bind((source, 0))  # binds the port now, so it is known even if reset
        local = sock.getsockname()[:2]
        sock.connect((host, port))
        local = sock.getsockname()[:2]
        line = b""
        while not line.endswith(b"\n"):
            data = sock.recv(256)
            if not data:
                raise ConnectionError(f"{address}: closed without a reset before a name")
            line += data
    except ConnectionResetError:
        sock.close()
        return None, None, local
    except BaseException:
        sock.close()
        raise
    return sock, line.decode().strip(), local


def close_gracefully(sock: socket.socket) -> None:
    """FIN, then wait for the proxy's FIN: l4lb has then seen this connection end."""
    try:
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(4096):
            pass
    finally:
        sock.close()


def close_reset(sock: socket.socket) -> None:
    """End the connection with a RST (SO_LINGER 0)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def echo(sock: socket.socket, payload: bytes = b"still there\n") -> bytes:
    """Send a line through an established connection and read the echo back."""
    sock.sendall(payload)
    got = b""
    while len(got) < len(payload):
        data = sock.recv(len(payload) - len(got))
        if not data:
            break
        got += data
    return got


def post_backend(
    lb: L4lbProcess, service: str, address: str, body: dict[str, Any] | bytes
) -> tuple[int, dict[str, Any]]:
    """``POST /api/v1/services/{service}/backends/{address}``; returns status and JSON."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    path = (
        f"/api/v1/services/{urllib.parse.quote(service, safe='')}"
        f"/backends/{urllib.parse.quote(address, safe='')}"
    )
    req = urllib.request.Request(
        f"http://{lb.admin}{path}",
        data=data,
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


# --------------------------------------------------------------------------- lock step


@dataclass
class Backend:
    """One backend as the config file has it."""

    server: NamedServer
    weight: int = 1
    upper: int = 0
    lower: int = 0

    @property
    def address(self) -> str:
        """The backend server's ``HOST:PORT``."""
        return self.server.address

    def config(self) -> dict[str, Any]:
        """The ``[[services.backends]]`` table."""
        doc: dict[str, Any] = {"address": self.address, "weight": self.weight}
        if self.upper:
            doc["upper_threshold"] = self.upper
        if self.lower:
            doc["lower_threshold"] = self.lower
        return doc


@dataclass(eq=False)
class Held:
    """A connection made through l4lb, with the model's view of it."""

    sock: socket.socket | None
    name: str | None
    dest: Any  # the model's Dest, None when refused
    tmpl: Any  # the model's controlling Template, if any


@dataclass(eq=False)
class Lockstep:
    """One service of a running l4lb and the model of it, driven connection by connection.

    Config changes are mirrored in the model as the control plane documents them: a
    reload runs deletes (old order), then adds (config order), then edits of backends
    whose weight or thresholds changed, and clears admin overrides; an admin change is an
    edit only when the programmed weight really changes. Time for the model's persistence
    timers is real time since construction, in ms.
    """

    name: str
    scheduler: str
    initial: Sequence[Backend]
    listen: str = "127.0.0.1:0"
    options: dict[str, Any] = field(default_factory=dict)
    inactive: float = INACTIVE
    reset_inactive: float = RESET_INACTIVE
    lb: L4lbProcess | None = None

    def __post_init__(self) -> None:
        self.model = M.Service(self.scheduler, **self._model_options())
        self.servers: list[NamedServer] = []  # model dest id -> backend server
        self.backends: list[Backend] = []
        self.overrides: dict[str, tuple[int | None, bool]] = {}
        self.observed: list[str | None] = []
        self.expected: list[str | None] = []
        self.held: list[Held] = []
        self.t0 = time.monotonic()
        self.set_backends(self.initial)

    # -- config

    def _model_options(self) -> dict[str, Any]:
        o = self.options
        flags = 0
        if o.get("affinity_timeout", 0) > 0:
            flags |= M.PERSISTENT
        if o.get("sh_fallback"):
            flags |= M.SH_FALLBACK
        if o.get("sh_port"):
            flags |= M.SH_PORT
        mask = o.get("affinity_netmask", 32)
        if isinstance(mask, str):
            mask = bin(int.from_bytes(socket.inet_aton(mask), "big")).count("1")
        return {
            "flags": flags,
            "persist_timeout_ms": int(o.get("affinity_timeout", 0) * 1000),
            "netmask4": mask,
            "expire_quiescent": bool(o.get("expire_quiescent", False)),
        }

    def _id(self, server: NamedServer) -> int:
        if server not in self.servers:
            self.servers.append(server)
        return self.servers.index(server)

    def _programmed(self, b: Backend) -> tuple[int, int, int]:
        weight, drain = self.overrides.get(b.address, (None, False))
        effective = 0 if drain else b.weight if weight is None else weight
        return effective, b.upper, b.lower

    def service_config(self) -> dict[str, Any]:
        """This service's ``[[services]]`` table as the file has it."""
        return {
            "name": self.name,
            "listen": self.listen,
            "scheduler": self.scheduler,
            **self.options,
            "backends": [b.config() for b in self.backends],
        }

    def set_backends(self, new: Sequence[Backend]) -> None:
        """Mirror a reload to the file's backends ``new`` (in config order)."""
        old = {b.address: self._programmed(b) for b in self.backends}
        keep = {b.address for b in new}
        for b in self.backends:
            if b.address not in keep:
                self.model.delete(self._id(b.server))
        self.overrides.clear()
        for b in new:
            if b.address not in old:
                self.model.add(self._id(b.server), b.weight, b.upper, b.lower)
        for b in new:
            if b.address in old and old[b.address] != self._programmed(b):
                self.model.edit(self._id(b.server), *self._programmed(b))
        self.backends = list(new)

    def reconfigure(
        self, *, scheduler: str | None = None, options: dict[str, Any] | None = None
    ) -> None:
        """Mirror a reload that changes the service's settings (applied before its backends).

        A different scheduler starts afresh over the current list; the same keeps its state.
        """
        if scheduler is not None:
            self.scheduler = scheduler
        if options is not None:
            self.options = dict(options)
        self.model.configure(self.scheduler, **self._model_options())

    def relisten(self, listen: str) -> None:
        """Mirror a reload that changes the listen address: IPVS can only delete the
        virtual service and create a new one, with fresh dests and no templates."""
        self.listen = listen
        self.overrides.clear()
        self.model = M.Service(self.scheduler, **self._model_options())
        for b in self.backends:
            self.model.add(self._id(b.server), b.weight, b.upper, b.lower)

    def override(
        self, server: NamedServer, *, weight: int | None = None, drain: bool | None = None
    ) -> None:
        """Mirror an admin API change of one backend."""
        b = next(b for b in self.backends if b.server is server)
        before = self._programmed(b)
        w, d = self.overrides.get(b.address, (None, False))
        self.overrides[b.address] = (w if weight is None else weight, d if drain is None else drain)
        if self._programmed(b) != before:
            self.model.edit(self._id(server), *self._programmed(b))

    # -- traffic

    def now(self) -> int:
        """Model time: ms since construction."""
        return int((time.monotonic() - self.t0) * 1000)

    def address(self, host: str | None = None) -> str:
        """Where to dial the service (``host`` replaces a wildcard listen host)."""
        assert self.lb is not None, "attach a running l4lb first"
        listen_host, port = parse_address(self.lb.service_address(self.name))
        return format_address(host or listen_host, port)

    def name_of(self, d: Any) -> str | None:
        """The backend name of a model dest (None: refused)."""
        return None if d is None else self.servers[d.id].name

    def open(self, *, source: str | None = None, host: str | None = None) -> Held:
        """One new connection, held open; records what l4lb and the model chose."""
        sock, name, local = dial(self.address(host), source=source)
        daddr = host or parse_address(self.address())[0]
        d, t = self.model.connect(M.Conn(local[0], local[1], daddr), self.now())
        held = Held(sock, name, d, t)
        self.observed.append(name)
        self.expected.append(self.name_of(d))
        if sock is not None:
            self.held.append(held)
        return held

    def close(self, held: Held, *, reset: bool = False, gone: bool | None = None) -> None:
        """End a held connection gracefully or with a reset, in l4lb and in the model.

        ``gone``: its inactive time ends during the test (default: for resets), so the
        model unbinds it too and we wait for l4lb's counters to show that.
        """
        assert held.sock is not None and held in self.held
        self.held.remove(held)
        (close_reset if reset else close_gracefully)(held.sock)
        closed = self.now()
        if held.dest is None:
            return
        self.model.deactivate(held.dest)
        if gone is None:
            gone = reset
        if gone:
            linger = self.reset_inactive if reset else self.inactive
            self.model.unbind(held.dest, held.tmpl, closed + int(linger * 1000))
        if gone or reset:  # l4lb sees a reset asynchronously: wait for it
            self.wait_counters()

    def pick(self, *, gone: bool = False, **kw: Any) -> str | None:
        """One connection that is closed gracefully at once; returns the backend's name."""
        held = self.open(**kw)
        if held.sock is not None:
            self.close(held, gone=gone)
        return held.name

    def picks(self, n: int, **kw: Any) -> list[str | None]:
        """``n`` connections made and closed one after another."""
        return [self.pick(**kw) for _ in range(n)]

    def close_all(self) -> None:
        """Close every connection still held (at teardown)."""
        for held in self.held:
            assert held.sock is not None
            held.sock.close()
        self.held.clear()

    # -- what l4lb shows

    def doc(self) -> dict[str, Any]:
        """This service's entry in ``GET /api/v1/services``."""
        assert self.lb is not None
        return self.lb.service(self.name)

    def counters(self) -> dict[str, tuple[int, int, bool]]:
        """Per backend address: (active, inactive, overloaded) from the admin API."""
        return {
            b["address"]: (b["active"], b["inactive"], b["overloaded"])
            for b in self.doc()["backends"]
        }

    def model_counters(self) -> dict[str, tuple[int, int, bool]]:
        """The model's (active, inactive, overloaded) per backend address."""
        return {
            self.servers[d.id].address: (d.active, d.inactive, d.overload) for d in self.model.dests
        }

    def wait_counters(self) -> None:
        """Wait until the admin API shows the model's counters (fail after WAIT seconds)."""
        want = self.model_counters()
        try:
            wait_for(lambda: self.counters() == want, WAIT, message="the model's counters")
        except TimeoutError:
            pytest.fail(f"counters: l4lb {self.counters()} != model {want}")

    def order(self) -> list[str]:
        """Backend addresses in the data plane's list order, from the admin API."""
        return [b["address"] for b in self.doc()["backends"]]

    def model_order(self) -> list[str]:
        """Backend addresses in the model's list order."""
        return [self.servers[d.id].address for d in self.model.dests]


@contextlib.contextmanager
def locksteps() -> Iterator[Callable[..., Lockstep]]:
    """A Lockstep factory whose connections are all closed on exit."""
    made: list[Lockstep] = []

    def make(*args: Any, **kw: Any) -> Lockstep:
        ls = Lockstep(*args, **kw)
        made.append(ls)
        return ls

    try:
        yield make
    finally:
        for ls in made:
            ls.close_all()


@pytest.fixture
def lockstep() -> Iterator[Callable[..., Lockstep]]:
    """Factory of :class:`Lockstep` services; held connections are closed at teardown."""
    with locksteps() as make:
        yield make


def start(l4lb: Callable[..., L4lbProcess], *services: Lockstep, **dataplane: Any) -> L4lbProcess:
    """Run one l4lb with these services and attach each to it."""
    lb = l4lb(make_config(*(s.service_config() for s in services), **dataplane))
    for s in services:
        s.lb = lb
    return lb


def reload(lb: L4lbProcess, *services: Lockstep, **dataplane: Any) -> None:
    """SIGHUP with the services' current backends; waits until the admin API shows them."""
    lb.reload(make_config(*(s.service_config() for s in services), **dataplane))


# --------------------------------------------------------------------------- rr and wrr

# §3 and §4 of the specification, for b0, b1, b2 added in that order (kernel order b2 b1 b0).
RR_WRR_TABLES = {
    ("rr", (1, 1, 1)): table("b2 b1 b0", 10),
    # cw 1 for the first round (added one by one), then 4, 3, 2, 1, 4, ...: 9 per cycle.
    ("wrr", (4, 3, 2)): table("b2 b1 b0") + table("b0 b1 b0 b2 b1 b0 b2 b1 b0", 3),
    ("wrr", (5, 1, 0)): table("b1 b0 b0 b0 b0 b0", 5),
    ("wrr", (4, 2, 6)): table("b2 b1 b0 b2 b2 b0", 5),
}


def spec_services(lockstep: Callable[..., Lockstep], servers: list[NamedServer]) -> list[Lockstep]:
    """One service per table of RR_WRR_TABLES, named after it, over the same backends."""
    return [
        lockstep(
            f"{sched}-{'-'.join(map(str, weights))}",
            sched,
            [Backend(s, w) for s, w in zip(servers, weights, strict=True)],
        )
        for sched, weights in RR_WRR_TABLES
    ]


def test_rr_and_wrr_sequences_match_the_spec(l4lb, named_backends, lockstep):
    servers = named_backends(3)
    services = spec_services(lockstep, servers)
    start(l4lb, *services)
    for ls, want in zip(services, RR_WRR_TABLES.values(), strict=True):
        assert ls.order() == [s.address for s in reversed(servers)], ls.name  # newest first
        got = ls.picks(30)
        assert got == want, ls.name
        assert got == ls.expected, ls.name
    assert servers[2].accepted == sum(t.count("b2") for t in RR_WRR_TABLES.values())


def test_rr_remove_and_readd_by_reload_match_the_spec(l4lb, named_backends, lockstep):
    b0, b1, b2 = named_backends(3)
    readd = lockstep("readd", "rr", [Backend(b0), Backend(b1), Backend(b2)])
    cursor = lockstep("cursor", "rr", [Backend(b0), Backend(b1), Backend(b2)])
    lb = start(l4lb, readd, cursor)
    # §3: after 12 picks (cursor on b0) delete b1 and re-add it: order b1 b2 b0.
    assert readd.picks(12) == table("b2 b1 b0", 4)
    # §3: cursor on b1 (order b2 b1 b0), b1 deleted: the cursor moves to b2, then b0 b2 b0.
    assert cursor.picks(2) == ["b2", "b1"]
    for ls in (readd, cursor):
        ls.set_backends([Backend(b0), Backend(b2)])
    reload(lb, readd, cursor)
    assert cursor.picks(6) == table("b0 b2", 3)
    readd.set_backends([Backend(b0), Backend(b1), Backend(b2)])
    reload(lb, readd, cursor)
    assert readd.order() == [b1.address, b2.address, b0.address]
    assert readd.picks(9) == table("b1 b2 b0", 3)
    assert cursor.picks(4) == table("b0 b2", 2)  # untouched by the other service's reload
    for ls in (readd, cursor):
        assert ls.observed == ls.expected, ls.name


def test_sequences_after_a_backend_is_removed_and_readded(l4lb, named_backends, lockstep):
    servers = named_backends(3)
    services = spec_services(lockstep, servers)
    lb = start(l4lb, *services)
    full = {ls.name: list(ls.backends) for ls in services}
    for ls in services:
        ls.picks(13)
        ls.set_backends([full[ls.name][0], full[ls.name][2]])
    reload(lb, *services)
    for ls in services:
        assert ls.order() == [servers[2].address, servers[0].address], ls.name
        ls.picks(7)
        ls.set_backends(full[ls.name])
    reload(lb, *services)
    for ls in services:
        # Re-added, b1 goes to the head of the list.
        assert ls.order() == [servers[1].address, servers[2].address, servers[0].address]
        ls.picks(20)
        assert ls.observed == ls.expected, ls.name
        weight_b1 = full[ls.name][1].weight
        assert ("b1" in ls.observed[20:]) == (weight_b1 > 0), ls.name


def test_reload_deletes_then_adds_in_config_order(l4lb, named_backends, lockstep):
    b0, b1, b2, b3, b4 = named_backends(5)
    services = [
        lockstep(sched, sched, [Backend(b0, 4), Backend(b1, 3), Backend(b2, 2)])
        for sched in ("rr", "wrr")
    ]
    lb = start(l4lb, *services)
    for ls in services:
        ls.picks(3)
        # b1 goes, then b3 and b4 are added in this order; the config's reordering of
        # b2 and b0 is no change at all.
        ls.set_backends([Backend(b2, 2), Backend(b3, 1), Backend(b0, 4), Backend(b4, 5)])
    reload(lb, *services)
    for ls in services:
        assert ls.order() == [b4.address, b3.address, b2.address, b0.address], ls.name
        assert ls.model_order() == ls.order()
        ls.picks(26)
        assert ls.observed == ls.expected, ls.name
    # rr: the cursor stayed on b0, the last, so the new head comes next.
    assert services[0].observed[3:11] == table("b4 b3 b2 b0", 2)
    assert b1.accepted == 2


# --------------------------------------------------------------------------- lc wlc sed nq

# §5-§8: weights [1, 2, 3] (kernel order b2 b1 b0), 24 connections held open.
HELD_TABLES = {
    "lc": table("b2 b1 b0", 8),
    "wlc": table("b2 b1 b0 b2 b1 b2", 4),
    "sed": table("b2 b1 b2 b2 b1 b0", 4),
    "nq": table("b2 b1 b0 b2 b2 b1 b2 b1 b2 b2 b1 b0 b2 b1 b2 b2 b1 b0 b2 b1 b2 b2 b1 b0"),
}


def test_least_connection_tables_with_held_connections(l4lb, named_backends, lockstep):
    servers = named_backends(3, hold=True)
    services = [
        lockstep(sched, sched, [Backend(s, w) for s, w in zip(servers, [1, 2, 3], strict=True)])
        for sched in HELD_TABLES
    ]
    start(l4lb, *services)
    for ls in services:
        got = [ls.open().name for _ in range(24)]
        assert got == HELD_TABLES[ls.name], ls.name
        assert got == ls.expected, ls.name
        counts = Counter(got)
        assert ls.counters() == {s.address: (counts[s.name], 0, False) for s in servers}


def test_least_connection_with_closed_and_reset_connections(l4lb, named_backends, lockstep):
    servers = named_backends(4, hold=True)
    weights = [3, 1, 0, 2]
    services = [
        lockstep(sched, sched, [Backend(s, w) for s, w in zip(servers, weights, strict=True)])
        for sched in ("lc", "wlc", "sed", "nq")
    ]
    start(l4lb, *services)
    for ls in services:
        rng = random.Random(f"{ls.name}-mix")
        for _ in range(40):
            r = rng.random()
            if ls.held and r < 0.3:  # inactive for the rest of the test: still in T
                ls.close(rng.choice(ls.held))
            elif ls.held and r < 0.4:  # gone after RESET_INACTIVE
                ls.close(rng.choice(ls.held), reset=True)
            else:
                ls.open()
            assert ls.counters() == ls.model_counters(), ls.name
        assert ls.observed == ls.expected, ls.name
        assert "b2" not in ls.observed, ls.name  # weight 0
    assert servers[2].accepted == 0


def test_overhead_counts_inactive_connections_as_a_shl_8_plus_t(l4lb, named_backends, lockstep):
    """§5: overhead = (A << 8) + T. The last pick of each service would differ under the
    pre-6.1.187 formula (A << 8) + I."""
    b0, b1 = named_backends(2, hold=True)
    lc = lockstep("lc", "lc", [Backend(b0), Backend(b1)])
    wlc = lockstep("wlc", "wlc", [Backend(b0, 1), Backend(b1, 128)])
    start(l4lb, lc, wlc)
    # lc: b1 holds 1 active (257); 256 connections closed on b0 (256 < 257 each time).
    assert lc.open().name == "b1"
    assert lc.picks(256) == ["b0"] * 256
    assert lc.open().name == "b0"  # 256 < 257; with A << 8 + I it is a tie -> b1
    assert lc.counters()[b0.address] == (1, 256, False)
    # wlc: b1 (weight 128) 1 active vs b0 (weight 1) 2 inactive: 257 * 1 > 2 * 128.
    assert wlc.open().name == "b1"
    assert wlc.picks(2) == ["b0", "b0"]
    assert wlc.open().name == "b0"  # 256 * 1 > 2 * 128 would be false -> b1
    assert lc.observed == lc.expected and wlc.observed == wlc.expected


# --------------------------------------------------------------------------- sh


def sh_bucket(ip: str, port: int = 0) -> int:
    """§9: hash_32 of the address (IPv6: XOR of its words; plus the port with sh-port)."""
    if ":" in ip:
        v = int.from_bytes(socket.inet_pton(socket.AF_INET6, ip), "big")
        key = (v >> 96 ^ v >> 64 ^ v >> 32 ^ v) & 0xFFFFFFFF
    else:
        key = int.from_bytes(socket.inet_aton(ip), "big")
    return (((key + port) & 0xFFFFFFFF) * 0x61C88647 & 0xFFFFFFFF) >> 24


SOURCES = [f"127.1.{x}.{y}" for x in range(2) for y in range(1, 151)]  # 300 clients


def test_sh_maps_300_sources_by_weight(l4lb, named_backends, lockstep):
    servers = named_backends(3)
    ls = lockstep("web", "sh", [Backend(s, w) for s, w in zip(servers, [1, 2, 3], strict=True)])
    start(l4lb, ls)
    got = [ls.pick(source=src) for src in SOURCES]
    # §10: [1, 2, 3] over order b2 b1 b0 fills the buckets b2 b2 b2 b1 b1 b0, repeating.
    run = table("b2 b2 b2 b1 b1 b0")
    assert got == [run[sh_bucket(src) % 6] for src in SOURCES]
    assert got == ls.expected
    # A source always maps to the same backend.
    assert [ls.pick(source=src) for src in SOURCES[:20]] == got[:20]


def test_sh_weight_zero_refuses_its_clients_with_a_reset(l4lb, named_backends, lockstep):
    servers = named_backends(3)
    ls = lockstep("web", "sh", [Backend(s, w) for s, w in zip(servers, [1, 0, 1], strict=True)])
    start(l4lb, ls)
    got = [ls.pick(source=src) for src in SOURCES]
    # §10: b1 keeps its buckets (one in three) and its clients are refused.
    assert got == [[*table("b2"), None, "b0"][sh_bucket(src) % 3] for src in SOURCES]
    assert got == ls.expected
    refused = got.count(None)
    assert refused > 50
    assert servers[1].accepted == 0
    assert ls.doc()["rejected"] == refused


def test_sh_fallback_respreads_weight_zero_clients(l4lb, named_backends, lockstep):
    servers = named_backends(3)
    backends = [Backend(s, w) for s, w in zip(servers, [1, 0, 3], strict=True)]
    ls = lockstep("web", "sh", backends, options={"sh_fallback": True})
    start(l4lb, ls)
    got = [ls.pick(source=src) for src in SOURCES]
    assert None not in got and "b1" not in got
    assert got == ls.expected
    # Clients whose home bucket is usable keep it (order b2 b1 b0: b2 b2 b2 b1 b0).
    home = table("b2 b2 b2 b1 b0")
    for src, name in zip(SOURCES, got, strict=True):
        if home[sh_bucket(src) % 5] != "b1":
            assert name == home[sh_bucket(src) % 5], src
    assert servers[1].accepted == 0 and ls.doc()["rejected"] == 0


def test_sh_port_hashes_the_client_port_too(l4lb, named_backends, lockstep):
    servers = named_backends(3)
    ls = lockstep("web", "sh", [Backend(s) for s in servers], options={"sh_port": True})
    start(l4lb, ls)
    ports = []
    for _ in range(90):
        held = ls.open(source="127.1.9.9")
        assert held.sock is not None
        ports.append(held.sock.getsockname()[1])
        ls.close(held)
    run = table("b2 b1 b0")
    assert ls.observed == [run[sh_bucket("127.1.9.9", p) % 3] for p in ports]
    assert ls.observed == ls.expected
    assert set(ls.observed) == {"b0", "b1", "b2"}  # one source, three backends


def test_sh_over_ipv6_hashes_the_folded_address_and_port(l4lb, named_backends, lockstep):
    servers = named_backends(3, host="::1")
    backends = [Backend(s, w) for s, w in zip(servers, [1, 2, 3], strict=True)]
    ls = lockstep("web", "sh", backends, listen="[::1]:0", options={"sh_port": True})
    start(l4lb, ls)
    ports = []
    for _ in range(60):
        held = ls.open(source="::1")
        assert held.sock is not None
        ports.append(held.sock.getsockname()[1])
        ls.close(held)
    run = table("b2 b2 b2 b1 b1 b0")
    assert ls.observed == [run[sh_bucket("::1", p) % 6] for p in ports]
    assert ls.observed == ls.expected
    assert set(ls.observed) == {"b0", "b1", "b2"}


# --------------------------------------------------------------------------- dh

DESTINATIONS = [f"127.2.{x}.{y}" for x in range(2) for y in range(1, 151)]  # 300 addresses


def test_dh_maps_300_destination_addresses(l4lb, named_backends, lockstep):
    servers = named_backends(3)
    services = [
        lockstep(
            name,
            "dh",
            [Backend(s, w) for s, w in zip(servers, ws, strict=True)],
            listen="0.0.0.0:0",
        )
        for name, ws in (("even", [1, 1, 1]), ("weighted", [1, 2, 3]), ("quiesced", [1, 0, 1]))
    ]
    start(l4lb, *services)
    even, weighted, quiesced = ([ls.pick(host=dst) for dst in DESTINATIONS] for ls in services)
    # §11: bucket i -> dests[i % 3] in list order, weights ignored; the key is the
    # address the client dialled; weight 0 refuses its share, without fallback.
    run = table("b2 b1 b0")
    assert even == [run[sh_bucket(dst) % 3] for dst in DESTINATIONS]
    assert weighted == even
    assert quiesced == [None if name == "b1" else name for name in even]
    for ls in services:
        assert ls.observed == ls.expected
    assert services[2].doc()["rejected"] == even.count("b1") > 50


# --------------------------------------------------------------------------- thresholds


def test_thresholds_skip_overloaded_backends_until_below_the_lower(l4lb, named_backends, lockstep):
    b0, b1, b2 = named_backends(3, hold=True)
    # Order b2 b1 b0. b1: upper 2, lower 1. b2: upper 4, default lower 4 - (4 >> 2) = 3.
    ls = lockstep("web", "rr", [Backend(b0), Backend(b1, upper=2, lower=1), Backend(b2, upper=4)])
    start(l4lb, ls)

    def on(server: NamedServer) -> list[Held]:
        return [h for h in ls.held if h.name == server.name]

    def overloaded() -> dict[str, bool]:
        return {s.name: ls.counters()[s.address][2] for s in (b0, b1, b2)}

    opened = [ls.open().name for _ in range(9)]
    # b1 reaches T = 2 on the 5th pick, b2 T = 4 on the 9th; both are skipped meanwhile.
    assert opened == table("b2 b1 b0 b2 b1 b0 b2 b0 b2")
    assert overloaded() == {"b0": False, "b1": True, "b2": True}
    assert [ls.open().name for _ in range(3)] == ["b0"] * 3
    # A graceful close leaves the connection inactive, still counted: b2 stays overloaded.
    ls.close(on(b2)[0])
    assert overloaded()["b2"] and ls.open().name == "b0"
    # Resets end connections for good. b1: T 2 -> 1 is not below lower 1 ... 1 -> 0 is.
    ls.close(on(b1)[0], reset=True)
    assert overloaded()["b1"] and ls.open().name == "b0"
    ls.close(on(b1)[0], reset=True)
    assert not overloaded()["b1"] and ls.open().name == "b1"
    # b2: T 4 -> 3 keeps the flag, 3 -> 2 (below l_val 3) clears it.
    ls.close(on(b2)[0], reset=True)
    assert overloaded()["b2"]
    assert ls.open().name == "b0"
    ls.close(on(b2)[0], reset=True)
    assert not overloaded()["b2"]
    assert [ls.open().name for _ in range(3)] == ["b2", "b1", "b0"]
    assert ls.observed == ls.expected
    assert ls.counters() == ls.model_counters()


# --------------------------------------------------------------------------- weight 0


def test_weight_zero_gets_no_new_connections_with_every_scheduler(l4lb, named_backends, lockstep):
    b0, b1, b2 = named_backends(3, hold=True)
    services = {
        sched: lockstep(
            sched,
            sched,
            [Backend(b0, 2), Backend(b1, 0), Backend(b2, 1)],
            listen="0.0.0.0:0" if sched == "dh" else "127.0.0.1:0",
        )
        for sched in ("rr", "wrr", "lc", "wlc", "sed", "nq", "sh", "dh")
    }
    start(l4lb, *services.values())
    for i in range(36):
        for sched, ls in services.items():
            if sched == "sh":
                ls.open(source=SOURCES[i])
            elif sched == "dh":
                ls.open(host=DESTINATIONS[i])
            else:
                ls.open()
    for sched, ls in services.items():
        assert "b1" not in ls.observed, sched
        assert ls.observed == ls.expected, sched
        assert {"b0", "b2"} <= set(ls.observed), sched
    # sh and dh refuse the clients of b1's buckets; the others never pick it at all.
    assert None in services["sh"].observed and None in services["dh"].observed
    assert all(None not in services[s].observed for s in ("rr", "wrr", "lc", "wlc", "sed", "nq"))
    assert b1.accepted == 0
