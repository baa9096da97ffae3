/* What the least-connection family (lc wlc sed nq) shares: the overhead
 * formulas and the weighted comparison, exactly as IPVS computes them.
 * All of them are stateless and run with the service lock held. */
#ifndef L4LB_SCHED_LEAST_H
#define L4LB_SCHED_LEAST_H

#include "l4lb.h"

/* §5/§6: (A << 8) + T, the 6.1.187+ formula (= 257 A + I).  64-bit so that
 * no count can overflow it. */
static inline int64_t l4_overhead_conns(const struct l4_slot *d)
{
	int64_t a = atomic_load_explicit(&d->active, memory_order_relaxed);
	int64_t t = atomic_load_explicit(&d->total, memory_order_relaxed);

	return a * 256 + t;
}

/* §7/§8: A + 1, inactive connections ignored. */
static inline int64_t l4_overhead_active(const struct l4_slot *d)
{
	return (int64_t)atomic_load_explicit(&d->active, memory_order_relaxed) + 1;
}

/* loh / lw > doh / dw, compared as products like the kernel's s64 ones;
 * 128-bit so that 64-bit overheads times 32-bit weights cannot overflow. */
static inline int l4_ratio_worse(int64_t loh, int32_t lw, int64_t doh, int32_t dw)
{
	return (__int128)loh * dw > (__int128)doh * lw;
}

/* §6/§7: the first available dest is the initial candidate; a later one
 * replaces it when the candidate's overhead/weight ratio is worse.  Later
 * weight-0 dests cannot win: their side of the product is 0. */
static inline struct l4_slot *l4_pick_weighted_least(struct l4_service *svc,
						     int64_t (*overhead)(const struct l4_slot *))
{
	struct l4_slot *least = NULL;
	int64_t loh = 0;
	uint32_t i;

	for (i = 0; i < svc->ndests; i++) {
		struct l4_slot *d = svc->dests[i];

		if (!d->overload && d->weight > 0) {
			least = d;
			loh = overhead(d);
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
		doh = overhead(d);
		if (l4_ratio_worse(loh, least->weight, doh, d->weight)) {
			least = d;
			loh = doh;
		}
	}
	return least;
}

#endif
