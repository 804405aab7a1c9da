/* virtio-rng test: two reads of random bytes that must differ, a buffer outside guest
 * memory that must come back empty, and a read after it (the device still works). */
#include "virtio.h"

#define RNG_BYTES 64
#define REQUEST_TIMEOUT_MS 5000

static struct virtqueue vq;
static uint8_t vq_rings[VQ_RING_BYTES(VQ_SIZE)] NOINIT __attribute__((aligned(4096)));
static uint8_t buf[2][RNG_BYTES] NOINIT;

/* One device-writable buffer; returns the used length, or -1 on timeout. */
static int64_t request(uint64_t addr, uint32_t len)
{
	vq.desc[0] = (struct vring_desc){addr, len, VRING_DESC_F_WRITE, 0};
	vq_push(&vq, 0);
	vq_notify(&vq);
	uint32_t id, used;
	if (vq_wait(&vq, REQUEST_TIMEOUT_MS, &id, &used) != 0) {
		puts_serial("rng: error: request timed out\n");
		return -1;
	}
	return used;
}

void rng_test(uint64_t base)
{
	uint64_t features;
	if (virtio_negotiate(base, "rng", 0, &features) != 0)
		return;
	if (virtio_setup_queue(base, "rng", 0, &vq, vq_rings, VQ_SIZE) != 0)
		return;
	virtio_driver_ok(base);
	memset(buf, 0, sizeof(buf));
	int64_t a = request((uint64_t)buf[0], RNG_BYTES);
	int64_t b = request((uint64_t)buf[1], RNG_BYTES);
	kprintf("rng: len=%ld,%ld differ=%u\n", a, b, memcmp(buf[0], buf[1], RNG_BYTES) != 0);
	/* Far beyond guest RAM, and huge. */
	kprintf("rng: outside len=%ld\n", request(0x7ffffff00000ull, 0xfffff000u));
	memset(buf[0], 0, RNG_BYTES);
	a = request((uint64_t)buf[0], RNG_BYTES);
	kprintf("rng: after len=%ld differ=%u\n", a, memcmp(buf[0], buf[1], RNG_BYTES) != 0);
}
