"""Drive the C schedulers through the extension's test hooks, model-shaped.

:class:`CService` offers the operations of :class:`ipvs_model.Service` on a
real :class:`l4lb._dataplane.Dataplane` service, so a test can run the same
steps on both and compare every decision and counter.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import ipvs_model as m

from l4lb import _dataplane as _dp

SVC = 1


def backend(slot: int) -> tuple[str, int]:
    """A fixed backend address per slot id, so re-adding revives the slot."""
    return "127.0.0.1", 20000 + slot


@dataclass(frozen=True)
class Counters:
    """What IPVS shows per dest: A, I, persistent templates, OVERLOAD."""

    active: int
    inactive: int
    persist: int
    overload: bool


class CService:
    """One service of a fresh data plane (no workers started)."""

    def __init__(self, sched: str = "rr", **opts: int | bool) -> None:
        self.dp = _dp.Dataplane(1)
        self.configure(sched, **opts)

    def configure(
        self,
        sched: str,
        *,
        flags: int = 0,
        persist_timeout_ms: int = 0,
        netmask4: int = 32,
        netmask6: int = 128,
        expire_quiescent: bool = False,
    ) -> None:
        """Same arguments as the model's; the timeout in ms."""
        self.dp.service_configure(
            SVC,
            sched,
            flags=flags,
            persist_timeout=persist_timeout_ms / 1000,
            netmask4=netmask4,
            netmask6=netmask6,
            expire_quiescent=expire_quiescent,
        )

    def add(self, id: int, weight: int, u: int = 0, lo: int = 0) -> None:
        host, port = backend(id)
        self.dp.dest_add(SVC, id, host, port, weight, u, lo)

    def edit(self, id: int, weight: int, u: int = 0, lo: int = 0) -> None:
        self.dp.dest_edit(SVC, id, weight, u, lo)

    def delete(self, id: int) -> None:
        self.dp.dest_del(SVC, id)

    def order(self) -> list[int]:
        return list(self.dp.dest_order(SVC))

    def connect(
        self, c: m.Conn, now: int = 0, exclude: tuple[int, ...] = (), retry: bool = False
    ) -> tuple[int | None, int]:
        """(slot id or None if refused, template handle)."""
        slot, tmpl = _dp._testhelper_connect(
            self.dp, SVC, c.client, c.cport, c.daddr, 0, now, exclude, retry
        )
        return (None if slot < 0 else slot), tmpl

    def pick(self, client: str = "10.0.0.1", cport: int = 0, daddr: str = "") -> int | None:
        """A connection that is held open for good."""
        return self.connect(m.Conn(client, cport, daddr))[0]

    def deactivate(self, id: int) -> None:
        _dp._testhelper_deactivate(self.dp, id)

    def unbind(self, id: int, tmpl: int = 0, now: int = 0) -> None:
        _dp._testhelper_unbind(self.dp, SVC, id, tmpl, now)

    def close(self, id: int, tmpl: int = 0, now: int = 0) -> None:
        """Deactivate and unbind at once."""
        _dp._testhelper_close(self.dp, SVC, id, True, tmpl, now)

    def expire(self, now: int) -> None:
        _dp._testhelper_persist_expire(self.dp, SVC, now)

    def persist_count(self) -> int:
        return int(_dp._testhelper_persist_count(self.dp, SVC))

    def counters(self, id: int) -> Counters:
        st = self.dp.slot_stats(id)
        return Counters(st[0], st[1], st[7], bool(self.dp.slot_overloaded(SVC, id)))


def model_counters(d: m.Dest) -> Counters:
    """The model's dest in the same shape."""
    return Counters(d.active, d.inactive, d.persist, d.overload)


class Both:
    """A model service and a C service run in lock step; every call checks
    that they agree and returns the model's answer."""

    def __init__(self, sched: str = "rr", **opts: int | bool) -> None:
        self.m = m.Service(sched, **opts)
        self.c = CService(sched, **opts)

    def configure(self, sched: str, **opts: int | bool) -> None:
        self.m.configure(sched, **opts)
        self.c.configure(sched, **opts)

    def add(self, id: int, weight: int, u: int = 0, lo: int = 0) -> None:
        self.m.add(id, weight, u, lo)
        self.c.add(id, weight, u, lo)
        self.check()

    def edit(self, id: int, weight: int, u: int = 0, lo: int = 0) -> None:
        self.m.edit(id, weight, u, lo)
        self.c.edit(id, weight, u, lo)
        self.check()

    def delete(self, id: int) -> None:
        self.m.delete(id)
        self.c.delete(id)
        self.check()

    def connect(self, c: m.Conn, now: int = 0) -> tuple[m.Dest | None, m.Template | None, int]:
        """Returns the model's (dest, template) and the C template handle."""
        md, mt = self.m.connect(c, now)
        cid, ct = self.c.connect(c, now)
        assert cid == (md.id if md else None), f"{c}: C picked {cid}, model {md}"
        assert (ct != 0) == (mt is not None)
        self.check()
        return md, mt, ct

    def pick(self, client: str = "10.0.0.1", cport: int = 0, daddr: str = "") -> int | None:
        md, _, _ = self.connect(m.Conn(client, cport, daddr))
        return md.id if md else None

    def deactivate(self, id: int) -> None:
        self.m.deactivate(self.m.slots[id])
        self.c.deactivate(id)
        self.check()

    def unbind(self, id: int, mt: m.Template | None, ct: int, now: int = 0) -> None:
        self.m.unbind(self.m.slots[id], mt, now)
        self.c.unbind(id, ct, now)
        self.check()

    def close(self, id: int, mt: m.Template | None = None, ct: int = 0, now: int = 0) -> None:
        self.deactivate(id)
        self.unbind(id, mt, ct, now)

    def expire(self, now: int) -> None:
        self.m.expire(now)
        self.c.expire(now)
        self.check(persist=True)
        assert self.c.persist_count() == self.m.persistence.count()

    def check(self, persist: bool = False) -> None:
        """Compare list order and counters.  Template counts only agree right
        after a sweep: C frees dead templates lazily, the model on time."""
        assert self.c.order() == self.m.order()
        for id, d in self.m.slots.items():
            got, want = self.c.counters(id), model_counters(d)
            if not persist:
                got, want = replace(got, persist=0), replace(want, persist=0)
            assert got == want, f"slot {id}"
