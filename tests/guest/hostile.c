/* Hostile driver: attacks the first virtio-blk device (the victim) the way a malicious
 * or broken guest could, then checks that the second blk device (the bystander) still
 * serves a read, and that the victim serves one again after a reset. Optional net
 * attacks hit the first virtio-net device's TX queue. See README.md for the lines. */
#include "virtio.h"

#define VIRTIO_BLK_T_IN 0
#define SECTOR_SIZE 512
#define STATUS_NONE 0xff
#define STATUS_NEEDS_RESET 0x40u
#define SETTLE_MS 300
#define REQUEST_TIMEOUT_MS 2000
#define STORM_NOTIFIES 10000
#define STORM_BAD_NOTIFIES 1000
#define RESET_ROUNDS 50
#define INDIRECT_DESCS 64

struct blk_hdr {
	uint32_t type;
	uint32_t reserved;
	uint64_t sector;
};

static struct virtqueue vq, vq2;
static uint8_t rings[VQ_RING_BYTES(VQ_SIZE)] NOINIT __attribute__((aligned(4096)));
static uint8_t rings2[VQ_RING_BYTES(VQ_SIZE)] NOINIT __attribute__((aligned(4096)));
static struct vring_desc indirect[INDIRECT_DESCS] NOINIT __attribute__((aligned(16)));
static struct blk_hdr hdr __attribute__((aligned(16)));
static uint8_t data[SECTOR_SIZE * 2] NOINIT __attribute__((aligned(512)));
static volatile uint8_t status;
static uint64_t victim, bystander, netdev;

static uint32_t rd(uint64_t base, uint32_t off)
{
	return mmio_read32(base + off);
}

static void wr(uint64_t base, uint32_t off, uint32_t v)
{
	mmio_write32(base + off, v);
}

/* Victim (or any blk device) up with one VQ_SIZE queue; 0 on success. */
static int blk_up(uint64_t base)
{
	uint64_t features;
	if (virtio_negotiate(base, "hostile", 0, &features) != 0 ||
	    virtio_setup_queue(base, "hostile", 0, &vq, rings, VQ_SIZE) != 0)
		return -1;
	virtio_driver_ok(base);
	return 0;
}

static void desc(uint16_t i, uint64_t addr, uint32_t len, uint16_t flags, uint16_t next)
{
	vq.desc[i] = (struct vring_desc){addr, len, flags, next};
}

/* A well-formed read of sector 0 at descriptors 0..2, published but not notified. */
static void post_read(void)
{
	hdr = (struct blk_hdr){VIRTIO_BLK_T_IN, 0, 0};
	status = STATUS_NONE;
	desc(0, (uint64_t)&hdr, sizeof(hdr), VRING_DESC_F_NEXT, 1);
	desc(1, (uint64_t)data, SECTOR_SIZE, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 2);
	desc(2, (uint64_t)&status, 1, VRING_DESC_F_WRITE, 0);
	vq_push(&vq, 0);
}

/* Publishes head 0 with the data descriptor at `addr`/`len`, notifies, and waits:
 * returns the status byte, -1 on timeout. */
static int read_into(uint64_t addr, uint32_t len)
{
	post_read();
	desc(1, addr, len, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 2);
	vq_notify(&vq);
	uint32_t id, used_len;
	if (vq_wait(&vq, REQUEST_TIMEOUT_MS, &id, &used_len) != 0)
		return -1;
	return status;
}

/* A clean read of sector 0 on `base` after a reset: the request status, -1 on timeout,
 * -2 if the device would not start. */
static int probe(uint64_t base)
{
	if (blk_up(base) != 0)
		return -2;
	int st = read_into((uint64_t)data, SECTOR_SIZE);
	virtio_reset(base);
	return st;
}

/* Waits a little for used elements; prints how many arrived and the last length. */
static void report_used(const char *name)
{
	uint32_t id = 0, len = 0, last_len = 0;
	int n = 0;
	uint64_t end = rdtsc() + tsc_hz() / 1000 * SETTLE_MS;
	while (rdtsc() < end) {
		if (vq_poll(&vq, &id, &len)) {
			n++;
			last_len = len;
		}
	}
	kprintf("hostile: %s used=%d len=%u req=%u\n", name, n, n ? last_len : 0, (unsigned)status);
}

/* The verdict line: the victim's Status after the attack, then a read on the bystander
 * and on the victim after a reset. */
static void verdict(const char *name, uint64_t attacked)
{
	uint32_t st = rd(attacked, VIRTIO_MMIO_STATUS);
	virtio_reset(attacked);
	int other = probe(bystander);
	int self = probe(victim);
	kprintf("hostile: %s status=0x%x other=%d self=%d\n", name, st, other, self);
}

static void attack_loop(void)
{
	if (blk_up(victim) != 0)
		return;
	post_read();
	/* data -> header -> data ...: the chain never ends. */
	desc(1, (uint64_t)data, SECTOR_SIZE, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 0);
	vq_notify(&vq);
	report_used("loop");
}

static void attack_long(void)
{
	if (blk_up(victim) != 0)
		return;
	/* Every descriptor of the table, the last pointing past its end. */
	hdr = (struct blk_hdr){VIRTIO_BLK_T_IN, 0, 0};
	status = STATUS_NONE;
	desc(0, (uint64_t)&hdr, sizeof(hdr), VRING_DESC_F_NEXT, 1);
	for (uint16_t i = 1; i < VQ_SIZE; i++)
		desc(i, (uint64_t)data, SECTOR_SIZE, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, (uint16_t)(i + 1));
	vq_push(&vq, 0);
	vq_notify(&vq);
	report_used("long");

	/* An indirect table of 64 descriptors: a chain eight times the queue size. */
	indirect[0] = (struct vring_desc){(uint64_t)&hdr, sizeof(hdr), VRING_DESC_F_NEXT, 1};
	for (uint16_t i = 1; i < INDIRECT_DESCS - 1; i++)
		indirect[i] = (struct vring_desc){(uint64_t)data, 8, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE,
						  (uint16_t)(i + 1)};
	indirect[INDIRECT_DESCS - 1] = (struct vring_desc){(uint64_t)&status, 1, VRING_DESC_F_WRITE, 0};
	status = STATUS_NONE;
	desc(3, (uint64_t)indirect, sizeof(indirect), 4 /* VRING_DESC_F_INDIRECT */, 0);
	vq_push(&vq, 3);
	vq_notify(&vq);
	report_used("long-indirect");
}

static void attack_outside(void)
{
	if (blk_up(victim) != 0)
		return;
	/* Header far outside guest memory, status fine. */
	status = STATUS_NONE;
	desc(0, 0xfffffffff000ull, sizeof(hdr), VRING_DESC_F_NEXT, 2);
	desc(2, (uint64_t)&status, 1, VRING_DESC_F_WRITE, 0);
	vq_push(&vq, 0);
	vq_notify(&vq);
	report_used("outside-header");
	/* Data just past the end of low RAM. */
	kprintf("hostile: outside-data req=%d\n", read_into(low_ram_end, SECTOR_SIZE));
}

static void attack_gap(void)
{
	if (blk_up(victim) != 0)
		return;
	/* Half in RAM, half in what follows it (the MMIO gap when RAM reaches it). */
	kprintf("hostile: gap at=0x%lx req=%d\n", low_ram_end - SECTOR_SIZE / 2,
		read_into(low_ram_end - SECTOR_SIZE / 2, SECTOR_SIZE));
}

static void attack_overflow(void)
{
	if (blk_up(victim) != 0)
		return;
	/* addr + len wraps around 2^64. */
	kprintf("hostile: overflow wrap req=%d\n", read_into(0xfffffffffffffe00ull, 0x400));
	/* The largest length a descriptor can hold. */
	kprintf("hostile: overflow max req=%d\n", read_into((uint64_t)data, 0xffffffffu));
	/* Two descriptors whose lengths add up past 2^32. */
	post_read();
	desc(1, (uint64_t)data, 0x80000000u, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 3);
	desc(3, (uint64_t)data, 0x80000000u, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 2);
	vq_notify(&vq);
	uint32_t id, len;
	int st = vq_wait(&vq, REQUEST_TIMEOUT_MS, &id, &len) == 0 ? status : -1;
	kprintf("hostile: overflow sum req=%d\n", st);
}

static void attack_availjump(void)
{
	if (blk_up(victim) != 0)
		return;
	post_read();
	/* Claim 1000 more entries than the 8-entry ring holds. */
	*(volatile uint16_t *)&vq.avail->idx = (uint16_t)(vq.next_avail + 1000);
	vq_notify(&vq);
	report_used("availjump");
}

static void attack_qsize(void)
{
	uint64_t features;
	if (virtio_negotiate(victim, "hostile", 0, &features) != 0)
		return;
	static const uint32_t sizes[] = {6, 0, 1024, 3};
	wr(victim, VIRTIO_MMIO_QUEUE_SEL, 0);
	for (unsigned i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++) {
		wr(victim, VIRTIO_MMIO_QUEUE_NUM, sizes[i]);
		uint64_t r = (uint64_t)rings;
		wr(victim, VIRTIO_MMIO_QUEUE_DESC_LOW, (uint32_t)r);
		wr(victim, VIRTIO_MMIO_QUEUE_DRIVER_LOW, (uint32_t)(r + 0x100));
		wr(victim, VIRTIO_MMIO_QUEUE_DEVICE_LOW, (uint32_t)(r + 0x200));
		wr(victim, VIRTIO_MMIO_QUEUE_READY, 1);
		kprintf("hostile: qsize %u ready=%u\n", sizes[i], rd(victim, VIRTIO_MMIO_QUEUE_READY));
	}
	/* DRIVER_OK with no usable queue: the device must refuse and ask for a reset. */
	virtio_driver_ok(victim);
}

static void attack_storm(void)
{
	if (blk_up(victim) != 0)
		return;
	post_read();
	for (int i = 0; i < STORM_NOTIFIES; i++)
		wr(victim, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
	for (int i = 0; i < STORM_BAD_NOTIFIES; i++)
		wr(victim, VIRTIO_MMIO_QUEUE_NOTIFY, 5);
	report_used("storm");
}

static void attack_mmio(void)
{
	if (blk_up(victim) != 0)
		return;
	/* Every offset of the window, every size, reads then writes. */
	uint64_t sum = 0;
	for (uint32_t off = 0; off < 0x1000; off++) {
		uint64_t a = victim + off;
		uint8_t b;
		uint16_t h;
		uint32_t w;
		uint64_t q;
		__asm__ volatile("movb (%1), %0" : "=q"(b) : "r"(a) : "memory");
		__asm__ volatile("movw (%1), %0" : "=r"(h) : "r"(a) : "memory");
		__asm__ volatile("movl (%1), %0" : "=r"(w) : "r"(a) : "memory");
		__asm__ volatile("movq (%1), %0" : "=r"(q) : "r"(a) : "memory");
		sum += b + h + w + q;
	}
	for (uint32_t off = 0; off < 0x1000; off++) {
		uint64_t a = victim + off;
		__asm__ volatile("movb %0, (%1)" : : "q"((uint8_t)0xa5), "r"(a) : "memory");
		__asm__ volatile("movw %0, (%1)" : : "r"((uint16_t)0xa5a5), "r"(a) : "memory");
		__asm__ volatile("movl %0, (%1)" : : "r"(0xa5a5a5a5u), "r"(a) : "memory");
		__asm__ volatile("movq %0, (%1)" : : "r"(0xa5a5a5a5a5a5a5a5ull), "r"(a) : "memory");
	}
	kprintf("hostile: mmio accesses=%u\n", 0x1000u * 8);
	(void)sum;
}

static void attack_config(void)
{
	/* The blk config space is 24 bytes: everything after it must read as 0. */
	unsigned nonzero = 0;
	for (uint32_t off = VIRTIO_MMIO_CONFIG + 24; off < 0x1000; off += 4)
		nonzero += rd(victim, off) != 0;
	for (uint32_t off = VIRTIO_MMIO_CONFIG + 24; off < VIRTIO_MMIO_CONFIG + 0x100; off++)
		nonzero += mmio_read8(victim + off) != 0;
	kprintf("hostile: config nonzero=%u\n", nonzero);
}

static void attack_reset(void)
{
	/* Reset while a request is published and notified, many times over. */
	for (int i = 0; i < RESET_ROUNDS; i++) {
		if (blk_up(victim) != 0)
			return;
		post_read();
		vq_notify(&vq);
		wr(victim, VIRTIO_MMIO_STATUS, 0);
	}
	kprintf("hostile: reset rounds=%d\n", RESET_ROUNDS);
}

/* Net: TX chains that loop, then a TX avail index that jumps. */
static void attack_net(void)
{
	uint64_t features;
	if (virtio_negotiate(netdev, "hostile", 0, &features) != 0 ||
	    virtio_setup_queue(netdev, "hostile", 0, &vq2, rings2, VQ_SIZE) != 0 ||
	    virtio_setup_queue(netdev, "hostile", 1, &vq, rings, VQ_SIZE) != 0)
		return;
	virtio_driver_ok(netdev);
	memset(data, 0, 64);
	desc(0, (uint64_t)data, 64, VRING_DESC_F_NEXT, 1);
	desc(1, (uint64_t)data, 64, VRING_DESC_F_NEXT, 0);
	vq_push(&vq, 0);
	vq_notify(&vq);
	report_used("net-loop");
	*(volatile uint16_t *)&vq.avail->idx = (uint16_t)(vq.next_avail + 1000);
	vq_notify(&vq);
	report_used("net-availjump");
}

static const struct {
	const char *name;
	void (*run)(void);
	int net;
} attacks[] = {
	{"loop", attack_loop, 0},	    {"long", attack_long, 0},		{"outside", attack_outside, 0},
	{"gap", attack_gap, 0},		    {"overflow", attack_overflow, 0}, {"availjump", attack_availjump, 0},
	{"qsize", attack_qsize, 0},	    {"storm", attack_storm, 0},		{"mmio", attack_mmio, 0},
	{"config", attack_config, 0},	    {"reset", attack_reset, 0},		{"net", attack_net, 1},
};

/* Whether `name` is in the comma-separated `ember_hostile=` list (all if absent). */
static int chosen(const char *cmdline, const char *name)
{
	const char *p = cmdline_find(cmdline, NULL, "ember_hostile=");
	if (!p)
		return 1;
	size_t n = strlen(name);
	while (*p && *p != ' ') {
		const char *end = p;
		while (*end && *end != ' ' && *end != ',')
			end++;
		if ((size_t)(end - p) == n && memcmp(p, name, n) == 0)
			return 1;
		p = *end == ',' ? end + 1 : end;
	}
	return 0;
}

void hostile_run(const char *cmdline)
{
	uint64_t blk[2];
	int nblk = virtio_find(cmdline, 2, blk, 2);
	uint64_t net[1];
	int nnet = virtio_find(cmdline, 1, net, 1);
	if (nblk < 2) {
		puts_serial("hostile: error: needs two virtio-blk devices\n");
		return;
	}
	victim = blk[0];
	bystander = blk[1];
	netdev = nnet ? net[0] : 0;
	kprintf("hostile: victim 0x%lx bystander 0x%lx low_ram_end 0x%lx\n", victim, bystander, low_ram_end);
	for (unsigned i = 0; i < sizeof(attacks) / sizeof(attacks[0]); i++) {
		if (!chosen(cmdline, attacks[i].name))
			continue;
		if (attacks[i].net && !netdev) {
			kprintf("hostile: %s skipped: no net device\n", attacks[i].name);
			continue;
		}
		kprintf("hostile: attack %s\n", attacks[i].name);
		attacks[i].run();
		verdict(attacks[i].name, attacks[i].net ? netdev : victim);
	}
	puts_serial("hostile: end\n");
}
