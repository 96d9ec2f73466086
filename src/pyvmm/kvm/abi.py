"""ctypes mirrors of the x86-64 KVM ABI structures (``<linux/kvm.h>``, ``<asm/kvm.h>``).

Each structure carries a size assertion against the kernel's ``sizeof``: an
ioctl number encodes the size of its argument, so a wrong layout would not
merely corrupt data but select a different (or no) ioctl.  Only the members
pyvmm reads or writes are spelled out; the rest are padding of the right size.

Variable-length structures (``kvm_msrs``, ``kvm_cpuid2``, ``kvm_irq_routing``)
are built by factory functions that append an entry array of the requested
length to the fixed header.
"""

from __future__ import annotations

from ctypes import (
    Structure,
    Union,
    c_int32,
    c_int64,
    c_uint8,
    c_uint16,
    c_uint32,
    c_uint64,
    sizeof,
)
from functools import cache

u8, u16, u32, u64, s32, s64 = c_uint8, c_uint16, c_uint32, c_uint64, c_int32, c_int64


def _check(struct: type, size: int) -> None:
    assert sizeof(struct) == size, f"{struct.__name__}: {sizeof(struct)} != kernel size {size}"


# --------------------------------------------------------------------------------------------
# struct kvm_run and the exit-reason payloads used by pyvmm
# --------------------------------------------------------------------------------------------
class KvmRunIo(Structure):
    """KVM_EXIT_IO: data lives at ``kvm_run + data_offset`` (``count`` items of ``size`` bytes)."""

    _fields_ = [("direction", u8), ("size", u8), ("port", u16), ("count", u32), ("data_offset", u64)]


_check(KvmRunIo, 16)


class KvmRunMmio(Structure):
    _fields_ = [("phys_addr", u64), ("data", u8 * 8), ("len", u32), ("is_write", u8), ("_pad", u8 * 3)]


_check(KvmRunMmio, 24)


class KvmRunFailEntry(Structure):
    _fields_ = [("hardware_entry_failure_reason", u64), ("cpu", u32), ("_pad", u32)]


_check(KvmRunFailEntry, 16)


class KvmRunInternal(Structure):
    """KVM_EXIT_INTERNAL_ERROR; for suberror EMULATION ``data`` starts with flags then insn bytes."""

    _fields_ = [("suberror", u32), ("ndata", u32), ("data", u64 * 16)]


_check(KvmRunInternal, 136)


class KvmRunSystemEvent(Structure):
    _fields_ = [("type", u32), ("ndata", u32), ("data", u64 * 16)]


_check(KvmRunSystemEvent, 136)


class KvmRunHypercall(Structure):
    _fields_ = [("nr", u64), ("args", u64 * 6), ("ret", u64), ("longmode", u32), ("pad", u32)]


_check(KvmRunHypercall, 72)


class KvmRunEx(Structure):
    _fields_ = [("exception", u32), ("error_code", u32)]


class KvmRunExitUnion(Union):
    _fields_ = [
        ("hw_exit_reason", u64),
        ("fail_entry", KvmRunFailEntry),
        ("ex", KvmRunEx),
        ("io", KvmRunIo),
        ("mmio", KvmRunMmio),
        ("hypercall", KvmRunHypercall),
        ("internal", KvmRunInternal),
        ("system_event", KvmRunSystemEvent),
        ("_pad", u8 * 256),
    ]


_check(KvmRunExitUnion, 256)


class KvmRun(Structure):
    """The per-vCPU shared page(s) mapped from the vCPU fd."""

    _fields_ = [
        ("request_interrupt_window", u8),
        ("immediate_exit", u8),
        ("_padding1", u8 * 6),
        ("exit_reason", u32),
        ("ready_for_interrupt_injection", u8),
        ("if_flag", u8),
        ("flags", u16),
        ("cr8", u64),
        ("apic_base", u64),
        ("u", KvmRunExitUnion),
        ("kvm_valid_regs", u64),
        ("kvm_dirty_regs", u64),
        ("s", u8 * 2048),
    ]


_check(KvmRun, 2352)
#: Offset of the exit union inside ``kvm_run`` (where the io/mmio/... payloads start).
KVM_RUN_EXIT_OFFSET = KvmRun.u.offset
assert KVM_RUN_EXIT_OFFSET == 32
KVM_RUN_EXIT_REASON_OFFSET = KvmRun.exit_reason.offset
KVM_RUN_IMMEDIATE_EXIT_OFFSET = KvmRun.immediate_exit.offset


# --------------------------------------------------------------------------------------------
# Registers
# --------------------------------------------------------------------------------------------
class KvmRegs(Structure):
    _fields_ = [(n, u64) for n in (
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")]


_check(KvmRegs, 144)


class KvmSegment(Structure):
    _fields_ = [
        ("base", u64), ("limit", u32), ("selector", u16), ("type", u8), ("present", u8), ("dpl", u8),
        ("db", u8), ("s", u8), ("l", u8), ("g", u8), ("avl", u8), ("unusable", u8), ("padding", u8),
    ]


_check(KvmSegment, 24)


class KvmDtable(Structure):
    _fields_ = [("base", u64), ("limit", u16), ("padding", u16 * 3)]


_check(KvmDtable, 16)

KVM_NR_INTERRUPTS = 256


class KvmSregs(Structure):
    _fields_ = [
        ("cs", KvmSegment), ("ds", KvmSegment), ("es", KvmSegment), ("fs", KvmSegment),
        ("gs", KvmSegment), ("ss", KvmSegment), ("tr", KvmSegment), ("ldt", KvmSegment),
        ("gdt", KvmDtable), ("idt", KvmDtable),
        ("cr0", u64), ("cr2", u64), ("cr3", u64), ("cr4", u64), ("cr8", u64),
        ("efer", u64), ("apic_base", u64),
        ("interrupt_bitmap", u64 * ((KVM_NR_INTERRUPTS + 63) // 64)),
    ]


_check(KvmSregs, 312)


class KvmFpu(Structure):
    _fields_ = [
        ("fpr", (u8 * 16) * 8), ("fcw", u16), ("fsw", u16), ("ftwx", u8), ("pad1", u8),
        ("last_opcode", u16), ("last_ip", u64), ("last_dp", u64), ("xmm", (u8 * 16) * 16),
        ("mxcsr", u32), ("pad2", u32),
    ]


_check(KvmFpu, 416)


class KvmMsrEntry(Structure):
    _fields_ = [("index", u32), ("reserved", u32), ("data", u64)]


_check(KvmMsrEntry, 16)


class KvmMsrsHeader(Structure):
    _fields_ = [("nmsrs", u32), ("pad", u32)]


_check(KvmMsrsHeader, 8)


@cache
def kvm_msrs_type(n: int) -> type[Structure]:
    """``struct kvm_msrs`` with room for ``n`` entries."""
    return type(f"KvmMsrs{n}", (Structure,), {"_fields_": [
        ("nmsrs", u32), ("pad", u32), ("entries", KvmMsrEntry * n)]})


class KvmMsrList(Structure):
    """``struct kvm_msr_list`` header (followed by ``nmsrs`` u32 indices)."""

    _fields_ = [("nmsrs", u32)]


class KvmCpuidEntry2(Structure):
    _fields_ = [
        ("function", u32), ("index", u32), ("flags", u32),
        ("eax", u32), ("ebx", u32), ("ecx", u32), ("edx", u32), ("padding", u32 * 3),
    ]


_check(KvmCpuidEntry2, 40)
KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1


class KvmCpuid2Header(Structure):
    _fields_ = [("nent", u32), ("padding", u32)]


_check(KvmCpuid2Header, 8)


@cache
def kvm_cpuid2_type(n: int) -> type[Structure]:
    """``struct kvm_cpuid2`` with room for ``n`` entries."""
    return type(f"KvmCpuid2_{n}", (Structure,), {"_fields_": [
        ("nent", u32), ("padding", u32), ("entries", KvmCpuidEntry2 * n)]})


KVM_APIC_REG_SIZE = 0x400


class KvmLapicState(Structure):
    _fields_ = [("regs", u8 * KVM_APIC_REG_SIZE)]


_check(KvmLapicState, 1024)


class KvmIrqchip(Structure):
    """``struct kvm_irqchip``: chip id (0 PIC master, 1 PIC slave, 2 IOAPIC) and raw chip state."""

    _fields_ = [("chip_id", u32), ("pad", u32), ("chip", u8 * 512)]


_check(KvmIrqchip, 520)


class KvmPitConfig(Structure):
    _fields_ = [("flags", u32), ("pad", u32 * 15)]


_check(KvmPitConfig, 64)
KVM_PIT_SPEAKER_DUMMY = 1


class KvmPitChannelState(Structure):
    _fields_ = [
        ("count", u32), ("latched_count", u16), ("count_latched", u8), ("status_latched", u8),
        ("status", u8), ("read_state", u8), ("write_state", u8), ("write_latch", u8),
        ("rw_mode", u8), ("mode", u8), ("bcd", u8), ("gate", u8), ("count_load_time", s64),
    ]


_check(KvmPitChannelState, 24)


class KvmPitState2(Structure):
    _fields_ = [("channels", KvmPitChannelState * 3), ("flags", u32), ("reserved", u32 * 9)]


_check(KvmPitState2, 112)


class KvmUserspaceMemoryRegion(Structure):
    _fields_ = [
        ("slot", u32), ("flags", u32), ("guest_phys_addr", u64), ("memory_size", u64),
        ("userspace_addr", u64),
    ]


_check(KvmUserspaceMemoryRegion, 32)
KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1


class KvmIoeventfd(Structure):
    _fields_ = [
        ("datamatch", u64), ("addr", u64), ("len", u32), ("fd", s32), ("flags", u32), ("pad", u8 * 36),
    ]


_check(KvmIoeventfd, 64)
KVM_IOEVENTFD_FLAG_DATAMATCH = 1 << 0
KVM_IOEVENTFD_FLAG_PIO = 1 << 1
KVM_IOEVENTFD_FLAG_DEASSIGN = 1 << 2


class KvmIrqfd(Structure):
    _fields_ = [("fd", u32), ("gsi", u32), ("flags", u32), ("resamplefd", u32), ("pad", u8 * 16)]


_check(KvmIrqfd, 32)
KVM_IRQFD_FLAG_DEASSIGN = 1 << 0
KVM_IRQFD_FLAG_RESAMPLE = 1 << 1


class KvmIrqRoutingIrqchip(Structure):
    _fields_ = [("irqchip", u32), ("pin", u32)]


class KvmIrqRoutingMsi(Structure):
    _fields_ = [("address_lo", u32), ("address_hi", u32), ("data", u32), ("devid", u32)]


class KvmIrqRoutingU(Union):
    _fields_ = [("irqchip", KvmIrqRoutingIrqchip), ("msi", KvmIrqRoutingMsi), ("pad", u32 * 8)]


class KvmIrqRoutingEntry(Structure):
    _fields_ = [("gsi", u32), ("type", u32), ("flags", u32), ("pad", u32), ("u", KvmIrqRoutingU)]


_check(KvmIrqRoutingEntry, 48)
KVM_IRQ_ROUTING_IRQCHIP = 1
KVM_IRQ_ROUTING_MSI = 2
KVM_IRQCHIP_PIC_MASTER = 0
KVM_IRQCHIP_PIC_SLAVE = 1
KVM_IRQCHIP_IOAPIC = 2


class KvmIrqRoutingHeader(Structure):
    _fields_ = [("nr", u32), ("flags", u32)]


_check(KvmIrqRoutingHeader, 8)


@cache
def kvm_irq_routing_type(n: int) -> type[Structure]:
    """``struct kvm_irq_routing`` with room for ``n`` entries."""
    return type(f"KvmIrqRouting{n}", (Structure,), {"_fields_": [
        ("nr", u32), ("flags", u32), ("entries", KvmIrqRoutingEntry * n)]})


class KvmClockData(Structure):
    _fields_ = [
        ("clock", u64), ("flags", u32), ("pad0", u32), ("realtime", u64), ("host_tsc", u64),
        ("pad", u32 * 4),
    ]


_check(KvmClockData, 48)


class _VcpuEventsException(Structure):
    _fields_ = [("injected", u8), ("nr", u8), ("has_error_code", u8), ("pending", u8), ("error_code", u32)]


class _VcpuEventsInterrupt(Structure):
    _fields_ = [("injected", u8), ("nr", u8), ("soft", u8), ("shadow", u8)]


class _VcpuEventsNmi(Structure):
    _fields_ = [("injected", u8), ("pending", u8), ("masked", u8), ("pad", u8)]


class _VcpuEventsSmi(Structure):
    _fields_ = [("smm", u8), ("pending", u8), ("smm_inside_nmi", u8), ("latched_init", u8)]


class KvmVcpuEvents(Structure):
    _fields_ = [
        ("exception", _VcpuEventsException), ("interrupt", _VcpuEventsInterrupt),
        ("nmi", _VcpuEventsNmi), ("sipi_vector", u32), ("flags", u32), ("smi", _VcpuEventsSmi),
        ("triple_fault_pending", u8), ("reserved", u8 * 26), ("exception_has_payload", u8),
        ("exception_payload", u64),
    ]


_check(KvmVcpuEvents, 64)
assert KvmVcpuEvents.exception_payload.offset == 56


class KvmXsave(Structure):
    _fields_ = [("region", u32 * 1024)]


_check(KvmXsave, 4096)


class KvmIrqLevel(Structure):
    """``struct kvm_irq_level``: ``irq`` (in) shares storage with ``status`` (out)."""

    _fields_ = [("irq", u32), ("level", u32)]


_check(KvmIrqLevel, 8)


class KvmMpState(Structure):
    _fields_ = [("mp_state", u32)]


_check(KvmMpState, 4)


class KvmMsi(Structure):
    _fields_ = [
        ("address_lo", u32), ("address_hi", u32), ("data", u32), ("flags", u32), ("devid", u32),
        ("pad", u8 * 12),
    ]


_check(KvmMsi, 32)


class KvmEnableCap(Structure):
    _fields_ = [("cap", u32), ("flags", u32), ("args", u64 * 4), ("pad", u8 * 64)]


_check(KvmEnableCap, 104)


# --------------------------------------------------------------------------------------------
# VM state: save/restore and dirty logging
# --------------------------------------------------------------------------------------------
class KvmSregs2(Structure):
    """``struct kvm_sregs2`` (KVM_CAP_SREGS2): sregs without the interrupt bitmap, plus PAE PDPTRs."""

    _fields_ = [
        ("cs", KvmSegment), ("ds", KvmSegment), ("es", KvmSegment), ("fs", KvmSegment),
        ("gs", KvmSegment), ("ss", KvmSegment), ("tr", KvmSegment), ("ldt", KvmSegment),
        ("gdt", KvmDtable), ("idt", KvmDtable),
        ("cr0", u64), ("cr2", u64), ("cr3", u64), ("cr4", u64), ("cr8", u64),
        ("efer", u64), ("apic_base", u64), ("flags", u64), ("pdptrs", u64 * 4),
    ]


_check(KvmSregs2, 320)
KVM_SREGS2_FLAGS_PDPTRS_VALID = 1


class KvmXcr(Structure):
    _fields_ = [("xcr", u32), ("reserved", u32), ("value", u64)]


KVM_MAX_XCRS = 16


class KvmXcrs(Structure):
    _fields_ = [("nr_xcrs", u32), ("flags", u32), ("xcrs", KvmXcr * KVM_MAX_XCRS), ("padding", u64 * 16)]


_check(KvmXcrs, 392)


class KvmDebugregs(Structure):
    _fields_ = [("db", u64 * 4), ("dr6", u64), ("dr7", u64), ("flags", u64), ("reserved", u64 * 9)]


_check(KvmDebugregs, 128)


class KvmDirtyLog(Structure):
    """``struct kvm_dirty_log``: the slot and the userspace address of its bitmap (one bit per page)."""

    _fields_ = [("slot", u32), ("padding1", u32), ("dirty_bitmap", u64)]


_check(KvmDirtyLog, 16)


class KvmDeviceAttr(Structure):
    """``struct kvm_device_attr`` (vCPU attributes, KVM_CAP_VCPU_ATTRIBUTES); ``addr`` points at the value."""

    _fields_ = [("flags", u32), ("group", u32), ("attr", u64), ("addr", u64)]


_check(KvmDeviceAttr, 24)
KVM_VCPU_TSC_CTRL = 0
KVM_VCPU_TSC_OFFSET = 0
KVM_CLOCK_TSC_STABLE = 1 << 1
KVM_CLOCK_REALTIME = 1 << 2
KVM_CLOCK_HOST_TSC = 1 << 3
