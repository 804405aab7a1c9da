/* blkbench: guest-side virtio-blk throughput, timed with the TSC. Sequential reads, then
 * writes, of the first min(capacity, 64 MiB) in 4 KiB and in 1 MiB requests, with up to
 * SLOTS requests in flight, then a flush. See README.md for the lines printed. */
#include "virtio.h"

#define VIRTIO_BLK_T_IN 0
#define VIRTIO_BLK_T_OUT 1
#define VIRTIO_BLK_T_FLUSH 4
#define SECTOR_SHIFT 9
#define BENCH_MAX_BYTES (64ull << 20)
#define SMALL_REQ 4096u
#define BIG_REQ (1u << 20)
/* Requests in flight; each is a 3-descriptor chain (header, data, status) using
 * descriptors 3k..3k+2 and buffer k. */
#define SLOTS 16
#define QSIZE 64 /* >= 3 * SLOTS, a power of two */
#define TIMEOUT_MS 5000
#define STATUS_NONE 0xff

struct virtio_blk_req_hdr {
	uint32_t type;
	uint32_t reserved;
	uint64_t sector;
};

struct run_result {
	uint64_t requests;
	uint64_t ticks;
	uint64_t errors;
	int last_status;
};

static struct virtqueue vq;
static uint8_t vq_rings[VQ_RING_BYTES(QSIZE)] NOINIT __attribute__((aligned(4096)));
static struct virtio_blk_req_hdr hdrs[SLOTS] NOINIT __attribute__((aligned(16)));
static volatile uint8_t statuses[SLOTS] NOINIT;
/* 16 MiB: the device reads into / writes from these; the guest never touches the data
 * (every byte it touched would cost emulated instructions). */
static uint8_t bufs[SLOTS][BIG_REQ] NOINIT __attribute__((aligned(4096)));

/* Sequential requests of `size` bytes (the last one shorter if need be) over
 * [0, bytes). Returns 0, or -1 after printing an error (timeout, bogus used element).
 * The rings are walked inline with local indices: every instruction here is emulated
 * on the PVM host, and the guest's cost per request should stay well below the VMM's. */
static int bench_run(uint32_t type, uint32_t size, uint64_t bytes, struct run_result *r)
{
	uint16_t free_slots[SLOTS];
	unsigned nfree = SLOTS;
	uint32_t busy = 0;
	uint16_t data_flags = (uint16_t)(VRING_DESC_F_NEXT | (type == VIRTIO_BLK_T_IN ? VRING_DESC_F_WRITE : 0));
	for (uint16_t k = 0; k < SLOTS; k++) {
		uint16_t d = (uint16_t)(3 * k);
		free_slots[k] = (uint16_t)(SLOTS - 1 - k);
		hdrs[k].type = type;
		hdrs[k].reserved = 0;
		vq.desc[d] = (struct vring_desc){(uint64_t)&hdrs[k], sizeof(hdrs[k]), VRING_DESC_F_NEXT, (uint16_t)(d + 1)};
		vq.desc[d + 1] = (struct vring_desc){(uint64_t)bufs[k], size, data_flags, (uint16_t)(d + 2)};
		vq.desc[d + 2] = (struct vring_desc){(uint64_t)&statuses[k], 1, VRING_DESC_F_WRITE, 0};
	}
	const uint16_t mask = QSIZE - 1;
	uint16_t avail = vq.next_avail, last = vq.last_used;
	uint64_t requests = 0, done = 0, errors = 0, off = 0;
	int last_status = 0;
	uint64_t timeout = tsc_hz() / 1000 * TIMEOUT_MS;
	uint64_t start = rdtsc();
	while (off < bytes || done < requests) {
		/* Keep every free slot posted, then one notify for the batch. */
		if (nfree && off < bytes) {
			do {
				uint16_t k = free_slots[--nfree];
				hdrs[k].sector = off >> SECTOR_SHIFT;
				if (bytes - off < size)
					vq.desc[3 * k + 1].len = (uint32_t)(bytes - off);
				off += size;
				statuses[k] = STATUS_NONE;
				busy |= 1u << k;
				vq.avail->ring[avail++ & mask] = (uint16_t)(3 * k);
				requests++;
			} while (nfree && off < bytes);
			vq_publish(&vq, avail);
			vq_notify(&vq);
		}
		uint16_t used = vq_used_idx(&vq);
		if (used == last) {
			uint64_t deadline = rdtsc() + timeout;
			while ((used = vq_used_idx(&vq)) == last) {
				if (rdtsc() >= deadline) {
					kprintf("blk-bench: error: request timed out (%lu of %lu done)\n", done, requests);
					vq.last_used = last;
					return -1;
				}
			}
		}
		done += (uint16_t)(used - last);
		do {
			uint32_t id = vq.used->ring[last++ & mask].id;
			uint32_t k = id / 3;
			if (id % 3 != 0 || k >= SLOTS || !(busy & (1u << k))) {
				kprintf("blk-bench: error: bogus used id %u\n", id);
				vq.last_used = last;
				return -1;
			}
			busy &= ~(1u << k);
			uint8_t st = statuses[k];
			if (st != 0) {
				errors++;
				last_status = st;
			}
			free_slots[nfree++] = (uint16_t)k;
		} while (last != used);
	}
	r->ticks = rdtsc() - start;
	vq.last_used = last;
	r->requests = requests;
	r->errors = errors;
	r->last_status = last_status;
	return 0;
}

static int bench(const char *name, uint32_t type, uint32_t size, uint64_t bytes)
{
	struct run_result r;
	if (bench_run(type, size, bytes, &r) != 0)
		return -1;
	uint64_t ticks = r.ticks ? r.ticks : 1;
	/* MiB/s in tenths, in integers: (bytes / 1 KiB) * 10 * hz stays below 2^60. */
	uint64_t tenths = (bytes >> 10) * 10 * tsc_hz() / ticks >> 10;
	kprintf("blk-bench: %s %u %lu.%lu %lu\n", name, size, tenths / 10, tenths % 10, r.requests);
	if (r.errors)
		kprintf("blk-bench: error: %s %u: %lu requests failed, last status %d\n", name, size, r.errors,
			r.last_status);
	return 0;
}

static int flush(void)
{
	hdrs[0] = (struct virtio_blk_req_hdr){VIRTIO_BLK_T_FLUSH, 0, 0};
	statuses[0] = STATUS_NONE;
	vq.desc[0] = (struct vring_desc){(uint64_t)&hdrs[0], sizeof(hdrs[0]), VRING_DESC_F_NEXT, 2};
	vq.desc[2] = (struct vring_desc){(uint64_t)&statuses[0], 1, VRING_DESC_F_WRITE, 0};
	vq_push(&vq, 0);
	vq_notify(&vq);
	uint32_t id, len;
	if (vq_wait(&vq, TIMEOUT_MS, &id, &len) != 0 || id != 0)
		return -1;
	return statuses[0];
}

void blk_bench(uint64_t base, const char *cmdline)
{
	(void)cmdline;
	uint64_t features;
	if (virtio_negotiate(base, "blk-bench", 0, &features) != 0)
		return;
	if (virtio_setup_queue(base, "blk-bench", 0, &vq, vq_rings, QSIZE) != 0)
		return;
	virtio_driver_ok(base);

	uint64_t capacity = mmio_read32(base + VIRTIO_MMIO_CONFIG) |
			    (uint64_t)mmio_read32(base + VIRTIO_MMIO_CONFIG + 4) << 32;
	uint64_t bytes = capacity < (BENCH_MAX_BYTES >> SECTOR_SHIFT) ? capacity << SECTOR_SHIFT : BENCH_MAX_BYTES;
	bytes &= ~(uint64_t)(SMALL_REQ - 1);
	kprintf("blk-bench: capacity=%lu bytes=%lu\n", capacity, bytes);
	if (bytes == 0) {
		puts_serial("blk-bench: error: disk smaller than 4096 bytes\n");
		return;
	}
	if (bench("read", VIRTIO_BLK_T_IN, SMALL_REQ, bytes) != 0 || bench("read", VIRTIO_BLK_T_IN, BIG_REQ, bytes) != 0 ||
	    bench("write", VIRTIO_BLK_T_OUT, SMALL_REQ, bytes) != 0 ||
	    bench("write", VIRTIO_BLK_T_OUT, BIG_REQ, bytes) != 0)
		return;
	kprintf("blk-bench: flush status=%d\n", flush());
}
