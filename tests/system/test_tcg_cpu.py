"""The tcg accelerator with tiny hand-assembled guests (needs binutils: as, ld, objcopy, nm).

Each guest reports values through port 0xE0 and finishes by writing port 0xE4.
"""

from __future__ import annotations

import resource
import threading
import time

from pyvmm.devices.fw_cfg import FwCfg
from pyvmm.runstate import RequestKind
from pyvmm.x86 import layout
from support.tcg_guestlib import (
    CODE_ADDR,
    IDT_ADDR,
    PDPT_ADDR,
    Harness,
    assemble,
)

# Assembly snippets for the guests that enter ring 3 with sysretq (Linux's GDT layout).
SET_STAR = """
        mov $0xc0000081, %ecx        # STAR: kernel CS 0x10, user base 0x23
        xor %eax, %eax
        mov $0x00230010, %edx
        wrmsr
"""
SET_LSTAR = """
        mov $0xc0000082, %ecx        # LSTAR = syscall_entry
        lea syscall_entry(%rip), %rax
        mov %rax, %rdx
        shr $32, %rdx
        wrmsr
"""


def _guest(src: str, setup=None, state: str = "long", timeout: float = 10.0) -> tuple[Harness, list[int]]:
    h = Harness()
    code, syms = assemble(src, CODE_ADDR)
    h.load(code)
    st = h.long_mode_state() if state == "long" else h.protected_mode_state()
    if setup is not None:
        setup(h, syms, st)
    return h, h.run(st, timeout=timeout)


def _map_apic_window(h: Harness) -> None:
    """Map 3-4 GiB (LAPIC/IOAPIC) uncached in the test page tables."""
    m = h.memory
    m.write_u64(PDPT_ADDR + 24, 0x5000 | 3)
    for i in range(512):
        m.write_u64(0x5000 + 8 * i, (0xC0000000 + (i << 21)) | 0x83 | 0x18)


def test_exceptions_through_the_idt_in_long_mode() -> None:
    src = r"""
    .code64
        mov $0x11, %eax
        out %eax, $0xe0
        ud2
        mov $0x12, %eax
        out %eax, $0xe0
        lea after_pf(%rip), %r15    # where the #PF handler resumes
        movabs $0x80000000, %rbx
        movq (%rbx), %rax           # #PF: only the first GiB is mapped
    after_pf:
        mov $0x13, %eax
        out %eax, $0xe0
        int $0x80
        mov $0x14, %eax
        out %eax, $0xe0
        ud2                         # a second #UD: the first must not count as 'in flight'
        lea after_pf2(%rip), %r15
        movabs $0x80001000, %rbx
        movl $1, (%rbx)             # a second #PF (write): must not become #DF
    after_pf2:
        out %eax, $0xe4
    1:  hlt
        jmp 1b
    ud_handler:
        mov $0x60, %eax
        out %eax, $0xe0
        addq $2, (%rsp)
        iretq
    pf_handler:
        mov $0x6e, %eax
        out %eax, $0xe0
        pop %rax                    # error code
        out %eax, $0xe0
        mov %cr2, %rax
        out %eax, $0xe0
        mov %r15, (%rsp)
        iretq
    int80_handler:
        mov $0x80, %eax
        out %eax, $0xe0
        iretq
    """

    def setup(h, syms, st):
        h.set_idt64(6, syms["ud_handler"])
        h.set_idt64(14, syms["pf_handler"])
        h.set_idt64(0x80, syms["int80_handler"])
        h.set_idt64(8, syms["int80_handler"] + 0x1000)   # a #DF would land in unmapped junk

    h, vals = _guest(src, setup)
    assert vals == [0x11, 0x60, 0x12, 0x6E, 0x0, 0x80000000, 0x13, 0x80, 0x14, 0x60,
                    0x6E, 0x2, 0x80001000]           # write to a not-present page: error code 2
    assert h.accel.stats()["exceptions"] == 5


def test_syscall_sysret_ring3_and_interrupt_stack_switch() -> None:
    src = r"""
    .code64
""" + SET_STAR + SET_LSTAR + r"""
        mov $0xc0000084, %ecx        # FMASK: clear IF
        mov $0x200, %eax
        xor %edx, %edx
        wrmsr
        lea user_code(%rip), %rcx
        mov $0x202, %r11
        movabs $0x70000, %rsp
        sysretq
    syscall_entry:
        mov %cs, %ax
        out %eax, $0xe0
        mov %edi, %eax
        out %eax, $0xe0
        pushf
        pop %rax
        out %eax, $0xe0
        mov %r11, %rax
        out %eax, $0xe0
        sysretq
    user_code:
        mov %cs, %ax
        mov %eax, %edi
        syscall
        int $0x81
        hlt                          # privileged: #GP at CPL 3
    int81_handler:
        mov %rsp, %rax
        shr $12, %rax
        out %eax, $0xe0
        mov 8(%rsp), %rax
        out %eax, $0xe0
        iretq
    gp_handler:
        mov (%rsp), %rax
        out %eax, $0xe0
        mov 16(%rsp), %rax
        out %eax, $0xe0
        out %eax, $0xe4
    1:  hlt
        jmp 1b
    """

    def setup(h, syms, st):
        h.set_idt64(0x81, syms["int81_handler"], dpl=3)
        h.set_idt64(13, syms["gp_handler"])

    h, vals = _guest(src, setup)
    # syscall: kernel CS, the user CS passed in rdi, IF cleared by FMASK, user RFLAGS in r11
    assert vals[:4] == [0x10, 0x33, 0x2, 0x202]
    # int 0x81 from ring 3 runs on TSS.RSP0 (0xa0000) and sees user CS 0x33
    assert vals[4:6] == [0x9F, 0x33]
    # hlt at CPL 3: #GP(0) from CS 0x33
    assert vals[6:] == [0x0, 0x33]
    assert h.accel.stats()["syscalls"] == 1


def test_real_mode_interrupts_use_the_ivt() -> None:
    src = r"""
    .code16
        mov $0x11, %ax
        out %ax, $0xe0
        int $0x10
        ud2
        mov $0x13, %ax
        out %ax, $0xe0
        out %ax, $0xe4
    1:  hlt
        jmp 1b
    h10:
        mov $0x10, %ax
        out %ax, $0xe0
        iret
    h6:
        mov $0x6, %ax
        out %ax, $0xe0
        push %bp
        mov %sp, %bp
        addw $2, 2(%bp)
        pop %bp
        iret
    """
    h = Harness()
    code, syms = assemble(src, 0x8000)
    h.load(code, 0x8000)
    h.set_ivt(0x10, 0x800, syms["h10"] - 0x8000)
    h.set_ivt(6, 0x800, syms["h6"] - 0x8000)
    assert h.run(h.real_mode_state(0x800, 0)) == [0x11, 0x10, 0x6, 0x13]


def test_protected_mode_interrupts_use_the_idt() -> None:
    src = r"""
    .code32
        mov $0x21, %eax
        out %eax, $0xe0
        int $0x30
        ud2
        mov $0x22, %eax
        out %eax, $0xe0
        out %eax, $0xe4
    1:  hlt
        jmp 1b
    h30:
        mov $0x30, %eax
        out %eax, $0xe0
        iret
    h6:
        mov $0x6, %eax
        out %eax, $0xe0
        addl $2, (%esp)
        iret
    """

    def setup(h, syms, st):
        h.set_idt32(0x30, syms["h30"])
        h.set_idt32(6, syms["h6"])

    _, vals = _guest(src, setup, state="protected")
    assert vals == [0x21, 0x30, 0x6, 0x22]


def test_triple_fault_requests_a_reset() -> None:
    src = r"""
    .code64
        mov $0x31, %eax
        out %eax, $0xe0
        ud2
    """
    h = Harness()
    code, _ = assemble(src, CODE_ADDR)
    h.load(code)
    st = h.long_mode_state()
    st.idt = (IDT_ADDR, 0)          # empty IDT: #UD -> #GP -> #DF -> shutdown
    req = h.run_until_request(st, timeout=10)
    assert req is not None and req.kind is RequestKind.RESET and "triple fault" in req.reason
    assert h.rec.values == [0x31]


def test_timers_wake_hlt_through_lapic_ioapic_and_pic() -> None:
    src = r"""
    .code64
        movabs $0xfee00000, %rbx
        movl $0x1ff, 0xf0(%rbx)        # SVR: enable
        movl $0xb, 0x3e0(%rbx)         # divide by 1
        movl $0x40, 0x320(%rbx)        # LVT timer: one-shot, vector 0x40
        rdtsc
        mov %eax, %r12d
        mov %edx, %r13d
        movl $5000000, 0x380(%rbx)     # 200 ms at 25 MHz
        sti
    2:  hlt
        cmpl $0, count(%rip)
        je 2b
        rdtsc
        shl $32, %rdx
        or %rdx, %rax
        shl $32, %r13
        or %r13, %r12
        sub %r12, %rax
        mov $2000000, %ecx             # TSC ticks per ms (2 GHz)
        xor %edx, %edx
        div %rcx
        out %eax, $0xe0                # elapsed ms by the TSC
        cli
        movabs $0xfec00000, %rsi       # IOAPIC pin 2 (the PIT) -> vector 0x41
        movl $0x14, (%rsi)
        movl $0x41, 0x10(%rsi)
        movl $0x15, (%rsi)
        movl $0, 0x10(%rsi)
        mov $0x34, %al                 # PIT ch0 mode 2, 1 ms
        out %al, $0x43
        mov $0xa9, %al
        out %al, $0x40
        mov $0x04, %al
        out %al, $0x40
        sti
    3:  hlt
        cmpl $5, pitcount(%rip)
        jb 3b
        cli
        movl $0x14, (%rsi)
        movl $0x10041, 0x10(%rsi)      # mask pin 2 again
        mov $0x11, %al                 # 8259: ICW1..4, vectors 0x20.., only IRQ0 unmasked
        out %al, $0x20
        mov $0x20, %al
        out %al, $0x21
        mov $0x04, %al
        out %al, $0x21
        mov $0x01, %al
        out %al, $0x21
        mov $0xfe, %al
        out %al, $0x21
        sti
    4:  hlt
        cmpl $3, piccount(%rip)
        jb 4b
        cli
        mov pitcount(%rip), %eax
        out %eax, $0xe0
        mov piccount(%rip), %eax
        out %eax, $0xe0
        out %eax, $0xe4
    5:  hlt
        jmp 5b
    timer_handler:
        movl $1, count(%rip)
        movl $0, 0xb0(%rbx)            # LAPIC EOI
        iretq
    pit_handler:
        incl pitcount(%rip)
        push %rax
        movabs $0xfee00000, %rax
        movl $0, 0xb0(%rax)
        pop %rax
        iretq
    pic_handler:
        incl piccount(%rip)
        push %rax
        mov $0x20, %al                 # 8259 non-specific EOI
        out %al, $0x20
        pop %rax
        iretq
    .align 8
    count: .long 0
    pitcount: .long 0
    piccount: .long 0
    """

    def setup(h, syms, st):
        _map_apic_window(h)
        h.set_idt64(0x40, syms["timer_handler"])
        h.set_idt64(0x41, syms["pit_handler"])
        h.set_idt64(0x20, syms["pic_handler"])

    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.monotonic()
    h, vals = _guest(src, setup)
    wall = time.monotonic() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    elapsed_ms, pit, pic = vals
    assert 195 <= elapsed_ms <= 400, elapsed_ms          # the guest's TSC agrees with host time
    assert pit >= 5 and pic >= 3
    assert wall >= 0.2
    # hlt idles: 200 ms of waiting must not burn 200 ms of CPU
    busy = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
    assert busy < wall - 0.1, (busy, wall)
    assert h.accel.stats()["irqs"] >= 9


def test_pause_resume_and_stop_with_the_stop_flag() -> None:
    src = r"""
    .code64
    1:  incq counter(%rip)
        jmp 1b
    .align 8
    counter: .quad 0
    """
    h = Harness()
    code, syms = assemble(src, CODE_ADDR)
    h.load(code)
    st = h.long_mode_state()
    h.accel.set_boot_state(st, start_aps=False)
    h.accel.start()
    try:
        time.sleep(0.2)
        h.accel.pause()
        c1 = h.memory.read_u64(syms["counter"])
        time.sleep(0.1)
        c2 = h.memory.read_u64(syms["counter"])
        assert c1 > 1000 and c1 == c2, (c1, c2)        # paused: the counter does not move
        assert "RIP=" in h.accel.cpu_dump()
        h.accel.resume()
        time.sleep(0.1)
        assert h.memory.read_u64(syms["counter"]) > c2
    finally:
        t0 = time.monotonic()
        h.accel.stop()
        assert time.monotonic() - t0 < 2.0
    # the read-modify-write instruction was never replayed: stops happen at block boundaries
    assert h.accel.stats()["kick"] >= 2


def test_cpuid_msrs_and_tsc_frequency() -> None:
    src = r"""
    .code64
        mov $1, %eax
        cpuid
        mov %ecx, %eax
        out %eax, $0xe0              # leaf 1 ECX
        mov %edx, %eax
        out %eax, $0xe0              # leaf 1 EDX
        mov $0x15, %eax
        cpuid
        out %eax, $0xe0
        mov %ebx, %eax
        out %eax, $0xe0
        mov %ecx, %eax
        out %eax, $0xe0
        mov $0x1b, %ecx              # APIC_BASE
        rdmsr
        out %eax, $0xe0
        mov $0x10a, %ecx             # ARCH_CAPABILITIES
        rdmsr
        out %eax, $0xe0
        mov $0x10, %ecx              # TSC write then read back
        xor %eax, %eax
        mov $1, %edx
        wrmsr
        rdtsc
        mov %edx, %eax
        out %eax, $0xe0
        out %eax, $0xe4
    1:  hlt
        jmp 1b
    """
    _, vals = _guest(src)
    ecx1, edx1, a15, b15, c15, apic_base, arch_caps, tsc_hi = vals
    for bit, name in ((26, "xsave"), (27, "osxsave"), (28, "avx"), (21, "x2apic"), (3, "monitor")):
        assert not ecx1 & (1 << bit), name
    assert ecx1 & (1 << 31)                   # hypervisor
    assert ecx1 & (1 << 24)                   # TSC-deadline timer
    assert edx1 & (1 << 9) and edx1 & (1 << 4)  # APIC, TSC
    assert a15 == 1 and c15 == 25_000_000 and c15 * b15 == 2_000_000_000
    assert apic_base == 0xFEE00900            # enabled, BSP
    assert arch_caps & 1                      # RDCL_NO: no PTI needed
    assert tsc_hi == 1


def test_pending_interrupt_waits_for_sti_shadow_and_if() -> None:
    """A self-IPI raised with IF=0 is taken right after sti's one-instruction shadow."""
    src = r"""
    .code64
        movabs $0xfee00000, %rbx
        movl $0x1ff, 0xf0(%rbx)
        movl $0x00040050, 0x300(%rbx)  # ICR: self, fixed, vector 0x50
        mov $1, %eax
        out %eax, $0xe0
        sti
        mov $2, %eax                   # the sti shadow: runs before the interrupt is taken
        out %eax, $0xe0                # ... and the interrupt comes before this one
        mov $3, %eax
        out %eax, $0xe0
        out %eax, $0xe4
    1:  hlt
        jmp 1b
    h50:
        push %rax
        mov $0x50, %eax
        out %eax, $0xe0
        movl $0, 0xb0(%rbx)
        pop %rax
        iretq
    """

    def setup(h, syms, st):
        _map_apic_window(h)
        h.set_idt64(0x50, syms["h50"])

    _, vals = _guest(src, setup)
    assert vals == [1, 0x50, 2, 3]


def test_threads_end_cleanly() -> None:
    before = {t.name for t in threading.enumerate()}
    h = Harness()
    code, _ = assemble(".code64\n out %eax, $0xe4\n1: hlt\n jmp 1b\n", CODE_ADDR)
    h.load(code)
    h.run(h.long_mode_state())
    after = {t.name for t in threading.enumerate()}
    assert not {n for n in after - before if n.startswith(("tcg-vcpu", "irqchip"))}


def test_reset_after_triple_fault_runs_fresh_code() -> None:
    """accel.reset() returns to power-on state: new code loaded at the same address runs (no stale TBs)."""
    h = Harness()
    code, _ = assemble(".code64\n mov $0x41, %eax\n out %eax, $0xe0\n ud2\n", CODE_ADDR)
    h.load(code)
    st = h.long_mode_state()
    st.idt = (IDT_ADDR, 0)
    req = h.run_until_request(st, timeout=10)
    assert req is not None and req.kind is RequestKind.RESET
    h.accel.reset()
    h.rec.values.clear()
    code2, _ = assemble(".code64\n mov $0x42, %eax\n out %eax, $0xe0\n out %eax, $0xe4\n1: hlt\n jmp 1b\n",
                        CODE_ADDR)
    h.load(code2)
    assert h.run(h.long_mode_state()) == [0x42]


def test_unassigned_physical_memory_reads_all_ones() -> None:
    src = r"""
    .code64
        movabs $0xd0000000, %rbx       # in the PCI hole, nothing there
        movl (%rbx), %eax
        out %eax, $0xe0
        out %eax, $0xe4
    1:  hlt
        jmp 1b
    """
    _, vals = _guest(src, lambda h, syms, st: _map_apic_window(h))
    assert vals == [0xFFFFFFFF]


def _code_rewrite_run(invalidate: bool, flood: bool = False) -> list[int]:
    src = r"""
    .code64
        call *%rbx
        out %eax, $0xe4
    1:  cmpl $0, flag(%rip)
        je 1b
        call *%rbx
        out %eax, $0xe0
        out %eax, $0xe4
    2:  hlt
        jmp 2b
    .align 8
    flag: .long 0
    """
    func = 0x20000
    h = Harness()
    code, syms = assemble(src, CODE_ADDR)
    h.load(code)
    h.load(assemble(".code64\n mov $1, %eax\n out %eax, $0xe0\n ret\n", func)[0], func)
    st = h.long_mode_state()
    st.regs["rbx"] = func
    h.accel.set_boot_state(st, start_aps=False)
    h.accel.start()
    try:
        assert h.rec.done.wait(10)
        h.rec.done.clear()
        # a "device" rewrites the function behind the CPU's back
        h.load(assemble(".code64\n mov $2, %eax\n out %eax, $0xe0\n ret\n", func)[0], func)
        if flood:
            # while the CPU is paused (it cannot drain the queue), more separate ranges than the
            # queue holds: it must flush all its translations before it runs again
            h.accel.pause()
            for i in range(3000):
                h.accel.invalidate_code(0x400000 + i * 8192, 16)
        if invalidate:
            h.accel.invalidate_code(func, 16)
        if flood:
            h.accel.resume()
        h.memory.write_u32(syms["flag"], 1)
        assert h.rec.done.wait(10)
    finally:
        h.accel.stop()
    return h.rec.values


def test_host_writes_to_translated_code_are_invalidated() -> None:
    assert _code_rewrite_run(invalidate=True) == [1, 2, 2]
    assert _code_rewrite_run(invalidate=True, flood=True) == [1, 2, 2]
    # without the notification unicorn keeps running its stale translation (why the API exists)
    assert _code_rewrite_run(invalidate=False) == [1, 1, 1]


def _fw_cfg_dma_rewrite_run(hook: bool) -> list[int]:
    """The guest runs a function, reloads it with fw_cfg DMA (inside its own port write: the
    vCPU thread does the DMA) and runs it again."""
    src = r"""
    .code64
        call *%rbx
        movl $0x0a002000, desc(%rip)     # control 0x0020000a (big-endian): select key 0x20, read
        movl $0x10000000, desc+4(%rip)   # length 16
        movl $0, desc+8(%rip)            # address 0x20000 (big-endian)
        movl $0x00000200, desc+12(%rip)
        xor %eax, %eax
        mov $0x514, %dx
        out %eax, %dx
        lea desc(%rip), %eax
        bswap %eax
        mov $0x518, %dx
        out %eax, %dx                    # the DMA happens here
        call *%rbx
        out %eax, $0xe4
    1:  hlt
        jmp 1b
    .align 16
    desc: .fill 16, 1, 0
    """
    func = 0x20000
    h = Harness()
    fw = FwCfg(memory=h.memory)
    h.io_bus.register(layout.FW_CFG_PORT, fw.io_size, fw, "fw_cfg")
    new_code = assemble(".code64\n mov $2, %eax\n out %eax, $0xe0\n ret\n", func)[0].ljust(16, b"\x90")
    assert fw.add_file("opt/new-code", new_code) == 0x20         # the key the guest selects
    if hook:
        fw.dma_hook = h.accel.invalidate_code
    code, _ = assemble(src, CODE_ADDR)
    h.load(code)
    h.load(assemble(".code64\n mov $1, %eax\n out %eax, $0xe0\n ret\n", func)[0], func)
    st = h.long_mode_state()
    st.regs["rbx"] = func
    return h.run(st)


def test_dma_by_the_vcpu_thread_itself_invalidates_translated_code() -> None:
    assert _fw_cfg_dma_rewrite_run(hook=True) == [1, 2]
    assert _fw_cfg_dma_rewrite_run(hook=False) == [1, 1]     # the stale translation, without the hook


def test_lapic_tsc_deadline_timer() -> None:
    src = r"""
    .code64
        movabs $0xfee00000, %rbx
        movl $0x1ff, 0xf0(%rbx)
        movl $0x40040, 0x320(%rbx)     # LVT timer: TSC-deadline mode, vector 0x40
        rdtsc
        shl $32, %rdx
        or %rdx, %rax
        mov %rax, %r12
        add $200000000, %rax           # +100 ms at 2 GHz
        mov %rax, %rdx
        shr $32, %rdx
        mov $0x6e0, %ecx
        wrmsr
        rdmsr                          # armed: reads back the deadline
        shl $32, %rdx
        or %rdx, %rax
        sub %r12, %rax
        shr $20, %rax
        out %eax, $0xe0
        sti
    2:  hlt
        cmpl $0, count(%rip)
        je 2b
        rdtsc
        shl $32, %rdx
        or %rdx, %rax
        sub %r12, %rax
        mov $2000000, %ecx
        xor %edx, %edx
        div %rcx
        out %eax, $0xe0                # elapsed ms
        mov $0x6e0, %ecx
        rdmsr                          # fired: reads 0
        or %edx, %eax
        out %eax, $0xe0
        out %eax, $0xe4
    1:  hlt
        jmp 1b
    timer_handler:
        movl $1, count(%rip)
        movl $0, 0xb0(%rbx)
        iretq
    .align 8
    count: .long 0
    """

    def setup(h, syms, st):
        _map_apic_window(h)
        h.set_idt64(0x40, syms["timer_handler"])

    _, vals = _guest(src, setup)
    armed, elapsed_ms, after = vals
    assert armed == 200000000 >> 20
    assert 98 <= elapsed_ms <= 300, elapsed_ms
    assert after == 0


def test_guest_stores_to_a_code_page_through_an_executable_mapping() -> None:
    """Self-modifying code after an unrelated store to the same page (the store fast path's invariant).

    The first store to the page makes its TLB entry 'dirty' (fast); that is only safe if no
    translation of the page survives it, otherwise the second store would go unnoticed.
    """
    src = r"""
    .code64
        movabs $0x30000, %rbx
        call *%rbx                    # translate and run func: 1
        out %eax, $0xe0
        movb $0, 0x800(%rbx)          # store elsewhere on func's page
        movb $2, 1(%rbx)              # patch func's immediate: mov $2, %eax
        call *%rbx
        out %eax, $0xe0
        out %eax, $0xe4
    1:  hlt
        jmp 1b
    """

    def setup(h, syms, st):
        h.load(bytes.fromhex("b801000000c3"), 0x30000)          # func: mov $1, %eax; ret

    _, vals = _guest(src, setup)
    assert vals == [1, 2]


def test_self_nmi_ipi_is_delivered_even_with_interrupts_disabled() -> None:
    src = r"""
    .code64
        movabs $0xfee00000, %rbx
        movl $0x1ff, 0xf0(%rbx)
        cli
        movl $0x00040400, 0x300(%rbx)  # ICR: self, delivery mode NMI
        mov $1, %eax
        out %eax, $0xe0
        out %eax, $0xe4
    1:  hlt
        jmp 1b
    nmi_handler:
        push %rax
        mov $2, %eax
        out %eax, $0xe0
        pop %rax
        iretq
    """

    def setup(h, syms, st):
        _map_apic_window(h)
        h.set_idt64(2, syms["nmi_handler"])

    h, vals = _guest(src, setup)
    # (an IPI is asynchronous: it lands at the next block boundary, here after the first OUT)
    assert sorted(vals) == [1, 2]
    assert h.accel.irqchip.counters["nmi"] == 1


def _run_while_kicked(src: str) -> tuple[Harness, list[int]]:
    """Run a 64-bit guest while another thread kicks its CPU every ~100 us.

    The kicks alternate between the two kinds other threads send: a DMA code
    invalidation (served between two blocks) and a pause-style kick that leaves
    emu_start (the run loop then enters it again).
    """
    h = Harness()
    code, _ = assemble(src, CODE_ADDR)
    h.load(code)
    st = h.long_mode_state()
    stop = threading.Event()

    def kicker() -> None:
        n = 0
        while not stop.is_set():
            if n % 2:
                h.accel.vcpus[0].kick()
            else:
                h.accel.invalidate_code(0x300000, 4096)    # no code there: only the kick matters
            n += 1
            time.sleep(0.0001)

    t = threading.Thread(target=kicker, daemon=True)
    t.start()
    try:
        vals = h.run(st, timeout=60)
    finally:
        stop.set()
        t.join()
    return h, vals


def test_ring3_tsc_reads_stay_virtual_while_the_cpu_is_kicked() -> None:
    """rdtsc/rdtscp in ring 3 (the vDSO clock) must never see the host's raw TSC.

    unicorn's rdtsc helpers stop walking the instruction hooks as soon as a stop was
    requested, and then return the host TSC; a pause-style kick requests one (from the
    vCPU thread now, between two blocks).  Regression test for a guest CLOCK_MONOTONIC jump to the host's uptime.
    """
    reads = "\n".join(
        f"""
        {'rdtscp' if i % 2 else 'rdtsc'}
        shl $32, %rdx
        or %rax, %rdx
        mov %rdx, %r{8 + i}"""
        for i in range(8))
    checks = "\n".join(
        f"""
        cmp %rbx, %r{8 + i}
        jb bad{i}
        mov %r{8 + i}, %rax
        sub %rbx, %rax
        cmp %rsi, %rax
        ja bad{i}
        mov %r{8 + i}, %rbx"""
        for i in range(8))

    bads = "\n".join(f"bad{i}: mov %r{8 + i}, %rcx\n jmp report" for i in range(8))
    src = rf"""
    .code64
    {SET_STAR}
        lea user_code(%rip), %rcx
        mov $0x3202, %r11            # IF, IOPL 3 (the user code reports through ports)
        movabs $0x70000, %rsp
        sysretq
    user_code:
        rdtsc
        shl $32, %rdx
        or %rax, %rdx
        mov %rdx, %rbx               # previous value
        movabs $0x800000000, %rsi    # bound on one step: ~17 s at 2 GHz
        mov $150000, %edi
    loop:
        {reads}
        {checks}
        dec %edi
        jnz loop
        xor %eax, %eax
        out %eax, $0xe0
        out %eax, $0xe4
    1:  jmp 1b
    {bads}
    report:
        mov $1, %eax
        out %eax, $0xe0
        mov %rbx, %rax
        out %eax, $0xe0
        shr $32, %rax
        out %eax, $0xe0
        mov %rcx, %rax
        out %eax, $0xe0
        shr $32, %rax
        out %eax, $0xe0
        out %eax, $0xe4
    2:  jmp 2b
    """
    h, vals = _run_while_kicked(src)
    if vals[0] != 0:
        prev, bad = vals[1] | vals[2] << 32, vals[3] | vals[4] << 32
        raise AssertionError(f"guest TSC went from {prev:#x} to {bad:#x}")
    assert vals == [0]


def test_syscalls_all_run_while_other_threads_kick_the_cpu() -> None:
    """Kicks from other threads (DMA code invalidation, pause) must not make the CPU skip a syscall.

    unicorn's syscall helper walks the instruction hooks and gives up as soon as a stop is
    requested; a stop requested from another thread in that window used to skip the syscall
    (EIP moved on, the handler never ran).  Regression test for wrong sha256 sums computed
    by a Linux guest while its virtio-blk device was doing DMA.
    """
    src = r"""
    .code64
""" + SET_STAR + SET_LSTAR + r"""
        xor %r12d, %r12d             # syscalls that reached the handler
        lea user_code(%rip), %rcx
        mov $0x3202, %r11            # IF, IOPL 3 (the user code reports through ports)
        movabs $0x70000, %rsp
        sysretq
    syscall_entry:
        inc %r12
        sysretq
    user_code:
        mov $400000, %edi
    loop:
        syscall
        dec %edi
        jnz loop
        mov %r12, %rax
        out %eax, $0xe0
        out %eax, $0xe4
    1:  jmp 1b
    """
    h, vals = _run_while_kicked(src)
    assert vals == [400000], f"{400000 - vals[0]} of 400000 syscalls were skipped"
    stats = h.accel.vcpus[0].stats
    assert stats["kicks_served"] > 0 and stats["kick"] > 0     # both kinds of kick happened


def test_linux_reboot_triple_lidt_zero_then_int3_triple_faults() -> None:
    """Linux's `reboot=triple`: lidt of a zero-length IDT at address 0, then int3."""
    src = r"""
    .code64
        mov $0x32, %eax
        out %eax, $0xe0
        cli
        lidt empty_idt(%rip)
        int3
        mov $0x33, %eax              # must never run
        out %eax, $0xe0
    1:  hlt
        jmp 1b
    .align 8
    empty_idt: .word 0
        .quad 0
    """
    h = Harness()
    code, _ = assemble(src, CODE_ADDR)
    h.load(code)
    req = h.run_until_request(h.long_mode_state(), timeout=10)
    assert req is not None and req.kind is RequestKind.RESET and "triple fault" in req.reason
    assert h.rec.values == [0x32]


def test_apic_base_global_disable_reaches_the_irqchip() -> None:
    """Clearing IA32_APIC_BASE.EN turns the LAPIC off (reset state, PIC wired straight to INTR)."""
    src = r"""
    .code64
        mov $0x1b, %ecx
        rdmsr
        and $~0x800, %eax            # global disable
        wrmsr
        out %eax, $0xe4
    1:  pause
        cmpl $0, flag(%rip)
        je 1b
        mov $0x1b, %ecx
        rdmsr
        or $0x800, %eax              # enable again
        wrmsr
        out %eax, $0xe4
    2:  hlt
        jmp 2b
    .align 8
    flag: .long 0
    """
    h = Harness()
    chip = h.accel.irqchip
    code, syms = assemble(src, CODE_ADDR)
    h.load(code)
    h.accel.set_boot_state(h.long_mode_state(), start_aps=False)
    chip.lapics[0].write_reg(0xF0, 0x1FF)              # software-enabled before the guest runs
    h.accel.start()
    try:
        assert h.rec.done.wait(10)
        h.rec.done.clear()
        assert chip.apic_global_enable[0] is False
        assert not chip.lapics[0].software_enabled       # back in its reset state
        h.memory.write_u32(syms["flag"], 1)
        assert h.rec.done.wait(10)
        assert chip.apic_global_enable[0] is True
    finally:
        h.accel.stop()
