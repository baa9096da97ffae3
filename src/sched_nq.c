/* Never queue, bit-exact with Linux IPVS ip_vs_nq.c
 * (docs/ipvs-schedulers.md §8): the first idle dest wins outright, else the
 * sed ratio (A + 1) / weight decides.  Stateless.
 */
#include "l4lb.h"

/* loh / lw > doh / dw, as overflow-free products. */
static inline int nq_worse(int64_t loh, int32_t lw, int64_t doh, int32_t dw)
{
	return (__int128)loh * dw > (__int128)doh * lw;
}

static struct l4_slot *nq_pick(struct l4_service *svc, const struct l4_pick_ctx *ctx)
{
	struct l4_slot *least = NULL;
	int64_t loh = 0;
	uint32_t i;

	(void)ctx;
	for (i = 0; i < svc->ndests; i++) {
		struct l4_slot *d = svc->dests[i];
		int64_t a, doh;

		if (d->overload || d->weight == 0)
			continue;
		a = atomic_load_explicit(&d->active, memory_order_relaxed);
		/* §8: an idle dest is taken at once, whatever follows. */
		if (a == 0)
			return d;
		doh = a + 1;
		if (!least || nq_worse(loh, least->weight, doh, d->weight)) {
			least = d;
			loh = doh;
		}
	}
	return least;
}

static int nq_init(struct l4_service *svc)
{
	(void)svc;
	return 0;
}

const struct l4_sched_ops l4_sched_nq = {
	.name = "nq",
	.init = nq_init,
	.done = NULL,
	.update = NULL,
	.pick = nq_pick,
};
