/* virtio 1.x over virtio-mmio (version 2), polled: just what blk.c and net.c need. */
#ifndef EMBER_TEST_GUEST_VIRTIO_H
#define EMBER_TEST_GUEST_VIRTIO_H

#include "guest.h"

#define VIRTIO_MMIO_MAGIC 0x000
#define VIRTIO_MMIO_VERSION 0x004
#define VIRTIO_MMIO_DEVICE_ID 0x008
#define VIRTIO_MMIO_DEVICE_FEATURES 0x010
#define VIRTIO_MMIO_DEVICE_FEATURES_SEL 0x014
#define VIRTIO_MMIO_DRIVER_FEATURES 0x020
#define VIRTIO_MMIO_DRIVER_FEATURES_SEL 0x024
#define VIRTIO_MMIO_QUEUE_SEL 0x030
#define VIRTIO_MMIO_QUEUE_NUM_MAX 0x034
#define VIRTIO_MMIO_QUEUE_NUM 0x038
#define VIRTIO_MMIO_QUEUE_READY 0x044
#define VIRTIO_MMIO_QUEUE_NOTIFY 0x050
#define VIRTIO_MMIO_INTERRUPT_STATUS 0x060
#define VIRTIO_MMIO_INTERRUPT_ACK 0x064
#define VIRTIO_MMIO_STATUS 0x070
#define VIRTIO_MMIO_QUEUE_DESC_LOW 0x080
#define VIRTIO_MMIO_QUEUE_DESC_HIGH 0x084
#define VIRTIO_MMIO_QUEUE_DRIVER_LOW 0x090
#define VIRTIO_MMIO_QUEUE_DRIVER_HIGH 0x094
#define VIRTIO_MMIO_QUEUE_DEVICE_LOW 0x0a0
#define VIRTIO_MMIO_QUEUE_DEVICE_HIGH 0x0a4
#define VIRTIO_MMIO_CONFIG 0x100

#define VIRTIO_MMIO_MAGIC_VALUE 0x74726976u /* "virt" */

#define VIRTIO_STATUS_ACKNOWLEDGE 1u
#define VIRTIO_STATUS_DRIVER 2u
#define VIRTIO_STATUS_DRIVER_OK 4u
#define VIRTIO_STATUS_FEATURES_OK 8u
#define VIRTIO_STATUS_FAILED 128u

#define VIRTIO_F_VERSION_1 32

#define VRING_DESC_F_NEXT 1
#define VRING_DESC_F_WRITE 2

/* Queue sizes (powers of two, so the free-running 16-bit ring indices wrap cleanly):
 * the device tests keep at most a handful of requests in flight, the benchmarks more. */
#define VQ_SIZE 8

struct vring_desc {
	uint64_t addr;
	uint32_t len;
	uint16_t flags;
	uint16_t next;
};

/* Driver area: flags, idx, ring[num], used_event. */
struct vring_avail {
	uint16_t flags;
	uint16_t idx;
	uint16_t ring[];
};

struct vring_used_elem {
	uint32_t id;
	uint32_t len;
};

/* Device area: flags, idx, ring[num], avail_event. */
struct vring_used {
	uint16_t flags;
	uint16_t idx;
	struct vring_used_elem ring[];
};

/* Bytes of ring memory for a queue of n entries: descriptor table (16 n), driver area
 * (6 + 2 n), device area (6 + 8 n, 4-byte aligned). Declare it 4096-aligned, NOINIT
 * (virtio_setup_queue clears it). */
#define VQ_RING_BYTES(n) ((16u * (n) + 6u + 2u * (n) + 3u) / 4u * 4u + 6u + 8u * (n))

/* One split virtqueue; the rings live in the memory given to virtio_setup_queue. */
struct virtqueue {
	struct vring_desc *desc;
	struct vring_avail *avail;
	struct vring_used *used;
	uint64_t base;
	uint16_t index;
	uint16_t num;
	uint16_t next_avail;
	uint16_t last_used;
};

/* The device's used index, read once; elements below it may be read after this. The
 * benchmarks walk the rings themselves with it: per-element function calls cost too
 * many emulated instructions on the PVM host. */
static inline uint16_t vq_used_idx(const struct virtqueue *vq)
{
	uint16_t idx = *(const volatile uint16_t *)&vq->used->idx;
	barrier();
	return idx;
}

/* Makes avail ring entries up to `next_avail` (already written) visible. */
static inline void vq_publish(struct virtqueue *vq, uint16_t next_avail)
{
	barrier();
	vq->next_avail = next_avail;
	*(volatile uint16_t *)&vq->avail->idx = next_avail;
}

/* Resets the device and negotiates VIRTIO_F_VERSION_1 plus the `wanted` low feature
 * bits the device offers. Returns the device's full feature set in *offered, or -1 after
 * printing "<tag>: error: ..." (the device is then marked FAILED). */
int virtio_negotiate(uint64_t base, const char *tag, uint32_t wanted, uint64_t *offered);
/* Sets up queue `index` with `num` entries (a power of two) on ring memory `rings`
 * (VQ_RING_BYTES(num) bytes, 4096-aligned); -1 after printing an error. */
int virtio_setup_queue(uint64_t base, const char *tag, uint16_t index, struct virtqueue *vq, void *rings,
		       uint16_t num);
void virtio_driver_ok(uint64_t base);
/* Resets the device, so it stops using the rings before they are reused. */
void virtio_reset(uint64_t base);
/* Publishes descriptor chain `head` in the avail ring (no notify). */
void vq_push(struct virtqueue *vq, uint16_t head);
void vq_notify(struct virtqueue *vq);
/* Waits up to `timeout_ms` for a used element; returns 0 and fills *id / *len, or -1. */
int vq_wait(struct virtqueue *vq, uint64_t timeout_ms, uint32_t *id, uint32_t *len);
/* Takes one used element if there is one (returns 1), without waiting and without the
 * interrupt-status MMIO access vq_wait makes: the benchmarks' hot path. */
int vq_poll(struct virtqueue *vq, uint32_t *id, uint32_t *len);

#endif
