"""Save and restore the whole state of one KVM vCPU as plain data (for snapshots and migration).

The state is a dict of ints and bytes: each kernel structure is kept as its raw
bytes (the KVM ABI is stable, and the sizes are checked on load), MSRs as packed
``(u32 index, u64 value)`` pairs.  What is saved, with the capability it needs:

==============  ==============================================  ======================
key             ioctl                                           when
==============  ==============================================  ======================
regs            KVM_GET_REGS                                    always
sregs           KVM_GET_SREGS                                   always
sregs2          KVM_GET_SREGS2 (adds the PAE PDPTRs)            KVM_CAP_SREGS2
xsave           KVM_GET_XSAVE2 / KVM_GET_XSAVE                  KVM_CAP_XSAVE(2)
fpu             KVM_GET_FPU                                     without KVM_CAP_XSAVE
xcrs            KVM_GET_XCRS                                    KVM_CAP_XCRS
msrs            KVM_GET_MSRS over KVM_GET_MSR_INDEX_LIST        always (refused MSRs left out)
lapic           KVM_GET_LAPIC                                   in-kernel irqchip
events          KVM_GET_VCPU_EVENTS                             KVM_CAP_VCPU_EVENTS
mp_state        KVM_GET_MP_STATE                                always
debugregs       KVM_GET_DEBUGREGS                               KVM_CAP_DEBUGREGS
tsc_khz         KVM_GET_TSC_KHZ                                 KVM_CAP_GET_TSC_KHZ
==============  ==============================================  ======================

Restore follows the order QEMU's ``kvm_arch_put_registers`` uses, for the same reasons:
the TSC frequency first (MSR_IA32_TSC is scaled by it); general registers; XSAVE then
XCRs; special registers (CR0/CR4/EFER, which decide which MSRs and XSAVE features are
valid); the MSRs; mp_state; the LAPIC (after sregs, whose apic_base enables it); the
TSC-deadline MSR *after* the LAPIC, because loading the LAPIC cancels its timer; the
pending events; the debug registers last.

Call these only while the vCPU is out of KVM_RUN (paused, or not started): a port or
MMIO read that exited to userspace completes only on the next KVM_RUN, so a vCPU
that was merely interrupted in userspace would lose it; the runner parks only after
KVM_RUN has returned EINTR, when the kernel has completed it.
"""

from __future__ import annotations

import ctypes
import logging
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pyvmm.errors import KvmError
from pyvmm.kvm import abi
from pyvmm.kvm.ioctls import Cap, MpState
from pyvmm.kvm.vcpu import Vcpu

if TYPE_CHECKING:
    from pyvmm.kvm.vm import Vm

log = logging.getLogger(__name__)

#: Bumped when the meaning of a key changes; a loader refuses versions it does not know.
VCPU_STATE_VERSION = 1

MSR_IA32_TSC = 0x10
MSR_IA32_TSC_DEADLINE = 0x6E0
#: One saved MSR: index, value.
_MSR_PAIR = struct.Struct("<IQ")
#: XSAVE images are 4 KiB (KVM_GET_XSAVE) up to KVM_CAP_XSAVE2's size (about 11 KiB with AMX).
MAX_XSAVE_SIZE = 64 << 10
MAX_MSRS = 4096

KVM_VCPUEVENT_VALID_NMI_PENDING = 0x1
KVM_VCPUEVENT_VALID_SIPI_VECTOR = 0x2

#: Fixed-size keys and the structure each must match.
_FIXED: dict[str, type[ctypes.Structure]] = {
    "regs": abi.KvmRegs, "sregs": abi.KvmSregs, "sregs2": abi.KvmSregs2, "fpu": abi.KvmFpu,
    "xcrs": abi.KvmXcrs, "lapic": abi.KvmLapicState, "events": abi.KvmVcpuEvents,
    "debugregs": abi.KvmDebugregs,
}

StateDict = dict[str, "int | bytes"]


@dataclass(frozen=True)
class VcpuFeatures:
    """What this host's KVM can save and load (probed once per VM)."""

    xsave_size: int  # 0: no XSAVE (use KVM_GET_FPU); 4096: KVM_GET_XSAVE; more: KVM_GET_XSAVE2
    sregs2: bool
    xcrs: bool
    events: bool
    debugregs: bool
    lapic: bool
    tsc_khz: bool
    tsc_control: bool
    msr_indices: tuple[int, ...]
    #: KVM_VCPU_TSC_OFFSET can be set and KVM_GET_CLOCK reports the host TSC.
    tsc_offset: bool = False

    @classmethod
    def probe(cls, vm: Vm, msr_indices: list[int]) -> VcpuFeatures:
        """Ask ``vm`` (its CHECK_EXTENSION answers for this VM type) what it can save."""
        check = vm.check_extension
        xsave2 = check(Cap.XSAVE2)
        xsave_size = max(xsave2, ctypes.sizeof(abi.KvmXsave)) if check(Cap.XSAVE) else 0
        return cls(xsave_size=xsave_size, sregs2=bool(check(Cap.SREGS2)), xcrs=bool(check(Cap.XCRS)),
                   events=bool(check(Cap.VCPU_EVENTS)), debugregs=bool(check(Cap.DEBUGREGS)),
                   lapic=vm.has_irqchip, tsc_khz=bool(check(Cap.GET_TSC_KHZ)),
                   tsc_control=bool(check(Cap.TSC_CONTROL)), msr_indices=tuple(msr_indices),
                   tsc_offset=bool(check(Cap.VCPU_ATTRIBUTES)))


def save_vcpu(vcpu: Vcpu, feats: VcpuFeatures) -> StateDict:
    """Everything KVM holds for ``vcpu``, as plain data (see the module docstring for the keys)."""
    st: StateDict = {"version": VCPU_STATE_VERSION, "index": vcpu.index}
    if feats.tsc_khz:
        st["tsc_khz"] = vcpu.get_tsc_khz()
    st["regs"] = bytes(vcpu.get_regs())
    st["sregs"] = bytes(vcpu.get_sregs())
    if feats.sregs2:
        st["sregs2"] = bytes(vcpu.get_sregs2())
    if feats.xsave_size:
        st["xsave"] = vcpu.get_xsave_image(feats.xsave_size)
    else:
        st["fpu"] = bytes(vcpu.get_fpu())
    if feats.xcrs:
        st["xcrs"] = bytes(vcpu.get_xcrs())
    values, refused = vcpu.read_msrs(list(feats.msr_indices))
    if refused:
        log.debug("vCPU %d: KVM would not read MSRs %s", vcpu.index, " ".join(f"{i:#x}" for i in refused))
    st["msrs"] = b"".join(_MSR_PAIR.pack(i, v) for i, v in values.items())
    st["mp_state"] = vcpu.get_mp_state()
    if feats.lapic:
        st["lapic"] = bytes(vcpu.get_lapic())
    if feats.events:
        st["events"] = bytes(vcpu.get_events())
    if feats.debugregs:
        st["debugregs"] = bytes(vcpu.get_debugregs())
    return st


def unpack_msrs(data: bytes) -> dict[int, int]:
    if len(data) % _MSR_PAIR.size or len(data) // _MSR_PAIR.size > MAX_MSRS:
        raise KvmError(f"vCPU state: MSR list of {len(data)} bytes is not a whole number of "
                       f"(index, value) pairs or holds more than {MAX_MSRS}")
    return {i: v for i, v in _MSR_PAIR.iter_unpack(data)}


def check_vcpu_state(st: Mapping[str, object], feats: VcpuFeatures) -> None:
    """Refuse, with one line, a state this host cannot load exactly (before anything is changed)."""
    version = st.get("version")
    if version != VCPU_STATE_VERSION:
        raise KvmError(f"vCPU state version {version!r} is not supported (this pyvmm reads version "
                       f"{VCPU_STATE_VERSION})")
    for key, struct_type in _FIXED.items():
        value = st.get(key)
        if value is None:
            continue
        if not isinstance(value, bytes | bytearray) or len(value) != ctypes.sizeof(struct_type):
            raise KvmError(f"vCPU state: '{key}' must be {ctypes.sizeof(struct_type)} bytes")
    for key in ("regs", "sregs", "msrs", "mp_state"):
        if key not in st:
            raise KvmError(f"vCPU state: '{key}' is missing")
    if not isinstance(st["msrs"], bytes | bytearray):
        raise KvmError("vCPU state: 'msrs' must be bytes")
    unpack_msrs(bytes(st["msrs"]))
    mp = st["mp_state"]
    if not isinstance(mp, int) or mp not in {m.value for m in MpState}:
        raise KvmError(f"vCPU state: mp_state {mp!r} is not a KVM mp_state this pyvmm knows")
    xsave = st.get("xsave")
    if xsave is not None:
        if not isinstance(xsave, bytes | bytearray) or not ctypes.sizeof(abi.KvmXsave) <= len(xsave) <= MAX_XSAVE_SIZE:
            raise KvmError(f"vCPU state: 'xsave' must be 4 KiB to {MAX_XSAVE_SIZE >> 10} KiB")
        if not feats.xsave_size:
            raise KvmError("vCPU state has XSAVE state, but KVM on this host has no KVM_CAP_XSAVE")
        if len(xsave) > max(feats.xsave_size, ctypes.sizeof(abi.KvmXsave)):
            raise KvmError(f"vCPU state: XSAVE image of {len(xsave)} bytes is larger than this host's "
                           f"({feats.xsave_size}): the source CPU has features this one lacks")
    elif "fpu" not in st:
        raise KvmError("vCPU state has neither 'xsave' nor 'fpu'")
    for key, present in (("xcrs", feats.xcrs), ("lapic", feats.lapic), ("events", feats.events),
                         ("debugregs", feats.debugregs)):
        if key in st and not present:
            raise KvmError(f"vCPU state has '{key}', which KVM on this host cannot load")
    if feats.lapic and "lapic" not in st:
        raise KvmError("vCPU state has no LAPIC, but this VM has an in-kernel irqchip")
    khz = st.get("tsc_khz")
    if khz is not None and (not isinstance(khz, int) or not 0 <= khz < 1 << 32):
        raise KvmError(f"vCPU state: tsc_khz {khz!r} is out of range")


def _set_guest_tsc(vcpu: Vcpu, tsc: int) -> bool:
    """Make the guest TSC read ``tsc`` now, through KVM_VCPU_TSC_OFFSET; False if KVM cannot.

    Writing MSR_IA32_TSC from the host is not exact: KVM takes a value within a second of what
    it expects (another vCPU's, or the fresh vCPU's own) as "meant to be in sync" and keeps its
    old offset, so a guest restored soon after its VM was made would see its TSC jump.
    """
    if not vcpu.has_tsc_offset_attr():
        return False
    # Offsets add modulo 2**64: move the current offset by how far the TSC must go.
    now = vcpu.get_msrs([MSR_IA32_TSC]).get(MSR_IA32_TSC)
    if now is None:
        return False
    vcpu.set_tsc_offset(vcpu.get_tsc_offset() + tsc - now)
    return True


def load_vcpu(vcpu: Vcpu, st: Mapping[str, object], feats: VcpuFeatures) -> list[int]:
    """Load a state from :func:`save_vcpu` into ``vcpu``; returns the MSRs KVM refused to write."""
    check_vcpu_state(st, feats)

    def raw(key: str) -> bytes:
        value = st[key]
        assert isinstance(value, bytes | bytearray)
        return bytes(value)

    khz = st.get("tsc_khz")
    scaled = False
    if isinstance(khz, int) and khz and feats.tsc_khz and (here := vcpu.get_tsc_khz()) != khz:
        if feats.tsc_control:
            vcpu.set_tsc_khz(khz)  # KVM leaves it unscaled when within its tolerance (250 ppm)
            scaled = vcpu.get_tsc_khz() != here
        else:
            # As QEMU: a frequency mismatch does not abort a migration; the guest's TSC-based time
            # runs off by the ratio until it recalibrates (kvmclock guests are not affected).
            log.warning("vCPU %d: the guest's TSC ran at %d kHz, this host's runs at %d kHz and KVM "
                        "cannot scale it (no KVM_CAP_TSC_CONTROL)", vcpu.index, khz, here)
    vcpu.set_regs(abi.KvmRegs.from_buffer_copy(raw("regs")))
    if "xsave" in st:
        vcpu.set_xsave_image(raw("xsave"), feats.xsave_size)
    else:
        vcpu.set_fpu(abi.KvmFpu.from_buffer_copy(raw("fpu")))
    if "xcrs" in st:
        vcpu.set_xcrs(abi.KvmXcrs.from_buffer_copy(raw("xcrs")))
    if "sregs2" in st and feats.sregs2:
        vcpu.set_sregs2(abi.KvmSregs2.from_buffer_copy(raw("sregs2")))
    else:
        vcpu.set_sregs(abi.KvmSregs.from_buffer_copy(raw("sregs")))
    msrs = unpack_msrs(raw("msrs"))
    # Only MSRs this host's KVM saves and restores (KVM_GET_MSR_INDEX_LIST); the rest are refused.
    known = set(feats.msr_indices)
    unknown = [i for i in msrs if i not in known]
    for i in unknown:
        del msrs[i]
    deadline = msrs.pop(MSR_IA32_TSC_DEADLINE, None)
    tsc = msrs.get(MSR_IA32_TSC)
    # The offset is "guest = host + offset" only while the TSC is not scaled.
    if tsc is not None and feats.tsc_offset and not scaled and _set_guest_tsc(vcpu, tsc):
        del msrs[MSR_IA32_TSC]
    refused = unknown + vcpu.write_msrs(msrs)
    mp_state = st["mp_state"]
    assert isinstance(mp_state, int)
    vcpu.set_mp_state(mp_state)
    if "lapic" in st:
        vcpu.set_lapic(abi.KvmLapicState.from_buffer_copy(raw("lapic")))
    if deadline is not None:
        refused += vcpu.write_msrs({MSR_IA32_TSC_DEADLINE: deadline})
    if "events" in st:
        ev = abi.KvmVcpuEvents.from_buffer_copy(raw("events"))
        ev.flags |= KVM_VCPUEVENT_VALID_NMI_PENDING | KVM_VCPUEVENT_VALID_SIPI_VECTOR
        vcpu.set_events(ev)
    if "debugregs" in st:
        vcpu.set_debugregs(abi.KvmDebugregs.from_buffer_copy(raw("debugregs")))
    if refused:
        log.warning("vCPU %d: KVM refused to restore MSRs %s", vcpu.index,
                    " ".join(f"{i:#x}" for i in refused))
    return refused
