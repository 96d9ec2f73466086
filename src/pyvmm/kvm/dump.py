"""QEMU-style ``info registers`` text, and conversions between KVM and neutral CPU state.

The formatter takes accelerator-neutral values (a register dict and
:class:`~pyvmm.cpu_state.Segment` objects) so tcg can print the same layout.
"""

from __future__ import annotations

from collections.abc import Mapping

from pyvmm.cpu_state import CR0_PE, CR0_PG, EFER_LMA, GPR_NAMES, CpuState, Segment
from pyvmm.kvm import abi

SEGMENT_NAMES = ("es", "cs", "ss", "ds", "fs", "gs")
_REG_NAMES = frozenset(name for name, *_ in abi.KvmRegs._fields_)


def segment_from_kvm(s: abi.KvmSegment) -> Segment:
    return Segment(selector=s.selector, base=s.base, limit=s.limit, type=s.type, present=s.present,
                   dpl=s.dpl, db=s.db, s=s.s, l=s.l, g=s.g, avl=s.avl, unusable=s.unusable)


def segment_to_kvm(seg: Segment, out: abi.KvmSegment) -> None:
    out.selector, out.base, out.limit, out.type = seg.selector, seg.base, seg.limit, seg.type
    out.present, out.dpl, out.db, out.s = seg.present, seg.dpl, seg.db, seg.s
    out.l, out.g, out.avl, out.unusable = seg.l, seg.g, seg.avl, seg.unusable


def regs_to_dict(r: abi.KvmRegs) -> dict[str, int]:
    return {name: getattr(r, name) for name, *_ in abi.KvmRegs._fields_}


def apply_cpu_state(state: CpuState, regs: abi.KvmRegs, sregs: abi.KvmSregs) -> None:
    """Load a neutral :class:`CpuState` into KVM register structures (in place)."""
    for name in (*GPR_NAMES, "rip", "rflags"):
        setattr(regs, name, 0)
    regs.rflags = 0x2  # bit 1 is reserved-as-one
    for name, value in state.regs.items():
        if name not in _REG_NAMES:
            raise ValueError(f"unknown register {name!r} in boot CPU state")
        setattr(regs, name, value)
    regs.rflags |= 0x2
    for name, seg in state.segments().items():
        segment_to_kvm(seg, getattr(sregs, name))
    sregs.gdt.base, sregs.gdt.limit = state.gdt
    sregs.idt.base, sregs.idt.limit = state.idt
    sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer = state.cr0, state.cr3, state.cr4, state.efer
    sregs.cr2 = 0


def _attr_flags(seg: Segment) -> int:
    """The descriptor attribute word as QEMU prints it (bits 8..23 of the descriptor's high dword)."""
    return ((seg.type << 8) | (seg.s << 12) | (seg.dpl << 13) | (seg.present << 15) | (seg.avl << 20)
            | (seg.l << 21) | (seg.db << 22) | (seg.g << 23))


def _seg_desc(name: str, seg: Segment, long_mode: bool) -> str:
    if not seg.present or seg.unusable:
        return ""
    if not seg.s:
        kinds = {2: "LDT", 9: "TSS32-avl", 0xB: "TSS32-busy" if not long_mode else "TSS64-busy", 1: "TSS16-avl",
                 3: "TSS16-busy"}
        if long_mode and seg.type == 9:
            return f" DPL={seg.dpl} TSS64-avl"
        return f" DPL={seg.dpl} {kinds.get(seg.type, f'SYS{seg.type}')}"
    if seg.type & 8:
        bits = "CS64" if seg.l else ("CS32" if seg.db else "CS16")
        rwx = ("C" if seg.type & 4 else "-") + ("R" if seg.type & 2 else "-") + ("A" if seg.type & 1 else "-")
    else:
        bits = "DS" if seg.db else "DS16"
        rwx = ("E" if seg.type & 4 else "-") + ("W" if seg.type & 2 else "-") + ("A" if seg.type & 1 else "-")
    return f" DPL={seg.dpl} {bits} [{rwx}]"


def format_registers(regs: Mapping[str, int], segments: Mapping[str, Segment], gdt: tuple[int, int],
                     idt: tuple[int, int], cr0: int, cr2: int, cr3: int, cr4: int, efer: int,
                     extra: Mapping[str, str] | None = None) -> str:
    """A multi-line dump laid out like QEMU's ``info registers`` for x86-64."""
    lines = []
    gpr = [("RAX", "rax"), ("RBX", "rbx"), ("RCX", "rcx"), ("RDX", "rdx"),
           ("RSI", "rsi"), ("RDI", "rdi"), ("RBP", "rbp"), ("RSP", "rsp"),
           ("R8 ", "r8"), ("R9 ", "r9"), ("R10", "r10"), ("R11", "r11"),
           ("R12", "r12"), ("R13", "r13"), ("R14", "r14"), ("R15", "r15")]
    for i in range(0, len(gpr), 4):
        lines.append(" ".join(f"{label}={regs.get(key, 0):016x}" for label, key in gpr[i:i + 4]))
    rfl = regs.get("rflags", 2)
    fl = "".join(c if rfl & (1 << b) else "-" for c, b in
                 (("D", 10), ("O", 11), ("S", 7), ("Z", 6), ("A", 4), ("P", 2), ("C", 0)))
    ss = segments.get("ss", Segment())
    cpl = (3 if rfl & (1 << 17) else ss.dpl) if cr0 & CR0_PE else 0
    mode = "long" if efer & EFER_LMA else ("protected" if cr0 & CR0_PE else "real")
    lines.append(f"RIP={regs.get('rip', 0):016x} RFL={rfl:08x} [{fl}] CPL={cpl} MODE={mode}")
    long_mode = bool(efer & EFER_LMA)
    for name in (*SEGMENT_NAMES, "ldt", "tr"):
        seg = segments.get(name)
        if seg is None:
            continue
        label = {"ldt": "LDT", "tr": "TR "}.get(name, name.upper() + " ")
        lines.append(f"{label}={seg.selector:04x} {seg.base:016x} {seg.limit:08x} {_attr_flags(seg):08x}"
                     + _seg_desc(name, seg, long_mode))
    lines.append(f"GDT=     {gdt[0]:016x} {gdt[1]:08x}")
    lines.append(f"IDT=     {idt[0]:016x} {idt[1]:08x}")
    lines.append(f"CR0={cr0:08x} CR2={cr2:016x} CR3={cr3:016x} CR4={cr4:08x}")
    lines.append(f"EFER={efer:016x}" + (" PG" if cr0 & CR0_PG else ""))
    for k, v in (extra or {}).items():
        lines.append(f"{k}={v}")
    return "\n".join(lines)


def format_kvm_registers(regs: abi.KvmRegs, sregs: abi.KvmSregs,
                         extra: Mapping[str, str] | None = None) -> str:
    segs = {n: segment_from_kvm(getattr(sregs, n)) for n in (*SEGMENT_NAMES, "ldt", "tr")}
    return format_registers(regs_to_dict(regs), segs, (sregs.gdt.base, sregs.gdt.limit),
                            (sregs.idt.base, sregs.idt.limit), sregs.cr0, sregs.cr2, sregs.cr3, sregs.cr4,
                            sregs.efer, extra)
