/* Round robin (ipvs-schedulers.md §3): a cursor on the dest list. */
#include <stdint.h>

#include "l4lb.h"

/* The cursor is a list index kept in sched_data; -1 is the head sentinel. */
static inline intptr_t rr_cur(const struct l4_service *svc)
{
	return (intptr_t)svc->sched_data;
}

static inline void rr_set(struct l4_service *svc, intptr_t cur)
{
	svc->sched_data = (void *)cur;
}

static int rr_init(struct l4_service *svc)
{
	rr_set(svc, -1);
	return 0;
}

static void rr_update(struct l4_service *svc, int op, uint32_t pos)
{
	intptr_t cur = rr_cur(svc);

	if (op == L4_DEST_ADD) {
		/* The new dest is at the head; everything else moved down. */
		if (cur >= 0)
			rr_set(svc, cur + 1);
	} else if (op == L4_DEST_DEL) {
		/* A deleted cursor moves to its predecessor (the head if first). */
		if (cur >= (intptr_t)pos)
			rr_set(svc, cur - 1);
	}
}

static struct l4_slot *rr_pick(struct l4_service *svc, const struct l4_pick_ctx *ctx)
{
	intptr_t n = (intptr_t)svc->ndests, cur = rr_cur(svc), i, p;
	(void)ctx;

	for (i = 1; i <= n + 1; i++) {
		/* Positions after cur to the end, then from the first up to cur. */
		p = (cur + i) % (n + 1);
		if (p == n)
			continue;
		if (l4_slot_usable(svc->dests[p])) {
			rr_set(svc, p);
			return svc->dests[p];
		}
	}
	return NULL;
}

const struct l4_sched_ops l4_sched_rr = {
	.name = "rr",
	.init = rr_init,
	.update = rr_update,
	.pick = rr_pick,
};
