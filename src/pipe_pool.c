/* Per-worker pool of splice pipes (HAProxy's pipe pool): a connection holds
 * a pipe only while data is in flight, so idle connections cost no pipes. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <unistd.h>

#include "l4lb.h"

/* A pipe from the pool or a new one; NULL with errno set when none can be
 * had (fd or memory exhaustion). */
struct l4_pipe *l4_pipe_get(struct l4_worker *w)
{
	struct l4_pipe *p = w->free_pipes;
	int fds[2];

	if (p != NULL) {
		w->free_pipes = p->next;
		w->nfree_pipes--;
		atomic_fetch_sub_explicit(&w->pipes_free, 1, memory_order_relaxed);
		goto out;
	}
	p = calloc(1, sizeof(*p));
	if (p == NULL)
		return NULL;
	if (!w->dp->use_splice) {
		p->rfd = p->wfd = -1;
		p->buf = malloc(w->dp->pipe_size);
		if (p->buf == NULL) {
			free(p);
			return NULL;
		}
		goto out;
	}
	if (pipe2(fds, O_NONBLOCK | O_CLOEXEC) < 0) {
		/* Out of fds: copy through a buffer rather than stall the
		 * connection (HAProxy falls back the same way). */
		p->rfd = p->wfd = -1;
		p->buf = malloc(w->dp->pipe_size);
		if (p->buf == NULL) {
			free(p);
			return NULL;
		}
		atomic_fetch_add_explicit(&w->splice_fallbacks, 1, memory_order_relaxed);
		goto out;
	}
	/* Best effort: the pipe keeps the default size if the limit says no. */
	if (w->dp->pipe_size != 65536)
		(void)fcntl(fds[0], F_SETPIPE_SZ, (int)w->dp->pipe_size);
	p->rfd = fds[0];
	p->wfd = fds[1];
out:
	p->data = 0;
	p->off = 0;
	p->next = NULL;
	atomic_fetch_add_explicit(&w->pipes_used, 1, memory_order_relaxed);
	return p;
}

/* Close a pipe for good (it may still hold data). */
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

/* Return a pipe: recycled only when empty and the pool has room. */
void l4_pipe_put(struct l4_worker *w, struct l4_pipe *p)
{
	/* A fallback buffer in splice mode is not worth keeping. */
	if (p->data != 0 || w->nfree_pipes >= w->dp->max_pipes || (p->buf && w->dp->use_splice)) {
		l4_pipe_kill(w, p);
		return;
	}
	p->next = w->free_pipes;
	w->free_pipes = p;
	w->nfree_pipes++;
	atomic_fetch_sub_explicit(&w->pipes_used, 1, memory_order_relaxed);
	atomic_fetch_add_explicit(&w->pipes_free, 1, memory_order_relaxed);
}

void l4_pipe_pool_flush(struct l4_worker *w)
{
	struct l4_pipe *p;
	while ((p = w->free_pipes) != NULL) {
		w->free_pipes = p->next;
		w->nfree_pipes--;
		atomic_fetch_sub_explicit(&w->pipes_free, 1, memory_order_relaxed);
		atomic_fetch_add_explicit(&w->pipes_used, 1, memory_order_relaxed);
		l4_pipe_kill(w, p);
	}
}
