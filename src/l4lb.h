/* The data plane's C API.  Every function returns >= 0 or a negative errno
 * unless stated otherwise; none of them touches Python. */
#ifndef L4LB_H
#define L4LB_H

#include "service-t.h"
#include "worker-t.h"

/* ---- clock ---- */
uint64_t l4_now_ms(void);

/* ---- schedulers (sched_*.c) ---- */
extern const struct l4_sched_ops l4_sched_rr, l4_sched_wrr, l4_sched_lc, l4_sched_wlc,
	l4_sched_sed, l4_sched_nq, l4_sched_sh, l4_sched_dh;
/* The scheduler called `name`, or NULL. */
const struct l4_sched_ops *l4_sched_find(const char *name);

/* ---- services and dests (service.c); all take the service lock ---- */
void l4_service_init(struct l4_service *svc, uint32_t id);
/* (Re)configure.  A different scheduler name re-runs init over the current
 * dests (fresh state); the same name keeps its state, as IPVS does. */
int l4_service_configure(struct l4_service *svc, const char *sched, uint32_t flags,
			 uint32_t persist_timeout_ms, uint8_t netmask4, uint8_t netmask6,
			 uint8_t expire_quiescent);
/* Connection settings read by workers (no lock): the PROXY protocol version
 * sent to backends (0 = none, 1, 2) and the most active client connections
 * over all workers (0 = unlimited; more are reset at once and counted in
 * limit_rejected).  -EINVAL for another version. */
int l4_service_set_limits(struct l4_service *svc, uint8_t send_proxy, uint32_t max_conns);
/* Zero the cumulative counters of a service id about to be reused (only
 * once nothing refers to its previous life: no connection, no template). */
void l4_service_reset_counters(struct l4_service *svc);
/* Unlink every dest and mark the service unused.  Slots stay valid. */
void l4_service_clear(struct l4_service *svc);
int l4_dest_add(struct l4_service *svc, struct l4_slot *slot, int32_t weight, uint32_t u,
		uint32_t l);
int l4_dest_edit(struct l4_service *svc, struct l4_slot *slot, int32_t weight, uint32_t u,
		 uint32_t l);
int l4_dest_del(struct l4_service *svc, struct l4_slot *slot);
/* Copy up to max dest slot ids in list order; returns the number of dests. */
int l4_service_dest_ids(struct l4_service *svc, uint32_t *out, uint32_t max);
/* The dest's OVERLOAD flag (§2), read under the lock. */
int l4_slot_overloaded(struct l4_service *svc, struct l4_slot *slot);

/* Choose and bind a dest for a new connection: persistence first (unless
 * `retry`), then the scheduler; `exclude` lists slots already tried.  On
 * success the slot's A, T and conns are incremented (IPVS bind) and
 * *tmpl_out holds the controlling template (or NULL).  NULL = refuse. */
struct l4_slot *l4_service_schedule(struct l4_service *svc, const struct l4_pick_ctx *ctx,
				    const struct l4_slot *const *exclude, unsigned nexclude,
				    int retry, uint64_t now_ms, struct l4_tmpl **tmpl_out);
/* A connection left the active states (first FIN or RST): A -= 1. */
void l4_slot_deactivate(struct l4_slot *slot);
/* A connection's inactive time is over: T -= 1 (IPVS unbind, overload
 * hysteresis) and its template loses a controlled connection. */
void l4_service_unbind(struct l4_service *svc, struct l4_slot *slot, struct l4_tmpl *tmpl,
		       uint64_t now_ms);

/* ---- per-VIP counters (vip_counters.c) ---- */
/* Publish the service's VIP list (n = 0: none).  A VIP also in the previous
 * list keeps its count.  -E2BIG beyond L4_MAX_VIPS, -EAFNOSUPPORT for a
 * family other than AF_INET/AF_INET6. */
int l4_service_set_vips(struct l4_service *svc, const struct l4_vip *list, uint32_t n);
/* Count a new connection on the VIP ctx's destination matches, else as
 * "other"; nothing when the service has no VIP list.  Lock-free. */
void l4_service_count_vip(struct l4_service *svc, const struct l4_pick_ctx *ctx);
/* Copy up to max VIP totals in list order and the "other" count; returns
 * the number of VIPs. */
int l4_service_vip_stats(struct l4_service *svc, uint64_t *out, uint32_t max, uint64_t *other);
void l4_service_reset_vip_counters(struct l4_service *svc);
/* Free every VIP table (only with the data plane). */
void l4_service_free_vips(struct l4_service *svc);

/* ---- PROXY protocol (proxy.c) ---- */
/* Longest header l4_proxy_header writes (v1 TCP6 with two full addresses). */
#define L4_PROXY_MAX 108
/* Write the version 1 or 2 header for ctx's connection (client -> the
 * address it dialled) to buf; returns its length, 0 if cap is too small or
 * the version unknown. */
size_t l4_proxy_header(int version, const struct l4_pick_ctx *ctx, uint8_t *buf, size_t cap);

/* ---- persistence templates (persist.c); called with the service lock held ---- */
struct l4_persist *l4_persist_new(void);
void l4_persist_free(struct l4_persist *p);
/* A valid template for ctx's client (masked by the service netmask): its
 * dest is still linked and, with expire_quiescent, has weight > 0.  Re-arms
 * it (now + timeout) and returns its dest; an invalid one is discarded.
 * NULL when there is none. */
struct l4_slot *l4_persist_lookup(struct l4_service *svc, const struct l4_pick_ctx *ctx,
				  uint64_t now_ms, struct l4_tmpl **tmpl_out);
/* Create (or re-point, on a retry) the template for ctx's client to `slot`.
 * NULL when out of memory: the connection then goes on without one. */
struct l4_tmpl *l4_persist_bind(struct l4_service *svc, const struct l4_pick_ctx *ctx,
				struct l4_slot *slot, uint64_t now_ms);
/* A new connection is controlled by tmpl / one it controlled is gone. */
void l4_tmpl_get(struct l4_tmpl *tmpl);
void l4_tmpl_put(struct l4_service *svc, struct l4_tmpl *tmpl, uint64_t now_ms);
/* Free templates whose time is over (IPVS: a template still controlling a
 * connection when it expires is re-armed for 60 s). */
void l4_persist_expire(struct l4_service *svc, uint64_t now_ms);
/* Number of templates currently held. */
uint32_t l4_persist_count(const struct l4_persist *p);

/* ---- pipe pool (pipe_pool.c) ---- */
struct l4_pipe *l4_pipe_get(struct l4_worker *w, int splice);
void l4_pipe_put(struct l4_worker *w, struct l4_pipe *p);
void l4_pipe_kill(struct l4_worker *w, struct l4_pipe *p);
void l4_pipe_pool_flush(struct l4_worker *w);

/* ---- workers (worker.c) ---- */
/* The worker's event loop; returns when told to stop (0) or on a fatal
 * epoll error (-errno).  Runs without the GIL for its whole life. */
int l4_worker_run(struct l4_worker *w);
/* Queue a command for the worker and wake it; thread-safe.  For
 * L4_CMD_ADD_LISTENER the worker takes ownership of fd. */
int l4_worker_command(struct l4_worker *w, int op, int fd, uint32_t svc_id);

/* Internal to the worker thread (worker.c), shared with udp.c. */
void l4_timer_set(struct l4_worker *w, struct l4_conn *c, uint64_t deadline);
void l4_conn_close(struct l4_worker *w, struct l4_conn *c, int reset);
/* Count a new client in svc->active unless the service is at max_conns:
 * then count it in limit_rejected instead and return 0. */
int l4_conn_admit(struct l4_service *svc);
/* Put an admitted connection on the worker's list (counts it accepted). */
void l4_conn_link(struct l4_worker *w, struct l4_conn *c);

/* ---- UDP flows (udp.c), worker thread only ---- */
/* Enable the ancillary data a UDP listener needs; 1 if fd is UDP, 0 if not. */
int l4_udp_listener_setup(int fd);
/* Datagrams from clients on listener fd: find or make flows, forward. */
void l4_udp_recv(struct l4_worker *w, struct l4_service *svc, int fd);
/* Drop whatever is queued on a listener whose service is gone. */
void l4_udp_discard(int fd);
/* Replies from a flow's backend, sent to its client from the right address. */
void l4_udp_reply(struct l4_worker *w, struct l4_conn *c);
void l4_udp_flow_unhash(struct l4_worker *w, struct l4_conn *c);
/* Close every flow that replies through listener fd. */
void l4_udp_close_flows(struct l4_worker *w, int fd);

/* ---- the data plane object (dp.c) ---- */
struct l4_dp *l4_dp_new(uint32_t nworkers, uint32_t max_services, uint32_t max_slots,
			uint32_t pipe_size, uint32_t max_pipes, uint32_t inactive_ms,
			uint32_t reset_inactive_ms, int use_splice);
/* Only once every worker has returned from l4_worker_run. */
void l4_dp_free(struct l4_dp *dp);
/* The service with this id, created on first use; NULL if out of range. */
struct l4_service *l4_dp_service_get(struct l4_dp *dp, uint32_t id);
/* The service / slot with this id if it exists, else NULL. */
struct l4_service *l4_dp_service(struct l4_dp *dp, uint32_t id);
struct l4_slot *l4_dp_slot(struct l4_dp *dp, uint32_t id);
/* Create or reset slot `id` for a backend address (must not be linked). */
int l4_dp_slot_set(struct l4_dp *dp, uint32_t id, const struct sockaddr *addr, socklen_t len);
/* Build a sockaddr_in / sockaddr_in6; returns its length. */
socklen_t l4_sockaddr_fill(struct sockaddr_storage *ss, int family, const uint8_t *addr,
			   uint16_t port);

#endif
