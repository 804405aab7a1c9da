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

/* Small rings: every test keeps at most a handful of requests in flight. */
#define VQ_SIZE 8

struct vring_desc {
	uint64_t addr;
	uint32_t len;
	uint16_t flags;
	uint16_t next;
};

struct vring_avail {
	uint16_t flags;
	uint16_t idx;
	uint16_t ring[VQ_SIZE];
	uint16_t used_event;
};

struct vring_used_elem {
	uint32_t id;
	uint32_t len;
};

struct vring_used {
	uint16_t flags;
	uint16_t idx;
	struct vring_used_elem ring[VQ_SIZE];
	uint16_t avail_event;
};

/* One split virtqueue; the rings live in the guest image's .bss. */
struct virtqueue {
	struct vring_desc desc[VQ_SIZE] __attribute__((aligned(16)));
	struct vring_avail avail __attribute__((aligned(2)));
	struct vring_used used __attribute__((aligned(4)));
	uint64_t base;
	uint16_t index;
	uint16_t next_avail;
	uint16_t last_used;
};

/* Resets the device and negotiates VIRTIO_F_VERSION_1 plus the `wanted` low feature
 * bits the device offers. Returns the device's full feature set in *offered, or -1 after
 * printing "<tag>: error: ..." (the device is then marked FAILED). */
int virtio_negotiate(uint64_t base, const char *tag, uint32_t wanted, uint64_t *offered);
/* Sets up queue `index` on rings `vq`; -1 after printing an error. */
int virtio_setup_queue(uint64_t base, const char *tag, uint16_t index, struct virtqueue *vq);
void virtio_driver_ok(uint64_t base);
/* Resets the device, so it stops using the rings before they are reused. */
void virtio_reset(uint64_t base);
/* Publishes descriptor chain `head` in the avail ring (no notify). */
void vq_push(struct virtqueue *vq, uint16_t head);
void vq_notify(struct virtqueue *vq);
/* Waits up to `timeout_ms` for a used element; returns 0 and fills *id / *len, or -1. */
int vq_wait(struct virtqueue *vq, uint64_t timeout_ms, uint32_t *id, uint32_t *len);

#endif
