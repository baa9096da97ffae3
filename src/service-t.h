/* Types shared by the scheduler, persistence and worker code.
 *
 * A service owns an ordered list of destinations ("dests") exactly like an
 * IPVS virtual service: index 0 is the list head, a new dest is inserted at
 * index 0, so iteration order is newest-first.  Every field marked "lock" is
 * guarded by the service mutex; schedulers run with it held.
 */
#ifndef L4LB_SERVICE_T_H
#define L4LB_SERVICE_T_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <sys/socket.h>
#include <netinet/in.h>

/* IPVS service flags (include/uapi/linux/ip_vs.h). */
#define L4_SVC_F_PERSISTENT 0x0001
#define L4_SVC_F_SH_FALLBACK 0x0008
#define L4_SVC_F_SH_PORT 0x0010

/* Scheduler hook operations, reported after the dest list changed. */
enum { L4_DEST_ADD = 0, L4_DEST_DEL = 1, L4_DEST_EDIT = 2 };

/* What a scheduler may look at to choose a destination. */
struct l4_pick_ctx {
	uint8_t family;         /* AF_INET or AF_INET6: family of caddr */
	uint8_t dfamily;        /* family of daddr (0 = unknown) */
	uint16_t cport;         /* client port, host order */
	uint16_t dport;         /* original destination port, host order */
	uint8_t caddr[16];      /* client address, network order (IPv4: first 4 bytes) */
	uint8_t daddr[16];      /* original destination (the VIP dialled), network order */
};

/* One destination of one service.  Slots are allocated by the control
 * plane, identified by a stable id and never freed while connections or
 * templates may point at them, so counters survive list changes. */
struct l4_slot {
	uint32_t id;
	uint32_t svc_id;
	struct sockaddr_storage addr;   /* backend address (sockaddr_in / sockaddr_in6) */
	socklen_t addrlen;
	int32_t weight;                 /* lock */
	uint32_t u_threshold;           /* lock; 0 = no limit */
	uint32_t l_threshold;           /* lock */
	uint8_t overload;               /* lock; IP_VS_DEST_F_OVERLOAD */
	uint8_t linked;                 /* lock; 1 while in its service's dest list */
	_Atomic int32_t active;         /* A: connections in an active state */
	_Atomic int32_t total;          /* T: active + inactive (written under lock) */
	_Atomic int32_t persist;        /* templates pointing here */
	_Atomic uint64_t conns;         /* connections scheduled here, cumulative */
	_Atomic uint64_t bytes_in;      /* client -> backend bytes delivered */
	_Atomic uint64_t bytes_out;     /* backend -> client bytes delivered */
	_Atomic uint64_t connect_errors;
	_Atomic uint32_t consec_failures; /* connect failures since the last success */
};

struct l4_service;
struct l4_persist;
struct l4_tmpl;

struct l4_sched_ops {
	const char *name;
	/* Bind to the current dest list (service created or scheduler changed).
	 * May allocate svc->sched_data.  Returns 0 or -errno. */
	int (*init)(struct l4_service *svc);
	/* Free svc->sched_data.  May be NULL. */
	void (*done)(struct l4_service *svc);
	/* After dest `pos` was added (pos 0), deleted (its former index) or
	 * edited.  May be NULL. */
	void (*update)(struct l4_service *svc, int op, uint32_t pos);
	/* Choose a dest for a new connection, or NULL to refuse it. */
	struct l4_slot *(*pick)(struct l4_service *svc, const struct l4_pick_ctx *ctx);
};

/* One virtual address a service answers for, with its connection count. */
struct l4_vip {
	uint8_t family;                 /* AF_INET or AF_INET6 */
	uint16_t port;                  /* host order */
	uint8_t addr[16];               /* network order (IPv4: first 4 bytes) */
	_Atomic uint64_t total;         /* connections that dialled it */
};

/* A service's VIP list.  Immutable once published except for the counters;
 * a replaced table is kept (on `retired`) until the data plane is freed, so
 * a worker still scanning it never touches freed memory. */
struct l4_vip_table {
	uint32_t n;
	struct l4_vip_table *retired;
	struct l4_vip v[];
};

#define L4_MAX_VIPS 4096

struct l4_service {
	uint32_t id;
	pthread_mutex_t lock;
	uint8_t in_use;
	uint8_t needs_daddr;            /* scheduler hashes the original destination */
	uint8_t expire_quiescent;       /* lock */
	uint8_t netmask4;               /* lock: persistence prefix length, IPv4 */
	uint8_t netmask6;               /* lock: persistence prefix length, IPv6 */
	uint32_t flags;                 /* lock: L4_SVC_F_* */
	uint32_t persist_timeout_ms;    /* lock */
	const struct l4_sched_ops *sched;   /* lock */
	void *sched_data;               /* lock */
	uint32_t ndests;                /* lock */
	uint32_t cap;                   /* lock */
	struct l4_slot **dests;         /* lock: [0] = head = newest */
	struct l4_persist *persist;     /* lock: templates, NULL until first needed */
	/* Connection settings, read by workers without the lock (relaxed). */
	_Atomic uint32_t connect_timeout_ms;
	_Atomic uint32_t idle_timeout_ms;
	_Atomic int32_t retries;        /* -1 = every other dest once */
	_Atomic uint8_t send_proxy;     /* PROXY protocol version to send (0 = none) */
	_Atomic uint32_t max_conns;     /* active client connections allowed (0 = any) */
	_Atomic(struct l4_vip_table *) vips;    /* NULL = no VIP list */
	struct l4_vip_table *vips_retired;      /* lock: replaced tables */
	/* Counters. */
	_Atomic uint64_t accepted;
	_Atomic int64_t active;         /* client connections open */
	_Atomic uint64_t rejected;      /* refused: no dest available */
	_Atomic uint64_t failed;        /* every connect attempt failed */
	_Atomic uint64_t limit_rejected; /* refused at max_conns (UDP: datagrams that
					  * would have started a flow) */
	_Atomic uint64_t vip_other;     /* connections to no address in `vips` */
};

/* A dest can take new connections (weight 0 = quiesced). */
static inline int l4_slot_usable(const struct l4_slot *d)
{
	return d != NULL && d->weight > 0 && !d->overload;
}

/* Host-order u32 key of an address as IPVS hashes it: IPv4 as is, IPv6 the
 * XOR of its four big-endian words. */
static inline uint32_t l4_addr_key(uint8_t family, const uint8_t *a)
{
	uint32_t w[4];
	int i, n = family == AF_INET6 ? 4 : 1;
	uint32_t k = 0;
	for (i = 0; i < n; i++) {
		w[i] = ((uint32_t)a[4 * i] << 24) | ((uint32_t)a[4 * i + 1] << 16) |
		       ((uint32_t)a[4 * i + 2] << 8) | (uint32_t)a[4 * i + 3];
		k ^= w[i];
	}
	return k;
}

/* Linux hash_32() with GOLDEN_RATIO_32. */
static inline uint32_t l4_hash_32(uint32_t v, unsigned bits)
{
	return (uint32_t)(v * 0x61C88647u) >> (32 - bits);
}

#endif
