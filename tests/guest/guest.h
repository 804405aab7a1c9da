/* Shared declarations for the ember test guest: a freestanding 64-bit program that
 * runs in guest kernel mode and reports over the serial port. */
#ifndef EMBER_TEST_GUEST_H
#define EMBER_TEST_GUEST_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

/* Port I/O and MMIO use inline assembly so the compiler emits exactly one plain
 * in/out/mov per access: the PVM host emulates MMIO by decoding the faulting
 * instruction, and a combined or widened access would be wrong for a device register. */
static inline void outb(uint8_t value, uint16_t port)
{
	__asm__ volatile("outb %0, %1" : : "a"(value), "Nd"(port));
}

static inline uint8_t inb(uint16_t port)
{
	uint8_t value;
	__asm__ volatile("inb %1, %0" : "=a"(value) : "Nd"(port));
	return value;
}

static inline uint32_t mmio_read32(uint64_t addr)
{
	uint32_t value;
	__asm__ volatile("movl (%1), %0" : "=r"(value) : "r"(addr) : "memory");
	return value;
}

static inline uint8_t mmio_read8(uint64_t addr)
{
	uint8_t value;
	__asm__ volatile("movb (%1), %0" : "=q"(value) : "r"(addr) : "memory");
	return value;
}

static inline void mmio_write32(uint64_t addr, uint32_t value)
{
	__asm__ volatile("movl %0, (%1)" : : "r"(value), "r"(addr) : "memory");
}

static inline void mmio_write8(uint64_t addr, uint8_t value)
{
	__asm__ volatile("movb %0, (%1)" : : "q"(value), "r"(addr) : "memory");
}

static inline uint64_t rdtsc(void)
{
	uint32_t lo, hi;
	__asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return ((uint64_t)hi << 32) | lo;
}

static inline void cpuid(uint32_t leaf, uint32_t *a, uint32_t *b, uint32_t *c, uint32_t *d)
{
	__asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(0));
}

static inline void cpuid_count(uint32_t leaf, uint32_t subleaf, uint32_t *a, uint32_t *b,
			       uint32_t *c, uint32_t *d)
{
	__asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(subleaf));
}

/* An MSR KVM does not know raises #GP, which this guest cannot handle: read only MSRs
 * the host knows exist. */
static inline uint64_t rdmsr(uint32_t msr)
{
	uint32_t lo, hi;
	__asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
	return ((uint64_t)hi << 32) | lo;
}

/* Compiler barrier: enough between plain stores on x86 (TSO). */
static inline void barrier(void)
{
	__asm__ volatile("" : : : "memory");
}

/* Full barrier without SSE2's mfence: a locked no-op on the stack, as Linux does. */
static inline void mb(void)
{
	__asm__ volatile("lock; addl $0, (%%rsp)" : : : "memory", "cc");
}

/* Large buffers that need no zeroing (stacks, DMA buffers, tables filled before use)
 * go here instead of .bss, so the start code clears only a few hundred bytes: on the PVM
 * host every guest instruction and memory write is emulated, and clearing 80 KiB took
 * ~80 ms. */
#define NOINIT __attribute__((section(".noinit")))

/* lib.c */
void *memset(void *dst, int c, size_t n);
void *memcpy(void *dst, const void *src, size_t n);
void *memmove(void *dst, const void *src, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);
void putc_serial(char c);
void puts_serial(const char *s);
/* Writes `len` bytes with back-to-back `out` instructions, no LSR polling (flood mode). */
void write_serial_fast(const char *s, size_t len);
void kprintf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
uint32_t crc32(const void *data, size_t len);
uint64_t tsc_hz(void);
void delay_ms(uint64_t ms);
void reset_machine(void) __attribute__((noreturn));
/* Finds `key` (e.g. "ember_test=") as a whole word in `cmdline`; returns a pointer to
 * its value (up to the next space), or NULL. `from` restarts the search after a hit. */
const char *cmdline_find(const char *cmdline, const char *from, const char *key);
/* Parses an unsigned number (0x.. hex or decimal) and returns the end pointer. */
const char *parse_u64(const char *s, uint64_t *out);

/* main.c: Ctrl-Alt-Del as Firecracker's SendCtrlAltDel injects it, for the loops that
 * never return (counter, vsock). `matched` starts at 0; on the whole sequence these print
 * `ctrl-alt-del: received` and reset. */
void i8042_feed(unsigned *matched, uint8_t b);
void i8042_poll(unsigned *matched);

/* virtio.c: runs the per-device test on every virtio-mmio device of the given ID
 * announced on the command line (`virtio_mmio.device=<size>@<base>:<irq>`). */
void virtio_test_all(const char *cmdline, uint32_t device_id);
/* The same probe with a caller's `run` per device: prints "<tag>: device 0x<base>" before
 * and resets the device after each, "<tag>: no device" if there is none. */
void virtio_for_each(const char *cmdline, uint32_t device_id, const char *tag,
		     void (*run)(uint64_t base, const char *cmdline));

/* The base addresses of up to `max` virtio-mmio devices with ID `device_id` named on
 * the command line, in command-line order; returns how many were found. */
int virtio_find(const char *cmdline, uint32_t device_id, uint64_t *bases, int max);
/* End of the highest RAM entry below 4 GiB in the e820 map (set by main.c). */
extern uint64_t low_ram_end;
/* hostile.c: attacks on the devices (README.md). */
void hostile_run(const char *cmdline);

/* blk.c, net.c: one device each, already probed (magic, version, device ID). */
void blk_test(uint64_t base);
void net_test(uint64_t base);
/* rng.c, balloon.c */
void rng_test(uint64_t base);
void balloon_test(uint64_t base);
/* blkbench.c, netbench.c: throughput / latency measurements (README.md). */
void blk_bench(uint64_t base, const char *cmdline);
void net_bench(uint64_t base, const char *cmdline);
/* vsock.c: serves the host's connections forever (README.md). */
void vsock_run(uint64_t base, const char *cmdline);
/* mmds.c: an ARP + TCP + HTTP client of the metadata service (mmds_script=...). */
void mmds_test(uint64_t base, const char *cmdline);
/* snap.c: never returns (README.md, mode `snap`). */
void snap_loop(const char *cmdline) __attribute__((noreturn));
/* cpuid.c: the `cpuid:` and `msr:` lines (README.md, mode `cpuid`). */
void cpuid_report(const char *cmdline);
/* Set by main.c with modes `cpuid` and `snap` together: every snap iteration reports
 * the CPUID again, so a restored guest shows what it sees after the restore. */
extern int snap_reports_cpuid;

#endif
