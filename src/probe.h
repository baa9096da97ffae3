/* TCP connect checks without Python: non-blocking connects on an epoll set of
 * their own, timeouts on a binary heap behind one timerfd in that set, and
 * results harvested in batches.  Nothing here touches Python; functions
 * return >= 0 or a negative errno. */
#ifndef L4LB_PROBE_H
#define L4LB_PROBE_H

#include <stdint.h>

/* `err` of a probe whose timeout fell due before its connect completed. */
#define L4_PROBE_TIMEOUT (-1)

struct l4_probe_req {
	int64_t id;	  /* the caller's, returned with the result */
	uint8_t addr[16]; /* network order; the first 4 bytes for AF_INET */
	uint16_t family;  /* AF_INET or AF_INET6 */
	uint16_t port;
	uint32_t timeout_ms;
};

struct l4_probe_result {
	int64_t id;
	int32_t err;	   /* 0: connected, > 0: errno, L4_PROBE_TIMEOUT */
	uint32_t elapsed_us; /* from submission to the outcome */
};

struct l4_prober;

/* NULL with errno set on failure. */
struct l4_prober *l4_prober_new(void);
/* Close every socket in flight (unreported) and free the prober. */
void l4_prober_free(struct l4_prober *p);
/* The epoll fd: readable whenever l4_prober_poll has something to harvest. */
int l4_prober_fd(const struct l4_prober *p);
/* Probes started and not yet harvested. */
uint32_t l4_prober_inflight(const struct l4_prober *p);
/* Start `n` connects; each closes with a reset (SO_LINGER 0).  A probe that
 * fails at once (socket() or connect() error) has its result ready without
 * waiting for the fd.  Returns the number of results ready. */
int l4_prober_submit(struct l4_prober *p, const struct l4_probe_req *reqs, uint32_t n);
/* Harvest completed connects, then timeouts that fell due (a connect that
 * did complete is never reported as a timeout), until `max` results are
 * ready; what is left keeps the fd readable.  Returns the number of results
 * ready; read them with l4_prober_results, then l4_prober_consume. */
int l4_prober_poll(struct l4_prober *p, uint32_t max);
const struct l4_probe_result *l4_prober_results(const struct l4_prober *p, uint32_t *n);
void l4_prober_consume(struct l4_prober *p);

#endif
