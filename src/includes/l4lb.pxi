# The C API of the data plane (src/l4lb.h).  Every function is noexcept and
# nogil: none of them raises or touches Python; errors are negative errnos.
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t


cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t

    cdef struct sockaddr:
        pass

    cdef struct sockaddr_storage:
        pass


cdef extern from "l4lb.h" nogil:
    cdef int L4_SVC_F_PERSISTENT
    cdef int L4_CMD_ADD_LISTENER
    cdef int L4_CMD_DEL_LISTENERS
    cdef int L4_CMD_DRAIN
    cdef int L4_CMD_STOP
    cdef int L4_CMD_RESET_SLOT

    cdef struct l4_pick_ctx:
        uint8_t family
        uint8_t dfamily
        uint16_t cport
        uint16_t dport
        uint8_t caddr[16]
        uint8_t daddr[16]

    cdef struct l4_tmpl:
        pass

    cdef struct l4_persist:
        pass

    cdef struct l4_slot:
        uint32_t id
        int32_t weight
        uint32_t u_threshold
        uint32_t l_threshold
        uint8_t linked
        int32_t active
        int32_t total
        int32_t persist
        uint64_t conns
        uint64_t bytes_in
        uint64_t bytes_out
        uint64_t connect_errors
        uint32_t consec_failures

    cdef int L4_MAX_VIPS

    cdef struct l4_vip:
        uint8_t family
        uint16_t port
        uint8_t addr[16]
        uint64_t total

    cdef struct l4_service:
        uint32_t id
        uint8_t in_use
        uint32_t flags
        uint32_t ndests
        l4_persist *persist
        uint32_t connect_timeout_ms
        uint32_t idle_timeout_ms
        int32_t retries
        uint64_t accepted
        int64_t active
        uint64_t rejected
        uint64_t failed
        uint64_t limit_rejected

    cdef struct l4_worker:
        int64_t nconns
        int64_t pipes_used
        int64_t pipes_free
        uint64_t accept_errors
        uint64_t emfile_pauses
        uint64_t splice_fallbacks

    cdef struct l4_dp:
        uint32_t nworkers
        l4_worker **workers
        uint32_t max_services
        uint32_t max_slots

    uint64_t l4_now_ms() noexcept

    int l4_service_configure(l4_service *svc, const char *sched, uint32_t flags,
                             uint32_t persist_timeout_ms, uint8_t netmask4, uint8_t netmask6,
                             uint8_t expire_quiescent) noexcept
    int l4_service_set_limits(l4_service *svc, uint8_t send_proxy, uint32_t max_conns) noexcept
    int l4_service_set_vips(l4_service *svc, const l4_vip *list, uint32_t n) noexcept
    int l4_service_vip_stats(l4_service *svc, uint64_t *out, uint32_t max,
                             uint64_t *other) noexcept
    void l4_service_clear(l4_service *svc) noexcept
    void l4_service_reset_counters(l4_service *svc) noexcept
    int l4_dest_add(l4_service *svc, l4_slot *slot, int32_t weight, uint32_t u,
                    uint32_t l) noexcept
    int l4_dest_edit(l4_service *svc, l4_slot *slot, int32_t weight, uint32_t u,
                     uint32_t l) noexcept
    int l4_dest_del(l4_service *svc, l4_slot *slot) noexcept
    int l4_service_dest_ids(l4_service *svc, uint32_t *out, uint32_t max) noexcept
    int l4_slot_overloaded(l4_service *svc, l4_slot *slot) noexcept
    l4_slot *l4_service_schedule(l4_service *svc, const l4_pick_ctx *ctx,
                                 const l4_slot *const *exclude, unsigned nexclude,
                                 int retry, uint64_t now_ms, l4_tmpl **tmpl_out) noexcept
    void l4_slot_deactivate(l4_slot *slot) noexcept
    void l4_service_unbind(l4_service *svc, l4_slot *slot, l4_tmpl *tmpl,
                           uint64_t now_ms) noexcept
    uint32_t l4_persist_count(const l4_persist *p) noexcept

    int l4_worker_run(l4_worker *w) noexcept
    int l4_worker_command(l4_worker *w, int op, int fd, uint32_t svc_id) noexcept

    l4_dp *l4_dp_new(uint32_t nworkers, uint32_t max_services, uint32_t max_slots,
                     uint32_t pipe_size, uint32_t max_pipes, uint32_t inactive_ms,
                     uint32_t reset_inactive_ms, int use_splice) noexcept
    void l4_dp_free(l4_dp *dp) noexcept
    l4_service *l4_dp_service_get(l4_dp *dp, uint32_t id) noexcept
    l4_service *l4_dp_service(l4_dp *dp, uint32_t id) noexcept
    l4_slot *l4_dp_slot(l4_dp *dp, uint32_t id) noexcept
    int l4_dp_slot_set(l4_dp *dp, uint32_t id, const sockaddr *addr, socklen_t len) noexcept
    socklen_t l4_sockaddr_fill(sockaddr_storage *ss, int family, const uint8_t *addr,
                               uint16_t port) noexcept
