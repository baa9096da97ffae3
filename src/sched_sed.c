/* Shortest expected delay, bit-exact with Linux IPVS ip_vs_sed.c
 * (docs/ipvs-schedulers.md §7): the wlc loop with overhead A + 1, so
 * inactive connections are ignored. */
#include "sched-least.h"

static struct l4_slot *sed_pick(struct l4_service *svc, const struct l4_pick_ctx *ctx)
{
	(void)ctx;
	return l4_pick_weighted_least(svc, l4_overhead_active);
}

const struct l4_sched_ops l4_sched_sed = {
	.name = "sed",
	.pick = sed_pick,
};
