"""Boot-time descriptor tables, identity page tables and entry CPU states.

A kernel loaded directly (no firmware) expects to be entered in a specific
mode with matching tables in memory: the Linux boot protocol wants a GDT
with flat segments at ``__BOOT_CS`` (0x10) and ``__BOOT_DS`` (0x18) and, for
the 64-bit entry, identity-mapped page tables; multiboot and PVH want flat
32-bit protected mode with paging off; a boot sector wants real mode.  The
builders here write those tables at the addresses in :mod:`layout` and
return the matching :class:`CpuState`.
"""

from __future__ import annotations

import enum
import struct

from pyvmm.cpu_state import (
    CR0_ET,
    CR0_MP,
    CR0_NE,
    CR0_PE,
    CR0_PG,
    CR4_PAE,
    EFER_LMA,
    EFER_LME,
    CpuState,
    Segment,
)
from pyvmm.memory import GuestMemory
from pyvmm.x86 import layout

RFLAGS_RESERVED = 0x2  # bit 1 always reads as one; IF clear


class Selector(enum.IntEnum):
    """Boot GDT selectors.  0x10/0x18 are the Linux boot protocol's ``__BOOT_CS``/``__BOOT_DS``."""

    NULL = 0x00
    CODE32 = 0x08  # flat 32-bit code, always
    BOOT_CS = 0x10  # flat code of the entry mode: 64-bit for long-mode entry, else 32-bit
    BOOT_DS = 0x18  # flat read/write data
    CODE64 = 0x20  # 64-bit code, always
    TSS = 0x28  # placeholder task state segment (VMX requires a usable TR)


GDT_ENTRIES = 6
assert GDT_ENTRIES <= layout.BOOT_GDT_MAX_ENTRIES

# Page-table entry bits.
PTE_PRESENT = 1 << 0
PTE_WRITE = 1 << 1
PTE_PS = 1 << 7  # 2 MiB page in a page directory
PAGE_2M = 2 << 20


def _tss_segment() -> Segment:
    return Segment.tss(int(Selector.TSS), base=0, limit=0x67)


def write_boot_gdt(memory: GuestMemory, long_mode: bool) -> tuple[int, int]:
    """Write the boot GDT; returns ``(base, limit)`` for GDTR.

    ``__BOOT_CS`` must be the code segment the kernel is entered with, so its
    width depends on the entry mode; 0x08 and 0x20 are fixed 32- and 64-bit
    code segments for guests that switch modes themselves.
    """
    cs = int(Selector.BOOT_CS)
    boot_cs = Segment.flat64_code(cs) if long_mode else Segment.flat32(cs, True)
    descriptors = [
        0,
        Segment.flat32(int(Selector.CODE32), True).descriptor(),
        boot_cs.descriptor(),
        Segment.flat32(int(Selector.BOOT_DS), False).descriptor(),
        Segment.flat64_code(int(Selector.CODE64)).descriptor(),
        _tss_segment().descriptor(),
    ]
    data = struct.pack(f"<{len(descriptors)}Q", *descriptors)
    memory.write(layout.BOOT_GDT_START, data)
    memory.write(layout.BOOT_IDT_START, bytes(8))
    return layout.BOOT_GDT_START, len(data) - 1


def identity_map_size(memory: GuestMemory) -> int:
    """Bytes the boot page tables identity-map: at least 4 GiB, RAM above it while tables fit."""
    top = max(layout.IDENTITY_MAP_MIN, max(r.end for r in memory.regions))
    top = layout.align_up(top, layout.GIB)
    return min(top, layout.PD_MAX_COUNT * layout.GIB)


def write_identity_page_tables(memory: GuestMemory, size: int | None = None) -> int:
    """Write 4-level tables identity-mapping ``[0, size)`` with 2 MiB pages; returns CR3.

    2 MiB pages need no CPU feature beyond long mode (1 GiB pages would need
    pdpe1gb, which a restricted ``--cpu`` may hide).
    """
    if size is None:
        size = identity_map_size(memory)
    npd = layout.align_up(size, layout.GIB) // layout.GIB
    if not 1 <= npd <= layout.PD_MAX_COUNT:
        raise ValueError(f"identity map of {size:#x} bytes needs {npd} page directories")
    flags = PTE_PRESENT | PTE_WRITE
    memory.write(layout.PML4_START, struct.pack("<Q", layout.PDPT_START | flags) + bytes(4096 - 8))
    pdpt = [(layout.PD_START + i * 0x1000) | flags for i in range(npd)] + [0] * (512 - npd)
    memory.write(layout.PDPT_START, struct.pack("<512Q", *pdpt))
    for i in range(npd):
        base = i * layout.GIB
        pd = [(base + j * PAGE_2M) | flags | PTE_PS for j in range(512)]
        memory.write(layout.PD_START + i * 0x1000, struct.pack("<512Q", *pd))
    return layout.PML4_START


def _base_state(regs: dict[str, int], idt: tuple[int, int], gdt: tuple[int, int]) -> CpuState:
    state = CpuState()
    state.regs = {name: 0 for name in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp")}
    state.regs.update(regs)
    state.regs.setdefault("rflags", RFLAGS_RESERVED)
    state.gdt = gdt
    state.idt = idt
    state.tr = _tss_segment()
    return state


def long_mode_state(memory: GuestMemory, rip: int, *, rsi: int = 0,
                    rsp: int = layout.BOOT_STACK_POINTER) -> CpuState:
    """Write GDT + identity page tables; CPU state for 64-bit entry at ``rip`` (paging on, IF clear)."""
    gdt = write_boot_gdt(memory, long_mode=True)
    cr3 = write_identity_page_tables(memory)
    state = _base_state({"rip": rip, "rsi": rsi, "rsp": rsp}, (layout.BOOT_IDT_START, 0), gdt)
    state.cs = Segment.flat64_code(int(Selector.BOOT_CS))
    data = Segment.flat32(int(Selector.BOOT_DS), False)
    state.ds = state.es = state.fs = state.gs = state.ss = data
    state.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_PG
    state.cr3 = cr3
    state.cr4 = CR4_PAE
    state.efer = EFER_LME | EFER_LMA
    return state


def protected_mode_state(memory: GuestMemory, eip: int, *, regs: dict[str, int] | None = None,
                         esp: int = layout.BOOT_STACK_POINTER) -> CpuState:
    """Write the GDT; CPU state for flat 32-bit protected mode at ``eip``, paging off, IF clear.

    Used by the Linux 32-bit boot protocol, PVH and multiboot, which all
    specify flat 4 GiB segments with ``__BOOT_CS``/``__BOOT_DS`` semantics.
    """
    gdt = write_boot_gdt(memory, long_mode=False)
    all_regs = {"rip": eip, "rsp": esp}
    all_regs.update(regs or {})
    state = _base_state(all_regs, (layout.BOOT_IDT_START, 0), gdt)
    state.cs = Segment.flat32(int(Selector.BOOT_CS), True)
    data = Segment.flat32(int(Selector.BOOT_DS), False)
    state.ds = state.es = state.fs = state.gs = state.ss = data
    state.cr0 = CR0_PE | CR0_ET | CR0_NE
    return state


def real_mode_state(segment: int, offset: int, *, regs: dict[str, int] | None = None,
                    stack: tuple[int, int] = (0, layout.BOOT_SECTOR_START)) -> CpuState:
    """CPU state for real mode at ``segment:offset`` (nothing is written to memory).

    The IVT at 0 is left as-is (pyvmm has no BIOS services); the IDTR keeps
    the real-mode default of base 0, limit 0x3ff.
    """
    if not (0 <= segment <= 0xFFFF and 0 <= offset <= 0xFFFF):
        raise ValueError(f"real-mode address {segment:#x}:{offset:#x} out of range")
    all_regs = {"rip": offset, "rsp": stack[1]}
    all_regs.update(regs or {})
    state = _base_state(all_regs, (0, 0x3FF), (0, 0xFFFF))
    state.cs = Segment.real_mode(segment, code=True)
    state.ds = Segment.real_mode(0)
    state.es = Segment.real_mode(0)
    state.fs = Segment.real_mode(0)
    state.gs = Segment.real_mode(0)
    state.ss = Segment.real_mode(stack[0])
    state.tr = Segment.tss(0)
    state.cr0 = CR0_ET
    return state
