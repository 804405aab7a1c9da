/* netbench: guest-side virtio-net measurements, timed with the TSC: bulk TX of
 * 1514-byte frames, bulk RX counted until an "END" frame, and ping-pong round trips.
 * The host side sends / echoes (README.md has the protocol). */
#include "virtio.h"

#define VIRTIO_NET_F_MAC 5
#define NET_HDR_SIZE 12 /* struct virtio_net_hdr with VERSION_1 (num_buffers included) */
#define ETH_HDR_SIZE 14
#define ETH_MIN_FRAME 60
#define FRAME_SIZE 1514
#define ETHERTYPE_BENCH 0x88b5
#define QSIZE 256 /* a power of two; ember and Firecracker offer 256 */
/* Without mergeable buffers every RX buffer must hold a whole 1514-byte frame. */
#define RX_BUF_SIZE 2048
#define DEFAULT_FRAMES 20000
#define TX_TIMEOUT_MS 5000
#define RX_TIMEOUT_MS 10000
#define RTT_COUNT 100
#define RTT_TIMEOUT_MS 1000
#define RTT_MAX_LOST 3

static struct virtqueue rxq, txq;
static uint8_t rx_rings[VQ_RING_BYTES(QSIZE)] NOINIT __attribute__((aligned(4096)));
static uint8_t tx_rings[VQ_RING_BYTES(QSIZE)] NOINIT __attribute__((aligned(4096)));
static uint8_t rx_bufs[QSIZE][RX_BUF_SIZE] NOINIT __attribute__((aligned(4096)));
/* Every bulk TX descriptor points at this one frame: the device only reads it. */
static uint8_t tx_frame[NET_HDR_SIZE + FRAME_SIZE] NOINIT __attribute__((aligned(64)));
static uint8_t ping_frame[NET_HDR_SIZE + ETH_MIN_FRAME] NOINIT __attribute__((aligned(64)));
/* TX heads not in flight (the device may complete them in any order). */
static uint16_t tx_free[QSIZE] NOINIT;
static unsigned tx_nfree;

static void eth_header(uint8_t *buf, const uint8_t mac[6])
{
	memset(buf, 0, NET_HDR_SIZE);
	uint8_t *f = buf + NET_HDR_SIZE;
	memset(f, 0xff, 6);
	memcpy(f + 6, mac, 6);
	f[12] = ETHERTYPE_BENCH >> 8;
	f[13] = ETHERTYPE_BENCH & 0xff;
}

/* Returns finished TX heads to the free list. -1 on a bogus used element. */
static int tx_reclaim(uint64_t *completed)
{
	uint32_t id, len;
	while (vq_poll(&txq, &id, &len)) {
		if (id >= QSIZE || tx_nfree >= QSIZE) {
			kprintf("net-bench: error: bogus TX used id %u\n", id);
			return -1;
		}
		tx_free[tx_nfree++] = (uint16_t)id;
		(*completed)++;
	}
	return 0;
}

static void print_seconds(uint64_t ticks)
{
	uint64_t ms = ticks * 1000 / tsc_hz();
	kprintf("%lu.%03lu", ms / 1000, ms % 1000);
}

/* The rings are walked inline with local indices (see blkbench.c): the guest's cost per
 * frame should stay well below the VMM's. */
static void bench_tx(uint64_t frames)
{
	for (uint16_t i = 0; i < QSIZE; i++)
		txq.desc[i] = (struct vring_desc){(uint64_t)tx_frame, sizeof(tx_frame), 0, 0};
	const uint16_t mask = QSIZE - 1;
	uint16_t avail = txq.next_avail, last = txq.last_used;
	uint64_t sent = 0, completed = 0, timeout = tsc_hz() / 1000 * TX_TIMEOUT_MS;
	uint64_t start = rdtsc(), deadline = start + timeout;
	while (completed < frames) {
		if (tx_nfree && sent < frames) {
			do {
				txq.avail->ring[avail++ & mask] = tx_free[--tx_nfree];
				sent++;
			} while (tx_nfree && sent < frames);
			vq_publish(&txq, avail);
			vq_notify(&txq);
			deadline = rdtsc() + timeout;
		}
		uint16_t used = vq_used_idx(&txq);
		if (used == last) {
			if (rdtsc() >= deadline) {
				kprintf("net-bench: error: TX stalled (%lu of %lu frames done)\n", completed, frames);
				break;
			}
			continue;
		}
		completed += (uint16_t)(used - last);
		do {
			uint32_t id = txq.used->ring[last++ & mask].id;
			if (id >= QSIZE || tx_nfree >= QSIZE) {
				kprintf("net-bench: error: bogus TX used id %u\n", id);
				txq.last_used = last;
				return;
			}
			tx_free[tx_nfree++] = (uint16_t)id;
		} while (last != used);
		deadline = rdtsc() + timeout;
	}
	uint64_t ticks = rdtsc() - start;
	txq.last_used = last;
	kprintf("net-bench: tx %lu ", completed);
	print_seconds(ticks);
	putc_serial('\n');
}

static int is_bench_frame(const uint8_t *f, uint32_t flen)
{
	return flen >= ETH_HDR_SIZE && f[12] == (ETHERTYPE_BENCH >> 8) && f[13] == (ETHERTYPE_BENCH & 0xff);
}

static void bench_rx(void)
{
	const uint16_t mask = QSIZE - 1;
	uint16_t avail = rxq.next_avail, last = rxq.last_used;
	uint64_t frames = 0, bytes = 0, first = 0, last_frame = 0;
	int ended = 0;
	puts_serial("net-bench: ready-rx\n");
	uint64_t deadline = rdtsc() + tsc_hz() / 1000 * RX_TIMEOUT_MS;
	while (!ended) {
		uint16_t used = vq_used_idx(&rxq);
		/* One timestamp per batch of used elements: per frame would cost more
		 * emulated instructions than the rest of the loop. */
		uint64_t now = rdtsc(), before = frames;
		if (now >= deadline)
			break;
		if (used == last)
			continue;
		do {
			const volatile struct vring_used_elem *e = &rxq.used->ring[last++ & mask];
			uint32_t id = e->id, len = e->len;
			if (id >= QSIZE) {
				kprintf("net-bench: error: bogus RX used id %u\n", id);
				rxq.last_used = last;
				vq_publish(&rxq, avail);
				return;
			}
			const uint8_t *f = rx_bufs[id] + NET_HDR_SIZE;
			uint32_t flen = len > NET_HDR_SIZE && len <= RX_BUF_SIZE ? len - NET_HDR_SIZE : 0;
			if (is_bench_frame(f, flen)) {
				if (flen >= ETH_HDR_SIZE + 3 && f[14] == 'E' && f[15] == 'N' && f[16] == 'D') {
					ended = 1;
				} else {
					frames++;
					bytes += flen;
				}
			}
			rxq.avail->ring[avail++ & mask] = (uint16_t)id;
		} while (!ended && last != used);
		if (frames != before) {
			if (!before)
				first = now;
			last_frame = now;
		}
		vq_publish(&rxq, avail);
		vq_notify(&rxq);
	}
	rxq.last_used = last;
	if (!ended)
		puts_serial("net-bench: error: no END frame within 10 s\n");
	kprintf("net-bench: rx %lu %lu ", frames, bytes);
	print_seconds(last_frame - first);
	putc_serial('\n');
}

static size_t format_u64(char *out, uint64_t v)
{
	char digits[20];
	size_t n = 0, len = 0;
	do {
		digits[n++] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	while (n)
		out[len++] = digits[--n];
	return len;
}

/* Waits for a bench frame whose payload is `want` (not followed by another digit),
 * recycling everything else. Returns the TSC at its arrival, or 0 on timeout. */
static uint64_t wait_pong(const char *want, size_t want_len, uint64_t deadline)
{
	uint32_t id, len;
	for (;;) {
		int got = vq_poll(&rxq, &id, &len);
		uint64_t now = rdtsc();
		if (now >= deadline)
			return 0;
		if (!got)
			continue;
		if (id >= QSIZE)
			return 0;
		const uint8_t *f = rx_bufs[id] + NET_HDR_SIZE;
		uint32_t flen = len > NET_HDR_SIZE && len <= RX_BUF_SIZE ? len - NET_HDR_SIZE : 0;
		int match = is_bench_frame(f, flen) && flen >= ETH_HDR_SIZE + want_len &&
			    memcmp(f + ETH_HDR_SIZE, want, want_len) == 0 &&
			    (flen == ETH_HDR_SIZE + want_len || f[ETH_HDR_SIZE + want_len] < '0' ||
			     f[ETH_HDR_SIZE + want_len] > '9');
		vq_push(&rxq, (uint16_t)id);
		vq_notify(&rxq);
		if (match)
			return now;
	}
}

static void bench_rtt(const uint8_t mac[6])
{
	uint64_t count = 0, sum = 0, min = ~0ull, unused = 0;
	unsigned lost = 0;
	puts_serial("net-bench: ready-rtt\n");
	eth_header(ping_frame, mac);
	for (uint64_t i = 0; i < RTT_COUNT && lost < RTT_MAX_LOST; i++) {
		char want[32];
		uint8_t *payload = ping_frame + NET_HDR_SIZE + ETH_HDR_SIZE;
		memset(payload, 0, ETH_MIN_FRAME - ETH_HDR_SIZE);
		memcpy(payload, "PING ", 5);
		size_t n = 5 + format_u64((char *)payload + 5, i);
		memcpy(want, "PONG ", 5);
		format_u64(want + 5, i);
		if (tx_reclaim(&unused) != 0)
			return;
		if (!tx_nfree) {
			puts_serial("net-bench: error: no free TX descriptor\n");
			break;
		}
		uint16_t head = tx_free[--tx_nfree];
		txq.desc[head] = (struct vring_desc){(uint64_t)ping_frame, sizeof(ping_frame), 0, 0};
		uint64_t start = rdtsc();
		vq_push(&txq, head);
		vq_notify(&txq);
		uint64_t at = wait_pong(want, n, start + tsc_hz() / 1000 * RTT_TIMEOUT_MS);
		if (!at) {
			kprintf("net-bench: error: no PONG %lu within 1 s\n", i);
			lost++;
			continue;
		}
		uint64_t us = (at - start) * 1000000 / tsc_hz();
		count++;
		sum += us;
		if (us < min)
			min = us;
	}
	kprintf("net-bench: rtt %lu %lu %lu\n", count, count ? sum / count : 0, count ? min : 0);
}

void net_bench(uint64_t base, const char *cmdline)
{
	uint64_t frames = DEFAULT_FRAMES;
	const char *arg = cmdline_find(cmdline, NULL, "ember_bench_frames=");
	if (arg) {
		uint64_t v;
		const char *end = parse_u64(arg, &v);
		if (end != arg && (*end == 0 || *end == ' '))
			frames = v;
		else
			puts_serial("net-bench: error: bad ember_bench_frames, using 20000\n");
	}

	uint64_t features;
	if (virtio_negotiate(base, "net-bench", 1u << VIRTIO_NET_F_MAC, &features) != 0)
		return;
	if (virtio_setup_queue(base, "net-bench", 0, &rxq, rx_rings, QSIZE) != 0 ||
	    virtio_setup_queue(base, "net-bench", 1, &txq, tx_rings, QSIZE) != 0)
		return;
	virtio_driver_ok(base);

	uint8_t mac[6] = {0x02, 0, 0, 0, 0, 0x01};
	if (features & (1ull << VIRTIO_NET_F_MAC)) {
		for (int i = 0; i < 6; i++)
			mac[i] = mmio_read8(base + VIRTIO_MMIO_CONFIG + (uint64_t)i);
	}
	kprintf("net-bench: mac=%02x:%02x:%02x:%02x:%02x:%02x frames=%lu\n", mac[0], mac[1], mac[2], mac[3], mac[4],
		mac[5], frames);

	/* RX buffers go up first, so nothing the host sends during TX is lost for want
	 * of them (frames other than 0x88b5 ones are recycled in every phase). */
	for (uint16_t i = 0; i < QSIZE; i++) {
		rxq.desc[i] = (struct vring_desc){(uint64_t)rx_bufs[i], RX_BUF_SIZE, VRING_DESC_F_WRITE, 0};
		vq_push(&rxq, i);
	}
	vq_notify(&rxq);
	tx_nfree = 0;
	for (uint16_t i = 0; i < QSIZE; i++)
		tx_free[tx_nfree++] = (uint16_t)(QSIZE - 1 - i);

	eth_header(tx_frame, mac);
	/* The payload only has to be there: a constant fill is one rep stosq. */
	memset(tx_frame + NET_HDR_SIZE + ETH_HDR_SIZE, 0x5a, FRAME_SIZE - ETH_HDR_SIZE);
	bench_tx(frames);
	bench_rx();
	bench_rtt(mac);
}
