/* Entry from the VMM, in 64-bit long mode as for a Linux vmlinux: RSI = boot_params,
 * boot page tables identity-map the low 4 GiB, interrupts off. */
	.section .text.entry, "ax"
	.code64
	.globl _start
_start:
	cli
	mov	%rsi, %r12		/* boot_params, kept across the .bss clear */
	/* Clear .bss: the ELF loader copies file contents only. Large buffers live in
	 * .noinit instead, so this is short (writes are costly on the PVM host). */
	mov	$__bss_start, %rdi
	mov	$__bss_end, %rcx
	sub	%rdi, %rcx
	shr	$3, %rcx
	xor	%eax, %eax
	cld
	rep stosq
	mov	$stack_top, %rsp	/* the VMM's stack at 0x8ff0 is tiny */
	xor	%ebp, %ebp
	mov	%r12, %rdi
	call	guest_main
1:	cli
	hlt
	jmp	1b

	.section .noinit, "aw", @nobits
	.balign 16
stack:
	.skip	16384
stack_top:

	.section .note.GNU-stack, "", @progbits
