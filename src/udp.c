/* UDP services: one flow per client address, datagrams moved in batches.
 *
 * A flow is a connection object (so it shares the timer wheel, the idle
 * timeout and the accounting) whose client side is the shared listener and
 * whose backend side is a connected UDP socket of its own.  The backend's
 * replies go back to the client through the listener, sent from the local
 * address the client's datagram arrived at (IP_PKTINFO), so that a client
 * talking to a wildcard listener, or to a VIP through iptables REDIRECT,
 * gets its answers from the address it sent to.
 *
 * Rules:
 * 1. Datagrams are never queued in user space: a datagram that cannot be
 *    sent right now (socket buffer full) is dropped, as the network would.
 * 2. A flow lives until it has been idle for the service's idle timeout.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include "l4lb.h"

#ifndef IP_RECVORIGDSTADDR
#define IP_RECVORIGDSTADDR 20
#endif
#ifndef IP_ORIGDSTADDR
#define IP_ORIGDSTADDR 20
#endif
#ifndef IPV6_RECVORIGDSTADDR
#define IPV6_RECVORIGDSTADDR 74
#endif
#ifndef IPV6_ORIGDSTADDR
#define IPV6_ORIGDSTADDR 74
#endif

#define UDP_BATCH 32
#define UDP_MAX 65536
#define CMSG_SPACE_ALL 256

struct udp_bufs {
	struct mmsghdr msgs[UDP_BATCH];
	struct iovec iov[UDP_BATCH];
	struct sockaddr_storage addrs[UDP_BATCH];
	char cmsg[UDP_BATCH][CMSG_SPACE_ALL];
	char data[UDP_BATCH][UDP_MAX];
};

int l4_udp_listener_setup(int fd)
{
	int type = 0, one = 1;
	socklen_t len = sizeof(type);
	struct sockaddr_storage ss;
	socklen_t slen = sizeof(ss);

	if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) < 0 || type != SOCK_DGRAM)
		return 0;
	if (getsockname(fd, (struct sockaddr *)&ss, &slen) < 0)
		return 1;
	if (ss.ss_family == AF_INET6) {
		(void)setsockopt(fd, IPPROTO_IPV6, IPV6_RECVPKTINFO, &one, sizeof(one));
		(void)setsockopt(fd, IPPROTO_IPV6, IPV6_RECVORIGDSTADDR, &one, sizeof(one));
	} else {
		(void)setsockopt(fd, IPPROTO_IP, IP_PKTINFO, &one, sizeof(one));
		(void)setsockopt(fd, IPPROTO_IP, IP_RECVORIGDSTADDR, &one, sizeof(one));
	}
	return 1;
}

static struct udp_bufs *bufs(struct l4_worker *w)
{
	if (w->udp_bufs == NULL)
		w->udp_bufs = malloc(sizeof(struct udp_bufs));
	return w->udp_bufs;
}

void l4_udp_discard(int fd)
{
	char b[1];
	int i;
	for (i = 0; i < UDP_BATCH; i++)
		if (recv(fd, b, sizeof(b), MSG_DONTWAIT) < 0)
			return;
}

/* ------------------------------------------------------------ flow table */

static uint32_t flow_hash(int lfd, const struct l4_pick_ctx *ctx)
{
	uint32_t h = l4_addr_key(ctx->family, ctx->caddr);
	h ^= (uint32_t)ctx->cport * 0x9E3779B1u;
	h ^= (uint32_t)lfd * 0x85EBCA77u;
	return h ^ (h >> 16);
}

static int same_client(const struct l4_conn *c, int lfd, const struct l4_pick_ctx *ctx)
{
	return c->cfd == lfd && c->ctx.family == ctx->family && c->ctx.cport == ctx->cport &&
	       memcmp(c->ctx.caddr, ctx->caddr, ctx->family == AF_INET6 ? 16 : 4) == 0;
}

static struct l4_conn *flow_find(struct l4_worker *w, int lfd, const struct l4_pick_ctx *ctx)
{
	struct l4_conn *c;
	if (w->flow_buckets == 0)
		return NULL;
	for (c = w->flows[flow_hash(lfd, ctx) & (w->flow_buckets - 1)]; c; c = c->udp->hnext)
		if (same_client(c, lfd, ctx))
			return c;
	return NULL;
}

static int flow_insert(struct l4_worker *w, struct l4_conn *c)
{
	uint32_t b;

	if (w->nflows >= w->flow_buckets) {
		uint32_t n = w->flow_buckets ? w->flow_buckets * 2 : 256, i;
		struct l4_conn **t = calloc(n, sizeof(*t));
		if (t == NULL)
			return -ENOMEM;
		for (i = 0; i < w->flow_buckets; i++) {
			struct l4_conn *f = w->flows[i], *next;
			for (; f; f = next) {
				next = f->udp->hnext;
				b = flow_hash(f->cfd, &f->ctx) & (n - 1);
				f->udp->hnext = t[b];
				t[b] = f;
			}
		}
		free(w->flows);
		w->flows = t;
		w->flow_buckets = n;
	}
	b = flow_hash(c->cfd, &c->ctx) & (w->flow_buckets - 1);
	c->udp->hnext = w->flows[b];
	w->flows[b] = c;
	w->nflows++;
	return 0;
}

void l4_udp_flow_unhash(struct l4_worker *w, struct l4_conn *c)
{
	struct l4_conn **pp;

	if (c->udp == NULL || w->flow_buckets == 0)
		return;
	for (pp = &w->flows[flow_hash(c->cfd, &c->ctx) & (w->flow_buckets - 1)]; *pp;
	     pp = &(*pp)->udp->hnext) {
		if (*pp == c) {
			*pp = c->udp->hnext;
			w->nflows--;
			return;
		}
	}
}

void l4_udp_close_flows(struct l4_worker *w, int fd)
{
	struct l4_conn *c, *next;
	for (c = w->conns; c; c = next) {
		next = c->next;
		if ((c->flags & L4_UDP) && c->cfd == fd)
			l4_conn_close(w, c, 0);
	}
}

/* ----------------------------------------------------------- forwarding */

static void ctx_from_msg(struct l4_pick_ctx *ctx, struct l4_udp_flow *local,
			 const struct sockaddr_storage *peer, struct msghdr *mh)
{
	struct cmsghdr *cm;

	memset(ctx, 0, sizeof(*ctx));
	memset(local, 0, sizeof(*local));
	if (peer->ss_family == AF_INET6) {
		const struct sockaddr_in6 *s6 = (const struct sockaddr_in6 *)peer;
		ctx->family = AF_INET6;
		memcpy(ctx->caddr, &s6->sin6_addr, 16);
		ctx->cport = ntohs(s6->sin6_port);
	} else {
		const struct sockaddr_in *s4 = (const struct sockaddr_in *)peer;
		ctx->family = AF_INET;
		memcpy(ctx->caddr, &s4->sin_addr, 4);
		ctx->cport = ntohs(s4->sin_port);
	}
	for (cm = CMSG_FIRSTHDR(mh); cm; cm = CMSG_NXTHDR(mh, cm)) {
		if (cm->cmsg_level == IPPROTO_IP && cm->cmsg_type == IP_PKTINFO) {
			struct in_pktinfo pi;
			memcpy(&pi, CMSG_DATA(cm), sizeof(pi));
			local->lfamily = AF_INET;
			memcpy(local->laddr, &pi.ipi_addr, 4);
			local->ifindex = pi.ipi_ifindex;
		} else if (cm->cmsg_level == IPPROTO_IPV6 && cm->cmsg_type == IPV6_PKTINFO) {
			struct in6_pktinfo pi;
			memcpy(&pi, CMSG_DATA(cm), sizeof(pi));
			local->lfamily = AF_INET6;
			memcpy(local->laddr, &pi.ipi6_addr, 16);
			local->ifindex = (int)pi.ipi6_ifindex;
		} else if (cm->cmsg_level == IPPROTO_IP && cm->cmsg_type == IP_ORIGDSTADDR) {
			struct sockaddr_in o;
			memcpy(&o, CMSG_DATA(cm), sizeof(o));
			ctx->dfamily = AF_INET;
			memcpy(ctx->daddr, &o.sin_addr, 4);
			ctx->dport = ntohs(o.sin_port);
		} else if (cm->cmsg_level == IPPROTO_IPV6 && cm->cmsg_type == IPV6_ORIGDSTADDR) {
			struct sockaddr_in6 o;
			memcpy(&o, CMSG_DATA(cm), sizeof(o));
			ctx->dfamily = AF_INET6;
			memcpy(ctx->daddr, &o.sin6_addr, 16);
			ctx->dport = ntohs(o.sin6_port);
		}
	}
	if (ctx->dfamily == 0 && local->lfamily) {
		ctx->dfamily = local->lfamily;
		memcpy(ctx->daddr, local->laddr, 16);
	}
}

/* A new flow for ctx's client, connected to a backend; NULL if refused. */
static struct l4_conn *flow_new(struct l4_worker *w, struct l4_service *svc, int lfd,
				const struct l4_pick_ctx *ctx, const struct l4_udp_flow *local)
{
	struct l4_conn *c = calloc(1, sizeof(*c));
	struct l4_tmpl *tmpl = NULL;
	struct l4_slot *slot;
	struct epoll_event ev;
	int fd;

	/* Each flow counts against max_conns; a datagram over the limit is
	 * dropped (the client retries, as over a lossy path). */
	if (!l4_conn_admit(svc)) {
		free(c);
		return NULL;
	}
	if (c == NULL || (c->udp = malloc(sizeof(*c->udp))) == NULL) {
		free(c);
		atomic_fetch_sub_explicit(&svc->active, 1, memory_order_relaxed);
		return NULL;
	}
	*c->udp = *local;
	c->ctx = *ctx;
	c->cfd = lfd;
	c->bfd = -1;
	c->svc = svc;
	c->flags = L4_UDP;
	c->state = L4_ST_ESTABLISHED;
	c->last_ms = w->now_ms;
	slot = l4_service_schedule(svc, ctx, NULL, 0, 0, w->now_ms, &tmpl);
	if (slot == NULL) {
		atomic_fetch_add_explicit(&svc->rejected, 1, memory_order_relaxed);
		goto fail;
	}
	/* UDP connections never count as active (§1). */
	l4_slot_deactivate(slot);
	c->slot = slot;
	c->tmpl = tmpl;
	fd = socket(slot->addr.ss_family, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0 || connect(fd, (struct sockaddr *)&slot->addr, slot->addrlen) < 0) {
		if (fd >= 0)
			close(fd);
		atomic_fetch_add_explicit(&slot->connect_errors, 1, memory_order_relaxed);
		l4_service_unbind(svc, slot, tmpl, w->now_ms);
		goto fail;
	}
	ev.events = EPOLLIN;
	ev.data.u64 = (uint64_t)(uintptr_t)c | 1u; /* backend tag */
	if (epoll_ctl(w->epfd, EPOLL_CTL_ADD, fd, &ev) < 0 || flow_insert(w, c) < 0) {
		close(fd);
		l4_service_unbind(svc, slot, tmpl, w->now_ms);
		goto fail;
	}
	c->bfd = fd;
	l4_service_count_vip(svc, ctx);
	l4_conn_link(w, c);
	l4_timer_set(w, c, w->now_ms + atomic_load_explicit(&svc->idle_timeout_ms,
							    memory_order_relaxed));
	return c;
fail:
	atomic_fetch_sub_explicit(&svc->active, 1, memory_order_relaxed);
	free(c->udp);
	free(c);
	return NULL;
}

static void setup_recv(struct udp_bufs *b, int n)
{
	int i;
	for (i = 0; i < n; i++) {
		b->iov[i].iov_base = b->data[i];
		b->iov[i].iov_len = UDP_MAX;
		memset(&b->msgs[i].msg_hdr, 0, sizeof(b->msgs[i].msg_hdr));
		b->msgs[i].msg_hdr.msg_name = &b->addrs[i];
		b->msgs[i].msg_hdr.msg_namelen = sizeof(b->addrs[i]);
		b->msgs[i].msg_hdr.msg_iov = &b->iov[i];
		b->msgs[i].msg_hdr.msg_iovlen = 1;
		b->msgs[i].msg_hdr.msg_control = b->cmsg[i];
		b->msgs[i].msg_hdr.msg_controllen = CMSG_SPACE_ALL;
	}
}

/* The backend answered with ICMP port unreachable: nothing listens there.
 * End the flow so the client's next datagram is scheduled afresh instead of
 * being sent into the same hole. */
static void flow_refused(struct l4_worker *w, struct l4_conn *c)
{
	atomic_fetch_add_explicit(&c->slot->connect_errors, 1, memory_order_relaxed);
	atomic_fetch_add_explicit(&c->slot->consec_failures, 1, memory_order_relaxed);
	l4_conn_close(w, c, 0);
}

void l4_udp_recv(struct l4_worker *w, struct l4_service *svc, int fd)
{
	struct udp_bufs *b = bufs(w);
	int n, i;

	if (b == NULL) {
		l4_udp_discard(fd);
		return;
	}
	setup_recv(b, UDP_BATCH);
	n = recvmmsg(fd, b->msgs, UDP_BATCH, MSG_DONTWAIT, NULL);
	for (i = 0; i < n; i++) {
		struct l4_pick_ctx ctx;
		struct l4_udp_flow local;
		struct l4_conn *c;
		ssize_t sent;

		ctx_from_msg(&ctx, &local, &b->addrs[i], &b->msgs[i].msg_hdr);
		c = flow_find(w, fd, &ctx);
		if (c == NULL && (c = flow_new(w, svc, fd, &ctx, &local)) == NULL)
			continue;
		sent = send(c->bfd, b->data[i], b->msgs[i].msg_len, MSG_DONTWAIT);
		if (sent >= 0) {
			atomic_fetch_add_explicit(&c->slot->bytes_in, (uint64_t)sent,
						  memory_order_relaxed);
			c->last_ms = w->now_ms;
		} else if (errno == ECONNREFUSED) {
			flow_refused(w, c);
		}
	}
}

void l4_udp_reply(struct l4_worker *w, struct l4_conn *c)
{
	struct udp_bufs *b = bufs(w);
	struct mmsghdr out[UDP_BATCH];
	struct sockaddr_storage to;
	socklen_t tolen;
	int n, i, sent;

	if (b == NULL)
		return;
	setup_recv(b, UDP_BATCH);
	for (i = 0; i < UDP_BATCH; i++) {
		b->msgs[i].msg_hdr.msg_name = NULL;
		b->msgs[i].msg_hdr.msg_namelen = 0;
		b->msgs[i].msg_hdr.msg_control = NULL;
		b->msgs[i].msg_hdr.msg_controllen = 0;
	}
	n = recvmmsg(c->bfd, b->msgs, UDP_BATCH, MSG_DONTWAIT, NULL);
	if (n <= 0) {
		if (n < 0 && errno == ECONNREFUSED)
			flow_refused(w, c);
		return;
	}
	atomic_store_explicit(&c->slot->consec_failures, 0, memory_order_relaxed);
	memset(&to, 0, sizeof(to));
	if (c->ctx.family == AF_INET6) {
		struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)&to;
		s6->sin6_family = AF_INET6;
		memcpy(&s6->sin6_addr, c->ctx.caddr, 16);
		s6->sin6_port = htons(c->ctx.cport);
		tolen = sizeof(*s6);
	} else {
		struct sockaddr_in *s4 = (struct sockaddr_in *)&to;
		s4->sin_family = AF_INET;
		memcpy(&s4->sin_addr, c->ctx.caddr, 4);
		s4->sin_port = htons(c->ctx.cport);
		tolen = sizeof(*s4);
	}
	for (i = 0; i < n; i++) {
		struct msghdr *mh = &out[i].msg_hdr;
		memset(mh, 0, sizeof(*mh));
		b->iov[i].iov_len = b->msgs[i].msg_len;
		mh->msg_name = &to;
		mh->msg_namelen = tolen;
		mh->msg_iov = &b->iov[i];
		mh->msg_iovlen = 1;
		if (c->udp->lfamily == AF_INET) {
			struct in_pktinfo pi;
			struct cmsghdr *cm;
			memset(&pi, 0, sizeof(pi));
			memcpy(&pi.ipi_spec_dst, c->udp->laddr, 4);
			mh->msg_control = b->cmsg[i];
			mh->msg_controllen = CMSG_SPACE(sizeof(pi));
			cm = CMSG_FIRSTHDR(mh);
			cm->cmsg_level = IPPROTO_IP;
			cm->cmsg_type = IP_PKTINFO;
			cm->cmsg_len = CMSG_LEN(sizeof(pi));
			memcpy(CMSG_DATA(cm), &pi, sizeof(pi));
		} else if (c->udp->lfamily == AF_INET6) {
			struct in6_pktinfo pi;
			struct cmsghdr *cm;
			memset(&pi, 0, sizeof(pi));
			memcpy(&pi.ipi6_addr, c->udp->laddr, 16);
			pi.ipi6_ifindex = (unsigned)c->udp->ifindex;
			mh->msg_control = b->cmsg[i];
			mh->msg_controllen = CMSG_SPACE(sizeof(pi));
			cm = CMSG_FIRSTHDR(mh);
			cm->cmsg_level = IPPROTO_IPV6;
			cm->cmsg_type = IPV6_PKTINFO;
			cm->cmsg_len = CMSG_LEN(sizeof(pi));
			memcpy(CMSG_DATA(cm), &pi, sizeof(pi));
		}
	}
	sent = sendmmsg(c->cfd, out, (unsigned)n, MSG_DONTWAIT);
	for (i = 0; i < sent; i++)
		atomic_fetch_add_explicit(&c->slot->bytes_out, out[i].msg_len, memory_order_relaxed);
	c->last_ms = w->now_ms;
}
