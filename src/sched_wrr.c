/* Weighted round-robin, bit-exact with Linux IPVS ip_vs_wrr.c
 * (docs/ipvs-schedulers.md §4).
 *
 * The mark {cl, cw, mw, di} walks the dest list from its current position
 * `cl`, taking the next dest whose weight reaches the current weight `cw`;
 * every full pass lowers `cw` by the gcd of the weights `di`.  `cl` is a list
 * position: -1 stands for the list head (the kernel's sentinel).  Every
 * list change resets it to the head, so positions never need shifting.
 */
#include <errno.h>
#include <stdlib.h>

#include "l4lb.h"

#define WRR_HEAD (-1)

struct wrr_mark {
	int cl;         /* current position, WRR_HEAD = head */
	int cw;         /* current weight */
	int mw;         /* maximum weight, less di - 1 */
	int di;         /* decreasing interval: gcd of the weights */
};

static int gcd(int a, int b)
{
	while (b) {
		int r = a % b;

		a = b;
		b = r;
	}
	return a;
}

/* gcd of the positive weights, 1 when there are none (§4 gcd_w). */
static int wrr_gcd_weight(const struct l4_service *svc)
{
	int g = 0;
	uint32_t i;

	for (i = 0; i < svc->ndests; i++) {
		int w = svc->dests[i]->weight;

		if (w > 0)
			g = g > 0 ? gcd(w, g) : w;
	}
	return g ? g : 1;
}

/* Largest weight, 0 if none; OVERLOAD is not considered (§4 max_w). */
static int wrr_max_weight(const struct l4_service *svc)
{
	int m = 0;
	uint32_t i;

	for (i = 0; i < svc->ndests; i++)
		if (svc->dests[i]->weight > m)
			m = svc->dests[i]->weight;
	return m;
}

static int wrr_init(struct l4_service *svc)
{
	struct wrr_mark *mark = malloc(sizeof(*mark));

	if (!mark)
		return -ENOMEM;
	/* §4 init: a populated service starts a fresh cycle at cw = mw. */
	mark->cl = WRR_HEAD;
	mark->di = wrr_gcd_weight(svc);
	mark->mw = wrr_max_weight(svc) - (mark->di - 1);
	mark->cw = mark->mw;
	svc->sched_data = mark;
	return 0;
}

static void wrr_done(struct l4_service *svc)
{
	free(svc->sched_data);
	svc->sched_data = NULL;
}

static void wrr_update(struct l4_service *svc, int op, uint32_t pos)
{
	struct wrr_mark *mark = svc->sched_data;

	(void)op;
	(void)pos;
	/* §4 dest changed: back to the head; cw is kept but clamped to the new
	 * maximum, or realigned onto the new gcd grid. */
	mark->cl = WRR_HEAD;
	mark->di = wrr_gcd_weight(svc);
	mark->mw = wrr_max_weight(svc) - (mark->di - 1);
	if (mark->cw > mark->mw || mark->cw == 0)
		mark->cw = mark->mw;
	else if (mark->di > 1)
		mark->cw = (mark->cw / mark->di) * mark->di + 1;
}

static struct l4_slot *wrr_pick(struct l4_service *svc, const struct l4_pick_ctx *ctx)
{
	struct wrr_mark *mark = svc->sched_data;
	int n = (int)svc->ndests;
	int pos, last, stop = WRR_HEAD - 1;     /* -2: no stop position yet */
	int last_pass = 0, restarted = 0;

	(void)ctx;
	/* All weights 0 (or no dests): refuse, cl unchanged. */
	if (mark->mw == 0)
		return NULL;
	pos = mark->cl;
	last = pos;
	for (;;) {
		int p;

		for (p = pos + 1; p < n; p++) {
			struct l4_slot *d = svc->dests[p];

			if (!d->overload && d->weight >= mark->cw) {
				mark->cl = p;
				return d;
			}
			/* The last pass reached where it began: nobody left. */
			if (p == stop) {
				mark->cl = p;
				return NULL;
			}
		}
		pos = WRR_HEAD;
		mark->cw -= mark->di;
		if (mark->cw <= 0) {
			mark->cw = mark->mw;
			/* Every dest was already tried at weight >= 1 (all
			 * overloaded): give up at the head. */
			if (last_pass || last == WRR_HEAD) {
				mark->cl = WRR_HEAD;
				return NULL;
			}
			restarted = 1;
		}
		last_pass = mark->cw <= mark->di;
		/* The first pass at weight >= 1 only covered the dests
		 * after `last`; this one stops once it reaches `last`. */
		if (last_pass && restarted && last != WRR_HEAD)
			stop = last;
	}
}

const struct l4_sched_ops l4_sched_wrr = {
	.name = "wrr",
	.init = wrr_init,
	.done = wrr_done,
	.update = wrr_update,
	.pick = wrr_pick,
};
