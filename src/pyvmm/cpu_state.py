"""Accelerator-neutral x86 CPU state.

Boot loaders describe how the boot CPU must start (mode, registers,
descriptor tables) with these types; each accelerator translates them into
its own form (KVM_SET_REGS/SREGS, or unicorn register writes).
"""

from __future__ import annotations

from dataclasses import dataclass, field

# CR0 / CR4 / EFER bits used when describing entry states.
CR0_PE = 1 << 0
CR0_MP = 1 << 1
CR0_ET = 1 << 4
CR0_NE = 1 << 5
CR0_WP = 1 << 16
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
CR4_PGE = 1 << 7
CR4_OSFXSR = 1 << 9
CR4_OSXMMEXCPT = 1 << 10
EFER_SCE = 1 << 0
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
EFER_NXE = 1 << 11

GPR_NAMES = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
             "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")


@dataclass
class Segment:
    """A loaded segment register, in the unpacked form KVM's ``kvm_segment`` uses."""

    selector: int = 0
    base: int = 0
    limit: int = 0xFFFF
    type: int = 3  # data read/write, accessed
    present: int = 1
    dpl: int = 0
    db: int = 0
    s: int = 1
    l: int = 0
    g: int = 0
    avl: int = 0
    unusable: int = 0

    @classmethod
    def real_mode(cls, selector: int, code: bool = False) -> Segment:
        return cls(selector=selector, base=selector << 4, limit=0xFFFF, type=0xB if code else 0x3)

    @classmethod
    def flat32(cls, selector: int, code: bool) -> Segment:
        return cls(selector=selector, base=0, limit=0xFFFFFFFF, type=0xB if code else 0x3, db=1, g=1)

    @classmethod
    def flat64_code(cls, selector: int) -> Segment:
        return cls(selector=selector, base=0, limit=0xFFFFFFFF, type=0xB, l=1, g=1)

    @classmethod
    def tss(cls, selector: int, base: int = 0, limit: int = 0x67) -> Segment:
        return cls(selector=selector, base=base, limit=limit, type=0xB, s=0)

    @classmethod
    def ldt_null(cls) -> Segment:
        return cls(selector=0, base=0, limit=0xFFFF, type=2, s=0)

    def descriptor(self) -> int:
        """This segment packed as an 8-byte GDT descriptor (for writing a GDT into guest memory)."""
        limit = self.limit >> 12 if self.g else self.limit
        access = (self.type & 0xF) | (self.s << 4) | (self.dpl << 5) | (self.present << 7)
        flags = (self.avl) | (self.l << 1) | (self.db << 2) | (self.g << 3)
        return ((limit & 0xFFFF) | ((self.base & 0xFFFFFF) << 16) | (access << 40)
                | (((limit >> 16) & 0xF) << 48) | (flags << 52) | (((self.base >> 24) & 0xFF) << 56))


@dataclass
class CpuState:
    """Registers a vCPU starts with.  ``regs`` holds GPRs plus ``rip`` and ``rflags``."""

    regs: dict[str, int] = field(default_factory=dict)
    cs: Segment = field(default_factory=lambda: Segment.real_mode(0, code=True))
    ds: Segment = field(default_factory=lambda: Segment.real_mode(0))
    es: Segment = field(default_factory=lambda: Segment.real_mode(0))
    fs: Segment = field(default_factory=lambda: Segment.real_mode(0))
    gs: Segment = field(default_factory=lambda: Segment.real_mode(0))
    ss: Segment = field(default_factory=lambda: Segment.real_mode(0))
    tr: Segment = field(default_factory=lambda: Segment.tss(0))
    ldt: Segment = field(default_factory=Segment.ldt_null)
    gdt: tuple[int, int] = (0, 0xFFFF)  # (base, limit)
    idt: tuple[int, int] = (0, 0xFFFF)
    cr0: int = CR0_ET | CR0_NE
    cr3: int = 0
    cr4: int = 0
    efer: int = 0

    @property
    def mode(self) -> str:
        if not self.cr0 & CR0_PE:
            return "real"
        if self.efer & EFER_LMA:
            return "long"
        return "protected"

    def segments(self) -> dict[str, Segment]:
        return {"cs": self.cs, "ds": self.ds, "es": self.es, "fs": self.fs, "gs": self.gs, "ss": self.ss,
                "tr": self.tr, "ldt": self.ldt}
