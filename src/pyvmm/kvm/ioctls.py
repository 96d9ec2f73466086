"""KVM ioctl numbers, exit reasons and capability numbers.

The numbers are computed the way ``<asm-generic/ioctl.h>`` does, from the
argument structure sizes in :mod:`pyvmm.kvm.abi`, so a layout mistake shows up
as a mismatch against the kernel headers (checked by the tests) rather than as
a silently different ioctl.
"""

from __future__ import annotations

import enum
from ctypes import sizeof

from pyvmm.kvm import abi

_IOC_NRBITS, _IOC_TYPEBITS, _IOC_SIZEBITS = 8, 8, 14
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2

KVMIO = 0xAE


def _IOC(direction: int, typ: int, nr: int, size: int) -> int:
    assert 0 <= size < (1 << _IOC_SIZEBITS)
    return (direction << _IOC_DIRSHIFT) | (typ << _IOC_TYPESHIFT) | (nr << _IOC_NRSHIFT) | (size << _IOC_SIZESHIFT)


def _IO(nr: int) -> int:
    return _IOC(_IOC_NONE, KVMIO, nr, 0)


def _IOR(nr: int, struct: type | int) -> int:
    return _IOC(_IOC_READ, KVMIO, nr, struct if isinstance(struct, int) else sizeof(struct))


def _IOW(nr: int, struct: type | int) -> int:
    return _IOC(_IOC_WRITE, KVMIO, nr, struct if isinstance(struct, int) else sizeof(struct))


def _IOWR(nr: int, struct: type | int) -> int:
    return _IOC(_IOC_READ | _IOC_WRITE, KVMIO, nr, struct if isinstance(struct, int) else sizeof(struct))


class Ioctl(enum.IntEnum):
    """Every KVM ioctl pyvmm issues (system, VM and vCPU fds)."""

    # /dev/kvm
    GET_API_VERSION = _IO(0x00)
    CREATE_VM = _IO(0x01)
    GET_MSR_INDEX_LIST = _IOWR(0x02, abi.KvmMsrList)
    CHECK_EXTENSION = _IO(0x03)
    GET_VCPU_MMAP_SIZE = _IO(0x04)
    GET_SUPPORTED_CPUID = _IOWR(0x05, abi.KvmCpuid2Header)
    # VM fd
    CREATE_VCPU = _IO(0x41)
    GET_DIRTY_LOG = _IOW(0x42, abi.KvmDirtyLog)
    SET_USER_MEMORY_REGION = _IOW(0x46, abi.KvmUserspaceMemoryRegion)
    SET_TSS_ADDR = _IO(0x47)
    SET_IDENTITY_MAP_ADDR = _IOW(0x48, 8)
    CREATE_IRQCHIP = _IO(0x60)
    IRQ_LINE = _IOW(0x61, abi.KvmIrqLevel)
    GET_IRQCHIP = _IOWR(0x62, abi.KvmIrqchip)
    SET_IRQCHIP = _IOR(0x63, abi.KvmIrqchip)
    IRQ_LINE_STATUS = _IOWR(0x67, abi.KvmIrqLevel)
    SET_GSI_ROUTING = _IOW(0x6A, abi.KvmIrqRoutingHeader)
    IRQFD = _IOW(0x76, abi.KvmIrqfd)
    CREATE_PIT2 = _IOW(0x77, abi.KvmPitConfig)
    IOEVENTFD = _IOW(0x79, abi.KvmIoeventfd)
    SET_CLOCK = _IOW(0x7B, abi.KvmClockData)
    GET_CLOCK = _IOR(0x7C, abi.KvmClockData)
    GET_PIT2 = _IOR(0x9F, abi.KvmPitState2)
    SET_PIT2 = _IOW(0xA0, abi.KvmPitState2)
    SIGNAL_MSI = _IOW(0xA5, abi.KvmMsi)
    ENABLE_CAP = _IOW(0xA3, abi.KvmEnableCap)
    # vCPU fd
    RUN = _IO(0x80)
    GET_REGS = _IOR(0x81, abi.KvmRegs)
    SET_REGS = _IOW(0x82, abi.KvmRegs)
    GET_SREGS = _IOR(0x83, abi.KvmSregs)
    SET_SREGS = _IOW(0x84, abi.KvmSregs)
    GET_MSRS = _IOWR(0x88, abi.KvmMsrsHeader)
    SET_MSRS = _IOW(0x89, abi.KvmMsrsHeader)
    GET_FPU = _IOR(0x8C, abi.KvmFpu)
    SET_FPU = _IOW(0x8D, abi.KvmFpu)
    GET_LAPIC = _IOR(0x8E, abi.KvmLapicState)
    SET_LAPIC = _IOW(0x8F, abi.KvmLapicState)
    SET_CPUID2 = _IOW(0x90, abi.KvmCpuid2Header)
    GET_CPUID2 = _IOWR(0x91, abi.KvmCpuid2Header)
    GET_MP_STATE = _IOR(0x98, abi.KvmMpState)
    SET_MP_STATE = _IOW(0x99, abi.KvmMpState)
    GET_VCPU_EVENTS = _IOR(0x9F, abi.KvmVcpuEvents)
    SET_VCPU_EVENTS = _IOW(0xA0, abi.KvmVcpuEvents)
    GET_XSAVE = _IOR(0xA4, abi.KvmXsave)
    SET_XSAVE = _IOW(0xA5, abi.KvmXsave)
    GET_DEBUGREGS = _IOR(0xA1, abi.KvmDebugregs)
    SET_DEBUGREGS = _IOW(0xA2, abi.KvmDebugregs)
    SET_TSC_KHZ = _IO(0xA2)
    GET_TSC_KHZ = _IO(0xA3)
    GET_XCRS = _IOR(0xA6, abi.KvmXcrs)
    SET_XCRS = _IOW(0xA7, abi.KvmXcrs)
    KVMCLOCK_CTRL = _IO(0xAD)
    GET_SREGS2 = _IOR(0xCC, abi.KvmSregs2)
    SET_SREGS2 = _IOW(0xCD, abi.KvmSregs2)
    #: Like GET_XSAVE, but the buffer is as large as KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2) says.
    GET_XSAVE2 = _IOR(0xCF, abi.KvmXsave)
    SET_DEVICE_ATTR = _IOW(0xE1, abi.KvmDeviceAttr)
    GET_DEVICE_ATTR = _IOW(0xE2, abi.KvmDeviceAttr)
    HAS_DEVICE_ATTR = _IOW(0xE3, abi.KvmDeviceAttr)


KVM_API_VERSION = 12


class ExitReason(enum.IntEnum):
    UNKNOWN = 0
    EXCEPTION = 1
    IO = 2
    HYPERCALL = 3
    DEBUG = 4
    HLT = 5
    MMIO = 6
    IRQ_WINDOW_OPEN = 7
    SHUTDOWN = 8
    FAIL_ENTRY = 9
    INTR = 10
    SET_TPR = 11
    TPR_ACCESS = 12
    NMI = 16
    INTERNAL_ERROR = 17
    WATCHDOG = 21
    SYSTEM_EVENT = 24
    IOAPIC_EOI = 26
    HYPERV = 27
    X86_RDMSR = 29
    X86_WRMSR = 30
    DIRTY_RING_FULL = 31
    AP_RESET_HOLD = 32
    X86_BUS_LOCK = 33
    XEN = 34
    NOTIFY = 37


class IoDirection(enum.IntEnum):
    IN = 0
    OUT = 1


class InternalError(enum.IntEnum):
    EMULATION = 1
    SIMUL_EX = 2
    DELIVERY_EV = 3
    UNEXPECTED_EXIT_REASON = 4


class SystemEvent(enum.IntEnum):
    SHUTDOWN = 1
    RESET = 2
    CRASH = 3
    WAKEUP = 4
    SUSPEND = 5
    SEV_TERM = 6


class MpState(enum.IntEnum):
    RUNNABLE = 0
    UNINITIALIZED = 1
    INIT_RECEIVED = 2
    HALTED = 3
    SIPI_RECEIVED = 4


class Cap(enum.IntEnum):
    """KVM_CHECK_EXTENSION capability numbers pyvmm cares about."""

    IRQCHIP = 0
    HLT = 1
    USER_MEMORY = 3
    SET_TSS_ADDR = 4
    EXT_CPUID = 7
    CLOCKSOURCE = 8
    NR_VCPUS = 9
    NR_MEMSLOTS = 10
    PIT = 11
    NOP_IO_DELAY = 12
    MP_STATE = 14
    COALESCED_MMIO = 15
    SYNC_MMU = 16
    USER_NMI = 22
    IRQ_ROUTING = 25
    IRQ_INJECT_STATUS = 26
    IRQFD = 32
    PIT2 = 33
    PIT_STATE2 = 35
    IOEVENTFD = 36
    SET_IDENTITY_MAP_ADDR = 37
    ADJUST_CLOCK = 39
    INTERNAL_ERROR_DATA = 40
    VCPU_EVENTS = 41
    DEBUGREGS = 50
    XSAVE = 55
    XCRS = 56
    TSC_CONTROL = 60
    GET_TSC_KHZ = 61
    MAX_VCPUS = 66
    TSC_DEADLINE_TIMER = 72
    SIGNAL_MSI = 77
    READONLY_MEM = 81
    MAX_VCPU_ID = 128
    VCPU_ATTRIBUTES = 127
    X2APIC_API = 129
    IMMEDIATE_EXIT = 136
    X86_DISABLE_EXITS = 143
    EXCEPTION_PAYLOAD = 164
    SREGS2 = 200
    EXIT_ON_EMULATION_FAILURE = 204
    XSAVE2 = 208
    X86_TRIPLE_FAULT_EVENT = 218


#: Capabilities pyvmm cannot run without; checked when /dev/kvm is opened.
REQUIRED_CAPS: tuple[Cap, ...] = (
    Cap.USER_MEMORY,
    Cap.IRQCHIP,
    Cap.PIT2,
    Cap.SET_TSS_ADDR,
    Cap.EXT_CPUID,
    Cap.MP_STATE,
    Cap.IRQ_ROUTING,
    Cap.IMMEDIATE_EXIT,
)
