"""How much does pyvmm's Python exit loop cost compared with a C loop on the same guest?

A guest spins on ``out dx, al`` to one port.  Every iteration is a full round
trip: guest -> KVM -> userspace -> KVM -> guest.  The same guest image and
the same initial registers are run

* by a minimal C program (``exits_c.c``, built with gcc at run time), and
* by pyvmm: :class:`pyvmm.kvm.vm.Vm`/:class:`~pyvmm.kvm.vcpu.Vcpu` driven by
  :class:`pyvmm.accel.kvm_vcpu.VcpuRunner`, which dispatches each exit to a
  sink device on a :class:`pyvmm.bus.Bus`;

and the exits per second, microseconds per exit and the cost ratio are
printed.  Two guests: ``real`` (16-bit real mode, ring 0; on hosts without
hardware virtualization this is emulated instruction by instruction) and
``ring3`` (64-bit user mode with IOPL 3, which runs natively everywhere).

Usage: python bench/exits.py [--exits N] [--guest real|ring3|all] [--repeat R]
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from pyvmm.accel.kvm_vcpu import VcpuRunner
from pyvmm.bus import Bus
from pyvmm.cpu_state import (
    CR0_ET,
    CR0_NE,
    CR0_PE,
    CR0_PG,
    CR4_PAE,
    EFER_LMA,
    EFER_LME,
    CpuState,
    Segment,
)
from pyvmm.kvm import abi
from pyvmm.kvm.dump import apply_cpu_state
from pyvmm.kvm.ioctls import ExitReason
from pyvmm.kvm.system import System
from pyvmm.memory import GuestMemory
from pyvmm.runstate import VmControl

log = logging.getLogger("bench.exits")

PORT = 0x510
IMAGE_SIZE = 0x20000
RAM_SIZE = 2 << 20

# out dx, al ; jmp back to the out (2-byte short jump), identical encoding in 16/64-bit mode.
LOOP = bytes([0xEE, 0xEB, 0xFD])
# mov dx, PORT (operand-size prefix needed in 64-bit mode).
MOV_DX_16 = bytes([0xBA]) + struct.pack("<H", PORT)
MOV_DX_64 = bytes([0x66, 0xBA]) + struct.pack("<H", PORT)

CODE_ADDR = 0x4000
GDT_ADDR = 0x1000
TSS_ADDR = 0x2000
PML4_ADDR = 0x10000


@dataclass
class Guest:
    name: str
    image: bytes
    state: CpuState


def real_mode_guest() -> Guest:
    img = bytearray(IMAGE_SIZE)
    code = MOV_DX_16 + LOOP
    img[CODE_ADDR:CODE_ADDR + len(code)] = code
    return Guest("real", bytes(img), CpuState(regs={"rip": CODE_ADDR}))


def ring3_guest() -> Guest:
    """64-bit user-mode guest: identity-mapped first 2 MiB (user pages), IOPL 3 so OUT is allowed."""
    img = bytearray(IMAGE_SIZE)
    kcode = Segment.flat64_code(0x08)
    kdata = Segment.flat32(0x10, code=False)
    udata = Segment(selector=0x1B, base=0, limit=0xFFFFFFFF, type=3, dpl=3, db=1, g=1)
    ucode = Segment(selector=0x23, base=0, limit=0xFFFFFFFF, type=0xB, dpl=3, l=1, g=1)
    tss = Segment.tss(0x28, base=TSS_ADDR, limit=0x67)
    gdt = [0, kcode.descriptor(), kdata.descriptor(), udata.descriptor(), ucode.descriptor(),
           tss.descriptor(), 0]  # a 64-bit TSS descriptor takes two slots
    struct.pack_into("<7Q", img, GDT_ADDR, *gdt)
    struct.pack_into("<Q", img, TSS_ADDR + 4, 0x8000)  # rsp0, used if the guest ever faults
    # Page tables: PML4[0] -> PDPT[0] -> PD[0] = 2 MiB page at 0; present|write|user.
    struct.pack_into("<Q", img, PML4_ADDR, (PML4_ADDR + 0x1000) | 0x7)
    struct.pack_into("<Q", img, PML4_ADDR + 0x1000, (PML4_ADDR + 0x2000) | 0x7)
    struct.pack_into("<Q", img, PML4_ADDR + 0x2000, 0x87)
    code = MOV_DX_64 + LOOP
    img[CODE_ADDR:CODE_ADDR + len(code)] = code
    state = CpuState(regs={"rip": CODE_ADDR, "rsp": 0x9000, "rflags": 0x3002},
                     cs=ucode, ds=udata, es=udata, ss=udata, fs=udata, gs=udata, tr=tss,
                     gdt=(GDT_ADDR, len(gdt) * 8 - 1), idt=(0x3000, 0),
                     cr0=CR0_PE | CR0_PG | CR0_ET | CR0_NE, cr3=PML4_ADDR, cr4=CR4_PAE,
                     efer=EFER_LME | EFER_LMA)
    return Guest("ring3", bytes(img), state)


def kvm_state(state: CpuState) -> tuple[abi.KvmRegs, abi.KvmSregs]:
    regs, sregs = abi.KvmRegs(), abi.KvmSregs()
    sregs.apic_base = 0xFEE00900
    apply_cpu_state(state, regs, sregs)
    return regs, sregs


# -- C reference --------------------------------------------------------------------------------
def build_c(workdir: Path) -> Path:
    if shutil.which("gcc") is None:
        raise SystemExit("bench/exits.py needs gcc to build the C reference loop")
    src = Path(__file__).with_name("exits_c.c")
    exe = workdir / "exits_c"
    subprocess.run(["gcc", "-O2", "-o", str(exe), str(src)], check=True)
    return exe


def run_c(exe: Path, workdir: Path, guest: Guest, n: int) -> float:
    regs, sregs = kvm_state(guest.state)
    (workdir / "image.bin").write_bytes(guest.image)
    (workdir / "regs.bin").write_bytes(bytes(regs))
    (workdir / "sregs.bin").write_bytes(bytes(sregs))
    out = subprocess.run([str(exe), str(workdir / "image.bin"), str(workdir / "regs.bin"),
                          str(workdir / "sregs.bin"), hex(PORT), str(n)],
                         check=True, capture_output=True, text=True).stdout.split()
    exits, ns = int(out[0]), int(out[1])
    return ns / exits / 1000.0


# -- pyvmm loop -----------------------------------------------------------------------------------
class CountingSink:
    """The device the guest writes to; stops the runner after ``n`` writes."""

    def __init__(self, n: int) -> None:
        self.left = n
        self.total = 0
        self.runner: VcpuRunner | None = None

    def io_read(self, offset: int, size: int) -> int:
        return 0

    def io_write(self, offset: int, size: int, value: int) -> None:
        self.total += value
        self.left -= 1
        if self.left == 0:
            assert self.runner is not None
            self.runner.request_stop()


def run_py(system: System, guest: Guest, n: int) -> float:
    mem = GuestMemory(RAM_SIZE)
    mem.write(0, guest.image)
    vm = system.create_vm()
    try:
        vm.map_memory(mem)
        vcpu = vm.create_vcpu(0)
        vcpu.set_cpuid(system.supported_cpuid())
        regs, sregs = kvm_state(guest.state)
        vcpu.set_sregs(sregs)
        vcpu.set_regs(regs)
        io_bus, mmio_bus = Bus("io"), Bus("mmio")
        sink = CountingSink(n)
        io_bus.register(PORT, 1, sink, "sink")
        control = VmControl()
        runner = VcpuRunner(vcpu, io_bus, mmio_bus, control, halt_action="stop")
        sink.runner = runner
        t0 = time.perf_counter_ns()
        runner.run()
        t1 = time.perf_counter_ns()
        if sink.left != 0 or control.pending():
            raise SystemExit(f"pyvmm loop ended early ({n - sink.left} of {n} exits, last exit "
                             f"{runner.last_exit}): {control.wait(0)}")
        if runner.last_exit != ExitReason.INTR:
            raise SystemExit(f"pyvmm loop ended on exit {runner.last_exit}")
        return (t1 - t0) / n / 1000.0
    finally:
        vm.close()
        mem.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--exits", type=int, default=200_000, help="exits per measurement (default 200000)")
    ap.add_argument("--guest", choices=("real", "ring3", "all"), default="all")
    ap.add_argument("--repeat", type=int, default=3, help="take the best of R runs (default 3)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    guests = [g for g in (real_mode_guest(), ring3_guest()) if args.guest in ("all", g.name)]
    system = System()
    with tempfile.TemporaryDirectory(prefix="pyvmm-bench-") as d:
        workdir = Path(d)
        exe = build_c(workdir)
        print(f"{'guest':6} {'C exits/s':>12} {'C us/exit':>10} {'py exits/s':>12} {'py us/exit':>11} "
              f"{'ratio':>6} {'py-C us':>8}")
        for g in guests:
            c_us = min(run_c(exe, workdir, g, args.exits) for _ in range(args.repeat))
            py_us = min(run_py(system, g, args.exits) for _ in range(args.repeat))
            print(f"{g.name:6} {1e6 / c_us:12,.0f} {c_us:10.3f} {1e6 / py_us:12,.0f} {py_us:11.3f} "
                  f"{py_us / c_us:6.2f} {py_us - c_us:8.3f}")
    print(f"(Python {sys.version.split()[0]}, pid {os.getpid()}, ctypes {ctypes.__version__})")
    system.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
