/* The test guest's main flow: hello, command line, MP table, e820, last RAM page, then
 * the modes chosen with `ember_test=<mode>[,<mode>...]`. See README.md. */
#include "guest.h"

/* struct boot_params offsets (Linux arch/x86/include/uapi/asm/bootparam.h). */
#define BP_EXT_CMD_LINE_PTR 0x0c8
#define BP_E820_ENTRIES 0x1e8
#define BP_CMD_LINE_PTR 0x228
#define BP_E820_TABLE 0x2d0
#define E820_MAX_ENTRIES 128
#define E820_ENTRY_SIZE 20
#define E820_RAM 1

#define CMDLINE_MAX 2048
#define BOOT_TIMER_ADDR 0xd0000000ull
#define BOOT_TIMER_MAGIC 123

#define MODE_BASIC (1u << 0)
#define MODE_TRIPLEFAULT (1u << 1)
#define MODE_COUNTER (1u << 2)
#define MODE_BOOTTIMER (1u << 3)
#define MODE_BLK (1u << 4)
#define MODE_NET (1u << 5)
#define MODE_FLOOD (1u << 6)
#define MODE_BLKBENCH (1u << 7)
#define MODE_NETBENCH (1u << 8)
#define MODE_HOSTILE (1u << 9)
#define MODE_VSOCK (1u << 10)
#define MODE_MMDS (1u << 11)
#define MODE_RNG (1u << 12)
#define MODE_BALLOON (1u << 13)
#define MODE_SNAP (1u << 14)
#define MODE_CPUID (1u << 15)
#define MODE_PROFILE (1u << 16)
/* How long the profile mode spins in profile_hot. */
#define PROFILE_MS 1500

/* Where no device lives in ember: an I/O port (QEMU's fw_cfg, absent in ember) and a
 * page inside the MMIO gap above the virtio windows. Both must read as all ones. */
#define UNMAPPED_PORT 0x510
#define UNMAPPED_MMIO 0xd0ff0000ull
#define FLOOD_XS 100

#define PAGE_SIZE 4096ull
#define PTE_PRESENT 0x1ull
#define PTE_WRITE 0x2ull
#define PTE_HUGE 0x80ull
#define HUGE_PAGE_SIZE (2ull << 20)

void guest_main(const uint8_t *boot_params);

uint64_t low_ram_end;
static char cmdline[CMDLINE_MAX] NOINIT; /* always NUL-terminated by copy_cmdline */

/* Our own page tables: a copy of the boot PML4 (which keeps the low 4 GiB mapped through
 * the VMM's tables) extended with one 2 MiB page around the last RAM page. Filled in
 * full before use, so they need no zeroing at start. */
static uint64_t pml4[512] NOINIT __attribute__((aligned(4096)));
static uint64_t pdpt[512] NOINIT __attribute__((aligned(4096)));
static uint64_t pd[512] NOINIT __attribute__((aligned(4096)));

extern char __image_start[], __image_end[];

/* __builtin_memcpy with a constant size compiles to one unaligned load. */
static uint32_t read_u32(const uint8_t *p)
{
	uint32_t v;
	__builtin_memcpy(&v, p, sizeof(v));
	return v;
}

static uint64_t read_u64(const uint8_t *p)
{
	uint64_t v;
	__builtin_memcpy(&v, p, sizeof(v));
	return v;
}

static void copy_cmdline(const uint8_t *bp)
{
	uint64_t ptr = read_u32(bp + BP_CMD_LINE_PTR) | ((uint64_t)read_u32(bp + BP_EXT_CMD_LINE_PTR) << 32);
	/* Only the boot page tables are live here: they map the low 4 GiB. */
	if (ptr == 0 || ptr >= (1ull << 32) - CMDLINE_MAX) {
		cmdline[0] = 0;
		return;
	}
	const char *src = (const char *)ptr;
	size_t i = 0;
	for (; i < CMDLINE_MAX - 1 && src[i]; i++)
		cmdline[i] = src[i];
	cmdline[i] = 0;
}

static unsigned parse_modes(void)
{
	static const struct {
		const char *name;
		unsigned bit;
	} names[] = {
		{"basic", MODE_BASIC}, {"triplefault", MODE_TRIPLEFAULT}, {"counter", MODE_COUNTER},
		{"boottimer", MODE_BOOTTIMER}, {"blk", MODE_BLK}, {"net", MODE_NET},
		{"flood", MODE_FLOOD}, {"blkbench", MODE_BLKBENCH}, {"netbench", MODE_NETBENCH},
		{"hostile", MODE_HOSTILE}, {"vsock", MODE_VSOCK},
		{"mmds", MODE_MMDS}, {"rng", MODE_RNG}, {"balloon", MODE_BALLOON},
		{"snap", MODE_SNAP}, {"cpuid", MODE_CPUID}, {"profile", MODE_PROFILE},
	};
	unsigned modes = 0;
	const char *p = NULL;
	while ((p = cmdline_find(cmdline, p, "ember_test=")) != NULL) {
		while (*p && *p != ' ') {
			const char *end = p;
			while (*end && *end != ' ' && *end != ',')
				end++;
			size_t len = (size_t)(end - p);
			int known = 0;
			for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
				if (strlen(names[i].name) == len && memcmp(names[i].name, p, len) == 0) {
					modes |= names[i].bit;
					known = 1;
				}
			}
			if (!known && len) {
				puts_serial("ember_test: unknown mode ");
				for (const char *c = p; c < end; c++)
					putc_serial(*c);
				putc_serial('\n');
			}
			p = *end == ',' ? end + 1 : end;
		}
	}
	return modes ? modes : MODE_BASIC;
}

static uint8_t checksum(const uint8_t *p, size_t len)
{
	uint8_t sum = 0;
	while (len--)
		sum = (uint8_t)(sum + *p++);
	return sum;
}

static const uint8_t *find_mp_floating(uint64_t start, uint64_t end)
{
	for (uint64_t a = start; a + 16 <= end; a += 16)
		if (memcmp((const void *)a, "_MP_", 4) == 0)
			return (const uint8_t *)a;
	return NULL;
}

/* Intel MP spec 1.4: floating pointer -> "PCMP" config table -> entries. */
static void report_mptable(void)
{
	const uint8_t *fp = find_mp_floating(0x9fc00, 0xa0000);
	if (!fp)
		fp = find_mp_floating(0xf0000, 0x100000);
	if (!fp) {
		puts_serial("mptable: not found\n");
		return;
	}
	size_t fp_len = (size_t)fp[8] * 16;
	if (fp_len == 0 || fp_len > 64 || checksum(fp, fp_len) != 0)
		kprintf("mptable: error: bad floating pointer checksum at 0x%lx\n", (uint64_t)fp);
	uint64_t cfg_addr = read_u32(fp + 4);
	if (cfg_addr == 0) {
		kprintf("mptable: error: no config table (default configuration %u)\n", fp[11]);
		puts_serial("mptable: not found\n");
		return;
	}
	const uint8_t *cfg = (const uint8_t *)cfg_addr;
	if (memcmp(cfg, "PCMP", 4) != 0) {
		kprintf("mptable: error: no PCMP signature at 0x%lx\n", cfg_addr);
		puts_serial("mptable: not found\n");
		return;
	}
	uint16_t base_len = (uint16_t)(cfg[4] | cfg[5] << 8);
	uint16_t count = (uint16_t)(cfg[34] | cfg[35] << 8);
	if (base_len < 44 || checksum(cfg, base_len) != 0)
		kprintf("mptable: error: bad config table checksum at 0x%lx\n", cfg_addr);
	unsigned cpus = 0;
	size_t off = 44;
	for (unsigned i = 0; i < count; i++) {
		if (off >= base_len) {
			kprintf("mptable: error: entry %u beyond table length %u\n", i, base_len);
			break;
		}
		uint8_t type = cfg[off];
		if (type == 0) {
			cpus++;
			off += 20;
		} else if (type <= 4) {
			off += 8;
		} else {
			kprintf("mptable: error: unknown entry type %u\n", type);
			break;
		}
	}
	kprintf("mptable: cpus=%u\n", cpus);
}

/* Prints the e820 map; returns the last 4 KiB page of the highest usable entry, or 0. */
static uint64_t report_e820(const uint8_t *bp)
{
	unsigned n = bp[BP_E820_ENTRIES];
	if (n > E820_MAX_ENTRIES) {
		kprintf("e820: error: %u entries, only %u fit\n", n, E820_MAX_ENTRIES);
		n = E820_MAX_ENTRIES;
	}
	uint64_t ram = 0, best_end = 0, last_page = 0;
	for (unsigned i = 0; i < n; i++) {
		const uint8_t *e = bp + BP_E820_TABLE + i * E820_ENTRY_SIZE;
		uint64_t addr = read_u64(e), size = read_u64(e + 8);
		uint32_t type = read_u32(e + 16);
		uint64_t end = addr + size;
		kprintf("e820: 0x%lx 0x%lx %u\n", addr, end, type);
		if (type != E820_RAM)
			continue;
		ram += size;
		if (end <= (1ull << 32) && end > low_ram_end)
			low_ram_end = end;
		uint64_t page = (end & ~(PAGE_SIZE - 1)) - PAGE_SIZE;
		if (end > best_end && end >= PAGE_SIZE && page >= addr) {
			best_end = end;
			last_page = page;
		}
	}
	kprintf("e820: ram=%lu\n", ram);
	return last_page;
}

/* Reads and writes where nothing is mapped; the VMM must return all ones and ignore
 * the writes (and keep the guest running). */
static void test_unmapped(void)
{
	uint8_t port = inb(UNMAPPED_PORT);
	uint32_t mmio = mmio_read32(UNMAPPED_MMIO);
	outb(0x5a, UNMAPPED_PORT);
	mmio_write32(UNMAPPED_MMIO, 0x5a5a5a5au);
	kprintf("unmapped: port=0x%02x mmio=0x%08x\n", port, mmio);
}

static uint64_t read_cr3(void)
{
	uint64_t cr3;
	__asm__ volatile("mov %%cr3, %0" : "=r"(cr3));
	return cr3;
}

static void load_cr3(uint64_t cr3)
{
	__asm__ volatile("mov %0, %%cr3" : : "r"(cr3) : "memory");
}

static void fill64(uint64_t *dst, uint64_t value, size_t words)
{
	__asm__ volatile("rep stosq" : "+D"(dst), "+c"(words) : "a"(value) : "memory");
}

/* Returns 1 if all `words` qwords at `p` equal `value` (repe scasq: one instruction). */
static int check64(const uint64_t *p, uint64_t value, size_t words)
{
	unsigned char equal;
	__asm__ volatile("repe scasq; sete %2" : "+D"(p), "+c"(words), "=qm"(equal) : "a"(value) : "memory", "cc");
	return equal && words == 0;
}

/* Maps the 2 MiB page around `page` (identity) in new tables and switches CR3 to them. */
static void map_identity(uint64_t page)
{
	const uint64_t table = PTE_PRESENT | PTE_WRITE, addr_mask = 0x000ffffffffff000ull;
	unsigned l4 = (page >> 39) & 511, l3 = (page >> 30) & 511, l2 = (page >> 21) & 511;
	const uint64_t *boot_pml4 = (const uint64_t *)(read_cr3() & addr_mask);
	memcpy(pml4, boot_pml4, sizeof(pml4));
	if (pml4[l4] & PTE_PRESENT)
		memcpy(pdpt, (const void *)(pml4[l4] & addr_mask), sizeof(pdpt));
	else
		fill64(pdpt, 0, 512);
	pml4[l4] = (uint64_t)pdpt | table;
	if (!(pdpt[l3] & PTE_PRESENT)) {
		fill64(pd, 0, 512);
	} else if (!(pdpt[l3] & PTE_HUGE)) {
		memcpy(pd, (const void *)(pdpt[l3] & addr_mask), sizeof(pd));
	} else {
		/* A 1 GiB page: split it into 2 MiB ones, keeping the same range mapped. */
		uint64_t gib = pdpt[l3] & 0x000fffffc0000000ull;
		for (uint64_t i = 0; i < 512; i++)
			pd[i] = (gib + i * HUGE_PAGE_SIZE) | table | PTE_HUGE;
	}
	pdpt[l3] = (uint64_t)pd | table;
	pd[l2] = (page & ~(HUGE_PAGE_SIZE - 1)) | table | PTE_HUGE;
	load_cr3((uint64_t)pml4);
}

/* Other VMMs' boot tables may map less than the low 4 GiB (Firecracker's map 1 GiB), where
 * the virtio-mmio windows lie: fill in each missing GiB of the boot PDPT with 2 MiB
 * identity pages. Under ember nothing is missing and this is a few reads. */
static uint64_t low_pds[3][512] NOINIT __attribute__((aligned(4096)));

static void map_low_4g(void)
{
	const uint64_t table = PTE_PRESENT | PTE_WRITE, addr_mask = 0x000ffffffffff000ull;
	const uint64_t *boot_pml4 = (const uint64_t *)(read_cr3() & addr_mask);
	if (!(boot_pml4[0] & PTE_PRESENT))
		return;
	uint64_t *boot_pdpt = (uint64_t *)(boot_pml4[0] & addr_mask);
	int changed = 0;
	for (unsigned g = 1; g < 4; g++) {
		if (boot_pdpt[g] & PTE_PRESENT)
			continue;
		uint64_t *pd = low_pds[g - 1];
		for (uint64_t i = 0; i < 512; i++)
			pd[i] = ((uint64_t)g << 30 | i * HUGE_PAGE_SIZE) | table | PTE_HUGE;
		boot_pdpt[g] = (uint64_t)pd | table;
		changed = 1;
	}
	if (changed)
		load_cr3(read_cr3());
}

static void test_last_page(uint64_t page)
{
	if (!page) {
		puts_serial("lastpage: FAIL 0x0 (no usable RAM)\n");
		return;
	}
	if (page < (uint64_t)__image_end && page + PAGE_SIZE > (uint64_t)__image_start) {
		kprintf("lastpage: FAIL 0x%lx (overlaps the guest image)\n", page);
		return;
	}
	if (page >= (1ull << 47)) {
		kprintf("lastpage: FAIL 0x%lx (beyond 47-bit addresses)\n", page);
		return;
	}
	/* Always switch tables, also when the boot tables already cover the page: the test
	 * then also checks that the VMM lets the guest install its own CR3. */
	map_identity(page);
	/* One pass with an address-dependent pattern: a wrong or missing backing page shows,
	 * and the string instructions keep it to two (emulated) instructions. */
	uint64_t pattern = page ^ 0x5a5aa5a5c3c33c3cull;
	fill64((uint64_t *)page, pattern, PAGE_SIZE / 8);
	int ok = check64((const uint64_t *)page, pattern, PAGE_SIZE / 8);
	kprintf("lastpage: %s 0x%lx\n", ok ? "ok" : "FAIL", page);
}

static void triple_fault(void) __attribute__((noreturn));
static void triple_fault(void)
{
	static const struct {
		uint16_t limit;
		uint64_t base;
	} __attribute__((packed)) empty_idt = {0, 0};
	puts_serial("triplefault: now\n");
	__asm__ volatile("lidt %0" : : "m"(empty_idt));
	/* A non-canonical address raises #GP; with no IDT that escalates to #DF and then to
	 * a triple fault (shutdown). */
	volatile uint64_t *bad = (volatile uint64_t *)0x8000000000000000ull;
	(void)*bad;
	puts_serial("triplefault: FAIL still running\n");
	for (;;)
		__asm__ volatile("cli; hlt");
}

#define I8042_DATA 0x60
#define I8042_STATUS 0x64
#define I8042_STATUS_OBF 0x01

/* Feeds one i8042 byte to the matcher of the set-2 make codes Firecracker's
 * SendCtrlAltDel injects (Ctrl, Alt, E0-prefixed Del); on the whole sequence it prints
 * `ctrl-alt-del: received` and resets. */
void i8042_feed(unsigned *matched, uint8_t b)
{
	static const uint8_t cad[] = {0x14, 0x11, 0xe0, 0x71};
	if (b == cad[*matched])
		(*matched)++;
	else
		*matched = b == cad[0] ? 1 : 0;
	if (*matched == sizeof(cad)) {
		puts_serial("ctrl-alt-del: received\n");
		reset_machine();
	}
}

/* One poll of the i8042 (a VM exit, so callers poll about once a millisecond): feeds the
 * byte waiting, if any, to `i8042_feed`. */
void i8042_poll(unsigned *matched)
{
	if (inb(I8042_STATUS) & I8042_STATUS_OBF)
		i8042_feed(matched, inb(I8042_DATA));
}

/* Never returns: ticks every ~50 ms and echoes i8042 bytes until Ctrl-Alt-Del. */
/* profile: a known hot spot for the boot profiler's test (tests/profile.rs). Out of line
 * and not tail calls, so that a frame-pointer walk sees profile_outer -> profile_hot. */
volatile uint64_t profile_sink;

__attribute__((noinline)) uint64_t profile_hot(uint64_t until)
{
	uint64_t x = 1, rounds = 0;
	while (rdtsc() < until) {
		for (int i = 0; i < 1000; i++)
			x = x * 6364136223846793005ull + 1442695040888963407ull;
		rounds++;
	}
	profile_sink = x;
	return rounds;
}

__attribute__((noinline)) uint64_t profile_outer(uint64_t until)
{
	uint64_t rounds = profile_hot(until);
	profile_sink++;
	return rounds;
}

/* The rounds done tell the profiler's cost: fewer rounds in the same time. */
static void profile_run(void)
{
	puts_serial("profile: start\n");
	uint64_t rounds = profile_outer(rdtsc() + tsc_hz() / 1000 * PROFILE_MS);
	kprintf("profile: done rounds=%lu\n", rounds);
}

static void counter_loop(void) __attribute__((noreturn));
static void counter_loop(void)
{
	unsigned matched = 0;
	uint64_t hz = tsc_hz();
	uint64_t interval = hz / 20, poll = hz / 1000;
	uint64_t next = rdtsc();
	for (uint64_t n = 0;;) {
		uint64_t now = rdtsc();
		if (now >= next) {
			kprintf("tick %lu\n", n++);
			next += interval;
			if (next < now)
				next = now + interval;
		}
		/* Each port read is a VM exit: poll about once a millisecond, not flat out. The
		 * byte is printed before the matcher may reset on the last one of the sequence. */
		if (inb(I8042_STATUS) & I8042_STATUS_OBF) {
			uint8_t b = inb(I8042_DATA);
			kprintf("i8042: 0x%02x\n", b);
			i8042_feed(&matched, b);
			continue;
		}
		uint64_t until = rdtsc() + poll;
		while (rdtsc() < until)
			barrier();
	}
}

/* Never returns: "flood <n> " and 100 'x' per line, written with plain `out`s. The
 * line is built once; only the number changes. */
static void flood(void) __attribute__((noreturn));
static void flood(void)
{
	static char line[32 + FLOOD_XS] NOINIT;
	static char tail[FLOOD_XS + 1] NOINIT;
	memset(tail, 'x', FLOOD_XS);
	tail[FLOOD_XS] = '\n';
	memcpy(line, "flood ", 6);
	for (uint64_t n = 0;; n++) {
		char digits[20];
		size_t nd = 0, len = 6;
		uint64_t v = n;
		do {
			digits[nd++] = (char)('0' + v % 10);
			v /= 10;
		} while (v);
		while (nd)
			line[len++] = digits[--nd];
		line[len++] = ' ';
		memcpy(line + len, tail, sizeof(tail));
		write_serial_fast(line, len + sizeof(tail));
	}
}

void guest_main(const uint8_t *boot_params)
{
	puts_serial("ember-test-guest: hello\n");
	map_low_4g();
	copy_cmdline(boot_params);
	unsigned modes = parse_modes();
	if (modes & MODE_BOOTTIMER)
		mmio_write8(BOOT_TIMER_ADDR, BOOT_TIMER_MAGIC);
	if (modes & MODE_TRIPLEFAULT)
		triple_fault();
	if (modes & MODE_FLOOD)
		flood();
	kprintf("cmdline: %s\n", cmdline);
	report_mptable();
	uint64_t last_page = report_e820(boot_params);
	test_unmapped();
	test_last_page(last_page);
	if (modes & MODE_CPUID)
		cpuid_report(cmdline);
	if (modes & MODE_BLK)
		virtio_test_all(cmdline, 2);
	if (modes & MODE_NET)
		virtio_test_all(cmdline, 1);
	if (modes & MODE_RNG)
		virtio_test_all(cmdline, 4);
	if (modes & MODE_BALLOON)
		virtio_test_all(cmdline, 5);
	if (modes & MODE_BLKBENCH)
		virtio_for_each(cmdline, 2, "blk-bench", blk_bench);
	if (modes & MODE_NETBENCH)
		virtio_for_each(cmdline, 1, "net-bench", net_bench);
	if (modes & MODE_HOSTILE)
		hostile_run(cmdline);
	if (modes & MODE_MMDS)
		virtio_for_each(cmdline, 1, "mmds", mmds_test);
	if (modes & MODE_VSOCK)
		virtio_for_each(cmdline, 19, "vsock", vsock_run);
	if (modes & MODE_PROFILE)
		profile_run();
	if (modes & MODE_COUNTER)
		counter_loop();
	if (modes & MODE_SNAP) {
		snap_reports_cpuid = (modes & MODE_CPUID) != 0;
		snap_loop(cmdline);
	}
	puts_serial("ember-test-guest: done\n");
	reset_machine();
}
