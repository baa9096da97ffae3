# Test and benchmark hooks for the schedulers and persistence.
#
# Included textually at the end of _dataplane.pyx.  They drive
# l4_service_schedule() exactly as a worker does for a new connection, without
# sockets, so that tests can compare every decision with a reference model.
# Time is passed explicitly (now_ms) wherever persistence needs a clock.
#
# A connection is identified by (slot id, template handle); the handle is the
# controlling template's address as an int (0 for none), valid for as long as
# that connection has not been unbound.

from libc.stdint cimport uintptr_t
from libc.string cimport memset
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec


cdef extern from "l4lb.h" nogil:
    cdef int L4_PROXY_MAX
    size_t l4_proxy_header(int version, const l4_pick_ctx *ctx, uint8_t *buf,
                           size_t cap) noexcept
    void l4_persist_expire(l4_service *svc, uint64_t now_ms) noexcept
    uint32_t l4_hash_32(uint32_t v, unsigned bits) noexcept
    uint32_t l4_addr_key(uint8_t family, const uint8_t *a) noexcept


cdef extern from *:
    """
    /* Persistence calls expect the service lock to be held. */
    static void l4_testhelper_expire(struct l4_service *svc, uint64_t now_ms)
    {
        pthread_mutex_lock(&svc->lock);
        l4_persist_expire(svc, now_ms);
        pthread_mutex_unlock(&svc->lock);
    }

    static uint32_t l4_testhelper_persist_count(struct l4_service *svc)
    {
        uint32_t n;

        pthread_mutex_lock(&svc->lock);
        n = l4_persist_count(svc->persist);
        pthread_mutex_unlock(&svc->lock);
        return n;
    }
    """
    void l4_testhelper_expire(l4_service *svc, uint64_t now_ms) noexcept nogil
    uint32_t l4_testhelper_persist_count(l4_service *svc) noexcept nogil


cdef int _testhelper_addr(str ip, uint8_t *out) except -1:
    """Write ip (network order) to out[16]; return its address family."""
    cdef bytes packed
    cdef int family = _socket.AF_INET6 if ":" in ip else _socket.AF_INET
    cdef int i
    packed = _socket.inet_pton(family, ip)
    memset(out, 0, 16)
    for i in range(len(packed)):
        out[i] = packed[i]
    return family


cdef int _testhelper_ctx(l4_pick_ctx *ctx, str client_ip, int client_port, str dest_ip,
                         int dest_port) except -1:
    memset(ctx, 0, sizeof(l4_pick_ctx))
    if not 0 <= client_port <= 65535 or not 0 <= dest_port <= 65535:
        raise ValueError("port out of range")
    ctx.family = <uint8_t>_testhelper_addr(client_ip, ctx.caddr)
    ctx.cport = <uint16_t>client_port
    if dest_ip:
        ctx.dfamily = <uint8_t>_testhelper_addr(dest_ip, ctx.daddr)
    ctx.dport = <uint16_t>dest_port
    return 0


def _testhelper_connect(Dataplane dp, int svc_id, str client_ip, int client_port=0,
                        str dest_ip="", int dest_port=0, unsigned long long now_ms=0,
                        exclude=(), bint retry=False):
    """Schedule and bind a new connection like a worker does.

    ``exclude`` lists slot ids already tried and ``retry`` skips the
    template lookup, as on a worker's connect retry.  Returns (slot id,
    template handle), or (-1, 0) when the connection is refused.
    """
    cdef l4_service *svc = dp._service(svc_id)
    cdef l4_pick_ctx ctx
    cdef l4_slot *slot
    cdef l4_tmpl *tmpl = NULL
    cdef const l4_slot *tried[8]
    cdef unsigned ntried = 0
    if len(exclude) > 8:
        raise ValueError("at most 8 excluded slots")
    for slot_id in exclude:
        tried[ntried] = dp._slot(slot_id)
        ntried += 1
    _testhelper_ctx(&ctx, client_ip, client_port, dest_ip, dest_port)
    with nogil:
        slot = l4_service_schedule(svc, &ctx, tried, ntried, retry, now_ms, &tmpl)
    if slot == NULL:
        return -1, 0
    return <int>slot.id, <uintptr_t>tmpl


def _testhelper_pick(Dataplane dp, int svc_id, str client_ip, int client_port=0,
                     str dest_ip="", int dest_port=0, unsigned long long now_ms=0) -> int:
    """The slot id chosen and bound for a new connection, or -1 if refused."""
    return _testhelper_connect(dp, svc_id, client_ip, client_port, dest_ip, dest_port,
                               now_ms)[0]


def _testhelper_deactivate(Dataplane dp, int slot_id):
    """The connection left the active states (first FIN or RST): A -= 1."""
    l4_slot_deactivate(dp._slot(slot_id))


def _testhelper_unbind(Dataplane dp, int svc_id, int slot_id, uintptr_t tmpl=0,
                       unsigned long long now_ms=0):
    """The connection's inactive time is over: T -= 1, its template let go."""
    l4_service_unbind(dp._service(svc_id), dp._slot(slot_id), <l4_tmpl *>tmpl, now_ms)


def _testhelper_close(Dataplane dp, int svc_id, int slot_id, bint reset=True,
                      uintptr_t tmpl=0, unsigned long long now_ms=0):
    """End a connection: deactivate it, and with ``reset`` also unbind it at
    once; without, it lingers inactive until :func:`_testhelper_unbind`."""
    _testhelper_deactivate(dp, slot_id)
    if reset:
        _testhelper_unbind(dp, svc_id, slot_id, tmpl, now_ms)


def _testhelper_persist_expire(Dataplane dp, int svc_id, unsigned long long now_ms):
    """Run the template sweep a worker runs about once a second."""
    l4_testhelper_expire(dp._service(svc_id), now_ms)


def _testhelper_persist_count(Dataplane dp, int svc_id) -> int:
    """Number of templates in the service's table."""
    return l4_testhelper_persist_count(dp._service(svc_id))


def _testhelper_hash_32(unsigned int value, unsigned int bits) -> int:
    """Linux hash_32() as the sh and dh schedulers use it."""
    if not 1 <= bits <= 32:
        raise ValueError("bits must be 1..32")
    return l4_hash_32(value, bits)


def _testhelper_addr_key(str ip) -> int:
    """The u32 an address hashes as (IPv6: XOR of its four words)."""
    cdef uint8_t a[16]
    cdef int family = _testhelper_addr(ip, a)
    return l4_addr_key(<uint8_t>family, a)


def _testhelper_proxy_header(int version, str client_ip, int client_port, str dest_ip="",
                             int dest_port=0) -> bytes:
    """The PROXY protocol header a worker sends for this connection (b"" if none);
    ``dest_ip`` "" stands for a destination that could not be read."""
    cdef l4_pick_ctx ctx
    cdef uint8_t buf[256]
    cdef size_t n
    _testhelper_ctx(&ctx, client_ip, client_port, dest_ip, dest_port)
    n = l4_proxy_header(version, &ctx, buf, L4_PROXY_MAX)
    return bytes(buf[:n])


def _bench_pick(Dataplane dp, int svc_id, int n, bint vary_client=False) -> float:
    """Mean ns per schedule + unbind of a new connection, over n rounds.

    With ``vary_client`` each round comes from another client address and
    port (10.x.y.z), which matters to sh and to persistence.
    """
    cdef l4_service *svc = dp._service(svc_id)
    cdef l4_pick_ctx ctx
    cdef l4_slot *slot
    cdef l4_tmpl *tmpl
    cdef timespec t0, t1
    cdef uint64_t now
    cdef int i
    if n <= 0:
        raise ValueError("n must be positive")
    _testhelper_ctx(&ctx, "10.0.0.1", 40000, "", 0)
    now = l4_now_ms()
    with nogil:
        clock_gettime(CLOCK_MONOTONIC, &t0)
        for i in range(n):
            if vary_client:
                ctx.caddr[1] = <uint8_t>(i >> 16)
                ctx.caddr[2] = <uint8_t>(i >> 8)
                ctx.caddr[3] = <uint8_t>i
                ctx.cport = <uint16_t>(1024 + (i & 0x7fff))
            tmpl = NULL
            slot = l4_service_schedule(svc, &ctx, NULL, 0, 0, now, &tmpl)
            if slot != NULL:
                l4_slot_deactivate(slot)
                l4_service_unbind(svc, slot, tmpl, now)
        clock_gettime(CLOCK_MONOTONIC, &t1)
    return ((t1.tv_sec - t0.tv_sec) * 1e9 + (t1.tv_nsec - t0.tv_nsec)) / n
