/* Source hashing, bit-exact with Linux IPVS ip_vs_sh.c
 * (docs/ipvs-schedulers.md §10).
 *
 * A 256-bucket table maps hash_32(client address [+ port]) to a dest.  It
 * is rebuilt from scratch from the list order and weights on init and on
 * every add, delete and edit, so it never points at an unlinked dest.
 * Connection counts are ignored.
 */
#include <errno.h>
#include <stdlib.h>

#include "l4lb.h"

#define SH_TAB_BITS 8
#define SH_TAB_SIZE (1u << SH_TAB_BITS)

struct sh_state {
	struct l4_slot *bucket[SH_TAB_SIZE];
};

/* §10 rebuild: each dest takes `weight` consecutive buckets per round,
 * at least one (a weight-0 dest keeps its buckets and refuses their
 * clients unless sh-fallback is on). */
static void sh_rebuild(struct sh_state *s, const struct l4_service *svc)
{
	uint32_t i, p = 0;
	int32_t n = 0;

	for (i = 0; i < SH_TAB_SIZE; i++) {
		struct l4_slot *d;

		if (svc->ndests == 0) {
			s->bucket[i] = NULL;
			continue;
		}
		d = svc->dests[p];
		s->bucket[i] = d;
		if (++n >= d->weight) {
			p = p + 1 < svc->ndests ? p + 1 : 0;
			n = 0;
		}
	}
}

static int sh_init(struct l4_service *svc)
{
	struct sh_state *s = malloc(sizeof(*s));

	if (!s)
		return -ENOMEM;
	sh_rebuild(s, svc);
	svc->sched_data = s;
	return 0;
}

static void sh_done(struct l4_service *svc)
{
	free(svc->sched_data);
	svc->sched_data = NULL;
}

static void sh_update(struct l4_service *svc, int op, uint32_t pos)
{
	(void)op;
	(void)pos;
	sh_rebuild(svc->sched_data, svc);
}

/* Bucket for the client, offset by `off` (mod the table size). */
static inline uint32_t sh_hashkey(const struct l4_service *svc, const struct l4_pick_ctx *ctx,
				  uint32_t off)
{
	uint32_t key = l4_addr_key(ctx->family, ctx->caddr);

	/* §10 sh-port: the client's source port joins the key (mod 2^32). */
	if (svc->flags & L4_SVC_F_SH_PORT)
		key += ctx->cport;
	return (off + l4_hash_32(key, SH_TAB_BITS)) % SH_TAB_SIZE;
}

static struct l4_slot *sh_pick(struct l4_service *svc, const struct l4_pick_ctx *ctx)
{
	const struct sh_state *s = svc->sched_data;
	uint32_t h = sh_hashkey(svc, ctx, 0);
	struct l4_slot *d = s->bucket[h];
	uint32_t off;

	if (!(svc->flags & L4_SVC_F_SH_FALLBACK))
		return l4_slot_usable(d) ? d : NULL;
	if (!d)
		return NULL;
	if (l4_slot_usable(d))
		return d;
	/* §10 fallback probe: the kernel adds the bucket index as an offset to
	 * the hash again, so the walk starts at 2h, not at h + 1. */
	for (off = 0; off < SH_TAB_SIZE; off++) {
		d = s->bucket[sh_hashkey(svc, ctx, (off + h) % SH_TAB_SIZE)];
		if (!d)
			return NULL;
		if (l4_slot_usable(d))
			return d;
	}
	return NULL;
}

const struct l4_sched_ops l4_sched_sh = {
	.name = "sh",
	.init = sh_init,
	.done = sh_done,
	.update = sh_update,
	.pick = sh_pick,
};
