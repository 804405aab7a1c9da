/* Common virtio-mmio code: probing the devices named on the command line, feature
 * negotiation, queue setup and a polled split ring. */
#include "virtio.h"

static uint32_t rd(uint64_t base, uint32_t off)
{
	return mmio_read32(base + off);
}

static void wr(uint64_t base, uint32_t off, uint32_t v)
{
	mmio_write32(base + off, v);
}

void virtio_reset(uint64_t base)
{
	wr(base, VIRTIO_MMIO_STATUS, 0);
	/* The spec wants the driver to wait until the reset is visible. */
	for (int i = 0; i < 1000 && rd(base, VIRTIO_MMIO_STATUS) != 0; i++)
		delay_ms(1);
}

static int fail(uint64_t base, const char *tag, const char *what)
{
	kprintf("%s: error: %s\n", tag, what);
	wr(base, VIRTIO_MMIO_STATUS, rd(base, VIRTIO_MMIO_STATUS) | VIRTIO_STATUS_FAILED);
	return -1;
}

int virtio_negotiate(uint64_t base, const char *tag, uint32_t wanted, uint64_t *offered)
{
	virtio_reset(base);
	uint32_t status = VIRTIO_STATUS_ACKNOWLEDGE;
	wr(base, VIRTIO_MMIO_STATUS, status);
	status |= VIRTIO_STATUS_DRIVER;
	wr(base, VIRTIO_MMIO_STATUS, status);

	wr(base, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
	uint64_t features = rd(base, VIRTIO_MMIO_DEVICE_FEATURES);
	wr(base, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
	features |= (uint64_t)rd(base, VIRTIO_MMIO_DEVICE_FEATURES) << 32;
	*offered = features;
	if (!(features & (1ull << VIRTIO_F_VERSION_1)))
		return fail(base, tag, "device does not offer VIRTIO_F_VERSION_1");

	wr(base, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
	wr(base, VIRTIO_MMIO_DRIVER_FEATURES, (uint32_t)features & wanted);
	wr(base, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
	wr(base, VIRTIO_MMIO_DRIVER_FEATURES, 1u << (VIRTIO_F_VERSION_1 - 32));
	status |= VIRTIO_STATUS_FEATURES_OK;
	wr(base, VIRTIO_MMIO_STATUS, status);
	if (!(rd(base, VIRTIO_MMIO_STATUS) & VIRTIO_STATUS_FEATURES_OK))
		return fail(base, tag, "device rejected FEATURES_OK");
	return 0;
}

int virtio_setup_queue(uint64_t base, const char *tag, uint16_t index, struct virtqueue *vq, void *rings,
		       uint16_t num)
{
	uint8_t *mem = rings;
	memset(mem, 0, VQ_RING_BYTES(num));
	vq->desc = (struct vring_desc *)mem;
	vq->avail = (struct vring_avail *)(mem + 16u * num);
	vq->used = (struct vring_used *)(mem + (16u * num + 6u + 2u * num + 3u) / 4u * 4u);
	vq->base = base;
	vq->index = index;
	vq->num = num;
	vq->next_avail = 0;
	vq->last_used = 0;
	wr(base, VIRTIO_MMIO_QUEUE_SEL, index);
	if (rd(base, VIRTIO_MMIO_QUEUE_READY) != 0)
		return fail(base, tag, "queue already ready after reset");
	uint32_t max = rd(base, VIRTIO_MMIO_QUEUE_NUM_MAX);
	if (max < num) {
		kprintf("%s: error: queue %u size max %u < %u\n", tag, index, max, num);
		return fail(base, tag, "queue too small");
	}
	wr(base, VIRTIO_MMIO_QUEUE_NUM, num);
	uint64_t desc = (uint64_t)vq->desc, avail = (uint64_t)vq->avail, used = (uint64_t)vq->used;
	wr(base, VIRTIO_MMIO_QUEUE_DESC_LOW, (uint32_t)desc);
	wr(base, VIRTIO_MMIO_QUEUE_DESC_HIGH, (uint32_t)(desc >> 32));
	wr(base, VIRTIO_MMIO_QUEUE_DRIVER_LOW, (uint32_t)avail);
	wr(base, VIRTIO_MMIO_QUEUE_DRIVER_HIGH, (uint32_t)(avail >> 32));
	wr(base, VIRTIO_MMIO_QUEUE_DEVICE_LOW, (uint32_t)used);
	wr(base, VIRTIO_MMIO_QUEUE_DEVICE_HIGH, (uint32_t)(used >> 32));
	wr(base, VIRTIO_MMIO_QUEUE_READY, 1);
	return 0;
}

void virtio_driver_ok(uint64_t base)
{
	wr(base, VIRTIO_MMIO_STATUS, rd(base, VIRTIO_MMIO_STATUS) | VIRTIO_STATUS_DRIVER_OK);
}

void vq_push(struct virtqueue *vq, uint16_t head)
{
	vq->avail->ring[vq->next_avail & (vq->num - 1)] = head;
	/* The ring entry must be visible before the index that publishes it. */
	barrier();
	vq->next_avail++;
	*(volatile uint16_t *)&vq->avail->idx = vq->next_avail;
}

void vq_notify(struct virtqueue *vq)
{
	mb();
	wr(vq->base, VIRTIO_MMIO_QUEUE_NOTIFY, vq->index);
}

int vq_poll(struct virtqueue *vq, uint32_t *id, uint32_t *len)
{
	uint16_t used_idx = *(volatile uint16_t *)&vq->used->idx;
	if (used_idx == vq->last_used)
		return 0;
	/* Read the element only after seeing the index that published it. */
	barrier();
	const volatile struct vring_used_elem *e = &vq->used->ring[vq->last_used & (vq->num - 1)];
	*id = e->id;
	*len = e->len;
	vq->last_used++;
	return 1;
}

int vq_wait(struct virtqueue *vq, uint64_t timeout_ms, uint32_t *id, uint32_t *len)
{
	uint64_t end = rdtsc() + tsc_hz() / 1000 * timeout_ms;
	for (;;) {
		if (vq_poll(vq, id, len)) {
			/* Interrupts are off; acknowledge anyway so a level-triggered line drops. */
			uint32_t isr = rd(vq->base, VIRTIO_MMIO_INTERRUPT_STATUS);
			if (isr)
				wr(vq->base, VIRTIO_MMIO_INTERRUPT_ACK, isr);
			return 0;
		}
		if (rdtsc() >= end)
			return -1;
	}
}

/* Parses `virtio_mmio.device=<size>[KMG]@<base>:<irq>[:<id>]` (Linux's format). */
static const char *parse_device(const char *p, uint64_t *base)
{
	uint64_t size;
	p = parse_u64(p, &size);
	if (*p == 'K' || *p == 'k' || *p == 'M' || *p == 'm' || *p == 'G' || *p == 'g')
		p++;
	if (*p != '@')
		return NULL;
	p = parse_u64(p + 1, base);
	return *p == ':' ? p : NULL;
}

void virtio_for_each(const char *cmdline, uint32_t device_id, const char *tag,
		     void (*run)(uint64_t base, const char *cmdline))
{
	int found = 0;
	const char *p = NULL;
	while ((p = cmdline_find(cmdline, p, "virtio_mmio.device=")) != NULL) {
		uint64_t base;
		if (!parse_device(p, &base) || base < (1ull << 20) || base >= (1ull << 32) - 0x1000) {
			kprintf("virtio: error: cannot parse virtio_mmio.device=%s\n", p);
			continue;
		}
		uint32_t magic = mmio_read32(base + VIRTIO_MMIO_MAGIC);
		uint32_t version = mmio_read32(base + VIRTIO_MMIO_VERSION);
		uint32_t id = mmio_read32(base + VIRTIO_MMIO_DEVICE_ID);
		if (magic != VIRTIO_MMIO_MAGIC_VALUE) {
			kprintf("virtio: error: 0x%lx bad magic 0x%x\n", base, magic);
			continue;
		}
		if (id != device_id)
			continue;
		if (version != 2) {
			kprintf("%s: error: 0x%lx virtio-mmio version %u, need 2\n", tag, base, version);
			continue;
		}
		found = 1;
		kprintf("%s: device 0x%lx\n", tag, base);
		run(base, cmdline);
		virtio_reset(base);
	}
	if (!found)
		kprintf("%s: no device\n", tag);
}

int virtio_find(const char *cmdline, uint32_t device_id, uint64_t *bases, int max)
{
	int n = 0;
	const char *p = NULL;
	while (n < max && (p = cmdline_find(cmdline, p, "virtio_mmio.device=")) != NULL) {
		uint64_t base;
		if (!parse_device(p, &base) || base < (1ull << 20) || base >= (1ull << 32) - 0x1000)
			continue;
		if (mmio_read32(base + VIRTIO_MMIO_MAGIC) == VIRTIO_MMIO_MAGIC_VALUE &&
		    mmio_read32(base + VIRTIO_MMIO_VERSION) == 2 &&
		    mmio_read32(base + VIRTIO_MMIO_DEVICE_ID) == device_id)
			bases[n++] = base;
	}
	return n;
}

static void run_blk_test(uint64_t base, const char *cmdline)
{
	(void)cmdline;
	blk_test(base);
}

static void run_net_test(uint64_t base, const char *cmdline)
{
	(void)cmdline;
	net_test(base);
}

static void run_rng_test(uint64_t base, const char *cmdline)
{
	(void)cmdline;
	rng_test(base);
}

static void run_balloon_test(uint64_t base, const char *cmdline)
{
	(void)cmdline;
	balloon_test(base);
}

void virtio_test_all(const char *cmdline, uint32_t device_id)
{
	if (device_id == 2)
		virtio_for_each(cmdline, device_id, "blk", run_blk_test);
	else if (device_id == 4)
		virtio_for_each(cmdline, device_id, "rng", run_rng_test);
	else if (device_id == 5)
		virtio_for_each(cmdline, device_id, "balloon", run_balloon_test);
	else
		virtio_for_each(cmdline, device_id, "net", run_net_test);
}
