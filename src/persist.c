/* Persistence templates, as Linux IPVS keeps them (docs/ipvs-schedulers.md §12).
 *
 * A template binds a client network (the client address masked with the
 * service's prefix length) to a dest.  The service itself is the
 * (vaddr, vport) part of the kernel's key, so one table per service keyed by
 * (family, masked address) is enough.
 *
 * Timer semantics, evaluated lazily instead of with one timer per template:
 * every use re-arms `expires = now + timeout`; when the time is over the
 * template dies unless it still controls a connection, in which case the
 * kernel re-arms it for 60 s and keeps 60 s as its timeout from then on.
 * Because the controlled count only changes through the calls below, each
 * call first replays the firings due since the previous one (tmpl_advance).
 *
 * Storage: an open hash table (chained, doubled when full) for lookups and
 * a timing wheel of ~1 s ticks for l4_persist_expire.  A template sits in
 * the wheel slot of a tick no later than its expiry and is only moved when
 * that slot is swept, so re-arming costs nothing.
 *
 * A template that leaves the table (invalid, or the table is freed) while
 * connections still point at it becomes an orphan: it is freed by the
 * l4_tmpl_put that drops its last controlled connection.
 *
 * Everything runs with the service lock held.
 */
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>

#include "l4lb.h"

#define TMPL_REARM_MS 60000u    /* ip_vs_conn_expire: cp->timeout = 60 * HZ */
#define TICK_SHIFT 10           /* wheel tick: 1024 ms */
#define WHEEL_BITS 9            /* 512 ticks, ~9 minutes per turn */
#define WHEEL_SIZE (1u << WHEEL_BITS)
#define WHEEL_MASK (WHEEL_SIZE - 1)
#define HASH_MIN_BITS 6

struct tlist {
	struct tlist *prev, *next;
};

struct l4_tmpl {
	struct l4_tmpl *hnext;  /* hash chain */
	struct tlist timer;     /* wheel slot list */
	struct l4_slot *dest;
	uint64_t expires;       /* ms */
	uint32_t timeout_ms;    /* re-arm interval: the service's, then 60 s */
	uint32_t controls;      /* connections controlled */
	uint8_t orphan;         /* out of the table, waiting for its last put */
	uint8_t family;
	uint8_t addr[16];       /* masked client address */
};

struct l4_persist {
	struct l4_tmpl **buckets;
	uint32_t hbits;
	uint32_t count;         /* templates in the table */
	uint64_t seed;
	uint64_t next_tick;     /* first wheel tick not swept yet */
	struct tlist wheel[WHEEL_SIZE];
};

/* ---- small helpers ---- */

static inline void tlist_init(struct tlist *h)
{
	h->prev = h->next = h;
}

static inline void tlist_add(struct tlist *h, struct tlist *e)
{
	e->next = h->next;
	e->prev = h;
	h->next->prev = e;
	h->next = e;
}

static inline void tlist_del(struct tlist *e)
{
	e->prev->next = e->next;
	e->next->prev = e->prev;
	e->prev = e->next = e;
}

static inline struct l4_tmpl *tmpl_of(struct tlist *e)
{
	return (struct l4_tmpl *)(void *)((char *)e - offsetof(struct l4_tmpl, timer));
}

static inline uint64_t mix64(uint64_t x)
{
	x ^= x >> 33;
	x *= 0xff51afd7ed558ccdULL;
	x ^= x >> 33;
	x *= 0xc4ceb9fe1a85ec53ULL;
	x ^= x >> 33;
	return x;
}

static inline uint32_t tmpl_bucket(const struct l4_persist *p, uint8_t family,
				   const uint8_t *addr)
{
	uint64_t w[2];

	memcpy(w, addr, sizeof(w));
	/* Seeded so that clients cannot aim at one chain. */
	return (uint32_t)(mix64(mix64(p->seed ^ w[0] ^ family) ^ w[1]) >> (64 - p->hbits));
}

/* §12: the client network, cnet = client_addr & netmask. */
static void tmpl_key(const struct l4_service *svc, const struct l4_pick_ctx *ctx,
		     uint8_t *family, uint8_t addr[16])
{
	unsigned len = ctx->family == AF_INET6 ? 16 : 4;
	unsigned bits = ctx->family == AF_INET6 ? svc->netmask6 : svc->netmask4;
	unsigned i;

	if (bits > len * 8)
		bits = len * 8;
	memset(addr, 0, 16);
	for (i = 0; i < len && bits; i++) {
		unsigned take = bits < 8 ? bits : 8;

		addr[i] = (uint8_t)(ctx->caddr[i] & (0xff00u >> take));
		bits -= take;
	}
	*family = ctx->family;
}

static struct l4_tmpl **tmpl_find(struct l4_persist *p, uint8_t family, const uint8_t *addr)
{
	struct l4_tmpl **pp = &p->buckets[tmpl_bucket(p, family, addr)];

	for (; *pp; pp = &(*pp)->hnext)
		if ((*pp)->family == family && !memcmp((*pp)->addr, addr, 16))
			break;
	return pp;
}

/* File t in the wheel slot of its expiry tick, never in one already swept. */
static void tmpl_file(struct l4_persist *p, struct l4_tmpl *t)
{
	uint64_t tick = t->expires >> TICK_SHIFT;

	if (tick < p->next_tick)
		tick = p->next_tick;
	tlist_add(&p->wheel[tick & WHEEL_MASK], &t->timer);
}

static void tmpl_release(struct l4_tmpl *t)
{
	atomic_fetch_sub_explicit(&t->dest->persist, 1, memory_order_relaxed);
	free(t);
}

/* Replay the timer firings due by `now`.  Returns 0 if the template is dead
 * (its time is over and it controls no connection). */
static int tmpl_advance(struct l4_tmpl *t, uint64_t now)
{
	uint64_t k;

	if (now < t->expires)
		return 1;
	if (t->controls == 0)
		return 0;
	/* §12: fired while controlling connections -> re-armed for 60 s, and
	 * again at every later firing while the count stays above zero. */
	k = (now - t->expires) / TMPL_REARM_MS + 1;
	t->expires += k * TMPL_REARM_MS;
	t->timeout_ms = TMPL_REARM_MS;
	return 1;
}

/* Take t (found at *pp) out of the table: freed now, or orphaned while
 * connections still point at it. */
static void tmpl_drop(struct l4_persist *p, struct l4_tmpl **pp)
{
	struct l4_tmpl *t = *pp;

	*pp = t->hnext;
	tlist_del(&t->timer);
	p->count--;
	if (t->controls == 0)
		tmpl_release(t);
	else
		t->orphan = 1;
}

/* Double the hash table; on allocation failure the chains just get longer. */
static void persist_grow(struct l4_persist *p)
{
	uint32_t nbits = p->hbits + 1, i, oldsize = 1u << p->hbits;
	struct l4_tmpl **old = p->buckets, **nb;

	if (nbits > 30)
		return;
	nb = calloc((size_t)1 << nbits, sizeof(*nb));
	if (!nb)
		return;
	p->buckets = nb;
	p->hbits = nbits;
	for (i = 0; i < oldsize; i++) {
		struct l4_tmpl *t = old[i], *next;

		for (; t; t = next) {
			uint32_t b = tmpl_bucket(p, t->family, t->addr);

			next = t->hnext;
			t->hnext = nb[b];
			nb[b] = t;
		}
	}
	free(old);
}

/* ---- API (l4lb.h) ---- */

struct l4_persist *l4_persist_new(void)
{
	struct l4_persist *p = calloc(1, sizeof(*p));
	unsigned i;

	if (!p)
		return NULL;
	p->hbits = HASH_MIN_BITS;
	p->buckets = calloc((size_t)1 << p->hbits, sizeof(*p->buckets));
	if (!p->buckets) {
		free(p);
		return NULL;
	}
	if (getrandom(&p->seed, sizeof(p->seed), GRND_NONBLOCK) != (ssize_t)sizeof(p->seed))
		p->seed = (uint64_t)(uintptr_t)p * 0x9e3779b97f4a7c15ULL;
	for (i = 0; i < WHEEL_SIZE; i++)
		tlist_init(&p->wheel[i]);
	return p;
}

void l4_persist_free(struct l4_persist *p)
{
	uint32_t i;

	if (!p)
		return;
	for (i = 0; i < (1u << p->hbits); i++) {
		struct l4_tmpl *t = p->buckets[i], *next;

		for (; t; t = next) {
			next = t->hnext;
			if (t->controls == 0) {
				tmpl_release(t);
			} else {
				t->hnext = NULL;
				tlist_init(&t->timer);
				t->orphan = 1;
			}
		}
	}
	free(p->buckets);
	free(p);
}

struct l4_slot *l4_persist_lookup(struct l4_service *svc, const struct l4_pick_ctx *ctx,
				  uint64_t now_ms, struct l4_tmpl **tmpl_out)
{
	struct l4_persist *p = svc->persist;
	struct l4_tmpl **pp, *t;
	uint8_t family, addr[16];

	if (tmpl_out)
		*tmpl_out = NULL;
	if (!p || p->count == 0)
		return NULL;
	tmpl_key(svc, ctx, &family, addr);
	pp = tmpl_find(p, family, addr);
	t = *pp;
	if (!t)
		return NULL;
	if (!tmpl_advance(t, now_ms)) {
		tmpl_drop(p, pp);
		return NULL;
	}
	/* §12 ip_vs_check_template: the dest must still be in the service and,
	 * with expire_quiescent, not quiesced.  Weight 0 and OVERLOAD are
	 * otherwise ignored here. */
	if (!t->dest->linked || (svc->expire_quiescent && t->dest->weight == 0)) {
		tmpl_drop(p, pp);
		return NULL;
	}
	t->expires = now_ms + t->timeout_ms;
	if (tmpl_out)
		*tmpl_out = t;
	return t->dest;
}

struct l4_tmpl *l4_persist_bind(struct l4_service *svc, const struct l4_pick_ctx *ctx,
				struct l4_slot *slot, uint64_t now_ms)
{
	struct l4_persist *p = svc->persist;
	struct l4_tmpl **pp, *t;
	uint8_t family, addr[16];

	if (!p) {
		p = l4_persist_new();
		if (!p)
			return NULL;
		svc->persist = p;
	}
	tmpl_key(svc, ctx, &family, addr);
	pp = tmpl_find(p, family, addr);
	t = *pp;
	if (t && !tmpl_advance(t, now_ms)) {
		tmpl_drop(p, pp);
		t = NULL;
	}
	if (t) {
		/* A retry on another dest: the client's template follows it. */
		if (t->dest != slot) {
			atomic_fetch_sub_explicit(&t->dest->persist, 1, memory_order_relaxed);
			atomic_fetch_add_explicit(&slot->persist, 1, memory_order_relaxed);
			t->dest = slot;
		}
		t->expires = now_ms + t->timeout_ms;
		return t;
	}
	t = calloc(1, sizeof(*t));
	if (!t)
		return NULL;
	t->dest = slot;
	atomic_fetch_add_explicit(&slot->persist, 1, memory_order_relaxed);
	t->timeout_ms = svc->persist_timeout_ms;
	t->expires = now_ms + t->timeout_ms;
	t->family = family;
	memcpy(t->addr, addr, sizeof(t->addr));
	/* An empty wheel may restart at the present tick. */
	if (p->count == 0)
		p->next_tick = now_ms >> TICK_SHIFT;
	pp = &p->buckets[tmpl_bucket(p, family, addr)];
	t->hnext = *pp;
	*pp = t;
	tmpl_file(p, t);
	if (++p->count > (1u << p->hbits))
		persist_grow(p);
	return t;
}

void l4_tmpl_get(struct l4_tmpl *tmpl)
{
	if (tmpl)
		tmpl->controls++;
}

void l4_tmpl_put(struct l4_service *svc, struct l4_tmpl *tmpl, uint64_t now_ms)
{
	(void)svc;
	if (!tmpl || tmpl->controls == 0)
		return;
	if (tmpl->orphan) {
		if (--tmpl->controls == 0)
			tmpl_release(tmpl);
		return;
	}
	/* Firings before now saw this connection still controlled. */
	tmpl_advance(tmpl, now_ms);
	tmpl->controls--;
}

void l4_persist_expire(struct l4_service *svc, uint64_t now_ms)
{
	struct l4_persist *p = svc->persist;
	uint64_t cur = now_ms >> TICK_SHIFT, span, k;

	if (!p)
		return;
	if (p->count == 0) {
		p->next_tick = cur;
		return;
	}
	if (cur < p->next_tick)
		return;
	span = cur - p->next_tick + 1;
	if (span > WHEEL_SIZE)
		span = WHEEL_SIZE;
	for (k = 0; k < span; k++) {
		struct tlist *slot = &p->wheel[(p->next_tick + k) & WHEEL_MASK];
		struct tlist due;

		if (slot->next == slot)
			continue;
		/* Detach the slot first: survivors may be filed back into it. */
		due.next = slot->next;
		due.prev = slot->prev;
		due.next->prev = &due;
		due.prev->next = &due;
		tlist_init(slot);
		while (due.next != &due) {
			struct l4_tmpl *t = tmpl_of(due.next);

			tlist_del(&t->timer);
			if (tmpl_advance(t, now_ms)) {
				tmpl_file(p, t);
				continue;
			}
			/* Dead: unlink from its chain, then free. */
			tlist_init(&t->timer);
			tmpl_drop(p, tmpl_find(p, t->family, t->addr));
		}
	}
	/* The current tick stays due: later expiries may still land in it. */
	p->next_tick = cur;
}

uint32_t l4_persist_count(const struct l4_persist *p)
{
	return p ? p->count : 0;
}
