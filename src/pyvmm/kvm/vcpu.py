"""A KVM vCPU file descriptor and its shared ``kvm_run`` mapping.

State accessors (registers, MSRs, LAPIC, ...) may be called from any thread
while the vCPU is *not* inside KVM_RUN: the kernel serializes vCPU ioctls on a
per-vCPU mutex, so calling one while the vCPU thread is in the guest blocks
until the guest exits.  The accelerator therefore reads state on the vCPU
thread itself or while that thread is parked.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
from typing import TYPE_CHECKING

from pyvmm.errors import KvmError
from pyvmm.kvm import abi
from pyvmm.kvm.ioctls import ExitReason, Ioctl, MpState
from pyvmm.kvm.syscall import get_errno, ioctl, ioctl_errno, kvm_run_ioctl

if TYPE_CHECKING:
    from pyvmm.kvm.vm import Vm

log = logging.getLogger(__name__)

#: LAPIC register offsets used at vCPU set-up.
APIC_ID = 0x20
APIC_LVT0 = 0x350
APIC_LVT1 = 0x360
APIC_MODE_NMI = 0x4
APIC_MODE_EXTINT = 0x7


class Vcpu:
    """One vCPU: ``run`` is a ctypes view of the shared ``kvm_run`` area (``run_mmap``)."""

    def __init__(self, vm: Vm, index: int, fd: int, mmap_size: int) -> None:
        self.vm = vm
        self.index = index
        self.fd = fd
        self.mmap_size = mmap_size
        self.run_mmap = mmap.mmap(fd, mmap_size, flags=mmap.MAP_SHARED,
                                  prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self.run: abi.KvmRun | None = abi.KvmRun.from_buffer(self.run_mmap)

    # -- running ---------------------------------------------------------------------------------
    def run_once(self) -> int:
        """One KVM_RUN; returns the exit reason (``ExitReason.INTR`` if interrupted by a signal)."""
        ret = kvm_run_ioctl(self.fd, int(Ioctl.RUN), 0)
        if ret < 0:
            err = get_errno()
            if err in (errno.EINTR, errno.EAGAIN):
                return ExitReason.INTR
            raise KvmError(f"KVM_RUN on vCPU {self.index} failed: {os.strerror(err)} (errno {err})")
        assert self.run is not None
        return self.run.exit_reason

    # -- registers -------------------------------------------------------------------------------
    def get_regs(self) -> abi.KvmRegs:
        r = abi.KvmRegs()
        ioctl(self.fd, Ioctl.GET_REGS, r)
        return r

    def set_regs(self, regs: abi.KvmRegs) -> None:
        ioctl(self.fd, Ioctl.SET_REGS, regs)

    def get_sregs(self) -> abi.KvmSregs:
        s = abi.KvmSregs()
        ioctl(self.fd, Ioctl.GET_SREGS, s)
        return s

    def set_sregs(self, sregs: abi.KvmSregs) -> None:
        ioctl(self.fd, Ioctl.SET_SREGS, sregs)

    def get_fpu(self) -> abi.KvmFpu:
        f = abi.KvmFpu()
        ioctl(self.fd, Ioctl.GET_FPU, f)
        return f

    def set_fpu(self, fpu: abi.KvmFpu) -> None:
        ioctl(self.fd, Ioctl.SET_FPU, fpu)

    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        """Read MSRs; ones KVM refuses are left out of the result."""
        buf = abi.kvm_msrs_type(max(len(indices), 1))()
        buf.nmsrs = len(indices)
        for i, idx in enumerate(indices):
            buf.entries[i].index = idx
        n = ioctl(self.fd, Ioctl.GET_MSRS, buf)
        return {buf.entries[i].index: buf.entries[i].data for i in range(n)}

    def set_msrs(self, values: dict[int, int]) -> int:
        """Write MSRs in order; returns how many KVM accepted (it stops at the first it refuses)."""
        items = list(values.items())
        buf = abi.kvm_msrs_type(max(len(items), 1))()
        buf.nmsrs = len(items)
        for i, (idx, val) in enumerate(items):
            buf.entries[i].index = idx
            buf.entries[i].data = val
        return ioctl(self.fd, Ioctl.SET_MSRS, buf)

    def set_cpuid(self, entries: list[abi.KvmCpuidEntry2]) -> None:
        buf = abi.kvm_cpuid2_type(max(len(entries), 1))()
        buf.nent = len(entries)
        for i, e in enumerate(entries):
            buf.entries[i] = e
        ioctl(self.fd, Ioctl.SET_CPUID2, buf)

    def get_cpuid(self, max_entries: int = 256) -> list[abi.KvmCpuidEntry2]:
        buf = abi.kvm_cpuid2_type(max_entries)()
        buf.nent = max_entries
        ioctl(self.fd, Ioctl.GET_CPUID2, buf)
        return [abi.KvmCpuidEntry2.from_buffer_copy(buf.entries[i]) for i in range(buf.nent)]

    def get_lapic(self) -> abi.KvmLapicState:
        st = abi.KvmLapicState()
        ioctl(self.fd, Ioctl.GET_LAPIC, st)
        return st

    def set_lapic(self, st: abi.KvmLapicState) -> None:
        ioctl(self.fd, Ioctl.SET_LAPIC, st)

    def get_mp_state(self) -> int:
        st = abi.KvmMpState()
        ioctl(self.fd, Ioctl.GET_MP_STATE, st)
        return st.mp_state

    def set_mp_state(self, state: int) -> None:
        ioctl(self.fd, Ioctl.SET_MP_STATE, abi.KvmMpState(mp_state=int(state)))

    def get_events(self) -> abi.KvmVcpuEvents:
        ev = abi.KvmVcpuEvents()
        ioctl(self.fd, Ioctl.GET_VCPU_EVENTS, ev)
        return ev

    def set_events(self, ev: abi.KvmVcpuEvents) -> None:
        ioctl(self.fd, Ioctl.SET_VCPU_EVENTS, ev)

    def get_xsave(self) -> abi.KvmXsave:
        x = abi.KvmXsave()
        ioctl(self.fd, Ioctl.GET_XSAVE, x)
        return x

    def set_xsave(self, x: abi.KvmXsave) -> None:
        ioctl(self.fd, Ioctl.SET_XSAVE, x)

    # -- state for save/restore (see pyvmm.kvm.vcpu_state) ---------------------------------------
    def get_xsave_image(self, size: int) -> bytes:
        """The XSAVE image: KVM_GET_XSAVE2 into ``size`` bytes (KVM_CAP_XSAVE2's value), else KVM_GET_XSAVE."""
        if size > ctypes.sizeof(abi.KvmXsave):
            buf = (ctypes.c_uint8 * size)()
            ioctl(self.fd, Ioctl.GET_XSAVE2, buf)
            return bytes(buf)
        return bytes(self.get_xsave())

    def set_xsave_image(self, image: bytes, size: int = 0) -> None:
        """KVM_SET_XSAVE.  The kernel reads as many bytes as its own XSAVE2 size (``size``, from
        KVM_CAP_XSAVE2), so a smaller image from another host is padded with zeros (features it
        did not have stay in their init state)."""
        n = max(len(image), size, ctypes.sizeof(abi.KvmXsave))
        buf = (ctypes.c_uint8 * n).from_buffer_copy(image.ljust(n, b"\0"))
        ioctl(self.fd, Ioctl.SET_XSAVE, buf)

    def get_sregs2(self) -> abi.KvmSregs2:
        s = abi.KvmSregs2()
        ioctl(self.fd, Ioctl.GET_SREGS2, s)
        return s

    def set_sregs2(self, sregs: abi.KvmSregs2) -> None:
        ioctl(self.fd, Ioctl.SET_SREGS2, sregs)

    def get_xcrs(self) -> abi.KvmXcrs:
        x = abi.KvmXcrs()
        ioctl(self.fd, Ioctl.GET_XCRS, x)
        return x

    def set_xcrs(self, x: abi.KvmXcrs) -> None:
        ioctl(self.fd, Ioctl.SET_XCRS, x)

    def get_debugregs(self) -> abi.KvmDebugregs:
        d = abi.KvmDebugregs()
        ioctl(self.fd, Ioctl.GET_DEBUGREGS, d)
        return d

    def set_debugregs(self, d: abi.KvmDebugregs) -> None:
        ioctl(self.fd, Ioctl.SET_DEBUGREGS, d)

    def get_tsc_khz(self) -> int:
        """The guest TSC frequency in kHz (KVM_CAP_GET_TSC_KHZ)."""
        return ioctl(self.fd, Ioctl.GET_TSC_KHZ)

    def set_tsc_khz(self, khz: int) -> None:
        """Scale the guest TSC to ``khz`` (KVM_CAP_TSC_CONTROL; the host must support TSC scaling)."""
        ioctl(self.fd, Ioctl.SET_TSC_KHZ, khz)

    def has_tsc_offset_attr(self) -> bool:
        """Whether KVM_VCPU_TSC_OFFSET can be read and set (KVM_CAP_VCPU_ATTRIBUTES, Linux 5.16+)."""
        attr = abi.KvmDeviceAttr(group=abi.KVM_VCPU_TSC_CTRL, attr=abi.KVM_VCPU_TSC_OFFSET)
        ret, _ = ioctl_errno(self.fd, Ioctl.HAS_DEVICE_ATTR, attr)
        return ret == 0

    def get_tsc_offset(self) -> int:
        value = ctypes.c_uint64()
        attr = abi.KvmDeviceAttr(group=abi.KVM_VCPU_TSC_CTRL, attr=abi.KVM_VCPU_TSC_OFFSET,
                                 addr=ctypes.addressof(value))
        ioctl(self.fd, Ioctl.GET_DEVICE_ATTR, attr)
        return value.value

    def set_tsc_offset(self, offset: int) -> None:
        """Guest TSC = host TSC (scaled) + ``offset``, set exactly (no "within a second means in sync" guess)."""
        value = ctypes.c_uint64(offset & (2**64 - 1))
        attr = abi.KvmDeviceAttr(group=abi.KVM_VCPU_TSC_CTRL, attr=abi.KVM_VCPU_TSC_OFFSET,
                                 addr=ctypes.addressof(value))
        ioctl(self.fd, Ioctl.SET_DEVICE_ATTR, attr)

    def read_msrs(self, indices: list[int]) -> tuple[dict[int, int], list[int]]:
        """Read every MSR in ``indices`` KVM lets us read: (values, refused indices).

        KVM_GET_MSRS stops at the first MSR it cannot read and returns how many it read, so the
        refused one is skipped and the batch goes on from the next one.
        """
        values: dict[int, int] = {}
        refused: list[int] = []
        pending = list(indices)
        while pending:
            got = self.get_msrs(pending)
            values.update(got)
            n = len(got)
            if n < len(pending):
                refused.append(pending[n])
            pending = pending[n + 1:]
        return values, refused

    def write_msrs(self, values: dict[int, int]) -> list[int]:
        """Write every MSR in ``values`` (in order); returns the indices KVM refused, the rest are set."""
        refused: list[int] = []
        items = list(values.items())
        while items:
            n = self.set_msrs(dict(items))
            if n < len(items):
                refused.append(items[n][0])
            items = items[n + 1:]
        return refused

    # -- local APIC helpers ----------------------------------------------------------------------
    def setup_lint(self) -> None:
        """LINT0 = ExtINT (PIC virtual wire) and LINT1 = NMI, as a PC BIOS leaves them."""
        st = self.get_lapic()
        for off, mode in ((APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)):
            reg = ctypes.c_uint32.from_buffer(st, off)
            reg.value = (reg.value & ~0x700) | (mode << 8)
        self.set_lapic(st)

    def apic_id(self) -> int:
        return ctypes.c_uint32.from_buffer(self.get_lapic(), APIC_ID).value >> 24

    def is_uninitialized(self) -> bool:
        return self.get_mp_state() == MpState.UNINITIALIZED

    # -- teardown --------------------------------------------------------------------------------
    def close(self) -> None:
        """Unmap ``kvm_run`` and close the fd.  Any other views of ``run_mmap`` must be gone by now."""
        self.run = None
        if self.run_mmap is not None:
            try:
                self.run_mmap.close()
            except BufferError:
                log.warning("vCPU %d: kvm_run mapping still referenced; it is freed later", self.index)
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
