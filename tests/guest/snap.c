/* snap mode: a guest whose state the host can check across a snapshot and restore.
 * A counter in memory, a LAPIC TSC-deadline timer that keeps firing (its interrupt
 * counts ticks), a virtio-blk queue kept in use across iterations (each iteration writes
 * a sector and reads back the previous one), and a tag read from the serial input. */
#include "virtio.h"

#define TIMER_VECTOR 0x40
#define SPURIOUS_VECTOR 0xff
#define LAPIC_BASE 0xfee00000ull
#define LAPIC_EOI 0x0b0
#define LAPIC_SVR 0x0f0
#define LAPIC_LVT_TIMER 0x320
#define LVT_TSC_DEADLINE (2u << 17)
#define MSR_TSC_DEADLINE 0x6e0

#define VIRTIO_BLK_T_IN 0
#define VIRTIO_BLK_T_OUT 1
#define SECTOR_SIZE 512
/* Iteration n writes sector SECTOR_BASE + n % SECTOR_SPAN. */
#define SECTOR_BASE 8
#define SECTOR_SPAN 16

struct idt_entry {
	uint16_t offset_low;
	uint16_t selector;
	uint8_t ist;
	uint8_t type_attr;
	uint16_t offset_mid;
	uint32_t offset_high;
	uint32_t reserved;
} __attribute__((packed));

static struct idt_entry idt[256] NOINIT __attribute__((aligned(16)));
/* Read by the interrupt handler (assembly below). */
volatile uint64_t snap_timer_ticks;
uint64_t snap_timer_period;
/* The counter the host follows: it lives in guest memory, so only a correct memory
 * restore continues it. */
static volatile uint64_t counter;
static char tag[16];
static size_t tag_len;
/* `ember_snap_touch_mib=N` (N <= 8): every iteration writes one byte in each page of
 * the first N MiB of this buffer, so each clone of a snapshot copies that much memory
 * (the clones benchmark measures it). */
#define TOUCH_MAX_MIB 8
/* volatile: the stores are never read back, and must not be optimised away. */
static volatile uint8_t touch_buf[TOUCH_MAX_MIB << 20] NOINIT __attribute__((aligned(4096)));
static uint64_t touch_bytes;

void snap_timer_isr(void);
void snap_spurious_isr(void);

/* Counts a tick, arms the next deadline, acknowledges the LAPIC. Only rax, rcx and rdx
 * are used, and saved. */
__asm__(".text\n"
	".globl snap_timer_isr\n"
	"snap_timer_isr:\n"
	"	push %rax\n"
	"	push %rcx\n"
	"	push %rdx\n"
	"	lock incq snap_timer_ticks(%rip)\n"
	"	rdtsc\n"
	"	shl $32, %rdx\n"
	"	or %rdx, %rax\n"
	"	add snap_timer_period(%rip), %rax\n"
	"	mov %rax, %rdx\n"
	"	shr $32, %rdx\n"
	"	mov $0x6e0, %ecx\n"
	"	wrmsr\n"
	"	mov $0xfee000b0, %eax\n"
	"	movl $0, (%rax)\n"
	"	pop %rdx\n"
	"	pop %rcx\n"
	"	pop %rax\n"
	"	iretq\n"
	".globl snap_spurious_isr\n"
	"snap_spurious_isr:\n"
	"	iretq\n");

static void set_gate(unsigned vector, void (*handler)(void), uint16_t cs)
{
	uint64_t a = (uint64_t)handler;
	idt[vector] = (struct idt_entry){(uint16_t)a, cs, 0, 0x8e, (uint16_t)(a >> 16), (uint32_t)(a >> 32), 0};
}

static inline void wrmsr(uint32_t msr, uint64_t v)
{
	__asm__ volatile("wrmsr" : : "c"(msr), "a"((uint32_t)v), "d"((uint32_t)(v >> 32)));
}

static void start_timer(void)
{
	uint16_t cs;
	__asm__ volatile("mov %%cs, %0" : "=r"(cs));
	memset(idt, 0, sizeof(idt));
	set_gate(TIMER_VECTOR, snap_timer_isr, cs);
	set_gate(SPURIOUS_VECTOR, snap_spurious_isr, cs);
	struct {
		uint16_t limit;
		uint64_t base;
	} __attribute__((packed)) idtr = {sizeof(idt) - 1, (uint64_t)idt};
	__asm__ volatile("lidt %0" : : "m"(idtr));
	snap_timer_period = tsc_hz() / 50;
	mmio_write32(LAPIC_BASE + LAPIC_SVR, 0x100 | SPURIOUS_VECTOR);
	mmio_write32(LAPIC_BASE + LAPIC_LVT_TIMER, LVT_TSC_DEADLINE | TIMER_VECTOR);
	wrmsr(MSR_TSC_DEADLINE, rdtsc() + snap_timer_period);
	__asm__ volatile("sti");
}

struct blk_req_hdr {
	uint32_t type;
	uint32_t reserved;
	uint64_t sector;
};

static uint64_t blk_base;
static struct virtqueue vq;
static uint8_t vq_rings[VQ_RING_BYTES(VQ_SIZE)] NOINIT __attribute__((aligned(4096)));
static struct blk_req_hdr hdr __attribute__((aligned(16)));
static uint8_t data[SECTOR_SIZE] NOINIT __attribute__((aligned(512)));
static volatile uint8_t status;

/* The first virtio-blk device on the command line, set up once and kept. */
static void find_blk(const char *cmdline)
{
	const char *p = NULL;
	while ((p = cmdline_find(cmdline, p, "virtio_mmio.device=")) != NULL) {
		const char *at = p;
		while (*at && *at != '@' && *at != ' ')
			at++;
		if (*at != '@')
			continue;
		uint64_t base;
		parse_u64(at + 1, &base);
		if (base < (1ull << 20) || base >= (1ull << 32) - 0x1000)
			continue;
		if (mmio_read32(base + VIRTIO_MMIO_MAGIC) != VIRTIO_MMIO_MAGIC_VALUE ||
		    mmio_read32(base + VIRTIO_MMIO_DEVICE_ID) != 2)
			continue;
		uint64_t features;
		if (virtio_negotiate(base, "snap", 0, &features) != 0)
			return;
		if (virtio_setup_queue(base, "snap", 0, &vq, vq_rings, VQ_SIZE) != 0)
			return;
		virtio_driver_ok(base);
		blk_base = base;
		return;
	}
}

static int blk_request(uint32_t type, uint64_t sector)
{
	hdr.type = type;
	hdr.reserved = 0;
	hdr.sector = sector;
	status = 0xff;
	vq.desc[0] = (struct vring_desc){(uint64_t)&hdr, sizeof(hdr), VRING_DESC_F_NEXT, 1};
	vq.desc[1] = (struct vring_desc){(uint64_t)data, SECTOR_SIZE,
					 (uint16_t)(VRING_DESC_F_NEXT | (type == VIRTIO_BLK_T_IN ? VRING_DESC_F_WRITE : 0)), 2};
	vq.desc[2] = (struct vring_desc){(uint64_t)&status, 1, VRING_DESC_F_WRITE, 0};
	vq_push(&vq, 0);
	vq_notify(&vq);
	uint32_t id, len;
	if (vq_wait(&vq, 5000, &id, &len) != 0 || id != 0)
		return -1;
	return status;
}

/* "snap <n>" zero-padded to a sector. */
static void fill_sector(uint64_t n)
{
	memset(data, 0, sizeof(data));
	char digits[20];
	size_t nd = 0, len = 5;
	memcpy(data, "snap ", 5);
	do {
		digits[nd++] = (char)('0' + n % 10);
		n /= 10;
	} while (n);
	while (nd)
		data[len++] = (uint8_t)digits[--nd];
}

/* Writes this iteration's sector, reads back the previous iteration's. */
static const char *disk_step(uint64_t n)
{
	if (!blk_base)
		return "none";
	fill_sector(n);
	if (blk_request(VIRTIO_BLK_T_OUT, SECTOR_BASE + n % SECTOR_SPAN) != 0)
		return "write-failed";
	if (n == 0)
		return "ok";
	if (blk_request(VIRTIO_BLK_T_IN, SECTOR_BASE + (n - 1) % SECTOR_SPAN) != 0)
		return "read-failed";
	uint8_t got[SECTOR_SIZE];
	memcpy(got, data, sizeof(got));
	fill_sector(n - 1);
	return memcmp(got, data, sizeof(got)) == 0 ? "ok" : "mismatch";
}

/* The first virtio-rng device, if any: each iteration asks it for RNG_BYTES bytes. */
#define RNG_BYTES 16
static uint64_t rng_base;
static struct virtqueue rng_vq;
static uint8_t rng_rings[VQ_RING_BYTES(VQ_SIZE)] NOINIT __attribute__((aligned(4096)));
static uint8_t rng_buf[2][RNG_BYTES] NOINIT;

static void find_rng(const char *cmdline)
{
	const char *p = NULL;
	while ((p = cmdline_find(cmdline, p, "virtio_mmio.device=")) != NULL) {
		const char *at = p;
		while (*at && *at != '@' && *at != ' ')
			at++;
		if (*at != '@')
			continue;
		uint64_t base;
		parse_u64(at + 1, &base);
		if (base < (1ull << 20) || base >= (1ull << 32) - 0x1000)
			continue;
		if (mmio_read32(base + VIRTIO_MMIO_MAGIC) != VIRTIO_MMIO_MAGIC_VALUE ||
		    mmio_read32(base + VIRTIO_MMIO_DEVICE_ID) != 4)
			continue;
		uint64_t features;
		if (virtio_negotiate(base, "snap-rng", 0, &features) != 0)
			return;
		if (virtio_setup_queue(base, "snap-rng", 0, &rng_vq, rng_rings, VQ_SIZE) != 0)
			return;
		virtio_driver_ok(base);
		rng_base = base;
		memset(rng_buf, 0, sizeof(rng_buf));
		return;
	}
}

/* "snap-rng <n> len=<used length, -1 on timeout> differ=<0|1>": differ compares with the
 * previous iteration's bytes. */
static void rng_step(uint64_t n)
{
	if (!rng_base)
		return;
	uint8_t *b = rng_buf[n & 1];
	rng_vq.desc[0] = (struct vring_desc){(uint64_t)b, RNG_BYTES, VRING_DESC_F_WRITE, 0};
	vq_push(&rng_vq, 0);
	vq_notify(&rng_vq);
	uint32_t id, len;
	int64_t got = vq_wait(&rng_vq, 5000, &id, &len) == 0 ? (int64_t)len : -1;
	kprintf("snap-rng %lu len=%ld differ=%u\n", n, got, memcmp(rng_buf[0], rng_buf[1], RNG_BYTES) != 0);
}

/* Serial input bytes (printable) become the tag; a newline ends nothing. */
static void read_tag(void)
{
	while (inb(0x3fd) & 1) {
		char c = (char)inb(0x3f8);
		if (c > ' ' && c < 0x7f && tag_len < sizeof(tag) - 1)
			tag[tag_len++] = c;
	}
	tag[tag_len] = 0;
}

int snap_reports_cpuid;

void snap_loop(const char *cmdline)
{
	const char *t = cmdline_find(cmdline, NULL, "ember_snap_touch_mib=");
	if (t) {
		uint64_t mib;
		parse_u64(t, &mib);
		touch_bytes = (mib > TOUCH_MAX_MIB ? TOUCH_MAX_MIB : mib) << 20;
	}
	find_blk(cmdline);
	find_rng(cmdline);
	start_timer();
	kprintf("snap: start disk=%s\n", blk_base ? "yes" : "no");
	uint64_t interval = tsc_hz() / 10;
	uint64_t next = rdtsc();
	for (;;) {
		uint64_t now = rdtsc();
		if (now < next) {
			/* The timer interrupt wakes us every 20 ms: no busy loop, so fifty
			 * clones at once do not fight over emulated instructions. */
			__asm__ volatile("hlt");
			continue;
		}
		next = now + interval;
		read_tag();
		uint64_t n = counter;
		for (uint64_t off = 0; off < touch_bytes; off += 4096)
			touch_buf[off] = (uint8_t)n;
		const char *disk = disk_step(n);
		if (snap_reports_cpuid)
			cpuid_report(cmdline);
		kprintf("snap %lu ticks=%lu disk=%s tag=%s\n", n, snap_timer_ticks, disk, tag);
		rng_step(n);
		counter = n + 1;
	}
}
