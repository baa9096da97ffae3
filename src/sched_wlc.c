/* Weighted least-connection, bit-exact with Linux IPVS ip_vs_wlc.c
 * (docs/ipvs-schedulers.md §6).  Stateless.
 */
#include "l4lb.h"

/* §5/§6: (A << 8) + T, the 6.1.187+ formula. */
static inline int64_t wlc_overhead(const struct l4_slot *d)
{
	int64_t a = atomic_load_explicit(&d->active, memory_order_relaxed);
	int64_t t = atomic_load_explicit(&d->total, memory_order_relaxed);

	return a * 256 + t;
}

/* loh / lw > doh / dw, compared as products like the kernel's s64 ones;
 * 128-bit so that 64-bit overheads times 32-bit weights cannot overflow. */
static inline int wlc_worse(int64_t loh, int32_t lw, int64_t doh, int32_t dw)
{
	return (__int128)loh * dw > (__int128)doh * lw;
}

static struct l4_slot *wlc_pick(struct l4_service *svc, const struct l4_pick_ctx *ctx)
{
	struct l4_slot *least = NULL;
	int64_t loh = 0;
	uint32_t i;

	(void)ctx;
	/* §6: the first available dest is the initial candidate. */
	for (i = 0; i < svc->ndests; i++) {
		struct l4_slot *d = svc->dests[i];

		if (!d->overload && d->weight > 0) {
			least = d;
			loh = wlc_overhead(d);
			break;
		}
	}
	if (!least)
		return NULL;
	/* Later weight-0 dests cannot win: their side of the product is 0. */
	for (i++; i < svc->ndests; i++) {
		struct l4_slot *d = svc->dests[i];
		int64_t doh;

		if (d->overload)
			continue;
		doh = wlc_overhead(d);
		if (wlc_worse(loh, least->weight, doh, d->weight)) {
			least = d;
			loh = doh;
		}
	}
	return least;
}

static int wlc_init(struct l4_service *svc)
{
	(void)svc;
	return 0;
}

const struct l4_sched_ops l4_sched_wlc = {
	.name = "wlc",
	.init = wlc_init,
	.done = NULL,
	.update = NULL,
	.pick = wlc_pick,
};
