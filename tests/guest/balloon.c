/* virtio-balloon test. The guest fills a pool of RAM, then follows the target the host
 * sets (config space num_pages): inflating hands pool pages over, deflating takes them
 * back and counts those that read as zero (the host really released them). It answers
 * statistics requests, and when the balloon is back to empty after having held pages it
 * sends requests that lie (pages outside RAM, repeated pages, a huge count) and ends.
 *
 * Lines: "balloon: ready", "balloon: actual=<pages>", "balloon: deflated=<n> zeroed=<n>",
 * "balloon: stats=<n>", "balloon: hostile sent", "balloon: end". */
#include "virtio.h"

#define F_STATS_VQ 1
#define F_DEFLATE_ON_OOM 2
#define POOL_START (32ull << 20)
#define POOL_PAGES 4096u /* 16 MiB: filling it is emulated, and slow, on PVM hosts */
#define PFNS_PER_REQ 256u
#define FILL 0x5a5a5a5a5a5a5a5aull
#define REQUEST_TIMEOUT_MS 5000
#define RUN_TIMEOUT_MS 180000

struct stat_entry {
	uint16_t tag;
	uint64_t val;
} __attribute__((packed));

static struct virtqueue inflate_q, deflate_q, stats_q;
/* Separate arrays: each queue's rings must start 4096-aligned. */
static uint8_t inflate_rings[VQ_RING_BYTES(VQ_SIZE)] NOINIT __attribute__((aligned(4096)));
static uint8_t deflate_rings[VQ_RING_BYTES(VQ_SIZE)] NOINIT __attribute__((aligned(4096)));
static uint8_t stats_rings[VQ_RING_BYTES(VQ_SIZE)] NOINIT __attribute__((aligned(4096)));
static uint32_t pfns[PFNS_PER_REQ] NOINIT;
static struct stat_entry stats[3] NOINIT;

static void fill64(uint64_t *dst, uint64_t value, size_t words)
{
	__asm__ volatile("rep stosq" : "+D"(dst), "+c"(words) : "a"(value) : "memory");
}

/* Sends `n` page numbers (or `len` bytes of them) on `vq`; 0 when the device used it. */
static int send_pfns(struct virtqueue *vq, uint32_t len)
{
	vq->desc[0] = (struct vring_desc){(uint64_t)pfns, len, 0, 0};
	vq_push(vq, 0);
	vq_notify(vq);
	uint32_t id, used;
	if (vq_wait(vq, REQUEST_TIMEOUT_MS, &id, &used) != 0) {
		puts_serial("balloon: error: request timed out\n");
		return -1;
	}
	return 0;
}

static void send_stats(uint64_t n)
{
	stats[0] = (struct stat_entry){5, 128ull << 20};	/* total_memory */
	stats[1] = (struct stat_entry){4, 64ull << 20};	/* free_memory */
	stats[2] = (struct stat_entry){2, n};			/* major_faults: a counter */
	stats_q.desc[0] = (struct vring_desc){(uint64_t)stats, sizeof(stats), 0, 0};
	vq_push(&stats_q, 0);
	vq_notify(&stats_q);
}

void balloon_test(uint64_t base)
{
	uint64_t features;
	if (virtio_negotiate(base, "balloon", (1u << F_STATS_VQ) | (1u << F_DEFLATE_ON_OOM), &features) != 0)
		return;
	int has_stats = (features >> F_STATS_VQ) & 1;
	if (virtio_setup_queue(base, "balloon", 0, &inflate_q, inflate_rings, VQ_SIZE) != 0 ||
	    virtio_setup_queue(base, "balloon", 1, &deflate_q, deflate_rings, VQ_SIZE) != 0 ||
	    (has_stats && virtio_setup_queue(base, "balloon", 2, &stats_q, stats_rings, VQ_SIZE) != 0))
		return;
	virtio_driver_ok(base);
	fill64((uint64_t *)POOL_START, FILL, POOL_PAGES * 512ull);
	uint64_t nstats = 0;
	if (has_stats)
		send_stats(nstats);
	kprintf("balloon: ready stats=%u\n", has_stats);

	uint32_t actual = 0, held_max = 0;
	uint64_t end = rdtsc() + tsc_hz() / 1000 * RUN_TIMEOUT_MS;
	while (rdtsc() < end) {
		uint32_t id, len;
		if (has_stats && vq_poll(&stats_q, &id, &len)) {
			send_stats(++nstats);
			kprintf("balloon: stats=%lu\n", nstats);
		}
		uint32_t target = mmio_read32(base + VIRTIO_MMIO_CONFIG);
		if (target > POOL_PAGES)
			target = POOL_PAGES;
		if (target == actual) {
			if (actual == 0 && held_max > 0)
				break;
			delay_ms(10);
			continue;
		}
		if (target > actual) {
			uint32_t n = target - actual < PFNS_PER_REQ ? target - actual : PFNS_PER_REQ;
			for (uint32_t i = 0; i < n; i++)
				pfns[i] = (uint32_t)(POOL_START >> 12) + actual + i;
			if (send_pfns(&inflate_q, n * 4) != 0)
				return;
			actual += n;
			if (actual > held_max)
				held_max = actual;
		} else {
			uint32_t n = actual - target < PFNS_PER_REQ ? actual - target : PFNS_PER_REQ;
			for (uint32_t i = 0; i < n; i++)
				pfns[i] = (uint32_t)(POOL_START >> 12) + actual - 1 - i;
			if (send_pfns(&deflate_q, n * 4) != 0)
				return;
			actual -= n;
		}
		mmio_write32(base + VIRTIO_MMIO_CONFIG + 4, actual);
		if (actual == target) {
			kprintf("balloon: actual=%u\n", actual);
			if (actual == 0) {
				/* Every page given and taken back must read as zero now. */
				uint32_t zeroed = 0;
				for (uint32_t p = 0; p < held_max; p++)
					zeroed += *(volatile uint64_t *)(POOL_START + (uint64_t)p * 4096) == 0;
				kprintf("balloon: deflated=%u zeroed=%u\n", held_max, zeroed);
			}
		}
	}

	/* Lies: pages beyond RAM, a page of the MMIO gap, one page 256 times, and a
	 * descriptor claiming 4 GiB of page numbers. None may touch anything but the guest. */
	pfns[0] = 0xffffffffu;
	pfns[1] = 0x7fffffffu;
	pfns[2] = 0xd0001u;
	for (uint32_t i = 3; i < PFNS_PER_REQ; i++)
		pfns[i] = (uint32_t)(POOL_START >> 12);
	send_pfns(&inflate_q, PFNS_PER_REQ * 4);
	send_pfns(&inflate_q, 0xfffffffcu);
	send_pfns(&deflate_q, 0xfffffffcu);
	/* The guest's own code and data still work: the image was never released. */
	*(volatile uint64_t *)POOL_START = FILL;
	kprintf("balloon: hostile sent pool=%s\n", *(volatile uint64_t *)POOL_START == FILL ? "ok" : "bad");
	puts_serial("balloon: end\n");
}
