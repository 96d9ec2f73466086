"""Boot GDT, identity page tables and entry CPU states."""

from __future__ import annotations

import struct

import pytest

from pyvmm.cpu_state import CR0_PE, CR0_PG, CR4_PAE, EFER_LMA, EFER_LME
from pyvmm.memory import GuestMemory
from pyvmm.x86 import layout
from pyvmm.x86.boot_tables import (
    identity_map_size,
    long_mode_state,
    protected_mode_state,
    real_mode_state,
    write_identity_page_tables,
)

GiB = 1 << 30
ADDR_MASK = 0x000F_FFFF_FFFF_F000


def decode(desc: int) -> dict:
    limit = (desc & 0xFFFF) | ((desc >> 32) & 0xF0000)
    base = ((desc >> 16) & 0xFFFFFF) | ((desc >> 56) << 24)
    access = (desc >> 40) & 0xFF
    flags = (desc >> 52) & 0xF
    g = flags >> 3
    return {"base": base, "limit": (limit << 12 | 0xFFF) if g else limit, "type": access & 0xF,
            "s": (access >> 4) & 1, "p": access >> 7, "l": (flags >> 1) & 1, "db": (flags >> 2) & 1}


def gdt(mem: GuestMemory, state) -> list[dict]:
    base, limit = state.gdt
    raw = mem.read(base, limit + 1)
    return [decode(d) for d in struct.unpack(f"<{(limit + 1) // 8}Q", raw)]


def walk(mem: GuestMemory, cr3: int, va: int) -> int | None:
    """Translate ``va`` through 4-level tables (2 MiB or 4 KiB leaves)."""
    pml4e = mem.read_u64(cr3 + ((va >> 39) & 511) * 8)
    if not pml4e & 1:
        return None
    pdpte = mem.read_u64((pml4e & ADDR_MASK) + ((va >> 30) & 511) * 8)
    if not pdpte & 1:
        return None
    assert not pdpte & 0x80, "boot tables use 2 MiB pages, not 1 GiB pages"
    pde = mem.read_u64((pdpte & ADDR_MASK) + ((va >> 21) & 511) * 8)
    if not pde & 1:
        return None
    assert pde & 0x80 and pde & 2
    return (pde & ADDR_MASK & ~0x1FFFFF) | (va & 0x1FFFFF)


def test_long_mode_state_and_tables():
    mem = GuestMemory(64 << 20)
    st = long_mode_state(mem, 0x1000200, rsi=0x1000)
    assert st.mode == "long"
    assert st.cr0 & (CR0_PE | CR0_PG) == CR0_PE | CR0_PG
    assert st.cr4 & CR4_PAE and st.efer & (EFER_LME | EFER_LMA) == EFER_LME | EFER_LMA
    assert st.regs["rip"] == 0x1000200 and st.regs["rsi"] == 0x1000 and st.regs["rflags"] == 2
    assert st.cs.selector == 0x10 and st.cs.l == 1 and st.cs.db == 0
    assert all(s.selector == 0x18 for s in (st.ds, st.es, st.ss))
    g = gdt(mem, st)
    assert g[2]["l"] == 1 and g[2]["type"] & 8, "__BOOT_CS is 64-bit code"
    assert g[3]["type"] == 3 and g[3]["limit"] == 0xFFFFFFFF and g[3]["base"] == 0, "__BOOT_DS flat data"
    assert g[1]["db"] == 1 and g[1]["type"] & 8 and g[4]["l"] == 1
    # Descriptor in memory equals the loaded (cached) CS.
    assert g[2]["limit"] == st.cs.limit and g[2]["type"] == st.cs.type
    for va in (0, 0x1000, 0x1000200, 64 << 20, 0xBFFFFFFF, 0xFEC00000, 0xFFFFFFFF):
        assert walk(mem, st.cr3, va) == va
    assert walk(mem, st.cr3, 4 * GiB) is None  # no RAM above 4 GiB: map stops at 4 GiB


def test_identity_map_covers_high_ram():
    mem = layout.pc_memory(4 * GiB + (512 << 20))
    try:
        assert identity_map_size(mem) == 6 * GiB
        cr3 = write_identity_page_tables(mem)
        assert walk(mem, cr3, 5 * GiB + 0x123456) == 5 * GiB + 0x123456
        assert walk(mem, cr3, 6 * GiB) is None
    finally:
        mem.close()


def test_identity_map_is_capped():
    with pytest.raises(ValueError):
        write_identity_page_tables(GuestMemory(16 << 20), (layout.PD_MAX_COUNT + 1) * GiB)


def test_protected_mode_state():
    mem = GuestMemory(16 << 20)
    st = protected_mode_state(mem, 0x100000, regs={"rax": 0x2BADB002, "rbx": 0x3000})
    assert st.mode == "protected"
    assert not st.cr0 & CR0_PG and st.efer == 0 and st.cr4 == 0
    assert st.regs["rax"] == 0x2BADB002 and st.regs["rbx"] == 0x3000 and st.regs["rip"] == 0x100000
    assert st.cs.selector == 0x10 and st.cs.db == 1 and st.cs.l == 0 and st.cs.limit == 0xFFFFFFFF
    g = gdt(mem, st)
    assert g[2]["db"] == 1 and g[2]["l"] == 0 and g[2]["limit"] == 0xFFFFFFFF, "__BOOT_CS is 32-bit flat"
    assert st.tr.type == 0xB and st.tr.s == 0


def test_real_mode_state():
    st = real_mode_state(0, 0x7C00, regs={"rdx": 0x80})
    assert st.mode == "real"
    assert st.cs.base == 0 and st.cs.selector == 0 and st.regs["rip"] == 0x7C00 and st.regs["rdx"] == 0x80
    assert st.idt == (0, 0x3FF)
    st = real_mode_state(0x07C0, 0)
    assert st.cs.base == 0x7C00
    with pytest.raises(ValueError):
        real_mode_state(0x10000, 0)
