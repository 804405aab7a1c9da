/* virtio-vsock driver for the test guest: a polled server the host tests and benchmarks
 * drive through ember's Unix sockets (README.md, mode `vsock`).
 *
 * Guest kernel code is emulated instruction by instruction on the PVM hosts, so payload
 * bytes are never touched here: an echoed packet goes back out of the very RX buffer it
 * arrived in (only its 44-byte header is rewritten), a sink drops data unread, and a
 * source sends one pattern buffer over and over. The host checks the bytes. */
#include "virtio.h"

#define QSIZE 256
#define EVQ_SIZE 8
#define HDR 44
#define RXB_DATA 32768
#define NRX 96
#define TX_HEADS 128 /* head d uses descriptors d and d + TX_HEADS */
#define NCONN 2048   /* open-addressing table; ember allows 1023 connections */
#define GUEST_BUF_ALLOC (256u * 1024)
#define SRC_CHUNK 32768

#define OP_REQUEST 1
#define OP_RESPONSE 2
#define OP_RST 3
#define OP_SHUTDOWN 4
#define OP_RW 5
#define OP_CREDIT_UPDATE 6
#define OP_CREDIT_REQUEST 7
#define SHUT_RCV 1
#define SHUT_SEND 2

/* Ports the guest listens on. */
#define PORT_ECHO 1024
#define PORT_SINK 1025
#define PORT_SOURCE 1026
#define PORT_RSTNOW 1027
#define PORT_NOREAD 1028
#define GUEST_PORT_BASE 49152

struct hdr {
	uint64_t src_cid, dst_cid;
	uint32_t src_port, dst_port, len;
	uint16_t type, op;
	uint32_t flags, buf_alloc, fwd_cnt;
} __attribute__((packed));

enum { C_FREE, C_CONNECTING, C_OPEN };
enum { K_ECHO, K_SINK, K_SOURCE, K_NOREAD };

struct conn {
	uint32_t local, peer;
	uint8_t state, kind, used, asked_credit, in_parked;
	uint32_t peer_buf_alloc, peer_fwd_cnt, tx_cnt, fwd_cnt, last_fwd_sent;
	int16_t park_head, park_tail; /* RX buffers waiting for host credit (echo) */
	uint64_t src_left;
};

static struct virtqueue rxq, txq, evq;
static uint8_t rx_rings[VQ_RING_BYTES(QSIZE)] NOINIT __attribute__((aligned(4096)));
static uint8_t tx_rings[VQ_RING_BYTES(QSIZE)] NOINIT __attribute__((aligned(4096)));
static uint8_t ev_rings[VQ_RING_BYTES(EVQ_SIZE)] NOINIT __attribute__((aligned(4096)));
static uint8_t rx_bufs[NRX][HDR + RXB_DATA] NOINIT __attribute__((aligned(64)));
static uint8_t ev_bufs[EVQ_SIZE][8] NOINIT;
static struct hdr tx_hdrs[TX_HEADS] NOINIT __attribute__((aligned(64)));
static uint8_t pattern[SRC_CHUNK] NOINIT __attribute__((aligned(64)));
static struct conn conns[NCONN] NOINIT;
static int16_t park_next[NRX] NOINIT;
/* What a finished TX head gives back: an RX buffer index, or -1. */
static int16_t tx_meta[TX_HEADS] NOINIT;
static uint16_t tx_free[TX_HEADS] NOINIT;
static unsigned tx_nfree;
static uint64_t guest_cid;
static uint64_t source_bytes;
/* `vsock.echo=<port>` words: more echo ports, where an engine's agent listens. */
#define MAX_EXTRA_ECHO 8
static uint32_t extra_echo[MAX_EXTRA_ECHO];
static unsigned nextra_echo;
static int tx_dirty, rx_dirty;
static uint16_t source_list[NCONN] NOINIT; /* conns with bytes to source */
static unsigned nsource;
static uint16_t parked_list[NCONN] NOINIT; /* conns with echo data waiting */
static unsigned nparked;

static unsigned slot_of(uint32_t local, uint32_t peer)
{
	return (peer * 2654435761u ^ local) & (NCONN - 1);
}

static struct conn *find(uint32_t local, uint32_t peer)
{
	unsigned i = slot_of(local, peer);
	for (unsigned n = 0; n < NCONN; n++, i = (i + 1) & (NCONN - 1)) {
		struct conn *c = &conns[i];
		if (!c->used)
			return NULL;
		if (c->state != C_FREE && c->local == local && c->peer == peer)
			return c;
	}
	return NULL;
}

/* A free entry on the probe path (tombstones are reused: `used` stays set). */
static struct conn *alloc(uint32_t local, uint32_t peer)
{
	unsigned i = slot_of(local, peer);
	for (unsigned n = 0; n < NCONN; n++, i = (i + 1) & (NCONN - 1)) {
		struct conn *c = &conns[i];
		if (c->state == C_FREE) {
			memset(c, 0, sizeof(*c));
			c->used = 1;
			c->local = local;
			c->peer = peer;
			c->park_head = c->park_tail = -1;
			return c;
		}
	}
	return NULL;
}

static void post_rx(int b)
{
	rxq.desc[b] = (struct vring_desc){(uint64_t)rx_bufs[b], HDR + RXB_DATA, VRING_DESC_F_WRITE, 0};
	vq_push(&rxq, (uint16_t)b);
	rx_dirty = 1;
}

static void reclaim_tx(void)
{
	uint32_t id, len;
	while (vq_poll(&txq, &id, &len)) {
		if (id >= TX_HEADS) {
			kprintf("vsock: error: bogus TX used id %u\n", id);
			continue;
		}
		if (tx_meta[id] >= 0)
			post_rx(tx_meta[id]);
		tx_free[tx_nfree++] = (uint16_t)id;
	}
}

/* A free TX head; waits for the device to finish one if none is left. */
static int get_tx(void)
{
	uint64_t end = rdtsc() + tsc_hz() * 5;
	while (!tx_nfree) {
		if (tx_dirty) {
			vq_notify(&txq);
			tx_dirty = 0;
		}
		reclaim_tx();
		if (rdtsc() > end) {
			puts_serial("vsock: error: TX queue stuck\n");
			return -1;
		}
	}
	return tx_free[--tx_nfree];
}

static void fill_hdr(struct hdr *h, struct conn *c, uint16_t op, uint32_t len)
{
	h->src_cid = guest_cid;
	h->dst_cid = 2;
	h->src_port = c->local;
	h->dst_port = c->peer;
	h->len = len;
	h->type = 1;
	h->op = op;
	h->flags = 0;
	h->buf_alloc = GUEST_BUF_ALLOC;
	h->fwd_cnt = c->fwd_cnt;
}

static void push_tx(int d, uint64_t addr, uint32_t len, int16_t meta)
{
	txq.desc[d] = (struct vring_desc){addr, len, 0, 0};
	tx_meta[d] = meta;
	vq_push(&txq, (uint16_t)d);
	tx_dirty = 1;
}

static void send_ctrl(struct conn *c, uint16_t op, uint32_t flags)
{
	int d = get_tx();
	if (d < 0)
		return;
	fill_hdr(&tx_hdrs[d], c, op, 0);
	tx_hdrs[d].flags = flags;
	c->last_fwd_sent = c->fwd_cnt;
	push_tx(d, (uint64_t)&tx_hdrs[d], HDR, -1);
}

/* Once per stall: ember answers, and tells us again when its buffer for the host
 * drains, so a whole buffer that does not fit the credit yet never waits forever. */
static void ask_credit(struct conn *c)
{
	if (c->asked_credit)
		return;
	c->asked_credit = 1;
	send_ctrl(c, OP_CREDIT_REQUEST, 0);
}

/* An RST for a packet that matches no connection. */
static void send_rst_to(uint32_t local, uint32_t peer)
{
	struct conn tmp;
	memset(&tmp, 0, sizeof(tmp));
	tmp.local = local;
	tmp.peer = peer;
	send_ctrl(&tmp, OP_RST, 0);
}

static uint32_t credit(const struct conn *c)
{
	return c->peer_buf_alloc - (c->tx_cnt - c->peer_fwd_cnt);
}

/* Sends RX buffer b (data length len) back out as it is: the echo. */
static int echo_buf(struct conn *c, int b, uint32_t len)
{
	if (credit(c) < len || !tx_nfree)
		return 0;
	int d = tx_free[--tx_nfree];
	c->fwd_cnt += len;
	fill_hdr((struct hdr *)rx_bufs[b], c, OP_RW, len);
	c->tx_cnt += len;
	c->last_fwd_sent = c->fwd_cnt;
	push_tx(d, (uint64_t)rx_bufs[b], HDR + len, (int16_t)b);
	return 1;
}

static void park(struct conn *c, int b)
{
	if (!c->in_parked && nparked < NCONN) {
		c->in_parked = 1;
		parked_list[nparked++] = (uint16_t)(c - conns);
	}
	park_next[b] = -1;
	if (c->park_tail >= 0)
		park_next[c->park_tail] = (int16_t)b;
	else
		c->park_head = (int16_t)b;
	c->park_tail = (int16_t)b;
}

static void flush_parked(struct conn *c)
{
	while (c->park_head >= 0) {
		int b = c->park_head;
		uint32_t len = ((struct hdr *)rx_bufs[b])->len;
		if (!echo_buf(c, b, len)) {
			if (credit(c) < len)
				ask_credit(c);
			return;
		}
		c->park_head = park_next[b];
		if (c->park_head < 0)
			c->park_tail = -1;
	}
}

static void close_conn(struct conn *c)
{
	while (c->park_head >= 0) {
		int b = c->park_head;
		c->park_head = park_next[b];
		post_rx(b);
	}
	c->park_tail = -1;
	c->state = C_FREE;
}

/* Queues source packets while host credit and TX heads last. */
static void pump_source(struct conn *c)
{
	while (c->src_left && tx_nfree >= 2) {
		uint32_t n = c->src_left < SRC_CHUNK ? (uint32_t)c->src_left : SRC_CHUNK;
		if (credit(c) < n)
			n = credit(c);
		if (!n) {
			ask_credit(c);
			return;
		}
		int d = tx_free[--tx_nfree];
		fill_hdr(&tx_hdrs[d], c, OP_RW, n);
		c->tx_cnt += n;
		c->src_left -= n;
		txq.desc[d] = (struct vring_desc){(uint64_t)&tx_hdrs[d], HDR, VRING_DESC_F_NEXT, (uint16_t)(d + TX_HEADS)};
		txq.desc[d + TX_HEADS] = (struct vring_desc){(uint64_t)pattern, n, 0, 0};
		tx_meta[d] = -1;
		vq_push(&txq, (uint16_t)d);
		tx_dirty = 1;
		if (!c->src_left)
			send_ctrl(c, OP_SHUTDOWN, SHUT_SEND);
	}
}

static void accept_request(const struct hdr *h)
{
	int kind;
	switch (h->dst_port) {
	case PORT_ECHO: kind = K_ECHO; break;
	case PORT_SINK: kind = K_SINK; break;
	case PORT_SOURCE: kind = K_SOURCE; break;
	case PORT_NOREAD: kind = K_NOREAD; break;
	case PORT_RSTNOW: kind = K_ECHO; break;
	default:
		kind = -1;
		for (unsigned i = 0; i < nextra_echo; i++)
			if (h->dst_port == extra_echo[i])
				kind = K_ECHO;
		if (kind < 0) {
			send_rst_to(h->dst_port, h->src_port);
			return;
		}
	}
	struct conn *c = alloc(h->dst_port, h->src_port);
	if (!c) {
		send_rst_to(h->dst_port, h->src_port);
		return;
	}
	c->state = C_OPEN;
	c->kind = (uint8_t)kind;
	c->peer_buf_alloc = h->buf_alloc;
	c->peer_fwd_cnt = h->fwd_cnt;
	send_ctrl(c, OP_RESPONSE, 0);
	if (h->dst_port == PORT_RSTNOW) {
		/* A reset from the guest's end right after accepting. */
		send_ctrl(c, OP_RST, 0);
		close_conn(c);
	} else if (kind == K_SOURCE) {
		c->src_left = source_bytes;
		source_list[nsource++] = (uint16_t)(c - conns);
	}
}

/* One used RX buffer. Returns 1 if the buffer was kept (parked or echoed). */
static int handle_rx(int b, uint32_t used_len)
{
	const struct hdr *h = (const struct hdr *)rx_bufs[b];
	if (used_len < HDR || h->len > used_len - HDR) {
		kprintf("vsock: error: bad RX packet len %u in %u\n", h->len, used_len);
		return 0;
	}
	if (h->op == OP_REQUEST) {
		accept_request(h);
		return 0;
	}
	struct conn *c = find(h->dst_port, h->src_port);
	if (!c) {
		if (h->op != OP_RST)
			send_rst_to(h->dst_port, h->src_port);
		return 0;
	}
	c->peer_buf_alloc = h->buf_alloc;
	c->peer_fwd_cnt = h->fwd_cnt;
	c->asked_credit = 0;
	switch (h->op) {
	case OP_RESPONSE:
		if (c->state == C_CONNECTING) {
			c->state = C_OPEN;
			kprintf("vsock: connected %u\n", c->peer);
		}
		return 0;
	case OP_RST:
		kprintf("vsock: %s %u\n", c->state == C_CONNECTING ? "refused" : "reset by host", c->peer);
		close_conn(c);
		return 0;
	case OP_SHUTDOWN:
		kprintf("vsock: shutdown by host %u\n", c->local < GUEST_PORT_BASE ? c->local : c->peer);
		send_ctrl(c, OP_RST, 0);
		close_conn(c);
		return 0;
	case OP_CREDIT_REQUEST:
		send_ctrl(c, OP_CREDIT_UPDATE, 0);
		return 0;
	case OP_CREDIT_UPDATE:
		flush_parked(c);
		return 0;
	case OP_RW:
		break;
	default:
		return 0;
	}
	uint32_t len = h->len;
	switch (c->kind) {
	case K_ECHO:
		if (c->park_head < 0 && echo_buf(c, b, len))
			return 1;
		park(c, b);
		if (credit(c) < len)
			ask_credit(c);
		return 1;
	case K_SINK:
		c->fwd_cnt += len;
		if (c->fwd_cnt - c->last_fwd_sent >= GUEST_BUF_ALLOC / 2)
			send_ctrl(c, OP_CREDIT_UPDATE, 0);
		return 0;
	default:
		/* K_NOREAD: the application never reads; its socket buffer (our credit) fills. */
		return 0;
	}
}

/* VIRTIO_VSOCK_EVENT_TRANSPORT_RESET (a restore from a snapshot): every connection is
 * gone on the host's side, so drop them all, read the CID again, and hand the event
 * buffer back (the device holds RX until it sees it). */
static void poll_events(uint64_t base)
{
	uint32_t id, len;
	while (vq_poll(&evq, &id, &len)) {
		if (id >= EVQ_SIZE) {
			kprintf("vsock: error: bogus event used id %u\n", id);
			continue;
		}
		uint32_t event = *(volatile uint32_t *)ev_bufs[id];
		if (len >= 4 && event == 0) {
			unsigned dropped = 0;
			for (unsigned i = 0; i < NCONN; i++) {
				if (conns[i].state != C_FREE) {
					close_conn(&conns[i]);
					dropped++;
				}
			}
			nsource = 0;
			guest_cid = mmio_read32(base + VIRTIO_MMIO_CONFIG) |
				    (uint64_t)mmio_read32(base + VIRTIO_MMIO_CONFIG + 4) << 32;
			kprintf("vsock: transport reset dropped=%u cid=%lu\n", dropped, guest_cid);
		} else {
			kprintf("vsock: event id=%u len=%u\n", event, len);
		}
		evq.desc[id] = (struct vring_desc){(uint64_t)ev_bufs[id], 8, VRING_DESC_F_WRITE, 0};
		vq_push(&evq, (uint16_t)id);
		vq_notify(&evq);
	}
}

static void connect_to(uint32_t port, unsigned i)
{
	struct conn *c = alloc(GUEST_PORT_BASE + i, port);
	if (!c)
		return;
	c->state = C_CONNECTING;
	c->kind = K_ECHO;
	send_ctrl(c, OP_REQUEST, 0);
}

void vsock_run(uint64_t base, const char *cmdline)
{
	uint64_t features;
	if (virtio_negotiate(base, "vsock", 0, &features) != 0)
		return;
	if (virtio_setup_queue(base, "vsock", 0, &rxq, rx_rings, QSIZE) != 0 ||
	    virtio_setup_queue(base, "vsock", 1, &txq, tx_rings, QSIZE) != 0 ||
	    virtio_setup_queue(base, "vsock", 2, &evq, ev_rings, EVQ_SIZE) != 0)
		return;
	virtio_driver_ok(base);
	guest_cid = mmio_read32(base + VIRTIO_MMIO_CONFIG) | (uint64_t)mmio_read32(base + VIRTIO_MMIO_CONFIG + 4) << 32;

	memset(conns, 0, sizeof(conns));
	for (unsigned i = 0; i < SRC_CHUNK; i++)
		pattern[i] = (uint8_t)(i * 7 + 3);
	source_bytes = 64ull << 20;
	const char *v = cmdline_find(cmdline, NULL, "vsock.source_mib=");
	if (v) {
		parse_u64(v, &source_bytes);
		source_bytes <<= 20;
	}
	nextra_echo = 0;
	for (const char *e = NULL; nextra_echo < MAX_EXTRA_ECHO &&
				   (e = cmdline_find(cmdline, e, "vsock.echo=")) != NULL;) {
		uint64_t port;
		parse_u64(e, &port);
		extra_echo[nextra_echo++] = (uint32_t)port;
	}
	nsource = 0;
	nparked = 0;
	tx_nfree = 0;
	for (int d = TX_HEADS - 1; d >= 0; d--)
		tx_free[tx_nfree++] = (uint16_t)d;
	for (int b = 0; b < NRX; b++)
		post_rx(b);
	for (int e = 0; e < EVQ_SIZE; e++) {
		evq.desc[e] = (struct vring_desc){(uint64_t)ev_bufs[e], 8, VRING_DESC_F_WRITE, 0};
		vq_push(&evq, (uint16_t)e);
	}
	vq_notify(&evq);
	vq_notify(&rxq);
	rx_dirty = 0;
	kprintf("vsock: cid=%lu\n", guest_cid);

	/* vsock.connect=<port>: guest-initiated connections (several words add up). */
	unsigned n = 0;
	const char *p = NULL;
	while ((p = cmdline_find(cmdline, p, "vsock.connect=")) != NULL) {
		uint64_t port;
		parse_u64(p, &port);
		connect_to((uint32_t)port, n++);
	}
	puts_serial("vsock: ready\n");

	/* SendCtrlAltDel ends the VM as in counter mode; the i8042 is polled about once a
	 * millisecond (each poll is a VM exit), so the loop costs one rdtsc more per pass. */
	unsigned cad = 0;
	uint64_t poll = tsc_hz() / 1000, next_poll = rdtsc() + poll;
	for (;;) {
		if (rdtsc() >= next_poll) {
			i8042_poll(&cad);
			next_poll = rdtsc() + poll;
		}
		uint16_t idx = vq_used_idx(&rxq);
		while (rxq.last_used != idx) {
			const volatile struct vring_used_elem *e = &rxq.used->ring[rxq.last_used & (QSIZE - 1)];
			uint32_t id = e->id, len = e->len;
			rxq.last_used++;
			if (id >= NRX) {
				kprintf("vsock: error: bogus RX used id %u\n", id);
				continue;
			}
			if (!handle_rx((int)id, len))
				post_rx((int)id);
		}
		reclaim_tx();
		poll_events(base);
		for (unsigned i = 0; i < nparked;) {
			struct conn *c = &conns[parked_list[i]];
			if (c->state == C_FREE || c->park_head < 0) {
				c->in_parked = 0;
				parked_list[i] = parked_list[--nparked];
				continue;
			}
			flush_parked(c);
			i++;
		}
		for (unsigned i = 0; i < nsource;) {
			struct conn *c = &conns[source_list[i]];
			if (c->state != C_OPEN || !c->src_left) {
				source_list[i] = source_list[--nsource];
				continue;
			}
			pump_source(c);
			i++;
		}
		if (tx_dirty) {
			vq_notify(&txq);
			tx_dirty = 0;
		}
		if (rx_dirty) {
			vq_notify(&rxq);
			rx_dirty = 0;
		}
	}
}
