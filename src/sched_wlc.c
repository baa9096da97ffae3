/* Weighted least-connection, bit-exact with Linux IPVS ip_vs_wlc.c
 * (docs/ipvs-schedulers.md §6). */
#include "sched-least.h"

static struct l4_slot *wlc_pick(struct l4_service *svc, const struct l4_pick_ctx *ctx)
{
	(void)ctx;
	return l4_pick_weighted_least(svc, l4_overhead_conns);
}

const struct l4_sched_ops l4_sched_wlc = {
	.name = "wlc",
	.pick = wlc_pick,
};
