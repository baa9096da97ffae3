/* Least-connection, bit-exact with Linux IPVS ip_vs_lc.c
 * (docs/ipvs-schedulers.md §5).  Stateless: weights only matter as zero or
 * not, ties go to the first dest in list order.
 */
#include "l4lb.h"

/* §5: (A << 8) + T, the 6.1.187+ formula (= 257 A + I).  64-bit so that no
 * count can overflow it. */
static inline int64_t lc_overhead(const struct l4_slot *d)
{
	int64_t a = atomic_load_explicit(&d->active, memory_order_relaxed);
	int64_t t = atomic_load_explicit(&d->total, memory_order_relaxed);

	return a * 256 + t;
}

static struct l4_slot *lc_pick(struct l4_service *svc, const struct l4_pick_ctx *ctx)
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
		doh = lc_overhead(d);
		/* Strict <: the earlier dest keeps a tie. */
		if (!least || doh < loh) {
			least = d;
			loh = doh;
		}
	}
	return least;
}

static int lc_init(struct l4_service *svc)
{
	(void)svc;
	return 0;
}

const struct l4_sched_ops l4_sched_lc = {
	.name = "lc",
	.init = lc_init,
	.done = NULL,
	.update = NULL,
	.pick = lc_pick,
};
