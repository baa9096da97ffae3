/* Never queue, bit-exact with Linux IPVS ip_vs_nq.c
 * (docs/ipvs-schedulers.md §8): the first idle dest wins outright, else the
 * sed ratio (A + 1) / weight decides. */
#include "sched-least.h"

static struct l4_slot *nq_pick(struct l4_service *svc, const struct l4_pick_ctx *ctx)
{
	struct l4_slot *least = NULL;
	int64_t loh = 0;
	uint32_t i;

	(void)ctx;
	for (i = 0; i < svc->ndests; i++) {
		struct l4_slot *d = svc->dests[i];
		int64_t doh;

		if (d->overload || d->weight == 0)
			continue;
		/* §8: an idle dest is taken at once, whatever follows. */
		if (atomic_load_explicit(&d->active, memory_order_relaxed) == 0)
			return d;
		doh = l4_overhead_active(d);
		if (!least || l4_ratio_worse(loh, least->weight, doh, d->weight)) {
			least = d;
			loh = doh;
		}
	}
	return least;
}

const struct l4_sched_ops l4_sched_nq = {
	.name = "nq",
	.pick = nq_pick,
};
