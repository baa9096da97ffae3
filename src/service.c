/* Services, their dest lists, and the bind/unbind accounting IPVS does
 * around a scheduling decision (ipvs-schedulers.md §0-§2, §12). */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "l4lb.h"

uint64_t l4_now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

static const struct l4_sched_ops *const all_scheds[] = {
	&l4_sched_rr, &l4_sched_wrr, &l4_sched_lc, &l4_sched_wlc,
	&l4_sched_sed, &l4_sched_nq, &l4_sched_sh, &l4_sched_dh,
};

const struct l4_sched_ops *l4_sched_find(const char *name)
{
	size_t i;
	for (i = 0; i < sizeof(all_scheds) / sizeof(all_scheds[0]); i++)
		if (strcmp(all_scheds[i]->name, name) == 0)
			return all_scheds[i];
	return NULL;
}

void l4_service_init(struct l4_service *svc, uint32_t id)
{
	memset(svc, 0, sizeof(*svc));
	svc->id = id;
	pthread_mutex_init(&svc->lock, NULL);
	svc->netmask4 = 32;
	svc->netmask6 = 128;
	atomic_store(&svc->connect_timeout_ms, 3000);
	atomic_store(&svc->idle_timeout_ms, 900000);
	atomic_store(&svc->retries, -1);
}

int l4_service_configure(struct l4_service *svc, const char *sched, uint32_t flags,
			 uint32_t persist_timeout_ms, uint8_t netmask4, uint8_t netmask6,
			 uint8_t expire_quiescent)
{
	const struct l4_sched_ops *ops = l4_sched_find(sched);
	int rc = 0;

	if (ops == NULL)
		return -ENOENT;
	if (netmask4 > 32 || netmask6 > 128)
		return -EINVAL;
	pthread_mutex_lock(&svc->lock);
	if (svc->persist == NULL && (flags & L4_SVC_F_PERSISTENT)) {
		svc->persist = l4_persist_new();
		if (svc->persist == NULL) {
			rc = -ENOMEM;
			goto out;
		}
	}
	if (ops != svc->sched) {
		void *old_data = svc->sched_data;
		const struct l4_sched_ops *old = svc->sched;
		svc->sched_data = NULL;
		svc->sched = ops;
		rc = ops->init ? ops->init(svc) : 0;
		if (rc < 0) {
			svc->sched = old;
			svc->sched_data = old_data;
			goto out;
		}
		if (old) {
			void *new_data = svc->sched_data;
			svc->sched_data = old_data;
			if (old->done)
				old->done(svc);
			svc->sched_data = new_data;
		}
	}
	svc->flags = flags;
	svc->persist_timeout_ms = persist_timeout_ms;
	svc->netmask4 = netmask4;
	svc->netmask6 = netmask6;
	svc->expire_quiescent = expire_quiescent;
	svc->needs_daddr = ops == &l4_sched_dh;
	svc->in_use = 1;
out:
	pthread_mutex_unlock(&svc->lock);
	return rc;
}

int l4_service_set_limits(struct l4_service *svc, uint8_t send_proxy, uint32_t max_conns)
{
	if (send_proxy > 2)
		return -EINVAL;
	atomic_store_explicit(&svc->send_proxy, send_proxy, memory_order_relaxed);
	atomic_store_explicit(&svc->max_conns, max_conns, memory_order_relaxed);
	return 0;
}

/* §2: thresholds changed on add/edit. */
static void thresholds_changed(struct l4_slot *d)
{
	int32_t t = atomic_load_explicit(&d->total, memory_order_relaxed);
	uint32_t l_val = d->l_threshold ? d->l_threshold : d->u_threshold - (d->u_threshold >> 2);

	if (d->u_threshold == 0)
		d->overload = 0;
	else if ((uint32_t)t >= d->u_threshold)
		d->overload = 1;
	else if ((uint32_t)t < l_val)
		d->overload = 0;
}

static void set_dest(struct l4_slot *d, int32_t weight, uint32_t u, uint32_t l)
{
	int changed = d->u_threshold != u || d->l_threshold != l;
	d->weight = weight;
	d->u_threshold = u;
	d->l_threshold = l;
	if (changed)
		thresholds_changed(d);
}

int l4_dest_add(struct l4_service *svc, struct l4_slot *slot, int32_t weight, uint32_t u,
		uint32_t l)
{
	int rc = 0;

	if (weight < 0 || (u && l > u))
		return -ERANGE;
	pthread_mutex_lock(&svc->lock);
	if (slot->linked) {
		rc = -EEXIST;
		goto out;
	}
	if (svc->ndests == svc->cap) {
		uint32_t cap = svc->cap ? svc->cap * 2 : 8;
		struct l4_slot **n = realloc(svc->dests, cap * sizeof(*n));
		if (n == NULL) {
			rc = -ENOMEM;
			goto out;
		}
		svc->dests = n;
		svc->cap = cap;
	}
	/* A new dest goes to the head of the list (§0). */
	memmove(svc->dests + 1, svc->dests, svc->ndests * sizeof(*svc->dests));
	svc->dests[0] = slot;
	svc->ndests++;
	slot->svc_id = svc->id;
	slot->linked = 1;
	set_dest(slot, weight, u, l);
	if (svc->sched && svc->sched->update)
		svc->sched->update(svc, L4_DEST_ADD, 0);
out:
	pthread_mutex_unlock(&svc->lock);
	return rc;
}

static int index_of(const struct l4_service *svc, const struct l4_slot *slot)
{
	uint32_t i;
	for (i = 0; i < svc->ndests; i++)
		if (svc->dests[i] == slot)
			return (int)i;
	return -1;
}

int l4_dest_edit(struct l4_service *svc, struct l4_slot *slot, int32_t weight, uint32_t u,
		 uint32_t l)
{
	int pos, rc = 0;

	if (weight < 0 || (u && l > u))
		return -ERANGE;
	pthread_mutex_lock(&svc->lock);
	pos = index_of(svc, slot);
	if (pos < 0) {
		rc = -ENOENT;
		goto out;
	}
	set_dest(slot, weight, u, l);
	if (svc->sched && svc->sched->update)
		svc->sched->update(svc, L4_DEST_EDIT, (uint32_t)pos);
out:
	pthread_mutex_unlock(&svc->lock);
	return rc;
}

static void unlink_at(struct l4_service *svc, uint32_t pos)
{
	struct l4_slot *slot = svc->dests[pos];
	memmove(svc->dests + pos, svc->dests + pos + 1,
		(svc->ndests - pos - 1) * sizeof(*svc->dests));
	svc->ndests--;
	slot->linked = 0;
	if (svc->sched && svc->sched->update)
		svc->sched->update(svc, L4_DEST_DEL, pos);
}

int l4_dest_del(struct l4_service *svc, struct l4_slot *slot)
{
	int pos, rc = 0;

	pthread_mutex_lock(&svc->lock);
	pos = index_of(svc, slot);
	if (pos < 0)
		rc = -ENOENT;
	else
		unlink_at(svc, (uint32_t)pos);
	pthread_mutex_unlock(&svc->lock);
	return rc;
}

void l4_service_reset_counters(struct l4_service *svc)
{
	atomic_store(&svc->accepted, 0);
	atomic_store(&svc->rejected, 0);
	atomic_store(&svc->failed, 0);
	atomic_store(&svc->limit_rejected, 0);
	l4_service_reset_vip_counters(svc);
}

void l4_service_clear(struct l4_service *svc)
{
	pthread_mutex_lock(&svc->lock);
	while (svc->ndests)
		unlink_at(svc, 0);
	svc->in_use = 0;
	pthread_mutex_unlock(&svc->lock);
}

static int excluded(const struct l4_slot *d, const struct l4_slot *const *ex, unsigned n)
{
	unsigned i;
	for (i = 0; i < n; i++)
		if (ex[i] == d)
			return 1;
	return 0;
}

/* §1-§2: a new connection is bound to d. */
static void bind_dest(struct l4_slot *d)
{
	int32_t t = atomic_fetch_add_explicit(&d->total, 1, memory_order_relaxed) + 1;
	atomic_fetch_add_explicit(&d->active, 1, memory_order_relaxed);
	atomic_fetch_add_explicit(&d->conns, 1, memory_order_relaxed);
	if (d->u_threshold && (uint32_t)t == d->u_threshold)
		d->overload = 1;
}

struct l4_slot *l4_service_schedule(struct l4_service *svc, const struct l4_pick_ctx *ctx,
				    const struct l4_slot *const *exclude, unsigned nexclude,
				    int retry, uint64_t now_ms, struct l4_tmpl **tmpl_out)
{
	struct l4_slot *d = NULL;
	struct l4_tmpl *t = NULL;
	int persistent;

	pthread_mutex_lock(&svc->lock);
	persistent = (svc->flags & L4_SVC_F_PERSISTENT) && svc->persist != NULL;
	if (persistent && !retry) {
		d = l4_persist_lookup(svc, ctx, now_ms, &t);
		if (d != NULL && excluded(d, exclude, nexclude))
			d = NULL;
	}
	if (d == NULL) {
		t = NULL;
		if (svc->sched)
			d = svc->sched->pick(svc, ctx);
		/* A retry must not land on a dest that already failed: take the
		 * next usable one in list order after the scheduler's choice. */
		if (d != NULL && nexclude && excluded(d, exclude, nexclude)) {
			uint32_t i, start = (uint32_t)index_of(svc, d), n = svc->ndests;
			d = NULL;
			for (i = 1; i < n; i++) {
				struct l4_slot *c = svc->dests[(start + i) % n];
				if (l4_slot_usable(c) && !excluded(c, exclude, nexclude)) {
					d = c;
					break;
				}
			}
		}
		if (d != NULL && persistent)
			t = l4_persist_bind(svc, ctx, d, now_ms);
	}
	if (d != NULL) {
		bind_dest(d);
		if (t)
			l4_tmpl_get(t);
	}
	pthread_mutex_unlock(&svc->lock);
	*tmpl_out = t;
	return d;
}

void l4_slot_deactivate(struct l4_slot *slot)
{
	atomic_fetch_sub_explicit(&slot->active, 1, memory_order_relaxed);
}

void l4_service_unbind(struct l4_service *svc, struct l4_slot *slot, struct l4_tmpl *tmpl,
		       uint64_t now_ms)
{
	int32_t before;
	uint32_t l_val;

	pthread_mutex_lock(&svc->lock);
	before = atomic_fetch_sub_explicit(&slot->total, 1, memory_order_relaxed);
	l_val = slot->l_threshold ? slot->l_threshold
				  : slot->u_threshold - (slot->u_threshold >> 2);
	if (slot->overload && (uint32_t)before == l_val && (uint32_t)(before - 1) < l_val)
		slot->overload = 0;
	if (tmpl)
		l4_tmpl_put(svc, tmpl, now_ms);
	pthread_mutex_unlock(&svc->lock);
}

int l4_service_dest_ids(struct l4_service *svc, uint32_t *out, uint32_t max)
{
	uint32_t i, n;

	pthread_mutex_lock(&svc->lock);
	n = svc->ndests;
	for (i = 0; i < n && i < max; i++)
		out[i] = svc->dests[i]->id;
	pthread_mutex_unlock(&svc->lock);
	return (int)n;
}

int l4_slot_overloaded(struct l4_service *svc, struct l4_slot *slot)
{
	int v;
	pthread_mutex_lock(&svc->lock);
	v = slot->overload;
	pthread_mutex_unlock(&svc->lock);
	return v;
}
