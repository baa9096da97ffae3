/* PROXY protocol headers towards backends, as HAProxy writes them
 * (doc/proxy-protocol.txt; src/connection.c make_proxy_line_v1/_v2):
 *
 *   v1: "PROXY TCP4 <src> <dst> <sport> <dport>\r\n" (TCP6 for IPv6), or
 *       "PROXY UNKNOWN\r\n" when the two addresses are not of one family;
 *   v2: the 12-byte signature, ver/cmd 0x21 (v2, PROXY), family 0x11
 *       (TCP over IPv4) or 0x21 (TCP over IPv6), the address block length
 *       (big endian) and src addr, dst addr, src port, dst port; ver/cmd
 *       0x20 (LOCAL) with family 0 and no addresses when unknown.
 *
 * Source is the client, destination the address it dialled. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <stdio.h>
#include <string.h>

#include "l4lb.h"

static const uint8_t v2_sig[12] = { 0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D,
				    0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A };

static size_t header_v1(const struct l4_pick_ctx *ctx, int known, uint8_t *buf, size_t cap)
{
	char src[INET6_ADDRSTRLEN], dst[INET6_ADDRSTRLEN];
	int n;

	if (!known ||
	    inet_ntop(ctx->family, ctx->caddr, src, sizeof(src)) == NULL ||
	    inet_ntop(ctx->dfamily, ctx->daddr, dst, sizeof(dst)) == NULL)
		n = snprintf((char *)buf, cap, "PROXY UNKNOWN\r\n");
	else
		n = snprintf((char *)buf, cap, "PROXY %s %s %s %u %u\r\n",
			     ctx->family == AF_INET6 ? "TCP6" : "TCP4", src, dst,
			     (unsigned)ctx->cport, (unsigned)ctx->dport);
	return n < 0 || (size_t)n >= cap ? 0 : (size_t)n;
}

static size_t header_v2(const struct l4_pick_ctx *ctx, int known, uint8_t *buf, size_t cap)
{
	size_t alen = !known ? 0 : ctx->family == AF_INET6 ? 16 : 4;
	size_t len = 16 + 2 * alen + (known ? 4 : 0);
	uint8_t *p = buf + 16;

	if (cap < len)
		return 0;
	memcpy(buf, v2_sig, sizeof(v2_sig));
	buf[12] = known ? 0x21 : 0x20;
	buf[13] = !known ? 0x00 : ctx->family == AF_INET6 ? 0x21 : 0x11;
	buf[14] = (uint8_t)((len - 16) >> 8);
	buf[15] = (uint8_t)(len - 16);
	if (known) {
		memcpy(p, ctx->caddr, alen);
		memcpy(p + alen, ctx->daddr, alen);
		p += 2 * alen;
		p[0] = (uint8_t)(ctx->cport >> 8);
		p[1] = (uint8_t)ctx->cport;
		p[2] = (uint8_t)(ctx->dport >> 8);
		p[3] = (uint8_t)ctx->dport;
	}
	return len;
}

size_t l4_proxy_header(int version, const struct l4_pick_ctx *ctx, uint8_t *buf, size_t cap)
{
	int known = (ctx->family == AF_INET || ctx->family == AF_INET6) &&
		    ctx->dfamily == ctx->family;

	if (version == 1)
		return header_v1(ctx, known, buf, cap);
	if (version == 2)
		return header_v2(ctx, known, buf, cap);
	return 0;
}
