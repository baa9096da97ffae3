/* A worker: one thread, one epoll, its own SO_REUSEPORT listeners.
 *
 * Each accepted client gets a connection object that walks
 *   connecting -> established -> (half-closed) -> closed
 * and moves bytes client->backend and backend->client with splice(2)
 * through two pipes borrowed from the worker's pool.  Sockets are
 * registered once, edge-triggered, for both directions; readiness is kept in
 * the connection's flags and cleared only when a syscall says EAGAIN.
 *
 * Rules:
 * 1. A pipe never holds more than dp->pipe_size bytes (a copy buffer
 *    dp->buf_size), and we read from a socket only into a pipe with room:
 *    that is the backpressure, and the only buffering there is.
 * 2. A connection closed while handling one batch of events is parked on
 *    the dead list and freed after the batch, so later events of the same
 *    batch never touch freed memory.
 * 3. IPVS accounting (service.c) sees: bind at schedule time, deactivate at
 *    the first FIN or RST, unbind when the inactive time is over (ghosts).
 * 4. A service's max_conns is checked against its active count with one
 *    atomic add at accept, so the limit holds over all workers.
 * 5. With send_proxy, the PROXY header (proxy.c) is written to each backend
 *    socket once its connect has completed, before any client byte.  It is
 *    at most L4_PROXY_MAX bytes and the socket's send buffer is empty, so it
 *    goes out whole; a failed or short write counts as a failed connect to
 *    that backend and the next one is tried (nothing is kept for later).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include "l4lb.h"

/* From linux/netfilter_ipv4.h, which clashes with netinet/in.h. */
#ifndef SO_ORIGINAL_DST
#define SO_ORIGINAL_DST 80
#endif
#ifndef IP6T_SO_ORIGINAL_DST
#define IP6T_SO_ORIGINAL_DST 80
#endif

#define MAX_EVENTS 256
#define ACCEPT_BATCH 32
#define PUMP_ROUNDS 16          /* splice rounds before yielding to others */
#define EMFILE_BACKOFF_MS 100
#define SWEEP_MS 1000

/* epoll data: a pointer or index with a 2-bit tag. */
enum { TAG_CLIENT = 0, TAG_BACKEND = 1, TAG_LISTENER = 2, TAG_CONTROL = 3 };
#define TAG_OF(u) ((unsigned)((u) & 3u))
#define PTR_OF(u) ((struct l4_conn *)(uintptr_t)((u) & ~(uint64_t)3u))

static void conn_pump(struct l4_worker *w, struct l4_conn *c);
static void start_connect(struct l4_worker *w, struct l4_conn *c);

/* ---------------------------------------------------------------- timers */

static void timer_del(struct l4_worker *w, struct l4_conn *c)
{
	if (c->tprev == NULL && w->wheel[(c->deadline_ms / L4_TICK_MS) & (L4_WHEEL_SIZE - 1)] != c)
		return;
	if (c->tprev)
		c->tprev->tnext = c->tnext;
	else
		w->wheel[(c->deadline_ms / L4_TICK_MS) & (L4_WHEEL_SIZE - 1)] = c->tnext;
	if (c->tnext)
		c->tnext->tprev = c->tprev;
	c->tprev = c->tnext = NULL;
	w->ntimers--;
}

void l4_timer_set(struct l4_worker *w, struct l4_conn *c, uint64_t deadline)
{
	struct l4_conn **b;

	timer_del(w, c);
	/* Deadlines fall on tick boundaries, so a bucket is due exactly when its
	 * time has come; never schedule into a bucket the wheel has passed. */
	deadline += (L4_TICK_MS - deadline % L4_TICK_MS) % L4_TICK_MS;
	if (deadline < w->wheel_ms)
		deadline = w->wheel_ms;
	c->deadline_ms = deadline;
	b = &w->wheel[(deadline / L4_TICK_MS) & (L4_WHEEL_SIZE - 1)];
	c->tprev = NULL;
	c->tnext = *b;
	if (*b)
		(*b)->tprev = c;
	*b = c;
	w->ntimers++;
}

/* ---------------------------------------------------------------- ghosts */

static void ghost_push(struct l4_ghost_ring *r, struct l4_service *svc, struct l4_slot *slot,
		       struct l4_tmpl *tmpl, uint64_t now)
{
	struct l4_ghost *g;

	if (r->len == r->cap) {
		uint32_t cap = r->cap ? r->cap * 2 : 1024, i;
		struct l4_ghost *n = malloc(cap * sizeof(*n));
		if (n == NULL) {
			/* No room to wait: end the inactive time now. */
			l4_service_unbind(svc, slot, tmpl, now);
			return;
		}
		for (i = 0; i < r->len; i++)
			n[i] = r->g[(r->head + i) % r->cap];
		free(r->g);
		r->g = n;
		r->cap = cap;
		r->head = 0;
	}
	g = &r->g[(r->head + r->len) % r->cap];
	g->svc = svc;
	g->slot = slot;
	g->tmpl = tmpl;
	g->expire_ms = now + r->timeout_ms;
	r->len++;
}

/* Unbind every ghost whose time is over (all of them when `all`). */
static void ghosts_expire(struct l4_ghost_ring *r, uint64_t now, int all)
{
	while (r->len) {
		struct l4_ghost *g = &r->g[r->head];
		if (!all && g->expire_ms > now)
			break;
		l4_service_unbind(g->svc, g->slot, g->tmpl, now);
		r->head = (r->head + 1) % r->cap;
		r->len--;
	}
}

/* ----------------------------------------------------------- connections */

static void conn_deactivate(struct l4_conn *c)
{
	if (c->slot && !(c->flags & L4_INACTIVE)) {
		l4_slot_deactivate(c->slot);
		c->flags |= L4_INACTIVE;
	}
}

/* The backend connection is over: its dest enters its inactive time. */
static void release_slot(struct l4_worker *w, struct l4_conn *c, int reset)
{
	if (c->slot == NULL)
		return;
	conn_deactivate(c);
	ghost_push(reset ? &w->ghosts_rst : &w->ghosts_fin, c->svc, c->slot, c->tmpl,
		   w->now_ms);
	c->slot = NULL;
	c->tmpl = NULL;
	c->flags &= ~L4_INACTIVE;
}

static void close_fd(int fd, int reset)
{
	if (fd < 0)
		return;
	if (reset) {
		/* SO_LINGER 0: close sends RST instead of FIN. */
		struct linger lg = { .l_onoff = 1, .l_linger = 0 };
		(void)setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
	}
	close(fd);
}

static void drop_pipe(struct l4_worker *w, struct l4_pipe **pp)
{
	if (*pp) {
		l4_pipe_put(w, *pp);
		*pp = NULL;
	}
}

void l4_conn_close(struct l4_worker *w, struct l4_conn *c, int reset)
{
	if (c->state == 0)
		return;
	if (c->flags & L4_UDP) {
		l4_udp_flow_unhash(w, c);
		close(c->bfd);
		free(c->udp);
		c->udp = NULL;
		/* A UDP flow is never active and has no inactive time (§1). */
		if (c->slot)
			l4_service_unbind(c->svc, c->slot, c->tmpl, w->now_ms);
		c->slot = NULL;
	} else {
		close_fd(c->cfd, reset);
		close_fd(c->bfd, reset);
	}
	c->cfd = c->bfd = -1;
	drop_pipe(w, &c->c2b);
	drop_pipe(w, &c->b2c);
	timer_del(w, c);
	release_slot(w, c, reset);
	atomic_fetch_sub_explicit(&c->svc->active, 1, memory_order_relaxed);
	atomic_fetch_sub_explicit(&w->nconns, 1, memory_order_relaxed);
	if (c->prev)
		c->prev->next = c->next;
	else
		w->conns = c->next;
	if (c->next)
		c->next->prev = c->prev;
	c->state = 0;
	if (!(c->flags & L4_QUEUED)) {
		c->qnext = w->dead;
		w->dead = c;
	}
	/* A queued connection is freed when the run queue reaches it. */
}

static void free_dead(struct l4_worker *w)
{
	struct l4_conn *c;
	while ((c = w->dead) != NULL) {
		w->dead = c->qnext;
		free(c);
	}
}

static void runq_add(struct l4_worker *w, struct l4_conn *c)
{
	if (c->flags & L4_QUEUED)
		return;
	c->flags |= L4_QUEUED;
	c->qnext = w->runq;
	w->runq = c;
}

/* Refuse a client that has no backend: RST, as fast as possible. */
static void conn_refuse(struct l4_worker *w, struct l4_conn *c)
{
	l4_conn_close(w, c, 1);
}

static int epoll_add(struct l4_worker *w, int fd, uint32_t events, uint64_t data)
{
	struct epoll_event ev = { .events = events, .data.u64 = data };
	return epoll_ctl(w->epfd, EPOLL_CTL_ADD, fd, &ev) < 0 ? -errno : 0;
}

static void set_nodelay(int fd)
{
	int one = 1;
	(void)setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
}

/* 0: connecting; 1: this backend failed at once (errno in *err);
 * < 0: a local failure (no fds, no memory) that no backend can fix. */
static int backend_connect(struct l4_worker *w, struct l4_conn *c, struct l4_slot *slot,
			   int *err)
{
	int fd = socket(slot->addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	int rc;

	if (fd < 0)
		return -errno;
	set_nodelay(fd);
	if (connect(fd, (struct sockaddr *)&slot->addr, slot->addrlen) < 0 &&
	    errno != EINPROGRESS) {
		*err = errno;
		close(fd);
		return (*err == EMFILE || *err == ENFILE || *err == ENOBUFS || *err == ENOMEM ||
			*err == EADDRNOTAVAIL) ? -*err : 1;
	}
	rc = epoll_add(w, fd, EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET,
		       (uint64_t)(uintptr_t)c | TAG_BACKEND);
	if (rc < 0) {
		close(fd);
		return rc;
	}
	c->bfd = fd;
	c->flags &= ~(L4_B_RD | L4_B_WR);
	c->state = L4_ST_CONNECTING;
	l4_timer_set(w, c, w->now_ms + atomic_load_explicit(&c->svc->connect_timeout_ms,
							  memory_order_relaxed));
	return 0;
}

static unsigned max_tries(struct l4_service *svc)
{
	int32_t r = atomic_load_explicit(&svc->retries, memory_order_relaxed);
	if (r < 0 || r + 1 > L4_MAX_TRIES)
		return L4_MAX_TRIES;
	return (unsigned)r + 1;
}

static void note_connect_failure(struct l4_slot *slot)
{
	atomic_fetch_add_explicit(&slot->connect_errors, 1, memory_order_relaxed);
	atomic_fetch_add_explicit(&slot->consec_failures, 1, memory_order_relaxed);
}

/* Pick a backend (again, on a retry) and start connecting to it. */
static void start_connect(struct l4_worker *w, struct l4_conn *c)
{
	struct l4_service *svc = c->svc;
	unsigned limit = max_tries(svc);

	while (c->ntried < limit) {
		struct l4_tmpl *tmpl = NULL;
		struct l4_slot *slot;
		int err = 0, rc;

		slot = l4_service_schedule(svc, &c->ctx, (const struct l4_slot *const *)c->tried,
					   c->ntried, c->ntried > 0, w->now_ms, &tmpl);
		if (slot == NULL)
			break;
		c->tried[c->ntried++] = slot;
		c->slot = slot;
		c->tmpl = tmpl;
		rc = backend_connect(w, c, slot, &err);
		if (rc == 0)
			return;
		if (rc > 0)
			note_connect_failure(slot);
		release_slot(w, c, 1);
		if (rc < 0) {
			atomic_fetch_add_explicit(&w->accept_errors, 1, memory_order_relaxed);
			break;
		}
	}
	if (c->ntried == 0)
		atomic_fetch_add_explicit(&svc->rejected, 1, memory_order_relaxed);
	else
		atomic_fetch_add_explicit(&svc->failed, 1, memory_order_relaxed);
	conn_refuse(w, c);
}

/* The PROXY header, if the service sends one: 0 when written whole (or
 * none is due), -1 when the backend did not take all of it at once. */
static int send_proxy_header(struct l4_conn *c)
{
	uint8_t hdr[L4_PROXY_MAX];
	int version = atomic_load_explicit(&c->svc->send_proxy, memory_order_relaxed);
	size_t len;
	ssize_t n;

	if (version == 0)
		return 0;
	len = l4_proxy_header(version, &c->ctx, hdr, sizeof(hdr));
	if (len == 0)
		return -1;
	do
		n = send(c->bfd, hdr, len, MSG_NOSIGNAL);
	while (n < 0 && errno == EINTR);
	return n == (ssize_t)len ? 0 : -1;
}

/* The backend connect ended (or timed out: err = ETIMEDOUT). */
static void connect_done(struct l4_worker *w, struct l4_conn *c, int err)
{
	if (err == 0) {
		socklen_t len = sizeof(err);
		if (getsockopt(c->bfd, SOL_SOCKET, SO_ERROR, &err, &len) < 0)
			err = errno;
	}
	/* A backend that cannot take the PROXY header whole counts as a failed connect. */
	if (err != 0 || send_proxy_header(c) < 0) {
		note_connect_failure(c->slot);
		close(c->bfd);
		c->bfd = -1;
		release_slot(w, c, 1);
		start_connect(w, c);
		return;
	}
	atomic_store_explicit(&c->slot->consec_failures, 0, memory_order_relaxed);
	c->state = L4_ST_ESTABLISHED;
	c->last_ms = w->now_ms;
	l4_timer_set(w, c, w->now_ms + atomic_load_explicit(&c->svc->idle_timeout_ms,
							  memory_order_relaxed));
	conn_pump(w, c);
}

/* Move what can be moved from src through *pp to dst.
 * Returns 1 on progress, 0 on none, -errno on a fatal socket error. */
static int pump_dir(struct l4_worker *w, struct l4_conn *c, int src, int dst,
		    struct l4_pipe **pp, uint32_t rd, uint32_t wr, uint32_t eof, uint32_t shut,
		    uint32_t spliced, _Atomic uint64_t *bytes)
{
	struct l4_pipe *p = *pp;
	uint32_t size = p && p->buf ? w->dp->buf_size : w->dp->pipe_size;
	int progress = 0;
	ssize_t n;

	if (p && p->data && (c->flags & wr)) {
		if (p->buf)
			n = write(dst, p->buf + p->off, p->data);
		else
			n = splice(p->rfd, NULL, dst, NULL, p->data,
				   SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
		if (n > 0) {
			p->data -= (uint32_t)n;
			p->off = p->data ? p->off + (uint32_t)n : 0;
			atomic_fetch_add_explicit(bytes, (uint64_t)n, memory_order_relaxed);
			progress = 1;
			/* A short write means the socket buffer is full; the
			 * edge-triggered EPOLLOUT says when there is room again,
			 * so spare the syscall that would only say EAGAIN. */
			if (p->data)
				c->flags &= ~wr;
		} else if (n < 0 && errno == EAGAIN) {
			c->flags &= ~wr;
		} else if (n < 0 && errno != EINTR) {
			return -errno;
		}
	}
	if (!(c->flags & eof) && (c->flags & rd) && (!p || p->data < size)) {
		if (p == NULL) {
			p = *pp = l4_pipe_get(w, (c->flags & spliced) != 0);
			if (p == NULL)
				return -ENOMEM;
			size = p->buf ? w->dp->buf_size : w->dp->pipe_size;
		}
		/* A buffer fills up to its end; what was written out is reused
		 * once it is empty. */
		uint32_t want = p->buf ? size - p->off - p->data : size - p->data;
		if (want == 0)
			goto shut;
		if (p->buf)
			n = read(src, p->buf + p->off + p->data, want);
		else
			n = splice(src, NULL, p->wfd, NULL, want, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
		if (n > 0) {
			/* A read that fills a whole buffer means a bulk transfer:
			 * from the next pipe on, this direction splices. */
			if (p->buf && (uint32_t)n == size)
				c->flags |= spliced;
			p->data += (uint32_t)n;
			progress = 1;
		} else if (n == 0) {
			c->flags |= eof;
			progress = 1;
		} else if (errno == EAGAIN) {
			/* splice's EAGAIN means "socket empty" or "pipe full" (no
			 * free pipe slots even though bytes < size): only an empty
			 * pipe proves the former (HAProxy does the same). */
			if (p->data == 0 || p->buf)
				c->flags &= ~rd;
		} else if (errno != EINTR) {
			return -errno;
		}
	}
shut:
	if ((c->flags & eof) && (!p || p->data == 0) && !(c->flags & shut)) {
		/* When the other way is already shut, the connection closes
		 * right after this and close() sends the FIN by itself. */
		if ((c->flags & (L4_C_SHUT | L4_B_SHUT)) == 0)
			(void)shutdown(dst, SHUT_WR);
		c->flags |= shut;
		progress = 1;
	}
	if (p && p->data == 0)
		drop_pipe(w, pp);
	return progress;
}

static void conn_pump(struct l4_worker *w, struct l4_conn *c)
{
	int round, a, b;

	for (round = 0; round < PUMP_ROUNDS; round++) {
		a = pump_dir(w, c, c->cfd, c->bfd, &c->c2b, L4_C_RD, L4_B_WR, L4_C_EOF, L4_B_SHUT,
			     L4_C2B_SPLICE, &c->slot->bytes_in);
		if (a < 0)
			goto reset;
		b = pump_dir(w, c, c->bfd, c->cfd, &c->b2c, L4_B_RD, L4_C_WR, L4_B_EOF, L4_C_SHUT,
			     L4_B2C_SPLICE, &c->slot->bytes_out);
		if (b < 0)
			goto reset;
		if (a || b)
			c->last_ms = w->now_ms;
		if (c->flags & (L4_C_EOF | L4_B_EOF))
			conn_deactivate(c);
		if ((c->flags & (L4_C_SHUT | L4_B_SHUT)) == (L4_C_SHUT | L4_B_SHUT)) {
			l4_conn_close(w, c, 0);
			return;
		}
		if (!a && !b)
			return;
	}
	/* Still moving: let the other connections have a turn first. */
	runq_add(w, c);
	return;
reset:
	l4_conn_close(w, c, 1);
}

static void conn_event(struct l4_worker *w, struct l4_conn *c, unsigned tag, uint32_t ev)
{
	uint32_t rd = tag == TAG_CLIENT ? L4_C_RD : L4_B_RD;
	uint32_t wr = tag == TAG_CLIENT ? L4_C_WR : L4_B_WR;

	if (c->state == 0)
		return;
	if (c->flags & L4_UDP) {
		l4_udp_reply(w, c);
		return;
	}
	if (ev & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR))
		c->flags |= rd;
	if (ev & (EPOLLOUT | EPOLLHUP | EPOLLERR))
		c->flags |= wr;
	if (c->state == L4_ST_CONNECTING) {
		if (tag == TAG_BACKEND)
			connect_done(w, c, 0);
		else if (ev & (EPOLLERR | EPOLLHUP))
			l4_conn_close(w, c, 1); /* the client is gone before we got a backend */
		return;
	}
	if (ev & EPOLLERR) {
		/* A reset on one side resets the other, even when no data is
		 * moving that would have surfaced the error. */
		l4_conn_close(w, c, 1);
		return;
	}
	conn_pump(w, c);
}

static void conn_timeout(struct l4_worker *w, struct l4_conn *c)
{
	if (c->state == L4_ST_CONNECTING) {
		connect_done(w, c, ETIMEDOUT);
		return;
	}
	uint64_t idle = atomic_load_explicit(&c->svc->idle_timeout_ms, memory_order_relaxed);
	if (w->now_ms - c->last_ms >= idle)
		l4_conn_close(w, c, 1);
	else
		l4_timer_set(w, c, c->last_ms + idle);
}

/* ------------------------------------------------------------- accepting */

static void pick_ctx_from(struct l4_pick_ctx *ctx, const struct sockaddr_storage *ss, int dst)
{
	uint8_t *addr = dst ? ctx->daddr : ctx->caddr;
	uint16_t port;

	if (ss->ss_family == AF_INET6) {
		const struct sockaddr_in6 *s6 = (const struct sockaddr_in6 *)ss;
		memcpy(addr, &s6->sin6_addr, 16);
		port = ntohs(s6->sin6_port);
	} else {
		const struct sockaddr_in *s4 = (const struct sockaddr_in *)ss;
		memcpy(addr, &s4->sin_addr, 4);
		port = ntohs(s4->sin_port);
	}
	if (dst) {
		ctx->dfamily = (uint8_t)ss->ss_family;
		ctx->dport = port;
	} else {
		ctx->family = (uint8_t)ss->ss_family;
		ctx->cport = port;
	}
}

/* The address the client dialled: the pre-NAT destination when iptables
 * redirected the connection, else the local address. */
static void original_dst(int fd, int family, struct sockaddr_storage *ss)
{
	socklen_t len = sizeof(*ss);
	int rc = family == AF_INET6
			 ? getsockopt(fd, SOL_IPV6, IP6T_SO_ORIGINAL_DST, ss, &len)
			 : getsockopt(fd, SOL_IP, SO_ORIGINAL_DST, ss, &len);
	if (rc < 0) {
		len = sizeof(*ss);
		(void)getsockname(fd, (struct sockaddr *)ss, &len);
	}
}

void l4_conn_link(struct l4_worker *w, struct l4_conn *c)
{
	c->next = w->conns;
	if (w->conns)
		w->conns->prev = c;
	w->conns = c;
	atomic_fetch_add_explicit(&c->svc->accepted, 1, memory_order_relaxed);
	atomic_fetch_add_explicit(&w->nconns, 1, memory_order_relaxed);
}

int l4_conn_admit(struct l4_service *svc)
{
	uint32_t max = atomic_load_explicit(&svc->max_conns, memory_order_relaxed);
	int64_t before = atomic_fetch_add_explicit(&svc->active, 1, memory_order_relaxed);

	if (max != 0 && before >= (int64_t)max) {
		atomic_fetch_sub_explicit(&svc->active, 1, memory_order_relaxed);
		atomic_fetch_add_explicit(&svc->limit_rejected, 1, memory_order_relaxed);
		return 0;
	}
	return 1;
}

static void new_conn(struct l4_worker *w, struct l4_service *svc, int fd,
		     const struct sockaddr_storage *peer)
{
	struct l4_conn *c;

	if (!l4_conn_admit(svc)) {
		/* At its limit: refuse like the all-down path, before spending
		 * memory or syscalls on the connection.  It was accepted all the
		 * same, as a refused one is. */
		atomic_fetch_add_explicit(&svc->accepted, 1, memory_order_relaxed);
		close_fd(fd, 1);
		return;
	}
	c = calloc(1, sizeof(*c));
	if (c == NULL) {
		atomic_fetch_sub_explicit(&svc->active, 1, memory_order_relaxed);
		close_fd(fd, 1);
		atomic_fetch_add_explicit(&w->accept_errors, 1, memory_order_relaxed);
		return;
	}
	c->cfd = fd;
	c->bfd = -1;
	c->svc = svc;
	c->state = L4_ST_CONNECTING;
	c->flags = 0;
	pick_ctx_from(&c->ctx, peer, 0);
	/* Only dh, the PROXY header and per-VIP counters need the address the
	 * client dialled: spare the syscalls otherwise. */
	if (svc->needs_daddr || atomic_load_explicit(&svc->send_proxy, memory_order_relaxed) ||
	    atomic_load_explicit(&svc->vips, memory_order_relaxed) != NULL) {
		struct sockaddr_storage d;
		memset(&d, 0, sizeof(d));
		original_dst(fd, peer->ss_family, &d);
		if (d.ss_family == AF_INET || d.ss_family == AF_INET6)
			pick_ctx_from(&c->ctx, &d, 1);
		l4_service_count_vip(svc, &c->ctx);
	}
	l4_conn_link(w, c);
	set_nodelay(fd);
	if (epoll_add(w, fd, EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET,
		      (uint64_t)(uintptr_t)c | TAG_CLIENT) < 0) {
		atomic_fetch_add_explicit(&w->accept_errors, 1, memory_order_relaxed);
		l4_conn_close(w, c, 1);
		return;
	}
	start_connect(w, c);
}

static void listeners_arm(struct l4_worker *w, int on)
{
	uint32_t i;
	for (i = 0; i < w->nlisteners; i++) {
		struct epoll_event ev = { .events = on ? EPOLLIN : 0,
					  .data.u64 = ((uint64_t)i << 2) | TAG_LISTENER };
		(void)epoll_ctl(w->epfd, EPOLL_CTL_MOD, w->listeners[i].fd, &ev);
	}
}

static void do_accept(struct l4_worker *w, uint32_t idx)
{
	struct l4_listener *l;
	struct l4_service *svc;
	int i;

	if (idx >= w->nlisteners)
		return;
	l = &w->listeners[idx];
	svc = l4_dp_service(w->dp, l->svc_id);
	if (l->udp) {
		if (svc != NULL && svc->in_use)
			l4_udp_recv(w, svc, l->fd);
		else
			l4_udp_discard(l->fd);
		return;
	}
	for (i = 0; i < ACCEPT_BATCH; i++) {
		struct sockaddr_storage peer;
		socklen_t len = sizeof(peer);
		int fd = accept4(l->fd, (struct sockaddr *)&peer, &len,
				 SOCK_NONBLOCK | SOCK_CLOEXEC);
		if (fd < 0) {
			if (errno == EINTR || errno == ECONNABORTED)
				continue;
			if (errno == EAGAIN)
				return;
			atomic_fetch_add_explicit(&w->accept_errors, 1, memory_order_relaxed);
			if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS ||
			    errno == ENOMEM) {
				/* Out of descriptors: stop accepting for a moment
				 * instead of spinning on a full backlog. */
				atomic_fetch_add_explicit(&w->emfile_pauses, 1,
							  memory_order_relaxed);
				w->paused_until_ms = w->now_ms + EMFILE_BACKOFF_MS;
				listeners_arm(w, 0);
			}
			return;
		}
		if (svc == NULL || !svc->in_use) {
			close_fd(fd, 1);
			continue;
		}
		new_conn(w, svc, fd, &peer);
	}
}

/* --------------------------------------------------------------- control */

int l4_worker_command(struct l4_worker *w, int op, int fd, uint32_t svc_id)
{
	struct l4_cmd *cmd = calloc(1, sizeof(*cmd)), **tail;
	uint64_t one = 1;

	if (cmd == NULL)
		return -ENOMEM;
	cmd->op = op;
	cmd->fd = fd;
	cmd->svc_id = svc_id;
	pthread_mutex_lock(&w->cmd_lock);
	for (tail = &w->cmds; *tail; tail = &(*tail)->next)
		;
	*tail = cmd;
	pthread_mutex_unlock(&w->cmd_lock);
	if (write(w->evfd, &one, sizeof(one)) < 0 && errno != EAGAIN)
		return -errno;
	return 0;
}

static void listener_add(struct l4_worker *w, int fd, uint32_t svc_id)
{
	struct epoll_event ev;

	if (w->draining || w->stopping) {
		close(fd);
		return;
	}
	if (w->nlisteners == w->cap_listeners) {
		uint32_t cap = w->cap_listeners ? w->cap_listeners * 2 : 8;
		struct l4_listener *n = realloc(w->listeners, cap * sizeof(*n));
		if (n == NULL) {
			close(fd);
			return;
		}
		w->listeners = n;
		w->cap_listeners = cap;
	}
	(void)fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
	ev.events = w->paused_until_ms ? 0 : EPOLLIN;
	ev.data.u64 = ((uint64_t)w->nlisteners << 2) | TAG_LISTENER;
	if (epoll_ctl(w->epfd, EPOLL_CTL_ADD, fd, &ev) < 0) {
		close(fd);
		return;
	}
	w->listeners[w->nlisteners].fd = fd;
	w->listeners[w->nlisteners].svc_id = svc_id;
	w->listeners[w->nlisteners].paused = 0;
	w->listeners[w->nlisteners].udp = l4_udp_listener_setup(fd) == 1;
	w->nlisteners++;
}

/* Close the listeners of one service (all of them when all != 0). */
static void listeners_del(struct l4_worker *w, uint32_t svc_id, int all)
{
	uint32_t i = 0, j = 0;

	for (i = 0; i < w->nlisteners; i++) {
		struct l4_listener *l = &w->listeners[i];
		if (all || l->svc_id == svc_id) {
			/* Flows reply through their listener: they go first. */
			if (l->udp)
				l4_udp_close_flows(w, l->fd);
			close(l->fd);
			continue;
		}
		if (i != j) {
			struct epoll_event ev = { .events = w->paused_until_ms ? 0 : EPOLLIN,
						  .data.u64 = ((uint64_t)j << 2) | TAG_LISTENER };
			w->listeners[j] = *l;
			(void)epoll_ctl(w->epfd, EPOLL_CTL_MOD, l->fd, &ev);
		}
		j++;
	}
	w->nlisteners = j;
}

static void reset_slot(struct l4_worker *w, uint32_t slot_id)
{
	struct l4_conn *c, *next;
	for (c = w->conns; c; c = next) {
		next = c->next;
		if (c->slot && c->slot->id == slot_id)
			l4_conn_close(w, c, 1);
	}
}

static void run_commands(struct l4_worker *w)
{
	struct l4_cmd *cmd, *next;
	uint64_t v;

	if (read(w->evfd, &v, sizeof(v)) < 0 && errno != EAGAIN)
		return;
	pthread_mutex_lock(&w->cmd_lock);
	cmd = w->cmds;
	w->cmds = NULL;
	pthread_mutex_unlock(&w->cmd_lock);
	for (; cmd; cmd = next) {
		next = cmd->next;
		switch (cmd->op) {
		case L4_CMD_ADD_LISTENER:
			listener_add(w, cmd->fd, cmd->svc_id);
			break;
		case L4_CMD_DEL_LISTENERS:
			listeners_del(w, cmd->svc_id, 0);
			break;
		case L4_CMD_DRAIN:
			listeners_del(w, 0, 1);
			w->draining = 1;
			break;
		case L4_CMD_STOP:
			w->stopping = 1;
			break;
		case L4_CMD_RESET_SLOT:
			reset_slot(w, cmd->svc_id);
			break;
		}
		free(cmd);
	}
}

/* ------------------------------------------------------------ event loop */

static void run_timers(struct l4_worker *w)
{
	unsigned n = 0;

	if (w->ntimers == 0) {
		w->wheel_ms = w->now_ms - w->now_ms % L4_TICK_MS;
		return;
	}
	while (w->wheel_ms <= w->now_ms && n++ < L4_WHEEL_SIZE) {
		struct l4_conn **b = &w->wheel[(w->wheel_ms / L4_TICK_MS) & (L4_WHEEL_SIZE - 1)];
		struct l4_conn *c = *b, *next;
		for (; c; c = next) {
			next = c->tnext;
			if (c->deadline_ms <= w->now_ms) {
				timer_del(w, c);
				conn_timeout(w, c);
			}
		}
		w->wheel_ms += L4_TICK_MS;
	}
	if (w->wheel_ms <= w->now_ms) /* we slept past a whole turn */
		w->wheel_ms = w->now_ms - w->now_ms % L4_TICK_MS;
}

static void run_queue(struct l4_worker *w)
{
	struct l4_conn *c = w->runq, *next;

	w->runq = NULL;
	for (; c; c = next) {
		next = c->qnext;
		c->flags &= ~L4_QUEUED;
		if (c->state == 0) {
			c->qnext = w->dead;
			w->dead = c;
			continue;
		}
		conn_pump(w, c);
	}
}

static void sweep_templates(struct l4_worker *w)
{
	uint32_t i;
	for (i = 0; i < w->dp->max_services; i++) {
		struct l4_service *svc = l4_dp_service(w->dp, i);
		if (svc == NULL || svc->persist == NULL)
			continue;
		pthread_mutex_lock(&svc->lock);
		l4_persist_expire(svc, w->now_ms);
		pthread_mutex_unlock(&svc->lock);
	}
}

static int loop_timeout(struct l4_worker *w)
{
	if (w->runq)
		return 0;
	if (w->ntimers || w->ghosts_fin.len || w->ghosts_rst.len || w->paused_until_ms)
		return L4_TICK_MS;
	return SWEEP_MS;
}

static void worker_shutdown(struct l4_worker *w)
{
	while (w->conns)
		l4_conn_close(w, w->conns, 1);
	run_queue(w);
	free_dead(w);
	listeners_del(w, 0, 1);
	ghosts_expire(&w->ghosts_fin, w->now_ms, 1);
	ghosts_expire(&w->ghosts_rst, w->now_ms, 1);
	l4_pipe_pool_flush(w);
	free(w->flows);
	w->flows = NULL;
	w->nflows = w->flow_buckets = 0;
	free(w->udp_bufs);
	w->udp_bufs = NULL;
}

int l4_worker_run(struct l4_worker *w)
{
	struct epoll_event ev[MAX_EVENTS];
	int rc = 0;

	w->now_ms = l4_now_ms();
	w->wheel_ms = w->now_ms - w->now_ms % L4_TICK_MS;
	w->next_sweep_ms = w->now_ms + SWEEP_MS;
	while (!w->stopping) {
		int i, n = epoll_wait(w->epfd, ev, MAX_EVENTS, loop_timeout(w));
		if (n < 0) {
			if (errno == EINTR)
				continue;
			rc = -errno;
			break;
		}
		w->now_ms = l4_now_ms();
		for (i = 0; i < n; i++) {
			uint64_t u = ev[i].data.u64;
			switch (TAG_OF(u)) {
			case TAG_CLIENT:
			case TAG_BACKEND:
				conn_event(w, PTR_OF(u), TAG_OF(u), ev[i].events);
				break;
			case TAG_LISTENER:
				do_accept(w, (uint32_t)(u >> 2));
				break;
			case TAG_CONTROL:
				run_commands(w);
				break;
			}
		}
		run_queue(w);
		run_timers(w);
		ghosts_expire(&w->ghosts_fin, w->now_ms, 0);
		ghosts_expire(&w->ghosts_rst, w->now_ms, 0);
		if (w->paused_until_ms && w->now_ms >= w->paused_until_ms) {
			w->paused_until_ms = 0;
			listeners_arm(w, 1);
		}
		if (w->index == 0 && w->now_ms >= w->next_sweep_ms) {
			sweep_templates(w);
			w->next_sweep_ms = w->now_ms + SWEEP_MS;
		}
		free_dead(w);
	}
	worker_shutdown(w);
	return rc;
}
