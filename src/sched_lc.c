/* Least-connection, bit-exact with Linux IPVS ip_vs_lc.c
 * (docs/ipvs-schedulers.md §5): weights only matter as zero or not, ties go
 * to the first dest in list order. */
#include "sched-least.h"

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
		doh = l4_overhead_conns(d);
		/* Strict <: the earlier dest keeps a tie. */
		if (!least || doh < loh) {
			least = d;
			loh = doh;
		}
	}
	return least;
}

const struct l4_sched_ops l4_sched_lc = {
	.name = "lc",
	.pick = lc_pick,
};
