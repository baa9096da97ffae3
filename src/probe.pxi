# TCP connect checks in C (src/probe.c), for the health checker.
#
# Included textually from _dataplane.pyx.  Python hands over a batch of
# probes in one call and takes the finished ones back in one call; the
# connects, the polling and the timeouts run without the GIL.

from libc.stdint cimport int32_t, int64_t
from libc.stdlib cimport realloc
from libc.string cimport memcpy


cdef extern from "probe.h" nogil:
    int L4_PROBE_TIMEOUT

    struct l4_probe_req:
        int64_t id
        uint8_t addr[16]
        uint16_t family
        uint16_t port
        uint32_t timeout_ms

    struct l4_probe_result:
        int64_t id
        int32_t err
        uint32_t elapsed_us

    struct l4_prober:
        pass

    l4_prober *l4_prober_new() noexcept
    void l4_prober_free(l4_prober *p) noexcept
    int l4_prober_fd(const l4_prober *p) noexcept
    uint32_t l4_prober_inflight(const l4_prober *p) noexcept
    int l4_prober_submit(l4_prober *p, const l4_probe_req *reqs, uint32_t n) noexcept
    int l4_prober_poll(l4_prober *p, uint32_t max) noexcept
    const l4_probe_result *l4_prober_results(const l4_prober *p, uint32_t *n) noexcept
    void l4_prober_consume(l4_prober *p) noexcept


PROBE_TIMEOUT = L4_PROBE_TIMEOUT
#: Longest timeout a probe may have, in milliseconds (one day).
cdef long long _PROBE_MAX_TIMEOUT_MS = 86400000
PROBE_MAX_TIMEOUT_MS = _PROBE_MAX_TIMEOUT_MS
cdef long long _PROBE_AF_INET = _socket.AF_INET
cdef long long _PROBE_AF_INET6 = _socket.AF_INET6


cdef class Prober:
    """TCP connect checks on an epoll set of their own, timeouts included.

    :meth:`submit` starts a batch of connects, each given as ``(id, family,
    packed address, port, timeout_ms)`` with the address as
    :func:`socket.inet_pton` packs it; every connect ends with a reset
    (SO_LINGER 0), so no TIME_WAIT is left behind.  :meth:`fileno` becomes
    readable when results are waiting and :meth:`collect` returns them as
    ``(id, err, seconds)``: ``err`` is 0 when the connect succeeded, an errno
    when it failed, or :data:`PROBE_TIMEOUT` when the timeout fell due first.
    Each submitted probe yields exactly one result, unless the prober is
    closed first.
    """

    cdef l4_prober *p
    cdef l4_probe_req *reqs
    cdef uint32_t reqs_cap

    def __cinit__(self):
        self.p = l4_prober_new()
        if self.p == NULL:
            raise OSError(_errno.ENOMEM, "cannot create the prober")

    def __dealloc__(self):
        l4_prober_free(self.p)
        self.p = NULL
        free(self.reqs)
        self.reqs = NULL

    cdef l4_prober *_open(self) except NULL:
        if self.p == NULL:
            raise ValueError("the prober is closed")
        return self.p

    def fileno(self):
        """The fd to watch for readability (the prober's epoll set)."""
        return l4_prober_fd(self._open())

    @property
    def inflight(self):
        """Probes started and not yet collected."""
        return l4_prober_inflight(self._open())

    def close(self):
        """Close every socket in flight, unreported, and release the prober."""
        l4_prober_free(self.p)
        self.p = NULL

    cdef int _fill(self, Py_ssize_t i, object probe) except -1:
        cdef l4_probe_req *r = &self.reqs[i]
        cdef tuple t
        cdef bytes addr
        cdef long long pid, family, port, timeout_ms
        cdef Py_ssize_t size
        if type(probe) is not tuple or len(<tuple>probe) != 5:
            raise ValueError(f"probe {i}: expected (id, family, address, port, timeout_ms), "
                             f"got {probe!r}")
        t = <tuple>probe
        try:
            if not (isinstance(t[0], int) and isinstance(t[1], int) and isinstance(t[3], int)
                    and isinstance(t[4], int)):
                raise TypeError()
            pid, family, port, timeout_ms = t[0], t[1], t[3], t[4]
        except (TypeError, OverflowError):
            raise ValueError(f"probe {i}: id, family, port and timeout_ms must be ints, "
                             f"got {probe!r}") from None
        if family == _PROBE_AF_INET:
            size = 4
        elif family == _PROBE_AF_INET6:
            size = 16
        else:
            raise ValueError(f"probe {i}: family must be AF_INET or AF_INET6, got {family}")
        if type(t[2]) is not bytes or len(<bytes>t[2]) != size:
            raise ValueError(f"probe {i}: address must be {size} packed bytes for "
                             f"{_socket.AddressFamily(family).name}, got {t[2]!r}")
        if not 1 <= port <= 65535:
            raise ValueError(f"probe {i}: port must be 1..65535, got {port}")
        if not 1 <= timeout_ms <= _PROBE_MAX_TIMEOUT_MS:
            raise ValueError(f"probe {i}: timeout_ms must be 1..{_PROBE_MAX_TIMEOUT_MS}, "
                             f"got {timeout_ms}")
        addr = <bytes>t[2]
        r.id = pid
        r.family = <uint16_t>family
        r.port = <uint16_t>port
        r.timeout_ms = <uint32_t>timeout_ms
        memcpy(r.addr, <const char *>addr, size)
        return 0

    def submit(self, probes):
        """Start every probe of the list ``probes``; returns how many results
        can be collected at once (connects that failed immediately).

        The whole list is checked before anything starts: a bad entry raises
        ValueError naming it, and no probe of the list runs."""
        cdef l4_prober *p = self._open()
        cdef Py_ssize_t i, n
        cdef int rc
        cdef void *grown
        if not isinstance(probes, list):
            raise ValueError(f"probes must be a list, got {type(probes).__name__}")
        n = len(<list>probes)
        if n == 0:
            return 0
        if <size_t>n > self.reqs_cap:
            grown = realloc(self.reqs, <size_t>n * sizeof(l4_probe_req))
            if grown == NULL:
                raise MemoryError()
            self.reqs = <l4_probe_req *>grown
            self.reqs_cap = <uint32_t>n
        for i in range(n):
            self._fill(i, (<list>probes)[i])
        with nogil:
            rc = l4_prober_submit(p, self.reqs, <uint32_t>n)
        return _check(rc, "probe submit")

    def collect(self, uint32_t limit=4294967295):
        """The results ready now, as a list of ``(id, err, seconds)``; at most
        ``limit`` of them (the rest keep :meth:`fileno` readable)."""
        cdef l4_prober *p = self._open()
        cdef const l4_probe_result *res
        cdef uint32_t n, i
        cdef int rc
        with nogil:
            rc = l4_prober_poll(p, limit)
        _check(rc, "probe poll")
        res = l4_prober_results(p, &n)
        out = [(res[i].id, res[i].err, res[i].elapsed_us * 1e-6) for i in range(n)]
        l4_prober_consume(p)
        return out
