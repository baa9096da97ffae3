/* Per-VIP connection counters.  The control plane publishes a service's VIP
 * list; a worker that accepted a connection looks up the address the client
 * dialled in it and counts the connection there, or as "other". */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "l4lb.h"

static int vip_equal(const struct l4_vip *a, uint8_t family, const uint8_t *addr,
		     uint16_t port)
{
	return a->family == family && a->port == port &&
	       memcmp(a->addr, addr, family == AF_INET6 ? 16 : 4) == 0;
}

int l4_service_set_vips(struct l4_service *svc, const struct l4_vip *list, uint32_t n)
{
	struct l4_vip_table *t = NULL, *old;
	uint32_t i, j;

	if (n > L4_MAX_VIPS)
		return -E2BIG;
	for (i = 0; i < n; i++)
		if (list[i].family != AF_INET && list[i].family != AF_INET6)
			return -EAFNOSUPPORT;
	if (n) {
		t = calloc(1, sizeof(*t) + n * sizeof(t->v[0]));
		if (t == NULL)
			return -ENOMEM;
		t->n = n;
		for (i = 0; i < n; i++) {
			t->v[i].family = list[i].family;
			t->v[i].port = list[i].port;
			memcpy(t->v[i].addr, list[i].addr, sizeof(t->v[i].addr));
		}
	}
	pthread_mutex_lock(&svc->lock);
	old = atomic_load_explicit(&svc->vips, memory_order_relaxed);
	/* A VIP that stays keeps its count (increments racing with this copy
	 * land in the old table and are lost: at most a few per change). */
	for (i = 0; t && old && i < t->n; i++)
		for (j = 0; j < old->n; j++)
			if (vip_equal(&old->v[j], t->v[i].family, t->v[i].addr, t->v[i].port)) {
				atomic_store_explicit(&t->v[i].total,
						      atomic_load(&old->v[j].total),
						      memory_order_relaxed);
				break;
			}
	atomic_store_explicit(&svc->vips, t, memory_order_release);
	if (old) {
		old->retired = svc->vips_retired;
		svc->vips_retired = old;
	}
	pthread_mutex_unlock(&svc->lock);
	return 0;
}

void l4_service_count_vip(struct l4_service *svc, const struct l4_pick_ctx *ctx)
{
	struct l4_vip_table *t = atomic_load_explicit(&svc->vips, memory_order_acquire);
	uint32_t i;

	if (t == NULL)
		return;
	for (i = 0; i < t->n; i++)
		if (vip_equal(&t->v[i], ctx->dfamily, ctx->daddr, ctx->dport)) {
			atomic_fetch_add_explicit(&t->v[i].total, 1, memory_order_relaxed);
			return;
		}
	atomic_fetch_add_explicit(&svc->vip_other, 1, memory_order_relaxed);
}

int l4_service_vip_stats(struct l4_service *svc, uint64_t *out, uint32_t max, uint64_t *other)
{
	struct l4_vip_table *t;
	uint32_t i, n;

	pthread_mutex_lock(&svc->lock);
	t = atomic_load_explicit(&svc->vips, memory_order_relaxed);
	n = t ? t->n : 0;
	for (i = 0; i < n && i < max; i++)
		out[i] = atomic_load_explicit(&t->v[i].total, memory_order_relaxed);
	*other = atomic_load_explicit(&svc->vip_other, memory_order_relaxed);
	pthread_mutex_unlock(&svc->lock);
	return (int)n;
}

void l4_service_reset_vip_counters(struct l4_service *svc)
{
	struct l4_vip_table *t;
	uint32_t i;

	pthread_mutex_lock(&svc->lock);
	t = atomic_load_explicit(&svc->vips, memory_order_relaxed);
	for (i = 0; t && i < t->n; i++)
		atomic_store(&t->v[i].total, 0);
	atomic_store(&svc->vip_other, 0);
	pthread_mutex_unlock(&svc->lock);
}

void l4_service_free_vips(struct l4_service *svc)
{
	struct l4_vip_table *t = atomic_load(&svc->vips), *next;

	free(t);
	for (t = svc->vips_retired; t; t = next) {
		next = t->retired;
		free(t);
	}
	atomic_store(&svc->vips, NULL);
	svc->vips_retired = NULL;
}
