"""How much does pyvmm's Python exit loop cost compared with a C loop on the same guest?

A guest spins on ``out dx, al`` to one port.  Every iteration is a full round
trip: guest -> KVM -> userspace -> KVM -> guest.  The same guest image and
the same initial registers are run

* by a minimal C program (``exits_c.c``, built with gcc at run time), and
* by pyvmm: :class:`pyvmm.kvm.vm.Vm`/:class:`~pyvmm.kvm.vcpu.Vcpu` driven by
  :class:`pyvmm.accel.kvm_vcpu.VcpuRunner`, which dispatches each exit to a
  sink device on a :class:`pyvmm.bus.Bus`;

and the exits per second, microseconds per exit and the cost ratio are
printed, together with a "bare" Python loop (KVM_RUN through ctypes and a
read of the exit data, no dispatch): the floor for any VMM written in Python.

Two guests: ``real`` spins on ``out dx, al`` in 16-bit real mode (ring 0; on
hosts without hardware virtualization every instruction of it is emulated by
the host kernel), and ``ring3`` spins on a byte store to an address outside
guest RAM from 64-bit user mode (an MMIO exit; user mode runs natively on
every host, whereas ring-3 port I/O would need IOPL 3, which some hosts do
not give user mode).  Runs are interleaved and the best of ``--repeat`` is
reported, since other load on the host adds noise; besides wall-clock time
per exit, the thread CPU time per exit (user + kernel, including the time
KVM spends running/emulating the guest) is shown, which waiting for a busy
CPU does not inflate.

Usage: python bench/exits.py [--exits N] [--guest real|ring3|all] [--repeat R]
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import mmap
import os
import shutil
import statistics
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
from pyvmm.kvm import abi, fastrun
from pyvmm.kvm.dump import apply_cpu_state
from pyvmm.kvm.fastrun import RunCall
from pyvmm.kvm.ioctls import ExitReason, Ioctl
from pyvmm.kvm.system import System
from pyvmm.kvm.vcpu import Vcpu
from pyvmm.kvm.vm import Vm
from pyvmm.memory import GuestMemory
from pyvmm.runstate import VmControl

log = logging.getLogger("bench.exits")

PORT = 0x510
IMAGE_SIZE = 0x20000
RAM_SIZE = 2 << 20

MMIO_ADDR = 0x200000  # first byte past guest RAM (RAM_SIZE)

# mov dx, PORT ; 1: out dx, al ; jmp 1b
REAL_CODE = bytes([0xBA]) + struct.pack("<H", PORT) + bytes([0xEE, 0xEB, 0xFD])
# 1: mov [rbx], al ; jmp 1b      (rbx = MMIO_ADDR)
RING3_CODE = bytes([0x88, 0x03, 0xEB, 0xFC])

CODE_ADDR = 0x4000
GDT_ADDR = 0x1000
TSS_ADDR = 0x2000
PML4_ADDR = 0x10000


@dataclass
class Guest:
    name: str
    image: bytes
    state: CpuState
    kind: str  # "io" or "mmio"
    addr: int


def real_mode_guest() -> Guest:
    img = bytearray(IMAGE_SIZE)
    img[CODE_ADDR:CODE_ADDR + len(REAL_CODE)] = REAL_CODE
    return Guest("real", bytes(img), CpuState(regs={"rip": CODE_ADDR}), "io", PORT)


def ring3_guest() -> Guest:
    """64-bit user-mode guest: identity-mapped user pages for 0-4 MiB; the second 2 MiB is not RAM."""
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
    struct.pack_into("<QQ", img, PML4_ADDR + 0x2000, 0x87, MMIO_ADDR | 0x87)  # 2 MiB pages
    img[CODE_ADDR:CODE_ADDR + len(RING3_CODE)] = RING3_CODE
    state = CpuState(regs={"rip": CODE_ADDR, "rsp": 0x9000, "rbx": MMIO_ADDR, "rflags": 0x2},
                     cs=ucode, ds=udata, es=udata, ss=udata, fs=udata, gs=udata, tr=tss,
                     gdt=(GDT_ADDR, len(gdt) * 8 - 1), idt=(0x3000, 0),
                     cr0=CR0_PE | CR0_PG | CR0_ET | CR0_NE, cr3=PML4_ADDR, cr4=CR4_PAE,
                     efer=EFER_LME | EFER_LMA)
    return Guest("ring3", bytes(img), state, "mmio", MMIO_ADDR)


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


Sample = tuple[float, float]  # (wall-clock us per exit, thread CPU us per exit)


def run_c(exe: Path, workdir: Path, guest: Guest, n: int, rounds: int) -> list[Sample]:
    """Microseconds per exit of each round of the C loop."""
    regs, sregs = kvm_state(guest.state)
    (workdir / "image.bin").write_bytes(guest.image)
    (workdir / "regs.bin").write_bytes(bytes(regs))
    (workdir / "sregs.bin").write_bytes(bytes(sregs))
    out = subprocess.run([str(exe), str(workdir / "image.bin"), str(workdir / "regs.bin"),
                          str(workdir / "sregs.bin"), guest.kind, hex(guest.addr), str(n), str(rounds)],
                         check=True, capture_output=True, text=True).stdout.splitlines()
    return [(int(ns) / int(exits) / 1000.0, int(cpu) / int(exits) / 1000.0)
            for exits, ns, cpu in (line.split() for line in out)]


# -- pyvmm loop -----------------------------------------------------------------------------------
#: Loops measured, in print order: the C reference; a bare Python loop (KVM_RUN + reading the exit)
#: through ctypes and through the compiled helper; pyvmm's VcpuRunner with either call.
LOOPS = ("C", "bare-ctypes", "bare", "pyvmm", "pyvmm-ctypes")


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


class PyVm:
    """One VM with the guest loaded, reused for all rounds of a Python measurement."""

    def __init__(self, system: System, guest: Guest) -> None:
        self.guest = guest
        self.mem = GuestMemory(RAM_SIZE)
        self.mem.write(0, guest.image)
        self.vm: Vm = system.create_vm()
        self.vm.map_memory(self.mem)
        self.vcpu: Vcpu = self.vm.create_vcpu(0)
        self.vcpu.set_cpuid(system.supported_cpuid())
        regs, sregs = kvm_state(guest.state)
        self.vcpu.set_sregs(sregs)
        self.vcpu.set_regs(regs)

    def close(self) -> None:
        self.vm.close()
        self.mem.close()


def run_bare(pv: PyVm, n: int, rounds: int, call: RunCall) -> list[Sample]:
    """KVM_RUN plus reading the exit reason and data: no bus, no device."""
    run = pv.vcpu.run
    assert run is not None
    mm = pv.vcpu.run_mmap
    fd, req, ioctl = pv.vcpu.fd, int(Ioctl.RUN), call.fn
    is_io = pv.guest.kind == "io"
    want = ExitReason.IO if is_io else ExitReason.MMIO
    data_at = abi.KVM_RUN_EXIT_OFFSET + abi.KvmRunMmio.data.offset
    io = abi.KvmRunIo.from_buffer(mm, abi.KVM_RUN_EXIT_OFFSET)
    out = []
    try:
        for _ in range(rounds):
            c0, t0 = time.thread_time_ns(), time.perf_counter_ns()
            for _ in range(n):
                if ioctl(fd, req, 0) < 0 or run.exit_reason != want:
                    raise SystemExit(f"bare loop: unexpected exit {run.exit_reason}")
                mm[io.data_offset if is_io else data_at]
            t1, c1 = time.perf_counter_ns(), time.thread_time_ns()
            out.append(((t1 - t0) / n / 1000.0, (c1 - c0) / n / 1000.0))
    finally:
        del run, io
    return out


def run_py(pv: PyVm, n: int, rounds: int, call: RunCall) -> list[Sample]:
    """The accelerator's loop: VcpuRunner dispatching every exit to a device on a Bus."""
    io_bus, mmio_bus = Bus("io"), Bus("mmio")
    sink = CountingSink(n)
    (io_bus if pv.guest.kind == "io" else mmio_bus).register(pv.guest.addr, 1, sink, "sink")
    out = []
    for _ in range(rounds):
        control = VmControl()
        runner = VcpuRunner(pv.vcpu, io_bus, mmio_bus, control, halt_action="stop", run_call=call)
        sink.runner, sink.left = runner, n
        c0, t0 = time.thread_time_ns(), time.perf_counter_ns()
        runner.run()
        t1, c1 = time.perf_counter_ns(), time.thread_time_ns()
        out.append(((t1 - t0) / n / 1000.0, (c1 - c0) / n / 1000.0))
        if sink.left != 0 or control.pending() or runner.last_exit != ExitReason.INTR:
            raise SystemExit(f"pyvmm loop ended early ({n - sink.left} of {n} exits, last exit "
                             f"{runner.last_exit}): {control.wait(0)}")
    return out


class _FakeVcpu:
    """Stands in for a Vcpu whose kvm_run always reports an OUT of one byte to PORT."""

    index = 0
    fd = 0

    def __init__(self) -> None:
        self.run_mmap = mmap.mmap(-1, 3 * 4096)
        self.run: abi.KvmRun | None = abi.KvmRun.from_buffer(self.run_mmap)
        self.run.exit_reason = ExitReason.IO
        io = self.run.u.io
        io.direction, io.size, io.port, io.count, io.data_offset = 1, 1, PORT, 1, 4096


class _HaltAfter(CountingSink):
    def __init__(self, n: int, vcpu: _FakeVcpu) -> None:
        super().__init__(n)
        self.vcpu = vcpu

    def io_write(self, offset: int, size: int, value: int) -> None:
        self.total += value
        self.left -= 1
        if self.left == 0:
            self.vcpu.run.exit_reason = ExitReason.HLT  # type: ignore[union-attr]


def interpreter_overhead(n: int, rounds: int) -> dict[str, float]:
    """Best thread-CPU microseconds per iteration with KVM_RUN replaced by a no-op C call.

    This is what the Python side alone costs with warm caches: the bare loop,
    the VcpuRunner loop (decode, bus lookup, device call), and the foreign call.
    """
    noop = ctypes.CDLL(None)["abs"]  # abs(fd) == 0: "success", and kvm_run keeps reporting the OUT
    call = RunCall(noop, False, False)
    vcpu = _FakeVcpu()
    run, mm = vcpu.run, vcpu.run_mmap
    assert run is not None
    best = {"call": float("inf"), "bare": float("inf"), "pyvmm": float("inf")}
    for _ in range(rounds):
        c0 = time.thread_time_ns()
        for _ in range(n):
            noop(0, 0, 0)
        best["call"] = min(best["call"], (time.thread_time_ns() - c0) / n / 1000)
        io = abi.KvmRunIo.from_buffer(mm, abi.KVM_RUN_EXIT_OFFSET)
        run.exit_reason = ExitReason.IO
        c0 = time.thread_time_ns()
        for _ in range(n):
            if noop(0, 0, 0) < 0 or run.exit_reason != ExitReason.IO:
                raise SystemExit("overhead loop: unexpected state")
            mm[io.data_offset]
        best["bare"] = min(best["bare"], (time.thread_time_ns() - c0) / n / 1000)
        del io
        io_bus = Bus("io")
        sink = _HaltAfter(n, vcpu)
        io_bus.register(PORT, 1, sink, "sink")
        run.exit_reason = ExitReason.IO
        runner = VcpuRunner(vcpu, io_bus, Bus("mmio"), VmControl(), halt_action="stop",  # type: ignore[arg-type]
                            run_call=call)
        c0 = time.thread_time_ns()
        runner.run()
        best["pyvmm"] = min(best["pyvmm"], (time.thread_time_ns() - c0) / n / 1000)
        if sink.left != 0 or runner.last_exit != ExitReason.HLT:
            raise SystemExit("overhead loop: runner ended early")
    del run
    vcpu.run = None
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--exits", type=int, default=5000, help="exits per timed round (default 5000)")
    ap.add_argument("--rounds", type=int, default=10, help="rounds per batch (default 10)")
    ap.add_argument("--batches", type=int, default=4,
                    help="alternating C/Python batches (default 4); the best round of all is reported")
    ap.add_argument("--guest", choices=("real", "ring3", "all"), default="all")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    guests = [g for g in (real_mode_guest(), ring3_guest()) if args.guest in ("all", g.name)]
    system = System()
    with tempfile.TemporaryDirectory(prefix="pyvmm-bench-") as d:
        workdir = Path(d)
        exe = build_c(workdir)
        fast_call, ctypes_call = fastrun.run_call(), fastrun.fallback_call()
        if not fast_call.compiled:
            print("note: the compiled KVM_RUN helper is unavailable; 'bare'/'pyvmm' use ctypes too")
        print(f"{'guest':6} {'loop':12} {'exits/s':>10} {'wall us':>8} {'median':>8} {'vs C':>6} "
              f"{'cpu us':>7} {'vs C':>6}")
        for g in guests:
            samples: dict[str, list[Sample]] = {k: [] for k in LOOPS}
            pv = PyVm(system, g)
            try:
                for _ in range(args.batches):
                    samples["C"] += run_c(exe, workdir, g, args.exits, args.rounds)
                    samples["bare-ctypes"] += run_bare(pv, args.exits, args.rounds, ctypes_call)
                    samples["bare"] += run_bare(pv, args.exits, args.rounds, fast_call)
                    samples["pyvmm"] += run_py(pv, args.exits, args.rounds, fast_call)
                    samples["pyvmm-ctypes"] += run_py(pv, args.exits, args.rounds, ctypes_call)
            finally:
                pv.close()
            c_wall = min(w for w, _ in samples["C"])
            c_cpu = min(c for _, c in samples["C"])
            for loop, pairs in samples.items():
                wall = min(w for w, _ in pairs)
                cpu = min(c for _, c in pairs)
                print(f"{g.name:6} {loop:12} {1e6 / wall:10,.0f} {wall:8.3f} "
                      f"{statistics.median(w for w, _ in pairs):8.3f} {wall / c_wall:6.2f} {cpu:7.3f} "
                      f"{cpu / c_cpu:6.2f}")
    print(f"(Python {sys.version.split()[0]}; {args.batches}x{args.rounds} rounds of {args.exits} exits each; "
          f"load average {os.getloadavg()[0]:.2f})")
    ov = interpreter_overhead(args.exits, args.rounds)
    print(f"Python side alone (KVM_RUN replaced by a no-op ctypes call, warm caches), CPU us/iteration: "
          f"call {ov['call']:.3f}, bare loop {ov['bare']:.3f}, pyvmm loop {ov['pyvmm']:.3f}")
    system.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
