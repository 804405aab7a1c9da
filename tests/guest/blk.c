/* virtio-blk test: capacity and read-only flag, CRCs of the first and last sectors,
 * device ID, a write/read-back of sector 1 and a flush. */
#include "virtio.h"

#define VIRTIO_BLK_F_RO 5
#define VIRTIO_BLK_T_IN 0
#define VIRTIO_BLK_T_OUT 1
#define VIRTIO_BLK_T_FLUSH 4
#define VIRTIO_BLK_T_GET_ID 8
#define VIRTIO_BLK_ID_BYTES 20
#define SECTOR_SIZE 512
#define REQUEST_TIMEOUT_MS 5000
#define STATUS_NONE 0xff

struct virtio_blk_req_hdr {
	uint32_t type;
	uint32_t reserved;
	uint64_t sector;
};

static struct virtqueue vq;
static uint8_t vq_rings[VQ_RING_BYTES(VQ_SIZE)] NOINIT __attribute__((aligned(4096)));
static struct virtio_blk_req_hdr hdr __attribute__((aligned(16)));
static uint8_t data[SECTOR_SIZE] NOINIT __attribute__((aligned(512)));
static volatile uint8_t status;

/* One request as a chain: header (device reads), data (optional), status (device
 * writes). Returns the status byte, or -1 on timeout / a bogus completion. */
static int request(uint32_t type, uint64_t sector, uint32_t len)
{
	int device_writes = type == VIRTIO_BLK_T_IN || type == VIRTIO_BLK_T_GET_ID;
	hdr.type = type;
	hdr.reserved = 0;
	hdr.sector = sector;
	status = STATUS_NONE;
	uint16_t n = 0;
	vq.desc[n] = (struct vring_desc){(uint64_t)&hdr, sizeof(hdr), VRING_DESC_F_NEXT, (uint16_t)(n + 1)};
	n++;
	if (len) {
		vq.desc[n] = (struct vring_desc){(uint64_t)data, len,
						 (uint16_t)(VRING_DESC_F_NEXT | (device_writes ? VRING_DESC_F_WRITE : 0)),
						 (uint16_t)(n + 1)};
		n++;
	}
	vq.desc[n] = (struct vring_desc){(uint64_t)&status, 1, VRING_DESC_F_WRITE, 0};
	vq_push(&vq, 0);
	vq_notify(&vq);
	uint32_t id, used_len;
	if (vq_wait(&vq, REQUEST_TIMEOUT_MS, &id, &used_len) != 0) {
		kprintf("blk: error: request type %u timed out\n", type);
		return -1;
	}
	if (id != 0) {
		kprintf("blk: error: used id %u, expected 0\n", id);
		return -1;
	}
	return status;
}

static void read_crc(const char *name, uint64_t sector)
{
	memset(data, 0, sizeof(data));
	int st = request(VIRTIO_BLK_T_IN, sector, SECTOR_SIZE);
	if (st != 0) {
		kprintf("blk: %s read status=%d\n", name, st);
		return;
	}
	kprintf("blk: %s crc=0x%08x\n", name, crc32(data, SECTOR_SIZE));
}

static uint8_t pattern(unsigned i)
{
	return (uint8_t)((i * 7 + 3) & 0xff);
}

void blk_test(uint64_t base)
{
	uint64_t features;
	if (virtio_negotiate(base, "blk", 0, &features) != 0)
		return;
	if (virtio_setup_queue(base, "blk", 0, &vq, vq_rings, VQ_SIZE) != 0)
		return;
	virtio_driver_ok(base);

	/* The 64-bit capacity is read as two 32-bit halves: virtio-mmio config accesses
	 * must not be wider than 32 bits. */
	uint64_t capacity = mmio_read32(base + VIRTIO_MMIO_CONFIG) |
			    (uint64_t)mmio_read32(base + VIRTIO_MMIO_CONFIG + 4) << 32;
	kprintf("blk: capacity=%lu ro=%u\n", capacity, (unsigned)((features >> VIRTIO_BLK_F_RO) & 1));
	if (capacity == 0) {
		puts_serial("blk: error: empty disk\n");
		return;
	}

	read_crc("sector0", 0);
	read_crc("last", capacity - 1);

	memset(data, 0, sizeof(data));
	int st = request(VIRTIO_BLK_T_GET_ID, 0, VIRTIO_BLK_ID_BYTES);
	if (st == 0) {
		puts_serial("blk: id=");
		for (int i = 0; i < VIRTIO_BLK_ID_BYTES && data[i]; i++)
			putc_serial(data[i] >= 0x20 && data[i] < 0x7f ? (char)data[i] : '.');
		putc_serial('\n');
	} else {
		kprintf("blk: id status=%d\n", st);
	}

	if (capacity < 2) {
		puts_serial("blk: error: disk too small for the write test\n");
	} else {
		for (unsigned i = 0; i < SECTOR_SIZE; i++)
			data[i] = pattern(i);
		kprintf("blk: write status=%d\n", request(VIRTIO_BLK_T_OUT, 1, SECTOR_SIZE));
		memset(data, 0, sizeof(data));
		st = request(VIRTIO_BLK_T_IN, 1, SECTOR_SIZE);
		int same = st == 0;
		for (unsigned i = 0; i < SECTOR_SIZE && same; i++)
			same = data[i] == pattern(i);
		puts_serial(same ? "blk: readback ok\n" : "blk: readback mismatch\n");
	}
	kprintf("blk: flush status=%d\n", request(VIRTIO_BLK_T_FLUSH, 0, 0));
}
