# cython: language_level=3, embedsignature=True, boundscheck=False, wraparound=False
# cython: initializedcheck=False, cdivision=True
"""The l4lb data plane: C worker threads that accept, schedule and splice.

This module is the whole boundary between Python and C.  Python owns
configuration and calls in with the GIL held; C owns sockets and bytes and
never calls back.  What crosses:

1. Listening sockets: Python creates them and passes ``sock.detach()`` fds to
   :meth:`Dataplane.add_listener`; from then on C owns and closes them.
2. Worker threads: Python starts one thread per worker running
   :meth:`Dataplane.run_worker`, which releases the GIL for the thread's life.
3. Services and their destinations, as IPVS-style operations
   (:meth:`service_configure`, :meth:`dest_add`, :meth:`dest_edit`,
   :meth:`dest_del`), each applied under the service's lock.  Destinations
   live in slots with stable ids chosen by Python, so counters survive
   list changes.
   A service's VIP list (:meth:`service_vips`) is published as a whole.
4. Counters flow back as plain tuples (:meth:`service_stats`,
   :meth:`slot_stats`, :meth:`vip_stats`, :meth:`worker_stats`).
5. Errors: every C function returns a negative errno, raised here as OSError.
"""

import errno as _errno
import os as _os
import socket as _socket

from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc

include "includes/l4lb.pxi"


_PROXY_VERSIONS = {None: 0, "v1": 1, "v2": 2}


cdef inline int _check(int rc, str what) except -1:
    if rc < 0:
        raise OSError(-rc, f"{what}: {_os.strerror(-rc)}")
    return rc


cdef socklen_t _sockaddr(str host, int port, sockaddr_storage *ss) except 0:
    cdef bytes packed
    cdef int family = _socket.AF_INET6 if ":" in host else _socket.AF_INET
    if not 0 <= port <= 65535:
        raise ValueError(f"port out of range: {port}")
    packed = _socket.inet_pton(family, host)
    return l4_sockaddr_fill(ss, family, <const uint8_t *>packed, <uint16_t>port)


cdef class Dataplane:
    """The data plane: ``workers`` epoll loops sharing service tables.

    Invariants:
    1. ``l4_dp_free`` runs only when no worker thread is inside
       ``run_worker`` (a running worker keeps the object alive).
    2. Services and slots, once created, live as long as the data plane.
    """

    cdef l4_dp *dp
    cdef readonly int workers
    cdef readonly int pipe_size
    cdef int running

    def __cinit__(self, int workers=1, *, int max_services=65536, int max_slots=262144,
                  int pipe_size=65536, int max_pipes=0, double inactive_timeout=120.0,
                  double reset_inactive_timeout=10.0, bint splice=True):
        if not 1 <= workers <= 256:
            raise ValueError(f"workers must be 1..256, got {workers}")
        if pipe_size < 4096:
            raise ValueError(f"pipe_size must be at least 4096, got {pipe_size}")
        if max_pipes <= 0:
            max_pipes = 1024
        self.dp = l4_dp_new(workers, max_services, max_slots, pipe_size, max_pipes,
                            <uint32_t>(inactive_timeout * 1000),
                            <uint32_t>(reset_inactive_timeout * 1000), splice)
        if self.dp == NULL:
            raise OSError(_errno.ENOMEM, "cannot create the data plane")
        self.workers = workers
        self.pipe_size = pipe_size

    def __dealloc__(self):
        if self.dp != NULL and self.running == 0:
            l4_dp_free(self.dp)
        self.dp = NULL

    # ------------------------------------------------------------ workers

    def run_worker(self, int index):
        """Run worker ``index``'s event loop until :meth:`stop` (blocking)."""
        cdef int rc
        cdef l4_worker *w
        if not 0 <= index < self.workers:
            raise IndexError(index)
        w = self.dp.workers[index]
        self.running += 1
        try:
            with nogil:
                rc = l4_worker_run(w)
        finally:
            self.running -= 1
        _check(rc, f"worker {index}")

    cdef l4_worker *_worker(self, int index) except NULL:
        if not 0 <= index < self.workers:
            raise IndexError(f"no worker {index}")
        return self.dp.workers[index]

    def add_listener(self, int worker, int svc_id, int fd):
        """Hand listening socket ``fd`` to ``worker`` for service ``svc_id``.

        The data plane owns the fd from now on (even when this raises)."""
        cdef l4_worker *w = self._worker(worker)
        _check(l4_worker_command(w, L4_CMD_ADD_LISTENER, fd, svc_id), "add_listener")

    def remove_listeners(self, int svc_id):
        """Close every worker's listeners of service ``svc_id``."""
        cdef int i
        for i in range(self.workers):
            _check(l4_worker_command(self.dp.workers[i], L4_CMD_DEL_LISTENERS, -1, svc_id),
                   "remove_listeners")

    def reset_slot(self, int slot_id):
        """Reset (RST both sides) every connection to destination slot ``slot_id``."""
        cdef int i
        for i in range(self.workers):
            _check(l4_worker_command(self.dp.workers[i], L4_CMD_RESET_SLOT, -1, slot_id),
                   "reset_slot")

    def drain(self):
        """Stop accepting everywhere; open connections go on."""
        cdef int i
        for i in range(self.workers):
            _check(l4_worker_command(self.dp.workers[i], L4_CMD_DRAIN, -1, 0), "drain")

    def stop(self):
        """Make every worker reset its connections and return."""
        cdef int i
        for i in range(self.workers):
            _check(l4_worker_command(self.dp.workers[i], L4_CMD_STOP, -1, 0), "stop")

    # ----------------------------------------------------------- services

    cdef l4_service *_service(self, int svc_id, bint create=False) except NULL:
        cdef l4_service *svc
        if create:
            svc = l4_dp_service_get(self.dp, svc_id)
        else:
            svc = l4_dp_service(self.dp, svc_id)
        if svc == NULL:
            raise KeyError(f"no service {svc_id}")
        return svc

    cdef l4_slot *_slot(self, int slot_id) except NULL:
        cdef l4_slot *slot = l4_dp_slot(self.dp, slot_id)
        if slot == NULL:
            raise KeyError(f"no slot {slot_id}")
        return slot

    def service_configure(self, int svc_id, str scheduler, *, int flags=0,
                          double persist_timeout=0.0, int netmask4=32, int netmask6=128,
                          bint expire_quiescent=False, double connect_timeout=3.0,
                          double idle_timeout=900.0, int retries=-1, send_proxy=None,
                          long long max_connections=0):
        """Create or reconfigure service ``svc_id`` (IPVS semantics: the same
        scheduler keeps its state, a different one starts afresh).

        ``send_proxy`` ("v1", "v2" or None) prefixes every backend connection
        with a PROXY protocol header; ``max_connections`` (0 = unlimited)
        caps the service's active client connections over all workers."""
        cdef l4_service *svc
        cdef bytes name = scheduler.encode()
        cdef uint8_t proxy
        if not 0 <= netmask4 <= 32 or not 0 <= netmask6 <= 128:
            raise ValueError("netmask out of range")
        if send_proxy not in _PROXY_VERSIONS:
            raise ValueError(f"send_proxy must be 'v1', 'v2' or None, got {send_proxy!r}")
        if not 0 <= max_connections <= 0xFFFFFFFF:
            raise ValueError(f"max_connections out of range: {max_connections}")
        proxy = _PROXY_VERSIONS[send_proxy]
        svc = self._service(svc_id, True)
        rc = l4_service_configure(svc, name, <uint32_t>flags,
                                  <uint32_t>(persist_timeout * 1000), <uint8_t>netmask4,
                                  <uint8_t>netmask6, expire_quiescent)
        if rc == -_errno.ENOENT:
            raise ValueError(f"unknown scheduler {scheduler!r}")
        _check(rc, "service_configure")
        svc.connect_timeout_ms = <uint32_t>max(1.0, connect_timeout * 1000)
        svc.idle_timeout_ms = <uint32_t>max(1.0, idle_timeout * 1000)
        svc.retries = retries
        _check(l4_service_set_limits(svc, proxy, <uint32_t>max_connections), "service_configure")

    def service_vips(self, int svc_id, vips):
        """Publish the service's VIPs, ``[(family, packed address, port), ...]``;
        connections are counted per VIP from now on (an empty list stops it)."""
        cdef l4_service *svc = self._service(svc_id)
        cdef list items = list(vips)
        cdef uint32_t n = len(items), i, j
        cdef l4_vip *buf
        cdef bytes packed
        if n > L4_MAX_VIPS:
            raise ValueError(f"at most {L4_MAX_VIPS} VIPs per service, got {n}")
        buf = <l4_vip *>calloc(max(n, 1), sizeof(l4_vip))
        if buf == NULL:
            raise MemoryError()
        try:
            for i in range(n):
                family, packed, port = items[i]
                if (family, len(packed)) not in ((_socket.AF_INET, 4), (_socket.AF_INET6, 16)):
                    raise ValueError(f"VIP {i}: bad family {family} or address length")
                if not 0 <= port <= 65535:
                    raise ValueError(f"VIP {i}: port out of range: {port}")
                buf[i].family = <uint8_t>family
                buf[i].port = <uint16_t>port
                for j in range(len(packed)):
                    buf[i].addr[j] = packed[j]
            _check(l4_service_set_vips(svc, buf, n), "service_vips")
        finally:
            free(buf)

    def service_clear(self, int svc_id):
        """Delete every destination of the service and mark it unused."""
        l4_service_clear(self._service(svc_id))

    def service_reset_counters(self, int svc_id):
        """Zero a quiescent service's cumulative counters before its id is reused."""
        l4_service_reset_counters(self._service(svc_id))

    def dest_add(self, int svc_id, int slot_id, str host, int port, int weight,
                 int upper=0, int lower=0):
        """Add destination host:port in slot ``slot_id`` at the list head."""
        cdef sockaddr_storage ss
        cdef socklen_t len = _sockaddr(host, port, &ss)
        cdef l4_service *svc = self._service(svc_id)
        _check(l4_dp_slot_set(self.dp, slot_id, <sockaddr *>&ss, len), "slot")
        _check(l4_dest_add(svc, self._slot(slot_id), weight, upper, lower), "dest_add")

    def dest_edit(self, int svc_id, int slot_id, int weight, int upper=0, int lower=0):
        """Change a destination's weight and thresholds (an IPVS edit)."""
        _check(l4_dest_edit(self._service(svc_id), self._slot(slot_id), weight, upper, lower),
               "dest_edit")

    def dest_del(self, int svc_id, int slot_id):
        """Unlink a destination; its connections go on and its slot stays."""
        _check(l4_dest_del(self._service(svc_id), self._slot(slot_id)), "dest_del")

    def dest_order(self, int svc_id):
        """Slot ids of the service's destinations in list (IPVS) order."""
        cdef l4_service *svc = self._service(svc_id)
        cdef int n = l4_service_dest_ids(svc, NULL, 0), i
        cdef uint32_t *buf = <uint32_t *>malloc(max(n, 1) * sizeof(uint32_t))
        if buf == NULL:
            raise MemoryError()
        try:
            n = min(n, l4_service_dest_ids(svc, buf, n))
            return [buf[i] for i in range(n)]
        finally:
            free(buf)

    # ----------------------------------------------------------- counters

    def service_stats(self, int svc_id):
        """(accepted, active, rejected, failed, templates, limit_rejected) of one
        service; accepted includes the connections refused."""
        cdef l4_service *svc = self._service(svc_id)
        templates = l4_persist_count(svc.persist) if svc.persist != NULL else 0
        return (svc.accepted, svc.active, svc.rejected, svc.failed, templates,
                svc.limit_rejected)

    def vip_stats(self, int svc_id):
        """([connections per VIP, in :meth:`service_vips` order], other) of one
        service: "other" counts connections to an address not in the list."""
        cdef l4_service *svc = self._service(svc_id)
        cdef uint64_t other = 0
        cdef int n = l4_service_vip_stats(svc, NULL, 0, &other), i
        cdef uint64_t *buf = <uint64_t *>malloc(max(n, 1) * sizeof(uint64_t))
        if buf == NULL:
            raise MemoryError()
        try:
            n = min(n, l4_service_vip_stats(svc, buf, n, &other))
            return [buf[i] for i in range(n)], other
        finally:
            free(buf)

    def slot_stats(self, int slot_id):
        """(active, inactive, conns, bytes_in, bytes_out, connect_errors,
        consecutive_failures, persist) of one destination slot."""
        cdef l4_slot *s = self._slot(slot_id)
        cdef int active = s.active
        cdef int total = s.total
        return (active, max(total - active, 0), s.conns, s.bytes_in, s.bytes_out,
                s.connect_errors, s.consec_failures, s.persist)

    def slot_overloaded(self, int svc_id, int slot_id):
        """Whether the destination is over its upper threshold (IPVS OVERLOAD)."""
        return bool(l4_slot_overloaded(self._service(svc_id), self._slot(slot_id)))

    def worker_stats(self):
        """Summed (connections, pipes_used, pipes_free, accept_errors,
        emfile_pauses) over all workers."""
        cdef int i
        cdef l4_worker *w
        totals = [0, 0, 0, 0, 0]
        for i in range(self.workers):
            w = self.dp.workers[i]
            totals[0] += w.nconns
            totals[1] += w.pipes_used
            totals[2] += w.pipes_free
            totals[3] += w.accept_errors
            totals[4] += w.emfile_pauses
        return tuple(totals)


include "probe.pxi"
include "testhelper.pxi"
