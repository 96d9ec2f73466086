"""Helpers for the tcg tests: assemble tiny guests, build a bare machine, run until a port says done.

Guests report through port 0xE0 (a 32-bit write records a value) and finish by
writing to port 0xE4; the harness collects the values in order.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from pyvmm.accel.base import CpuConfig, MachineContext
from pyvmm.accel.tcg import TcgAccelerator
from pyvmm.bus import Bus
from pyvmm.cpu_state import (
    CR0_ET,
    CR0_NE,
    CR0_PE,
    CR0_PG,
    CR4_OSFXSR,
    CR4_PAE,
    EFER_LMA,
    EFER_LME,
    EFER_NXE,
    EFER_SCE,
    CpuState,
    Segment,
)
from pyvmm.devices.irqchip import UserspaceIrqchip
from pyvmm.memory import GuestMemory
from pyvmm.runstate import VmControl

REPORT_PORT = 0xE0
DONE_PORT = 0xE4

# Fixed low-memory layout of the test guests
GDT_ADDR = 0x500
TSS_ADDR = 0x600
PML4_ADDR = 0x1000
PDPT_ADDR = 0x2000
PD_ADDR = 0x3000
IDT_ADDR = 0x4000
CODE_ADDR = 0x10000
STACK_TOP = 0x80000
IST_TOP = 0x90000
RSP0_TOP = 0xA0000

# GDT selectors (Linux's layout, so STAR values look familiar)
KCODE32 = 0x08
KCODE64 = 0x10
KDATA = 0x18
UCODE32 = 0x23
UDATA = 0x2B
UCODE64 = 0x33
TSS_SEL = 0x40


def need_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"the tcg tests need '{name}' (binutils) to assemble guest code")
    return path


def assemble(source: str, base: int) -> tuple[bytes, dict[str, int]]:
    """Assemble GNU-as source into a flat binary linked at ``base``; also return its symbols."""
    for tool in ("as", "ld", "objcopy", "nm"):
        need_tool(tool)
    with tempfile.TemporaryDirectory() as d:
        src = Path(d, "g.S")
        src.write_text(source)
        run = dict(check=True, capture_output=True, text=True)
        subprocess.run(["as", "--64", "-o", f"{d}/g.o", str(src)], **run)
        subprocess.run(["ld", "-m", "elf_x86_64", "-Ttext", hex(base), "-e", "0", "-o", f"{d}/g.elf",
                        f"{d}/g.o"], **run)
        subprocess.run(["objcopy", "-O", "binary", "-j", ".text", f"{d}/g.elf", f"{d}/g.bin"], **run)
        out = subprocess.run(["nm", f"{d}/g.elf"], **run).stdout
        syms = {}
        for line in out.splitlines():
            parts = line.split()
            if len(parts) == 3:
                syms[parts[2]] = int(parts[0], 16)
        return Path(d, "g.bin").read_bytes(), syms


class Recorder:
    """Port device: 0xE0 records a value, 0xE4 signals completion."""

    def __init__(self) -> None:
        self.values: list[int] = []
        self.done = threading.Event()

    def io_read(self, offset: int, size: int) -> int:
        return 0

    def io_write(self, offset: int, size: int, value: int) -> None:
        if offset == 0:
            self.values.append(value)
        elif offset == 4:
            self.done.set()


class Harness:
    def __init__(self, mem_size: int = 32 << 20, ncpus: int = 1) -> None:
        self.memory = GuestMemory(mem_size)
        self.io_bus = Bus("io")
        self.mmio_bus = Bus("mmio")
        self.control = VmControl()
        self.rec = Recorder()
        self.io_bus.register(REPORT_PORT, 8, self.rec, "recorder")
        self.accel = TcgAccelerator()
        ctx = MachineContext(self.memory, self.io_bus, self.mmio_bus, self.control, ncpus, CpuConfig(),
                             irqchip_factory=self._irqchip)
        self.irq = self.accel.setup(ctx)

    def _irqchip(self, ncpus: int, lapic_bus_hz: int) -> UserspaceIrqchip:
        chip = UserspaceIrqchip(ncpus, lapic_bus_hz)
        chip.register(self.io_bus, self.mmio_bus)
        return chip

    def run(self, state: CpuState, timeout: float = 10.0) -> list[int]:
        self.accel.set_boot_state(state, start_aps=False)
        self.accel.start()
        try:
            deadline = time.monotonic() + timeout
            while not self.rec.done.is_set():
                if self.control.pending():
                    req = self.control.wait(0)
                    raise AssertionError(f"guest stopped: {req}")
                if time.monotonic() > deadline:
                    raise AssertionError(f"guest timed out; values so far {self.rec.values}\n"
                                         + self.accel.cpu_dump())
                time.sleep(0.005)
        finally:
            self.accel.stop()
        return self.rec.values

    def run_until_request(self, state: CpuState, timeout: float = 10.0):
        self.accel.set_boot_state(state, start_aps=False)
        self.accel.start()
        try:
            req = self.control.wait(timeout)
        finally:
            self.accel.stop()
        return req

    # -- guest set-up ----------------------------------------------------------------------------
    def write_gdt(self) -> None:
        m = self.memory
        descs = {
            KCODE32: Segment.flat32(KCODE32, code=True),
            KCODE64: Segment.flat64_code(KCODE64),
            KDATA: Segment.flat32(KDATA, code=False),
            UCODE32 & ~3: Segment(selector=UCODE32, limit=0xFFFFFFFF, type=0xB, db=1, g=1, dpl=3),
            UDATA & ~3: Segment(selector=UDATA, limit=0xFFFFFFFF, type=0x3, db=1, g=1, dpl=3),
            UCODE64 & ~3: Segment(selector=UCODE64, limit=0xFFFFFFFF, type=0xB, l=1, g=1, dpl=3),
        }
        m.write_u64(GDT_ADDR, 0)
        for sel, seg in descs.items():
            m.write_u64(GDT_ADDR + sel, seg.descriptor())
        tss = Segment.tss(TSS_SEL, TSS_ADDR, 0x67)
        m.write_u64(GDT_ADDR + TSS_SEL, tss.descriptor())
        m.write_u64(GDT_ADDR + TSS_SEL + 8, TSS_ADDR >> 32)
        # 64-bit TSS: RSP0 at +4, IST1 at +0x24
        m.fill(TSS_ADDR, 0x68)
        m.write_u64(TSS_ADDR + 4, RSP0_TOP)
        m.write_u64(TSS_ADDR + 0x24, IST_TOP)

    def write_page_tables(self) -> None:
        m = self.memory
        m.fill(PML4_ADDR, 0x3000)
        m.write_u64(PML4_ADDR, PDPT_ADDR | 0x7)
        m.write_u64(PDPT_ADDR, PD_ADDR | 0x7)
        for i in range(512):                       # identity map the first GiB with 2 MiB pages
            m.write_u64(PD_ADDR + 8 * i, (i << 21) | 0x87)

    def long_mode_state(self, entry: int = CODE_ADDR) -> CpuState:
        self.write_gdt()
        self.write_page_tables()
        st = CpuState()
        st.regs = {"rip": entry, "rsp": STACK_TOP, "rflags": 0x2}
        st.cs = Segment.flat64_code(KCODE64)
        data = Segment.flat32(KDATA, code=False)
        st.ds = st.es = st.ss = data
        st.fs = st.gs = data
        st.tr = Segment.tss(TSS_SEL, TSS_ADDR, 0x67)
        st.gdt = (GDT_ADDR, 0x47)
        st.idt = (IDT_ADDR, 0xFFF)
        st.cr0 = CR0_PE | CR0_PG | CR0_ET | CR0_NE
        st.cr3 = PML4_ADDR
        st.cr4 = CR4_PAE | CR4_OSFXSR
        st.efer = EFER_LME | EFER_LMA | EFER_SCE | EFER_NXE
        return st

    def protected_mode_state(self, entry: int = CODE_ADDR) -> CpuState:
        self.write_gdt()
        st = CpuState()
        st.regs = {"rip": entry, "rsp": STACK_TOP, "rflags": 0x2}
        st.cs = Segment.flat32(KCODE32, code=True)
        data = Segment.flat32(KDATA, code=False)
        st.ds = st.es = st.ss = st.fs = st.gs = data
        st.gdt = (GDT_ADDR, 0x47)
        st.idt = (IDT_ADDR, 0x7FF)
        st.cr0 = CR0_PE | CR0_ET | CR0_NE
        return st

    def real_mode_state(self, cs: int, ip: int, sp: int = 0x7000) -> CpuState:
        st = CpuState()
        st.regs = {"rip": ip, "rsp": sp, "rflags": 0x2}
        st.cs = Segment.real_mode(cs, code=True)
        st.ds = st.es = st.ss = st.fs = st.gs = Segment.real_mode(0)
        st.idt = (0, 0x3FF)
        st.gdt = (0, 0xFFFF)
        return st

    def set_idt64(self, vector: int, handler: int, ist: int = 0, dpl: int = 0) -> None:
        lo = (handler & 0xFFFF) | (KCODE64 << 16) | (ist << 32) | ((0x8E | (dpl << 5)) << 40) \
            | (((handler >> 16) & 0xFFFF) << 48)
        self.memory.write_u64(IDT_ADDR + 16 * vector, lo)
        self.memory.write_u64(IDT_ADDR + 16 * vector + 8, handler >> 32)

    def set_idt32(self, vector: int, handler: int) -> None:
        lo = (handler & 0xFFFF) | (KCODE32 << 16) | (0x8E << 40) | (((handler >> 16) & 0xFFFF) << 48)
        self.memory.write_u64(IDT_ADDR + 8 * vector, lo)

    def set_ivt(self, vector: int, seg: int, off: int) -> None:
        self.memory.write_u16(4 * vector, off)
        self.memory.write_u16(4 * vector + 2, seg)

    def load(self, code: bytes, addr: int = CODE_ADDR) -> None:
        self.memory.write(addr, code)
