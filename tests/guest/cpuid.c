/* Mode `cpuid`: what CPUID (and any MSR the command line names) the guest sees, so the
 * host can check a CPU template's effect from inside the guest. See README.md. */
#include "guest.h"

static const struct {
	uint32_t leaf, subleaf;
} leaves[] = {
	{0, 0}, {1, 0}, {7, 0}, {0xb, 0}, {0xb, 1}, {0xd, 0}, {0xd, 1}, {0x80000001, 0}, {0x80000008, 0},
};

void cpuid_report(const char *cmdline)
{
	for (size_t i = 0; i < sizeof(leaves) / sizeof(leaves[0]); i++) {
		uint32_t a, b, c, d;
		cpuid_count(leaves[i].leaf, leaves[i].subleaf, &a, &b, &c, &d);
		kprintf("cpuid: %x %x %08x %08x %08x %08x\n", leaves[i].leaf, leaves[i].subleaf, a, b,
			c, d);
	}
	const char *p = NULL;
	while ((p = cmdline_find(cmdline, p, "ember_rdmsr=")) != NULL) {
		uint64_t addr;
		parse_u64(p, &addr);
		kprintf("msr: %x %016lx\n", (uint32_t)addr, rdmsr((uint32_t)addr));
	}
	puts_serial("cpuid: end\n");
}
