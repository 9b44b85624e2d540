/* spin-init: an init that only spins, forever, without a single system call.
 *
 * On a PVM host guest user space cannot enter the kernel (syscall jumps to LSTAR
 * still at CPL3 and faults), so this is the only init that keeps a Linux guest
 * alive there.  The kernel keeps running underneath: timer interrupts, RCU,
 * sched_ext and the like still happen, which is all the freeze/write tests need.
 * `pause` keeps the loop polite to a hyperthread sibling on real hardware.
 */
__asm__(".text\n"
	".global _start\n"
	"_start:\n"
	"1:	pause\n"
	"	jmp 1b\n");
