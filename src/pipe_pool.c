/* Per-worker pools of splice pipes and copy buffers (HAProxy's pipe pool and
 * its splice-auto): a connection holds one only while data is in flight, so
 * idle connections cost neither.  A direction starts with a copy buffer,
 * which is cheaper than a pipe for small messages, and moves to a splice
 * pipe once a read fills a whole buffer (see worker.c). */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <unistd.h>

#include "l4lb.h"

static struct l4_pipe *pool_pop(struct l4_pipe **head, uint32_t *n)
{
	struct l4_pipe *p = *head;
	if (p != NULL) {
		*head = p->next;
		(*n)--;
	}
	return p;
}

static struct l4_pipe *new_buffer(struct l4_worker *w, struct l4_pipe *p)
{
	p->rfd = p->wfd = -1;
	p->buf = malloc(w->dp->buf_size);
	if (p->buf == NULL) {
		free(p);
		return NULL;
	}
	return p;
}

/* A kernel pipe when `splice` (and the data plane splices), else a copy
 * buffer; from the pool or new.  NULL with errno set when none can be had. */
struct l4_pipe *l4_pipe_get(struct l4_worker *w, int splice)
{
	struct l4_pipe *p;
	int fds[2];

	splice = splice && w->dp->use_splice;
	p = splice ? pool_pop(&w->free_pipes, &w->nfree_pipes)
		   : pool_pop(&w->free_bufs, &w->nfree_bufs);
	if (p != NULL) {
		atomic_fetch_sub_explicit(&w->pipes_free, 1, memory_order_relaxed);
		goto out;
	}
	p = calloc(1, sizeof(*p));
	if (p == NULL)
		return NULL;
	if (!splice) {
		if (new_buffer(w, p) == NULL)
			return NULL;
		goto out;
	}
	if (pipe2(fds, O_NONBLOCK | O_CLOEXEC) < 0) {
		/* Out of fds: copy rather than stall the connection. */
		if (new_buffer(w, p) == NULL)
			return NULL;
		atomic_fetch_add_explicit(&w->splice_fallbacks, 1, memory_order_relaxed);
		goto out;
	}
	/* Best effort: the pipe keeps the default size if the limit says no.  An
	 * unprivileged user over fs.pipe-user-pages-soft gets 2-page pipes, which
	 * would cost more syscalls than copying: use a buffer instead. */
	if (w->dp->pipe_size != 65536)
		(void)fcntl(fds[0], F_SETPIPE_SZ, (int)w->dp->pipe_size);
	if (fcntl(fds[0], F_GETPIPE_SZ) < (int)w->dp->buf_size) {
		close(fds[0]);
		close(fds[1]);
		if (new_buffer(w, p) == NULL)
			return NULL;
		atomic_fetch_add_explicit(&w->splice_fallbacks, 1, memory_order_relaxed);
		goto out;
	}
	p->rfd = fds[0];
	p->wfd = fds[1];
out:
	p->data = 0;
	p->off = 0;
	p->next = NULL;
	atomic_fetch_add_explicit(&w->pipes_used, 1, memory_order_relaxed);
	return p;
}

/* Close a pipe or free a buffer for good (it may still hold data). */
void l4_pipe_kill(struct l4_worker *w, struct l4_pipe *p)
{
	if (p->rfd >= 0) {
		close(p->rfd);
		close(p->wfd);
	}
	free(p->buf);
	free(p);
	atomic_fetch_sub_explicit(&w->pipes_used, 1, memory_order_relaxed);
}

/* Return a pipe or buffer: recycled only when empty and its pool has room. */
void l4_pipe_put(struct l4_worker *w, struct l4_pipe *p)
{
	struct l4_pipe **head = p->buf ? &w->free_bufs : &w->free_pipes;
	uint32_t *n = p->buf ? &w->nfree_bufs : &w->nfree_pipes;

	if (p->data != 0 || *n >= w->dp->max_pipes) {
		l4_pipe_kill(w, p);
		return;
	}
	p->next = *head;
	*head = p;
	(*n)++;
	atomic_fetch_sub_explicit(&w->pipes_used, 1, memory_order_relaxed);
	atomic_fetch_add_explicit(&w->pipes_free, 1, memory_order_relaxed);
}

void l4_pipe_pool_flush(struct l4_worker *w)
{
	struct l4_pipe *p;
	while ((p = pool_pop(&w->free_pipes, &w->nfree_pipes)) != NULL ||
	       (p = pool_pop(&w->free_bufs, &w->nfree_bufs)) != NULL) {
		atomic_fetch_sub_explicit(&w->pipes_free, 1, memory_order_relaxed);
		atomic_fetch_add_explicit(&w->pipes_used, 1, memory_order_relaxed);
		l4_pipe_kill(w, p);
	}
}
