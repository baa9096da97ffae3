/* The data plane object: workers, and the service and slot tables the
 * control plane fills in.  Services and slots are allocated on first use
 * and freed only with the data plane, so a worker never sees one vanish. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "l4lb.h"

static void worker_free(struct l4_worker *w)
{
	struct l4_cmd *cmd, *next;

	if (w == NULL)
		return;
	for (cmd = w->cmds; cmd; cmd = next) {
		next = cmd->next;
		if (cmd->op == L4_CMD_ADD_LISTENER)
			close(cmd->fd);
		free(cmd);
	}
	if (w->epfd >= 0)
		close(w->epfd);
	if (w->evfd >= 0)
		close(w->evfd);
	free(w->listeners);
	free(w->ghosts_fin.g);
	free(w->ghosts_rst.g);
	pthread_mutex_destroy(&w->cmd_lock);
	free(w);
}

static struct l4_worker *worker_new(struct l4_dp *dp, int index)
{
	struct l4_worker *w = calloc(1, sizeof(*w));
	struct epoll_event ev = { .events = EPOLLIN, .data.u64 = 3 /* control tag */ };

	if (w == NULL)
		return NULL;
	w->dp = dp;
	w->index = index;
	pthread_mutex_init(&w->cmd_lock, NULL);
	w->ghosts_fin.timeout_ms = dp->inactive_ms;
	w->ghosts_rst.timeout_ms = dp->reset_inactive_ms;
	w->epfd = epoll_create1(EPOLL_CLOEXEC);
	w->evfd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	if (w->epfd < 0 || w->evfd < 0 || epoll_ctl(w->epfd, EPOLL_CTL_ADD, w->evfd, &ev) < 0) {
		worker_free(w);
		return NULL;
	}
	return w;
}

struct l4_dp *l4_dp_new(uint32_t nworkers, uint32_t max_services, uint32_t max_slots,
			uint32_t pipe_size, uint32_t max_pipes, uint32_t inactive_ms,
			uint32_t reset_inactive_ms, int use_splice)
{
	struct l4_dp *dp = calloc(1, sizeof(*dp));
	uint32_t i;

	if (dp == NULL)
		return NULL;
	dp->nworkers = nworkers;
	dp->max_services = max_services;
	dp->max_slots = max_slots;
	dp->pipe_size = pipe_size;
	/* Copy buffers carry small exchanges only: a read that fills one moves the
	 * direction to a pipe, so they need not grow with the pipes. */
	dp->buf_size = pipe_size < L4_BUF_MAX ? pipe_size : L4_BUF_MAX;
	dp->max_pipes = max_pipes;
	dp->inactive_ms = inactive_ms;
	dp->reset_inactive_ms = reset_inactive_ms;
	dp->use_splice = use_splice;
	pthread_mutex_init(&dp->alloc_lock, NULL);
	dp->workers = calloc(nworkers, sizeof(*dp->workers));
	dp->services = calloc(max_services, sizeof(*dp->services));
	dp->slots = calloc(max_slots, sizeof(*dp->slots));
	if (!dp->workers || !dp->services || !dp->slots)
		goto fail;
	for (i = 0; i < nworkers; i++)
		if ((dp->workers[i] = worker_new(dp, (int)i)) == NULL)
			goto fail;
	return dp;
fail:
	l4_dp_free(dp);
	return NULL;
}

void l4_dp_free(struct l4_dp *dp)
{
	uint32_t i;

	if (dp == NULL)
		return;
	for (i = 0; dp->workers && i < dp->nworkers; i++)
		worker_free(dp->workers[i]);
	for (i = 0; dp->services && i < dp->max_services; i++) {
		struct l4_service *svc = atomic_load(&dp->services[i]);
		if (svc == NULL)
			continue;
		if (svc->sched && svc->sched->done)
			svc->sched->done(svc);
		l4_persist_free(svc->persist);
		l4_service_free_vips(svc);
		free(svc->dests);
		pthread_mutex_destroy(&svc->lock);
		free(svc);
	}
	for (i = 0; dp->slots && i < dp->max_slots; i++)
		free(atomic_load(&dp->slots[i]));
	free(dp->workers);
	free(dp->services);
	free(dp->slots);
	pthread_mutex_destroy(&dp->alloc_lock);
	free(dp);
}

struct l4_service *l4_dp_service(struct l4_dp *dp, uint32_t id)
{
	if (id >= dp->max_services)
		return NULL;
	return atomic_load_explicit(&dp->services[id], memory_order_acquire);
}

struct l4_slot *l4_dp_slot(struct l4_dp *dp, uint32_t id)
{
	if (id >= dp->max_slots)
		return NULL;
	return atomic_load_explicit(&dp->slots[id], memory_order_acquire);
}

struct l4_service *l4_dp_service_get(struct l4_dp *dp, uint32_t id)
{
	struct l4_service *svc;

	if (id >= dp->max_services)
		return NULL;
	pthread_mutex_lock(&dp->alloc_lock);
	svc = atomic_load(&dp->services[id]);
	if (svc == NULL && (svc = malloc(sizeof(*svc))) != NULL) {
		l4_service_init(svc, id);
		atomic_store_explicit(&dp->services[id], svc, memory_order_release);
	}
	pthread_mutex_unlock(&dp->alloc_lock);
	return svc;
}

int l4_dp_slot_set(struct l4_dp *dp, uint32_t id, const struct sockaddr *addr, socklen_t len)
{
	struct l4_slot *slot;
	int rc = 0;

	if (id >= dp->max_slots || len > sizeof(slot->addr))
		return -EINVAL;
	pthread_mutex_lock(&dp->alloc_lock);
	slot = atomic_load(&dp->slots[id]);
	if (slot == NULL) {
		slot = calloc(1, sizeof(*slot));
		if (slot == NULL) {
			rc = -ENOMEM;
			goto out;
		}
		slot->id = id;
		memcpy(&slot->addr, addr, len);
		slot->addrlen = len;
		atomic_store_explicit(&dp->slots[id], slot, memory_order_release);
	} else if (slot->linked) {
		rc = -EBUSY;
	} else if (slot->addrlen != len || memcmp(&slot->addr, addr, len) != 0) {
		/* A slot id is reused for another address only once nothing
		 * refers to it any more; counters start from zero. */
		if (atomic_load(&slot->total) || atomic_load(&slot->persist)) {
			rc = -EBUSY;
			goto out;
		}
		memset(slot, 0, sizeof(*slot));
		slot->id = id;
		memcpy(&slot->addr, addr, len);
		slot->addrlen = len;
	}
out:
	pthread_mutex_unlock(&dp->alloc_lock);
	return rc;
}

socklen_t l4_sockaddr_fill(struct sockaddr_storage *ss, int family, const uint8_t *addr,
			   uint16_t port)
{
	memset(ss, 0, sizeof(*ss));
	if (family == AF_INET6) {
		struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)ss;
		s6->sin6_family = AF_INET6;
		s6->sin6_port = htons(port);
		memcpy(&s6->sin6_addr, addr, 16);
		return sizeof(*s6);
	}
	struct sockaddr_in *s4 = (struct sockaddr_in *)ss;
	s4->sin_family = AF_INET;
	s4->sin_port = htons(port);
	memcpy(&s4->sin_addr, addr, 4);
	return sizeof(*s4);
}
