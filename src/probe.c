/* TCP connect checks (see probe.h).  A probe is a bare non-blocking socket
 * found by its fd; the one epoll set holds the sockets still connecting and a
 * timerfd armed for the earliest deadline, so a caller needs to watch one fd
 * and every harvest costs one epoll_wait however many probes finished.
 *
 * Sockets are reused: a finished probe is reset with connect(AF_UNSPEC) (an
 * RST when it was connected, like close() with SO_LINGER 0) and kept for the
 * next probe of its family, still in the epoll set with EPOLLONESHOT, so a
 * probe costs no socket(), close() or epoll registration of its own.  The
 * kernel's handshake is most of what a check costs; creating and destroying
 * a socket each time came next. */
#define _GNU_SOURCE
#include <errno.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#include "probe.h"

#define EVENT_BATCH 1024
/* Idle sockets kept per address family for reuse. */
#define POOL_MAX 4096

struct probe {
	int64_t id;
	uint16_t family;
	uint64_t start_ns;
	uint64_t deadline_ns;
	uint32_t heap_pos;
	int fd;		    /* -1 unless a probe is in flight on it */
	uint8_t registered; /* in the epoll set (possibly disarmed) */
};

struct pool {
	int fds[POOL_MAX];
	uint32_t n;
};

struct l4_prober {
	int epfd;
	int tfd;
	uint64_t armed_ns;	/* the timerfd's deadline, 0 while disarmed */
	struct probe *by_fd;	/* indexed by fd */
	uint32_t nslots;
	int32_t *heap;		/* fds, earliest deadline first */
	uint32_t nheap, heap_cap;
	struct l4_probe_result *ready; /* room for one result per probe in flight */
	uint32_t nready, ready_cap;
	struct pool pool4, pool6;
	struct epoll_event events[EVENT_BATCH];
};

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* ---- the deadline heap ---- */

static int heap_less(const struct l4_prober *p, uint32_t a, uint32_t b)
{
	return p->by_fd[p->heap[a]].deadline_ns < p->by_fd[p->heap[b]].deadline_ns;
}

static void heap_place(struct l4_prober *p, uint32_t pos, int32_t fd)
{
	p->heap[pos] = fd;
	p->by_fd[fd].heap_pos = pos;
}

static void heap_swap(struct l4_prober *p, uint32_t a, uint32_t b)
{
	int32_t fd = p->heap[a];

	heap_place(p, a, p->heap[b]);
	heap_place(p, b, fd);
}

static void heap_up(struct l4_prober *p, uint32_t pos)
{
	while (pos > 0 && heap_less(p, pos, (pos - 1) / 2)) {
		heap_swap(p, pos, (pos - 1) / 2);
		pos = (pos - 1) / 2;
	}
}

static void heap_down(struct l4_prober *p, uint32_t pos)
{
	for (;;) {
		uint32_t least = pos, kid = 2 * pos + 1;

		if (kid < p->nheap && heap_less(p, kid, least))
			least = kid;
		if (kid + 1 < p->nheap && heap_less(p, kid + 1, least))
			least = kid + 1;
		if (least == pos)
			return;
		heap_swap(p, pos, least);
		pos = least;
	}
}

static void heap_remove(struct l4_prober *p, uint32_t pos)
{
	p->nheap--;
	if (pos == p->nheap)
		return;
	heap_place(p, pos, p->heap[p->nheap]);
	heap_down(p, pos);
	heap_up(p, pos);
}

/* Arm the timerfd for the earliest deadline unless it already fires sooner;
 * a deadline that went away meanwhile costs one spurious wake-up at most. */
static void arm(struct l4_prober *p)
{
	struct itimerspec its = {0};
	uint64_t next;

	if (p->nheap == 0)
		return;
	next = p->by_fd[p->heap[0]].deadline_ns;
	if (p->armed_ns != 0 && p->armed_ns <= next)
		return;
	its.it_value.tv_sec = (time_t)(next / 1000000000u);
	its.it_value.tv_nsec = (long)(next % 1000000000u);
	if (timerfd_settime(p->tfd, TFD_TIMER_ABSTIME, &its, NULL) == 0)
		p->armed_ns = next;
}

/* ---- results ---- */

static void report(struct l4_prober *p, int64_t id, int err, uint64_t start_ns, uint64_t now)
{
	struct l4_probe_result *r = &p->ready[p->nready++];
	uint64_t us = now > start_ns ? (now - start_ns) / 1000u : 0;

	r->id = id;
	r->err = err;
	r->elapsed_us = us > UINT32_MAX ? UINT32_MAX : (uint32_t)us;
}

static struct pool *pool_of(struct l4_prober *p, int family)
{
	return family == AF_INET6 ? &p->pool6 : &p->pool4;
}

/* Closing also leaves the epoll set. */
static void discard(struct l4_prober *p, int fd)
{
	if ((uint32_t)fd < p->nslots)
		p->by_fd[fd].registered = 0;
	close(fd);
}

/* Reset the socket's connection (a reset if it was connected: SO_LINGER 0)
 * and keep the socket for another probe; close it if it cannot be reused.
 * Only a socket whose oneshot event fired or never was armed may come here:
 * an armed one would report the disconnect as an event of its next probe. */
static void recycle(struct l4_prober *p, int fd, int family)
{
	static const struct sockaddr unspec = {.sa_family = AF_UNSPEC};
	struct pool *pool = pool_of(p, family);

	if (pool->n < POOL_MAX && connect(fd, &unspec, sizeof(unspec)) == 0)
		pool->fds[pool->n++] = fd;
	else
		discard(p, fd);
}

/* Report and release the socket: reused when its oneshot event fired (`fired`),
 * closed otherwise (a timeout, whose oneshot is still armed). */
static void finish(struct l4_prober *p, struct probe *pr, int err, int fired, uint64_t now)
{
	int fd = pr->fd;

	heap_remove(p, pr->heap_pos);
	pr->fd = -1;
	report(p, pr->id, err, pr->start_ns, now);
	if (fired)
		recycle(p, fd, pr->family);
	else
		discard(p, fd);
}

static int socket_error(int fd)
{
	int err = 0;
	socklen_t len = sizeof(err);

	if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0)
		return errno;
	return err;
}

/* ---- the prober ---- */

struct l4_prober *l4_prober_new(void)
{
	struct l4_prober *p = calloc(1, sizeof(*p));
	struct epoll_event ev = {.events = EPOLLIN};
	int saved;

	if (p == NULL)
		return NULL;
	p->tfd = -1;
	p->epfd = epoll_create1(EPOLL_CLOEXEC);
	if (p->epfd < 0)
		goto fail;
	p->tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
	if (p->tfd < 0)
		goto fail;
	ev.data.fd = p->tfd;
	if (epoll_ctl(p->epfd, EPOLL_CTL_ADD, p->tfd, &ev) < 0)
		goto fail;
	return p;
fail:
	saved = errno;
	l4_prober_free(p);
	errno = saved;
	return NULL;
}

void l4_prober_free(struct l4_prober *p)
{
	uint32_t i;

	if (p == NULL)
		return;
	for (i = 0; i < p->nheap; i++)
		close(p->heap[i]);
	for (i = 0; i < p->pool4.n; i++)
		close(p->pool4.fds[i]);
	for (i = 0; i < p->pool6.n; i++)
		close(p->pool6.fds[i]);
	if (p->tfd >= 0)
		close(p->tfd);
	if (p->epfd >= 0)
		close(p->epfd);
	free(p->by_fd);
	free(p->heap);
	free(p->ready);
	free(p);
}

int l4_prober_fd(const struct l4_prober *p)
{
	return p->epfd;
}

uint32_t l4_prober_inflight(const struct l4_prober *p)
{
	return p->nheap;
}

static int grow(void **buf, uint32_t *cap, uint32_t want, size_t size)
{
	uint32_t n = *cap ? *cap : 64;
	void *nbuf;

	if (want <= *cap)
		return 0;
	while (n < want)
		n *= 2;
	nbuf = realloc(*buf, (size_t)n * size);
	if (nbuf == NULL)
		return -ENOMEM;
	*buf = nbuf;
	*cap = n;
	return 0;
}

static int grow_slots(struct l4_prober *p, int fd)
{
	uint32_t old = p->nslots, i;

	if ((uint32_t)fd < old)
		return 0;
	if (grow((void **)&p->by_fd, &p->nslots, (uint32_t)fd + 1, sizeof(*p->by_fd)) < 0)
		return -ENOMEM;
	for (i = old; i < p->nslots; i++) {
		p->by_fd[i].fd = -1;
		p->by_fd[i].registered = 0;
	}
	return 0;
}

static int sockaddr_of(const struct l4_probe_req *r, struct sockaddr_storage *ss)
{
	memset(ss, 0, sizeof(*ss));
	if (r->family == AF_INET) {
		struct sockaddr_in *sin = (struct sockaddr_in *)ss;

		sin->sin_family = AF_INET;
		sin->sin_port = htons(r->port);
		memcpy(&sin->sin_addr, r->addr, 4);
		return (int)sizeof(*sin);
	}
	if (r->family == AF_INET6) {
		struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)ss;

		sin6->sin6_family = AF_INET6;
		sin6->sin6_port = htons(r->port);
		memcpy(&sin6->sin6_addr, r->addr, 16);
		return (int)sizeof(*sin6);
	}
	return -EAFNOSUPPORT;
}

/* Start one connect; 0 when it is in flight, else the errno it ended with. */
static int start(struct l4_prober *p, const struct l4_probe_req *r, uint64_t now)
{
	static const struct linger reset = {.l_onoff = 1, .l_linger = 0};
	struct sockaddr_storage ss;
	struct epoll_event ev = {.events = EPOLLOUT | EPOLLONESHOT};
	struct pool *pool = pool_of(p, r->family);
	struct probe *pr;
	int len = sockaddr_of(r, &ss), fd, err;

	if (len < 0)
		return -len;
	if (pool->n > 0) {
		fd = pool->fds[--pool->n];
	} else {
		fd = socket(r->family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
		if (fd < 0)
			return errno;
		if (grow_slots(p, fd) < 0) {
			close(fd);
			return ENOMEM;
		}
		if (setsockopt(fd, SOL_SOCKET, SO_LINGER, &reset, sizeof(reset)) < 0)
			goto fail;
	}
	if (connect(fd, (struct sockaddr *)&ss, (socklen_t)len) == 0) {
		recycle(p, fd, r->family);
		return 0;
	}
	if (errno != EINPROGRESS) {
		err = errno;
		recycle(p, fd, r->family);
		return err;
	}
	pr = &p->by_fd[fd];
	ev.data.fd = fd;
	if (epoll_ctl(p->epfd, pr->registered ? EPOLL_CTL_MOD : EPOLL_CTL_ADD, fd, &ev) < 0)
		goto fail;
	pr->registered = 1;
	pr->id = r->id;
	pr->family = r->family;
	pr->fd = fd;
	pr->start_ns = now;
	pr->deadline_ns = now + (uint64_t)r->timeout_ms * 1000000u;
	heap_place(p, p->nheap++, fd);
	heap_up(p, p->nheap - 1);
	return -1;
fail:
	err = errno;
	discard(p, fd);
	return err;
}

int l4_prober_submit(struct l4_prober *p, const struct l4_probe_req *reqs, uint32_t n)
{
	uint64_t now = now_ns();
	uint32_t i, want = p->nheap + p->nready + n;
	int err;

	/* Every probe ends in exactly one result, so reserving here means the
	 * harvest never allocates. */
	if (want < n || grow((void **)&p->ready, &p->ready_cap, want, sizeof(*p->ready)) < 0 ||
	    grow((void **)&p->heap, &p->heap_cap, p->nheap + n, sizeof(*p->heap)) < 0)
		return -ENOMEM;
	for (i = 0; i < n; i++) {
		err = start(p, &reqs[i], now);
		if (err >= 0)
			report(p, reqs[i].id, err, now, now);
	}
	arm(p);
	return (int)p->nready;
}

int l4_prober_poll(struct l4_prober *p, uint32_t max)
{
	uint64_t now = now_ns(), expirations;
	int n, i, fd, err, batch;

	do {
		if (p->nready >= max)
			break;
		batch = max - p->nready < EVENT_BATCH ? (int)(max - p->nready) : EVENT_BATCH;
		n = epoll_wait(p->epfd, p->events, batch, 0);
		if (n < 0)
			return errno == EINTR ? (int)p->nready : -errno;
		now = now_ns();
		for (i = 0; i < n; i++) {
			fd = p->events[i].data.fd;
			if (fd == p->tfd) {
				if (read(fd, &expirations, sizeof(expirations)) > 0)
					p->armed_ns = 0;
				continue;
			}
			if ((uint32_t)fd >= p->nslots || p->by_fd[fd].fd != fd)
				continue;
			/* EPOLLOUT alone means connected; an error comes with EPOLLERR. */
			err = p->events[i].events & (EPOLLERR | EPOLLHUP) ? socket_error(fd) : 0;
			if (err == 0 && (p->events[i].events & EPOLLERR))
				err = ECONNRESET;
			finish(p, &p->by_fd[fd], err, 1, now);
		}
	} while (n == batch);

	if (p->armed_ns != 0 && p->armed_ns <= now)
		p->armed_ns = 0; /* fired, or about to: re-arm below either way */
	while (p->nready < max && p->nheap > 0 && p->by_fd[p->heap[0]].deadline_ns <= now) {
		struct probe *pr = &p->by_fd[p->heap[0]];
		struct sockaddr_storage peer;
		socklen_t len = sizeof(peer);

		/* A caller too late to harvest in time must not turn a connect
		 * that did complete into a timeout. */
		if (getpeername(pr->fd, (struct sockaddr *)&peer, &len) == 0)
			err = 0;
		else if ((err = socket_error(pr->fd)) == 0)
			err = L4_PROBE_TIMEOUT;
		finish(p, pr, err, 0, now);
	}
	arm(p);
	return (int)p->nready;
}

const struct l4_probe_result *l4_prober_results(const struct l4_prober *p, uint32_t *n)
{
	*n = p->nready;
	return p->ready;
}

void l4_prober_consume(struct l4_prober *p)
{
	p->nready = 0;
}
