/* Freestanding support: the C library pieces gcc may call, serial output, a small
 * printf, CRC-32, TSC timing and command-line parsing. */
#include "guest.h"

#define COM1 0x3f8
#define COM1_LSR (COM1 + 5)
#define LSR_THRE 0x20
#define I8042_COMMAND 0x64
#define I8042_CMD_RESET 0xfe

/* String operations use rep-prefixed instructions: on the PVM host this guest's
 * instructions are emulated one by one (~1.5 us each), and one rep instruction costs far
 * less than the equivalent loop. */
void *memset(void *dst, int c, size_t n)
{
	void *d = dst;
	size_t words = n / 8, bytes = n % 8;
	uint64_t v = (uint8_t)c * 0x0101010101010101ull;
	/* The emulator pays per iteration: move 8 bytes per iteration, then the tail. */
	__asm__ volatile("rep stosq; mov %3, %%rcx; rep stosb"
			 : "+D"(d), "+c"(words)
			 : "a"(v), "r"(bytes)
			 : "memory");
	return dst;
}

void *memcpy(void *dst, const void *src, size_t n)
{
	void *d = dst;
	size_t words = n / 8, bytes = n % 8;
	__asm__ volatile("rep movsq; mov %3, %%rcx; rep movsb"
			 : "+D"(d), "+S"(src), "+c"(words)
			 : "r"(bytes)
			 : "memory");
	return dst;
}

void *memmove(void *dst, const void *src, size_t n)
{
	unsigned char *d = dst;
	const unsigned char *s = src;
	if (d <= s || d >= s + n)
		return memcpy(dst, src, n);
	while (n--)
		d[n] = s[n];
	return dst;
}

int memcmp(const void *a, const void *b, size_t n)
{
	const unsigned char *x = a, *y = b;
	if (n == 0)
		return 0;
	/* repe cmpsb stops after the first differing byte (or after n equal ones). */
	__asm__ volatile("repe cmpsb" : "+S"(x), "+D"(y), "+c"(n) : : "memory", "cc");
	return x[-1] - y[-1];
}

size_t strlen(const char *s)
{
	size_t n = 0;
	while (s[n])
		n++;
	return n;
}

void putc_serial(char c)
{
	/* Bounded wait: a VMM without a UART model may return anything for LSR, and the
	 * guest must still make progress (and reach its reset). */
	for (int i = 0; i < 100000; i++)
		if (inb(COM1_LSR) & LSR_THRE)
			break;
	outb((uint8_t)c, COM1);
}

void puts_serial(const char *s)
{
	while (*s)
		putc_serial(*s++);
}

void write_serial_fast(const char *s, size_t len)
{
	/* One `out` per byte and nothing else the emulator must step through: the point
	 * is to produce output as fast as the guest can. */
	while (len--)
		outb((uint8_t)*s++, COM1);
}

static void put_u64(uint64_t v, unsigned base, int width, char pad)
{
	char buf[24];
	int n = 0;
	do {
		unsigned d = (unsigned)(v % base);
		buf[n++] = (char)(d < 10 ? '0' + d : 'a' + d - 10);
		v /= base;
	} while (v);
	while (n < width && n < (int)sizeof(buf))
		buf[n++] = pad;
	while (n)
		putc_serial(buf[--n]);
}

/* Supports %s %c %d %u %x with an optional '0' flag, width and 'l'/'ll' length. */
void kprintf(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	for (; *fmt; fmt++) {
		if (*fmt != '%') {
			putc_serial(*fmt);
			continue;
		}
		fmt++;
		char pad = ' ';
		int width = 0, lng = 0;
		if (*fmt == '0') {
			pad = '0';
			fmt++;
		}
		while (*fmt >= '0' && *fmt <= '9')
			width = width * 10 + (*fmt++ - '0');
		while (*fmt == 'l') {
			lng = 1;
			fmt++;
		}
		switch (*fmt) {
		case 's': {
			const char *s = va_arg(ap, const char *);
			puts_serial(s ? s : "(null)");
			break;
		}
		case 'c':
			putc_serial((char)va_arg(ap, int));
			break;
		case 'd': {
			int64_t v = lng ? va_arg(ap, int64_t) : va_arg(ap, int);
			if (v < 0) {
				putc_serial('-');
				v = -v;
			}
			put_u64((uint64_t)v, 10, width, pad);
			break;
		}
		case 'u':
			put_u64(lng ? va_arg(ap, uint64_t) : va_arg(ap, unsigned), 10, width, pad);
			break;
		case 'x':
			put_u64(lng ? va_arg(ap, uint64_t) : va_arg(ap, unsigned), 16, width, pad);
			break;
		case '%':
			putc_serial('%');
			break;
		case '\0':
			fmt--;
			break;
		default:
			putc_serial('%');
			putc_serial(*fmt);
		}
	}
	va_end(ap);
}

/* Standard CRC-32 (IEEE 802.3, reflected polynomial 0xedb88320, as zlib.crc32). The table
 * is a constant so nothing is computed at run time (see the cost note above). */
static const uint32_t crc_table[256] = {
	0x00000000u, 0x77073096u, 0xee0e612cu, 0x990951bau, 0x076dc419u, 0x706af48fu,
	0xe963a535u, 0x9e6495a3u, 0x0edb8832u, 0x79dcb8a4u, 0xe0d5e91eu, 0x97d2d988u,
	0x09b64c2bu, 0x7eb17cbdu, 0xe7b82d07u, 0x90bf1d91u, 0x1db71064u, 0x6ab020f2u,
	0xf3b97148u, 0x84be41deu, 0x1adad47du, 0x6ddde4ebu, 0xf4d4b551u, 0x83d385c7u,
	0x136c9856u, 0x646ba8c0u, 0xfd62f97au, 0x8a65c9ecu, 0x14015c4fu, 0x63066cd9u,
	0xfa0f3d63u, 0x8d080df5u, 0x3b6e20c8u, 0x4c69105eu, 0xd56041e4u, 0xa2677172u,
	0x3c03e4d1u, 0x4b04d447u, 0xd20d85fdu, 0xa50ab56bu, 0x35b5a8fau, 0x42b2986cu,
	0xdbbbc9d6u, 0xacbcf940u, 0x32d86ce3u, 0x45df5c75u, 0xdcd60dcfu, 0xabd13d59u,
	0x26d930acu, 0x51de003au, 0xc8d75180u, 0xbfd06116u, 0x21b4f4b5u, 0x56b3c423u,
	0xcfba9599u, 0xb8bda50fu, 0x2802b89eu, 0x5f058808u, 0xc60cd9b2u, 0xb10be924u,
	0x2f6f7c87u, 0x58684c11u, 0xc1611dabu, 0xb6662d3du, 0x76dc4190u, 0x01db7106u,
	0x98d220bcu, 0xefd5102au, 0x71b18589u, 0x06b6b51fu, 0x9fbfe4a5u, 0xe8b8d433u,
	0x7807c9a2u, 0x0f00f934u, 0x9609a88eu, 0xe10e9818u, 0x7f6a0dbbu, 0x086d3d2du,
	0x91646c97u, 0xe6635c01u, 0x6b6b51f4u, 0x1c6c6162u, 0x856530d8u, 0xf262004eu,
	0x6c0695edu, 0x1b01a57bu, 0x8208f4c1u, 0xf50fc457u, 0x65b0d9c6u, 0x12b7e950u,
	0x8bbeb8eau, 0xfcb9887cu, 0x62dd1ddfu, 0x15da2d49u, 0x8cd37cf3u, 0xfbd44c65u,
	0x4db26158u, 0x3ab551ceu, 0xa3bc0074u, 0xd4bb30e2u, 0x4adfa541u, 0x3dd895d7u,
	0xa4d1c46du, 0xd3d6f4fbu, 0x4369e96au, 0x346ed9fcu, 0xad678846u, 0xda60b8d0u,
	0x44042d73u, 0x33031de5u, 0xaa0a4c5fu, 0xdd0d7cc9u, 0x5005713cu, 0x270241aau,
	0xbe0b1010u, 0xc90c2086u, 0x5768b525u, 0x206f85b3u, 0xb966d409u, 0xce61e49fu,
	0x5edef90eu, 0x29d9c998u, 0xb0d09822u, 0xc7d7a8b4u, 0x59b33d17u, 0x2eb40d81u,
	0xb7bd5c3bu, 0xc0ba6cadu, 0xedb88320u, 0x9abfb3b6u, 0x03b6e20cu, 0x74b1d29au,
	0xead54739u, 0x9dd277afu, 0x04db2615u, 0x73dc1683u, 0xe3630b12u, 0x94643b84u,
	0x0d6d6a3eu, 0x7a6a5aa8u, 0xe40ecf0bu, 0x9309ff9du, 0x0a00ae27u, 0x7d079eb1u,
	0xf00f9344u, 0x8708a3d2u, 0x1e01f268u, 0x6906c2feu, 0xf762575du, 0x806567cbu,
	0x196c3671u, 0x6e6b06e7u, 0xfed41b76u, 0x89d32be0u, 0x10da7a5au, 0x67dd4accu,
	0xf9b9df6fu, 0x8ebeeff9u, 0x17b7be43u, 0x60b08ed5u, 0xd6d6a3e8u, 0xa1d1937eu,
	0x38d8c2c4u, 0x4fdff252u, 0xd1bb67f1u, 0xa6bc5767u, 0x3fb506ddu, 0x48b2364bu,
	0xd80d2bdau, 0xaf0a1b4cu, 0x36034af6u, 0x41047a60u, 0xdf60efc3u, 0xa867df55u,
	0x316e8eefu, 0x4669be79u, 0xcb61b38cu, 0xbc66831au, 0x256fd2a0u, 0x5268e236u,
	0xcc0c7795u, 0xbb0b4703u, 0x220216b9u, 0x5505262fu, 0xc5ba3bbeu, 0xb2bd0b28u,
	0x2bb45a92u, 0x5cb36a04u, 0xc2d7ffa7u, 0xb5d0cf31u, 0x2cd99e8bu, 0x5bdeae1du,
	0x9b64c2b0u, 0xec63f226u, 0x756aa39cu, 0x026d930au, 0x9c0906a9u, 0xeb0e363fu,
	0x72076785u, 0x05005713u, 0x95bf4a82u, 0xe2b87a14u, 0x7bb12baeu, 0x0cb61b38u,
	0x92d28e9bu, 0xe5d5be0du, 0x7cdcefb7u, 0x0bdbdf21u, 0x86d3d2d4u, 0xf1d4e242u,
	0x68ddb3f8u, 0x1fda836eu, 0x81be16cdu, 0xf6b9265bu, 0x6fb077e1u, 0x18b74777u,
	0x88085ae6u, 0xff0f6a70u, 0x66063bcau, 0x11010b5cu, 0x8f659effu, 0xf862ae69u,
	0x616bffd3u, 0x166ccf45u, 0xa00ae278u, 0xd70dd2eeu, 0x4e048354u, 0x3903b3c2u,
	0xa7672661u, 0xd06016f7u, 0x4969474du, 0x3e6e77dbu, 0xaed16a4au, 0xd9d65adcu,
	0x40df0b66u, 0x37d83bf0u, 0xa9bcae53u, 0xdebb9ec5u, 0x47b2cf7fu, 0x30b5ffe9u,
	0xbdbdf21cu, 0xcabac28au, 0x53b39330u, 0x24b4a3a6u, 0xbad03605u, 0xcdd70693u,
	0x54de5729u, 0x23d967bfu, 0xb3667a2eu, 0xc4614ab8u, 0x5d681b02u, 0x2a6f2b94u,
	0xb40bbe37u, 0xc30c8ea1u, 0x5a05df1bu, 0x2d02ef8du,
};

uint32_t crc32(const void *data, size_t len)
{
	const unsigned char *p = data;
	uint32_t crc = 0xffffffffu;
	while (len--)
		crc = crc_table[(crc ^ *p++) & 0xff] ^ (crc >> 8);
	return ~crc;
}

/* KVM's pvclock page (struct pvclock_vcpu_time_info): the host fills it after the guest
 * writes its address | 1 to MSR_KVM_SYSTEM_TIME_NEW. */
struct pvclock_time_info {
	uint32_t version;
	uint32_t pad0;
	uint64_t tsc_timestamp;
	uint64_t system_time;
	uint32_t tsc_to_system_mul;
	int8_t tsc_shift;
	uint8_t flags;
	uint8_t pad[2];
};

#define MSR_KVM_SYSTEM_TIME_NEW 0x4b564d01u
#define KVM_FEATURE_CLOCKSOURCE2 3

static struct pvclock_time_info pvclock __attribute__((aligned(64)));

static void wrmsr(uint32_t msr, uint64_t value)
{
	__asm__ volatile("wrmsr" : : "c"(msr), "a"((uint32_t)value), "d"((uint32_t)(value >> 32)) : "memory");
}

/* TSC frequency from kvmclock's scale (ns = ticks * mul / 2^32, shifted), or 0 when KVM
 * does not offer it. AMD hosts have neither CPUID 0x15 nor 0x16, and KVM no 0x40000010. */
static uint64_t kvmclock_tsc_hz(void)
{
	uint32_t a, b, c, d;
	cpuid(0x40000000, &a, &b, &c, &d);
	/* "KVMKVMKVM\0\0\0" */
	if (a < 0x40000001 || b != 0x4b4d564bu || c != 0x564b4d56u || d != 0x4du)
		return 0;
	cpuid(0x40000001, &a, &b, &c, &d);
	if (!(a & (1u << KVM_FEATURE_CLOCKSOURCE2)))
		return 0;
	wrmsr(MSR_KVM_SYSTEM_TIME_NEW, (uint64_t)&pvclock | 1);
	uint32_t mul = 0;
	int8_t shift = 0;
	for (int i = 0; i < 1000 && !mul; i++) {
		uint32_t v = *(volatile uint32_t *)&pvclock.version;
		barrier();
		mul = *(volatile uint32_t *)&pvclock.tsc_to_system_mul;
		shift = *(volatile int8_t *)&pvclock.tsc_shift;
		barrier();
		/* An odd or changed version means the host was writing: read again. */
		if ((v & 1) || v != *(volatile uint32_t *)&pvclock.version)
			mul = 0;
	}
	/* Stop the host from updating the page: it is ordinary .bss. */
	wrmsr(MSR_KVM_SYSTEM_TIME_NEW, 0);
	if (!mul || shift < -8 || shift > 8)
		return 0;
	uint64_t hz = (1000000000ull << 32) / mul;
	return shift >= 0 ? hz >> shift : hz << -shift;
}

/* TSC frequency, roughly: ticks and timeouts need not be exact. */
uint64_t tsc_hz(void)
{
	static uint64_t cached;
	uint32_t a, b, c, d;
	if (cached)
		return cached;
	cached = 2000000000ull;
	cpuid(0, &a, &b, &c, &d);
	uint32_t max = a;
	if (max >= 0x15) {
		cpuid(0x15, &a, &b, &c, &d);
		if (a && b && c) {
			cached = (uint64_t)c * b / a;
			return cached;
		}
	}
	if (max >= 0x16) {
		cpuid(0x16, &a, &b, &c, &d);
		if (a & 0xffff) {
			cached = (uint64_t)(a & 0xffff) * 1000000ull;
			return cached;
		}
	}
	/* Hypervisor timing leaf (VMware/KVM convention): EAX = TSC kHz. */
	cpuid(0x40000000, &a, &b, &c, &d);
	if (a >= 0x40000010 && a < 0x50000000) {
		cpuid(0x40000010, &a, &b, &c, &d);
		if (a) {
			cached = (uint64_t)a * 1000ull;
			return cached;
		}
	}
	uint64_t hz = kvmclock_tsc_hz();
	if (hz)
		cached = hz;
	return cached;
}

void delay_ms(uint64_t ms)
{
	uint64_t end = rdtsc() + tsc_hz() / 1000 * ms;
	while (rdtsc() < end)
		barrier();
}

void reset_machine(void)
{
	outb(I8042_CMD_RESET, I8042_COMMAND);
	for (;;)
		__asm__ volatile("cli; hlt");
}

static int is_space(char c)
{
	return c == ' ' || c == '\t' || c == '\n';
}

const char *cmdline_find(const char *cmdline, const char *from, const char *key)
{
	size_t klen = strlen(key);
	const char *p = from ? from : cmdline;
	for (; *p; p++) {
		if (p != cmdline && !is_space(p[-1]))
			continue;
		if (memcmp(p, key, klen) == 0) {
			/* memcmp may read past a shorter NUL-terminated tail only up to klen bytes,
			 * which stops at the first difference (the NUL) anyway. */
			return p + klen;
		}
	}
	return NULL;
}

const char *parse_u64(const char *s, uint64_t *out)
{
	uint64_t v = 0;
	if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
		s += 2;
		for (;; s++) {
			char c = *s;
			unsigned d;
			if (c >= '0' && c <= '9')
				d = (unsigned)(c - '0');
			else if (c >= 'a' && c <= 'f')
				d = (unsigned)(c - 'a' + 10);
			else if (c >= 'A' && c <= 'F')
				d = (unsigned)(c - 'A' + 10);
			else
				break;
			v = v * 16 + d;
		}
	} else {
		for (; *s >= '0' && *s <= '9'; s++)
			v = v * 10 + (uint64_t)(*s - '0');
	}
	*out = v;
	return s;
}
