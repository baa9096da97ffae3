/* Shortest expected delay, bit-exact with Linux IPVS ip_vs_sed.c
 * (docs/ipvs-schedulers.md §7): the wlc loop with overhead A + 1, so
 * inactive connections are ignored.  Stateless.
 */
#include "l4lb.h"

static inline int64_t sed_overhead(const struct l4_slot *d)
{
	return (int64_t)atomic_load_explicit(&d->active, memory_order_relaxed) + 1;
}

/* loh / lw > doh / dw, as overflow-free products. */
static inline int sed_worse(int64_t loh, int32_t lw, int64_t doh, int32_t dw)
{
	return (__int128)loh * dw > (__int128)doh * lw;
}

static struct l4_slot *sed_pick(struct l4_service *svc, const struct l4_pick_ctx *ctx)
{
	struct l4_slot *least = NULL;
	int64_t loh = 0;
	uint32_t i;

	(void)ctx;
	for (i = 0; i < svc->ndests; i++) {
		struct l4_slot *d = svc->dests[i];

		if (!d->overload && d->weight > 0) {
			least = d;
			loh = sed_overhead(d);
			break;
		}
	}
	if (!least)
		return NULL;
	for (i++; i < svc->ndests; i++) {
		struct l4_slot *d = svc->dests[i];
		int64_t doh;

		if (d->overload)
			continue;
		doh = sed_overhead(d);
		if (sed_worse(loh, least->weight, doh, d->weight)) {
			least = d;
			loh = doh;
		}
	}
	return least;
}

static int sed_init(struct l4_service *svc)
{
	(void)svc;
	return 0;
}

const struct l4_sched_ops l4_sched_sed = {
	.name = "sed",
	.init = sed_init,
	.done = NULL,
	.update = NULL,
	.pick = sed_pick,
};
