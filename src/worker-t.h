/* Types of the forwarding side: pipes, connections, workers, the data plane. */
#ifndef L4LB_WORKER_T_H
#define L4LB_WORKER_T_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>

#include "service-t.h"

/* The largest copy buffer: the size of a default pipe. */
#define L4_BUF_MAX 65536u

/* A splice pipe.  `data` is what we put in and have not taken out yet. */
struct l4_pipe {
	int rfd, wfd;                   /* -1 for a copy buffer */
	uint32_t data;
	uint32_t off;                   /* copy buffer: start of the data */
	char *buf;                      /* copy buffer, NULL for a kernel pipe */
	struct l4_pipe *next;           /* free list */
};

/* Connection flag bits. */
#define L4_C_RD (1u << 0)       /* client readable (edge seen, EAGAIN not yet) */
#define L4_C_WR (1u << 1)
#define L4_B_RD (1u << 2)
#define L4_B_WR (1u << 3)
#define L4_C_EOF (1u << 4)      /* read EOF from the client */
#define L4_B_EOF (1u << 5)
#define L4_C_SHUT (1u << 6)     /* we sent FIN to the client */
#define L4_B_SHUT (1u << 7)
#define L4_INACTIVE (1u << 8)   /* left the IPVS active states (A decremented) */
#define L4_QUEUED (1u << 9)     /* on the worker's run-again list */
#define L4_UDP (1u << 10)       /* a UDP flow: cfd is the (shared) listener, not ours */
#define L4_C2B_SPLICE (1u << 11) /* client->backend moved enough to splice */
#define L4_B2C_SPLICE (1u << 12)

enum { L4_ST_CONNECTING = 1, L4_ST_ESTABLISHED = 2 };

#define L4_MAX_TRIES 8

struct l4_conn {
	int cfd, bfd;
	struct l4_pipe *c2b, *b2c;
	struct l4_service *svc;
	struct l4_slot *slot;
	struct l4_tmpl *tmpl;
	uint32_t flags;
	uint8_t state;
	uint8_t ntried;
	struct l4_slot *tried[L4_MAX_TRIES];
	uint64_t last_ms;               /* last forwarding progress */
	uint64_t deadline_ms;           /* connect deadline, or idle check */
	struct l4_conn *tprev, *tnext;  /* timer wheel bucket */
	struct l4_conn *prev, *next;    /* all connections of the worker */
	struct l4_conn *qnext;          /* run-again list, then the dead list */
	struct l4_pick_ctx ctx;
	struct l4_udp_flow *udp;        /* UDP flows only */
};

/* What a UDP flow needs beyond a connection: its hash chain and the local
 * address the client sent to, which replies must come from. */
struct l4_udp_flow {
	struct l4_conn *hnext;
	uint8_t lfamily;
	uint8_t laddr[16];
	int ifindex;
};

/* A connection whose inactive time runs (IPVS FIN_WAIT/TIME_WAIT/CLOSE). */
struct l4_ghost {
	struct l4_service *svc;
	struct l4_slot *slot;
	struct l4_tmpl *tmpl;
	uint64_t expire_ms;
};

/* FIFO of ghosts: one timeout per ring, so expiry order is insertion order. */
struct l4_ghost_ring {
	struct l4_ghost *g;
	uint32_t cap, head, len;
	uint32_t timeout_ms;
};

struct l4_listener {
	int fd;
	uint32_t svc_id;
	uint8_t paused;
	uint8_t udp;
};

enum {
	L4_CMD_ADD_LISTENER = 1,
	L4_CMD_DEL_LISTENERS = 2,
	L4_CMD_DRAIN = 3,
	L4_CMD_STOP = 4,
	L4_CMD_RESET_SLOT = 5,        /* reset every connection to one slot (svc_id = slot id) */
};

struct l4_cmd {
	int op;
	int fd;
	uint32_t svc_id;
	struct l4_cmd *next;
};

#define L4_WHEEL_BITS 12
#define L4_WHEEL_SIZE (1u << L4_WHEEL_BITS)
#define L4_TICK_MS 10

struct l4_dp;

struct l4_worker {
	struct l4_dp *dp;
	int index;
	int epfd;
	int evfd;                       /* control eventfd */
	pthread_mutex_t cmd_lock;
	struct l4_cmd *cmds;            /* cmd_lock */
	struct l4_listener *listeners;
	uint32_t nlisteners, cap_listeners;
	uint64_t paused_until_ms;       /* accept backoff after EMFILE/ENFILE */
	struct l4_conn *conns;          /* all connections */
	struct l4_conn *runq;           /* connections with work left */
	struct l4_conn *dead;           /* closed this round, freed after it */
	struct l4_conn *wheel[L4_WHEEL_SIZE];
	uint64_t wheel_ms;              /* time of the next bucket to run */
	uint32_t ntimers;
	struct l4_pipe *free_pipes;
	uint32_t nfree_pipes;
	struct l4_pipe *free_bufs;      /* copy buffers, pooled like pipes */
	uint32_t nfree_bufs;
	uint64_t now_ms;
	uint64_t next_sweep_ms;
	struct l4_ghost_ring ghosts_fin, ghosts_rst;
	struct l4_conn **flows;         /* UDP flow hash table */
	uint32_t nflows, flow_buckets;
	void *udp_bufs;                 /* recvmmsg/sendmmsg scratch, allocated on first use */
	uint8_t draining, stopping;
	/* Counters (written by this worker only). */
	_Atomic int64_t nconns;
	_Atomic int64_t pipes_used;
	_Atomic int64_t pipes_free;
	_Atomic uint64_t accept_errors;
	_Atomic uint64_t emfile_pauses;
	_Atomic uint64_t splice_fallbacks;
};

struct l4_dp {
	uint32_t nworkers;
	struct l4_worker **workers;
	uint32_t max_services, max_slots;
	_Atomic(struct l4_service *) *services;
	_Atomic(struct l4_slot *) *slots;
	pthread_mutex_t alloc_lock;
	uint32_t pipe_size;             /* bytes a splice pipe holds */
	uint32_t buf_size;              /* bytes a copy buffer holds (<= pipe_size) */
	uint32_t max_pipes;             /* per worker free-list cap */
	uint32_t inactive_ms, reset_inactive_ms;
	int use_splice;
};

#endif
