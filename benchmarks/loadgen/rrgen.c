/* rrgen: request/response echo backend and load generator for the benchmarks.
 *
 *   rrgen echo PROTO HOST PORT
 *       echo server (PORT 0: any free port); prints "port N" once it is bound
 *   rrgen rr PROTO HOST PORT FLOWS OUTSTANDING SECONDS SIZE
 *       closed loop: OUTSTANDING requests in flight on each of FLOWS sockets, a new one
 *       sent for every response
 *   rrgen open PROTO HOST PORT FLOWS RATE SECONDS SIZE
 *       open loop: RATE requests/s spread round-robin over FLOWS sockets; latency is
 *       measured from each request's scheduled send time, so a stalled peer cannot hide
 *       its queueing (no coordinated omission)
 *
 * PROTO is tcp or udp; HOST an IPv4 address. Every message is SIZE bytes (at least 16):
 * a sequence number and the scheduled send time (CLOCK_MONOTONIC ns), then padding.
 * Load modes print one JSON object on stdout. The first fifth of the run (at most 0.5 s)
 * is warm-up and not counted. Batched recvmmsg/sendmmsg keep the generator's own cost per
 * request low; it reports that cost (cpu_ns_per_req) so the harness can show it.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BATCH 64
#define MAX_SIZE 1400
#define MAX_FLOWS 1024
#define TICK_NS 20000LL /* open loop: shortest sleep between send passes */
#define LOST_AFTER_NS 100000000LL /* UDP: a flow silent this long lost its requests */

struct flow {
	int fd;
	long inflight;
	int64_t last_rx;
	size_t rx_fill; /* TCP: bytes of a partial message */
	unsigned char rx[MAX_SIZE];
};

static int is_tcp;
static size_t msg_size;

static void die(const char *what)
{
	fprintf(stderr, "rrgen: %s: %s\n", what, strerror(errno));
	exit(2);
}

static int64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static double cpu_s(void)
{
	struct rusage ru;
	getrusage(RUSAGE_SELF, &ru);
	return (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6 +
	       (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec / 1e6;
}

static long parse_long(const char *s, long lo, long hi, const char *name)
{
	char *end;
	errno = 0;
	long v = strtol(s, &end, 10);
	if (errno || *end || v < lo || v > hi) {
		fprintf(stderr, "rrgen: %s must be an integer in [%ld, %ld], got %s\n", name, lo,
			hi, s);
		exit(2);
	}
	return v;
}

static struct sockaddr_in parse_addr(const char *host, const char *port)
{
	struct sockaddr_in sa;
	memset(&sa, 0, sizeof sa);
	sa.sin_family = AF_INET;
	sa.sin_port = htons((uint16_t)parse_long(port, 0, 65535, "PORT"));
	if (inet_pton(AF_INET, host, &sa.sin_addr) != 1) {
		fprintf(stderr, "rrgen: HOST must be an IPv4 address, got %s\n", host);
		exit(2);
	}
	return sa;
}

static int new_socket(void)
{
	int fd = socket(AF_INET, (is_tcp ? SOCK_STREAM : SOCK_DGRAM) | SOCK_NONBLOCK, 0);
	if (fd < 0)
		die("socket");
	if (is_tcp) {
		int one = 1;
		setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
	}
	return fd;
}

/* ------------------------------------------------------------------ echo server */

static void echo_udp(int fd)
{
	static unsigned char bufs[BATCH][MAX_SIZE];
	struct mmsghdr msgs[BATCH];
	struct iovec iov[BATCH];
	struct sockaddr_in from[BATCH];
	struct pollfd p = {.fd = fd, .events = POLLIN};
	for (;;) {
		for (int i = 0; i < BATCH; i++) {
			iov[i] = (struct iovec){bufs[i], MAX_SIZE};
			msgs[i].msg_hdr = (struct msghdr){.msg_name = &from[i],
							  .msg_namelen = sizeof from[i],
							  .msg_iov = &iov[i],
							  .msg_iovlen = 1};
		}
		int n = recvmmsg(fd, msgs, BATCH, MSG_DONTWAIT, NULL);
		if (n < 0) {
			if (errno != EAGAIN && errno != EINTR)
				die("recvmmsg");
			poll(&p, 1, -1);
			continue;
		}
		for (int i = 0; i < n; i++)
			iov[i].iov_len = msgs[i].msg_len;
		/* A full socket buffer on the way back drops the reply, as a real server would. */
		sendmmsg(fd, msgs, (unsigned)n, MSG_DONTWAIT);
	}
}

static void echo_tcp(int lfd)
{
	int ep = epoll_create1(0);
	if (ep < 0)
		die("epoll_create1");
	struct epoll_event ev = {.events = EPOLLIN, .data.fd = lfd};
	epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev);
	static unsigned char buf[65536];
	struct epoll_event evs[BATCH];
	for (;;) {
		int n = epoll_wait(ep, evs, BATCH, -1);
		for (int i = 0; i < n; i++) {
			int fd = evs[i].data.fd;
			if (fd == lfd) {
				int c = accept4(lfd, NULL, NULL, 0);
				if (c < 0)
					continue;
				int one = 1;
				setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
				struct epoll_event cev = {.events = EPOLLIN, .data.fd = c};
				epoll_ctl(ep, EPOLL_CTL_ADD, c, &cev);
				continue;
			}
			ssize_t got = recv(fd, buf, sizeof buf, MSG_DONTWAIT);
			if (got <= 0) {
				if (got < 0 && (errno == EAGAIN || errno == EINTR))
					continue;
				close(fd);
				continue;
			}
			/* Blocking socket: the reply goes out whole even if the peer reads slowly. */
			size_t off = 0;
			while (off < (size_t)got) {
				ssize_t w = send(fd, buf + off, (size_t)got - off, MSG_NOSIGNAL);
				if (w <= 0)
					break;
				off += (size_t)w;
			}
		}
	}
}

static int run_echo(const struct sockaddr_in *sa)
{
	int fd = socket(AF_INET, is_tcp ? SOCK_STREAM : SOCK_DGRAM, 0);
	if (fd < 0)
		die("socket");
	int one = 1;
	setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
	if (bind(fd, (const struct sockaddr *)sa, sizeof *sa) < 0)
		die("bind");
	if (is_tcp && listen(fd, 4096) < 0)
		die("listen");
	int rcvbuf = 4 << 20;
	setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf);
	struct sockaddr_in bound;
	socklen_t len = sizeof bound;
	getsockname(fd, (struct sockaddr *)&bound, &len);
	printf("port %u\n", ntohs(bound.sin_port));
	fflush(stdout);
	if (is_tcp)
		echo_tcp(fd);
	else
		echo_udp(fd);
	return 0;
}

/* ------------------------------------------------------------------ load modes */

static struct flow *flows;
static long nflows;

static void open_flows(const struct sockaddr_in *sa)
{
	flows = calloc((size_t)nflows, sizeof *flows);
	if (!flows)
		die("calloc");
	for (long i = 0; i < nflows; i++) {
		int fd = new_socket();
		if (connect(fd, (const struct sockaddr *)sa, sizeof *sa) < 0 && errno != EINPROGRESS)
			die("connect");
		flows[i].fd = fd;
	}
	if (!is_tcp)
		return;
	for (long i = 0; i < nflows; i++) { /* wait until every connection is up */
		struct pollfd p = {.fd = flows[i].fd, .events = POLLOUT};
		int err = 0;
		socklen_t len = sizeof err;
		if (poll(&p, 1, 5000) != 1)
			die("connect timed out");
		getsockopt(flows[i].fd, SOL_SOCKET, SO_ERROR, &err, &len);
		if (err) {
			errno = err;
			die("connect");
		}
	}
}

static void fill(unsigned char *msg, uint64_t seq, int64_t sched)
{
	memcpy(msg, &seq, 8);
	memcpy(msg + 8, &sched, 8);
}

/* Send ``count`` messages on flow ``f``; returns how many went out whole. */
static long send_batch(struct flow *f, long count, uint64_t *seq, int64_t sched)
{
	static unsigned char bufs[BATCH][MAX_SIZE];
	struct mmsghdr msgs[BATCH];
	struct iovec iov[BATCH];
	long sent = 0;
	while (sent < count) {
		unsigned n = (unsigned)(count - sent > BATCH ? BATCH : count - sent);
		for (unsigned i = 0; i < n; i++) {
			fill(bufs[i], (*seq)++, sched);
			iov[i] = (struct iovec){bufs[i], msg_size};
			msgs[i].msg_hdr = (struct msghdr){.msg_iov = &iov[i], .msg_iovlen = 1};
		}
		if (is_tcp) {
			/* Small messages on a connection with room to spare: never a short write
			 * in practice; a failed one ends the run with an error. */
			for (unsigned i = 0; i < n; i++)
				if (send(f->fd, bufs[i], msg_size, MSG_NOSIGNAL) != (ssize_t)msg_size)
					die("send");
			sent += n;
			continue;
		}
		int ok = sendmmsg(f->fd, msgs, n, MSG_DONTWAIT);
		if (ok <= 0)
			break; /* socket buffer full: the caller counts these as not sent */
		sent += ok;
		if ((unsigned)ok < n)
			break;
	}
	return sent;
}

/* Receive what is ready on flow ``f``; calls ``on_msg`` per complete message. */
static long recv_ready(struct flow *f, void (*on_msg)(const unsigned char *, int64_t), int64_t now)
{
	static unsigned char bufs[BATCH][MAX_SIZE];
	long got = 0;
	if (is_tcp) {
		unsigned char buf[16384];
		ssize_t n = recv(f->fd, buf, sizeof buf, MSG_DONTWAIT);
		if (n == 0) {
			errno = ECONNRESET;
			die("peer closed the connection");
		}
		if (n < 0) {
			if (errno == EAGAIN || errno == EINTR)
				return 0;
			die("recv");
		}
		for (size_t off = 0; off < (size_t)n;) {
			size_t take = msg_size - f->rx_fill;
			if (take > (size_t)n - off)
				take = (size_t)n - off;
			memcpy(f->rx + f->rx_fill, buf + off, take);
			f->rx_fill += take;
			off += take;
			if (f->rx_fill == msg_size) {
				on_msg(f->rx, now);
				f->rx_fill = 0;
				got++;
			}
		}
		return got;
	}
	struct mmsghdr msgs[BATCH];
	struct iovec iov[BATCH];
	for (int i = 0; i < BATCH; i++) {
		iov[i] = (struct iovec){bufs[i], MAX_SIZE};
		msgs[i].msg_hdr = (struct msghdr){.msg_iov = &iov[i], .msg_iovlen = 1};
	}
	int n = recvmmsg(f->fd, msgs, BATCH, MSG_DONTWAIT, NULL);
	if (n < 0) {
		if (errno == EAGAIN || errno == EINTR || errno == ECONNREFUSED)
			return 0;
		die("recvmmsg");
	}
	for (int i = 0; i < n; i++)
		if (msgs[i].msg_len >= 16)
			on_msg(bufs[i], now);
	return n;
}

static int64_t count_from; /* warm-up ends here */
static long counted;

static void on_rr(const unsigned char *msg, int64_t now)
{
	(void)msg;
	if (now >= count_from)
		counted++;
}

static int run_rr(long outstanding, double seconds)
{
	int64_t start = now_ns();
	int64_t warm = (int64_t)(seconds * 2e8);
	if (warm > 500000000LL)
		warm = 500000000LL;
	count_from = start + warm;
	int64_t end = count_from + (int64_t)(seconds * 1e9);
	uint64_t seq = 0;
	long lost = 0, unsent = 0;
	struct pollfd *pfds = calloc((size_t)nflows, sizeof *pfds);
	if (!pfds)
		die("calloc");
	for (long i = 0; i < nflows; i++) {
		pfds[i] = (struct pollfd){.fd = flows[i].fd, .events = POLLIN};
		flows[i].inflight = send_batch(&flows[i], outstanding, &seq, 0);
		flows[i].last_rx = start;
	}
	double cpu0 = 0;
	int cpu_started = 0;
	int64_t now = start;
	while (now < end) {
		poll(pfds, (nfds_t)nflows, 10);
		now = now_ns();
		if (!cpu_started && now >= count_from) {
			cpu0 = cpu_s();
			cpu_started = 1;
		}
		for (long i = 0; i < nflows; i++) {
			struct flow *f = &flows[i];
			long got = (pfds[i].revents & POLLIN) ? recv_ready(f, on_rr, now) : 0;
			if (got > 0) {
				f->inflight = f->inflight > got ? f->inflight - got : 0;
				f->last_rx = now;
			} else if (!is_tcp && f->inflight > 0 && now - f->last_rx > LOST_AFTER_NS) {
				lost += f->inflight; /* dropped somewhere: start this flow over */
				f->inflight = 0;
				f->last_rx = now;
			}
			long want = outstanding - f->inflight;
			if (want > 0) {
				long ok = send_batch(f, want, &seq, 0);
				unsent += want - ok;
				f->inflight += ok;
			}
		}
	}
	double cpu = cpu_started ? cpu_s() - cpu0 : 0.0;
	double secs = (double)(now - count_from) / 1e9;
	printf("{\"mode\": \"rr\", \"responses\": %ld, \"seconds\": %.6f, \"rate\": %.1f, "
	       "\"lost\": %ld, \"unsent\": %ld, \"cpu_s\": %.6f, \"cpu_ns_per_req\": %.1f}\n",
	       counted, secs, secs > 0 ? (double)counted / secs : 0.0, lost, unsent, cpu,
	       counted ? cpu * 1e9 / (double)counted : 0.0);
	return 0;
}

/* Open loop: send the due messages seq, seq + stride, ... < end on flow ``f`` in batches,
 * each stamped with its own scheduled time; returns how many did not go out. */
static uint64_t send_due(struct flow *f, uint64_t seq, uint64_t end, uint64_t stride,
			 int64_t t0, double interval)
{
	static unsigned char bufs[BATCH][MAX_SIZE];
	struct mmsghdr msgs[BATCH];
	struct iovec iov[BATCH];
	uint64_t unsent = 0;
	while (seq < end) {
		unsigned n = 0;
		for (; n < BATCH && seq < end; n++, seq += stride) {
			fill(bufs[n], seq, t0 + (int64_t)((double)seq * interval));
			iov[n] = (struct iovec){bufs[n], msg_size};
			msgs[n].msg_hdr = (struct msghdr){.msg_iov = &iov[n], .msg_iovlen = 1};
		}
		if (is_tcp) {
			for (unsigned i = 0; i < n; i++)
				if (send(f->fd, bufs[i], msg_size, MSG_NOSIGNAL) != (ssize_t)msg_size)
					die("send");
			continue;
		}
		int ok = sendmmsg(f->fd, msgs, n, MSG_DONTWAIT);
		unsent += n - (unsigned)(ok > 0 ? ok : 0);
	}
	return unsent;
}

static int64_t *latency; /* per sequence number; -1 until the response arrives */
static uint64_t total;

static void on_open(const unsigned char *msg, int64_t now)
{
	uint64_t seq;
	int64_t sched;
	memcpy(&seq, msg, 8);
	memcpy(&sched, msg + 8, 8);
	if (seq < total && latency[seq] < 0)
		latency[seq] = now - sched;
}

static int cmp64(const void *a, const void *b)
{
	int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
	return (x > y) - (x < y);
}

static double pct(const int64_t *sorted, uint64_t n, double p)
{
	if (!n)
		return 0.0;
	uint64_t i = (uint64_t)(p / 100.0 * (double)(n - 1) + 0.5);
	return (double)sorted[i] / 1e3; /* microseconds */
}

static int run_open(long rate, double seconds)
{
	total = (uint64_t)((double)rate * seconds);
	if (total < 1)
		total = 1;
	if (total > 50000000ULL) {
		fprintf(stderr, "rrgen: RATE * SECONDS must stay below 50 million requests\n");
		exit(2);
	}
	uint64_t warm = total / 5;
	if (warm > (uint64_t)rate / 2)
		warm = (uint64_t)rate / 2;
	total += warm;
	latency = malloc(total * sizeof *latency);
	int64_t *lag = malloc(total * sizeof *lag);
	struct pollfd *pfds = calloc((size_t)nflows, sizeof *pfds);
	if (!latency || !lag || !pfds)
		die("malloc");
	for (uint64_t i = 0; i < total; i++)
		latency[i] = -1;
	for (long i = 0; i < nflows; i++)
		pfds[i] = (struct pollfd){.fd = flows[i].fd, .events = POLLIN};
	prctl(PR_SET_TIMERSLACK, 1000UL, 0, 0, 0); /* wake within 1 us of the next send */
	double interval = 1e9 / (double)rate;
	int64_t t0 = now_ns() + 10000000LL;
	uint64_t next = 0, received = 0, unsent = 0;
	double cpu0 = cpu_s();
	int64_t drain_until = 0;
	for (;;) {
		int64_t now = now_ns();
		/* Everything due by now, at most one tick's worth late, goes out in one pass. */
		if (now >= t0 && next < total) {
			uint64_t due = (uint64_t)((double)(now - t0) / interval) + 1;
			if (due > total)
				due = total;
			for (uint64_t i = next; i < due; i++)
				lag[i] = now - (t0 + (int64_t)((double)i * interval));
			uint64_t stride = (uint64_t)nflows;
			for (uint64_t k = 0; k < stride && next + k < due; k++)
				unsent += send_due(&flows[(next + k) % stride], next + k, due, stride, t0,
						   interval);
			if (next < warm && due >= warm)
				cpu0 = cpu_s();
			next = due;
		}
		if (next == total && !drain_until)
			drain_until = now + 500000000LL; /* late responses: wait at most 0.5 s */
		if (drain_until && (received + unsent >= total || now >= drain_until))
			break;
		int64_t wait = drain_until ? 1000000LL
					   : t0 + (int64_t)((double)next * interval) - now;
		if (wait < TICK_NS)
			wait = TICK_NS; /* batch sends instead of waking once per request */
		struct timespec ts = {wait / 1000000000LL, wait % 1000000000LL};
		if (ppoll(pfds, (nfds_t)nflows, &ts, NULL) > 0) {
			now = now_ns();
			for (long i = 0; i < nflows; i++)
				if (pfds[i].revents & POLLIN)
					received += (uint64_t)recv_ready(&flows[i], on_open, now);
		}
	}
	double cpu = cpu_s() - cpu0;
	/* A request without a response counts as waited for until the end: loss shows in
	 * the tail percentiles instead of leaving only the fast answers. */
	int64_t gave_up = now_ns();
	uint64_t n = 0, measured = total - warm;
	for (uint64_t i = warm; i < total; i++) {
		if (latency[i] >= 0)
			n++;
		else
			latency[i] = gave_up - (t0 + (int64_t)((double)i * interval));
		latency[i - warm] = latency[i];
	}
	qsort(latency, measured, sizeof *latency, cmp64);
	memmove(lag, lag + warm, measured * sizeof *lag);
	qsort(lag, measured, sizeof *lag, cmp64);
	double secs = (double)measured * interval / 1e9;
	printf("{\"mode\": \"open\", \"rate\": %ld, \"sent\": %llu, \"responses\": %llu, "
	       "\"lost\": %llu, \"unsent\": %llu, \"seconds\": %.6f, "
	       "\"p50_us\": %.2f, \"p99_us\": %.2f, \"p99_9_us\": %.2f, \"max_us\": %.2f, "
	       "\"send_lag_p99_us\": %.2f, \"cpu_s\": %.6f, \"cpu_ns_per_req\": %.1f}\n",
	       rate, (unsigned long long)measured, (unsigned long long)n,
	       (unsigned long long)(measured - n), (unsigned long long)unsent, secs,
	       pct(latency, measured, 50), pct(latency, measured, 99),
	       pct(latency, measured, 99.9), pct(latency, measured, 100), pct(lag, measured, 99), cpu,
	       measured ? cpu * 1e9 / (double)measured : 0.0);
	return 0;
}

static void usage(void)
{
	fprintf(stderr, "usage: rrgen echo tcp|udp HOST PORT\n"
			"       rrgen rr tcp|udp HOST PORT FLOWS OUTSTANDING SECONDS SIZE\n"
			"       rrgen open tcp|udp HOST PORT FLOWS RATE SECONDS SIZE\n");
	exit(2);
}

int main(int argc, char **argv)
{
	signal(SIGPIPE, SIG_IGN);
	if (argc < 5)
		usage();
	if (strcmp(argv[2], "tcp") && strcmp(argv[2], "udp"))
		usage();
	is_tcp = !strcmp(argv[2], "tcp");
	struct sockaddr_in sa = parse_addr(argv[3], argv[4]);
	if (!strcmp(argv[1], "echo") && argc == 5)
		return run_echo(&sa);
	if (argc != 9 || (strcmp(argv[1], "rr") && strcmp(argv[1], "open")))
		usage();
	nflows = parse_long(argv[5], 1, MAX_FLOWS, "FLOWS");
	long load = parse_long(argv[6], 1, 10000000, strcmp(argv[1], "rr") ? "RATE" : "OUTSTANDING");
	char *end;
	double seconds = strtod(argv[7], &end);
	if (*end || !(seconds >= 0.05 && seconds <= 3600)) {
		fprintf(stderr, "rrgen: SECONDS must be a number in [0.05, 3600], got %s\n", argv[7]);
		return 2;
	}
	msg_size = (size_t)parse_long(argv[8], 16, MAX_SIZE, "SIZE");
	open_flows(&sa);
	return strcmp(argv[1], "rr") ? run_open(load, seconds) : run_rr(load, seconds);
}
