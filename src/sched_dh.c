/* Destination hashing, bit-exact with Linux IPVS ip_vs_dh.c
 * (docs/ipvs-schedulers.md §11).
 *
 * A 256-bucket table, bucket i = dests[i % ndests] (weights ignored), maps
 * hash_32(original destination address) to a dest; there is no fallback.
 * Rebuilt on init and on every add, delete and edit.  The service sets
 * needs_daddr for this scheduler, so workers fill ctx->daddr.
 */
#include <errno.h>
#include <stdlib.h>

#include "l4lb.h"

#define DH_TAB_BITS 8
#define DH_TAB_SIZE (1u << DH_TAB_BITS)

struct dh_state {
	struct l4_slot *bucket[DH_TAB_SIZE];
};

static void dh_rebuild(struct dh_state *s, const struct l4_service *svc)
{
	uint32_t i;

	for (i = 0; i < DH_TAB_SIZE; i++)
		s->bucket[i] = svc->ndests ? svc->dests[i % svc->ndests] : NULL;
}

static int dh_init(struct l4_service *svc)
{
	struct dh_state *s = malloc(sizeof(*s));

	if (!s)
		return -ENOMEM;
	dh_rebuild(s, svc);
	svc->sched_data = s;
	return 0;
}

static void dh_done(struct l4_service *svc)
{
	free(svc->sched_data);
	svc->sched_data = NULL;
}

static void dh_update(struct l4_service *svc, int op, uint32_t pos)
{
	(void)op;
	(void)pos;
	dh_rebuild(svc->sched_data, svc);
}

static struct l4_slot *dh_pick(struct l4_service *svc, const struct l4_pick_ctx *ctx)
{
	const struct dh_state *s = svc->sched_data;
	/* An unknown destination family means the VIP's, i.e. the client's. */
	uint8_t family = ctx->dfamily ? ctx->dfamily : ctx->family;
	struct l4_slot *d = s->bucket[l4_hash_32(l4_addr_key(family, ctx->daddr), DH_TAB_BITS)];

	/* §11: no fallback; an unusable or unlinked dest refuses its share. */
	if (!d || !d->linked || !l4_slot_usable(d))
		return NULL;
	return d;
}

const struct l4_sched_ops l4_sched_dh = {
	.name = "dh",
	.init = dh_init,
	.done = dh_done,
	.update = dh_update,
	.pick = dh_pick,
};
