"""VM state of tcg vCPUs, including what unicorn's API does not show.

Unicorn keeps the whole x86 CPU state in QEMU's ``CPUX86State``: general, segment (with
their hidden descriptor caches), control, debug and FPU/SSE/AVX registers, the MSRs it
emulates (EFER, STAR/LSTAR/CSTAR/FMASK, KERNEL_GS_BASE, SYSENTER, PAT, ...), hflags and the
pending-exception bookkeeping.  ``uc_context_save`` copies exactly that structure, up to
its per-process part; this module saves those bytes as they are (the same unicorn build
restores them: native.py refuses any other) and adds what pvtcg.c keeps beside unicorn: the
virtual TSC (saved as its value, so guest time continues on the destination), TSC_ADJUST,
TSC_DEADLINE, APIC_BASE, a pending NMI and whether an application processor still waits
for its Startup IPI.  The caller has parked the vCPU threads.
"""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING, Any

from pyvmm.errors import AccelError
from pyvmm.vmstate import VmStateError, fields

if TYPE_CHECKING:
    from pyvmm.accel.tcg.cpu import TcgVcpu

VERSION = 1


def env_size(vcpu: TcgVcpu) -> int:
    """Bytes of CPUX86State that ``uc_context_save`` copies (its context header's first field)."""
    uc = vcpu.uc
    assert uc is not None
    ctx = uc.context_save()
    size = ctypes.c_size_t.from_address(ctx.context.value).value
    if not 0x1000 <= size <= 0x10000:
        raise AccelError(f"tcg: unicorn's CPU context size {size:#x} is not what VM state expects")
    return int(size)


def save_vcpu(vcpu: TcgVcpu) -> dict[str, Any]:
    v, ffi, lib = vcpu._v, vcpu.nat.ffi, vcpu.nat.lib
    if v is None:
        raise VmStateError(f"tcg: vCPU {vcpu.index} has no engine")
    size = env_size(vcpu)
    return {
        "env": bytes(ffi.buffer(v.env, size)),
        "tsc": int(lib.pv_tsc_now(v)),
        "tsc_hz": int(v.tsc_hz),
        "tsc_deadline": int(v.tsc_deadline),
        "tsc_adjust": int(v.tsc_adjust),
        "apic_base": int(v.apic_base),
        "nmi_pending": bool(lib.pv_nmi_pending(v)),
        "wait_sipi": bool(vcpu._wait_sipi),
    }


def load_vcpu(vcpu: TcgVcpu, st: dict[str, Any]) -> None:
    v, ffi, lib, uc = vcpu._v, vcpu.nat.ffi, vcpu.nat.lib, vcpu.uc
    what = f"tcg vCPU {vcpu.index}"
    if v is None or uc is None:
        raise VmStateError(f"{what} has no engine")
    env = fields.need(st, "env", bytes, what)
    size = env_size(vcpu)
    if len(env) != size:
        raise VmStateError(f"{what}: CPU state of {len(env)} bytes in the stream, this unicorn keeps {size}")
    if fields.need(st, "tsc_hz", int, what) != v.tsc_hz:
        raise VmStateError(f"{what}: TSC frequency {st['tsc_hz']} Hz in the stream, {v.tsc_hz} Hz here")
    tsc, deadline, adjust, apic_base = (fields.need(st, k, int, what) & 0xFFFF_FFFF_FFFF_FFFF
                                        for k in ("tsc", "tsc_deadline", "tsc_adjust", "apic_base"))
    ffi.memmove(v.env, env, size)
    lib.pv_tsc_set(v, tsc)
    v.tsc_deadline = deadline
    v.tsc_adjust = adjust
    v.apic_base = (apic_base & 0xD00) | 0xFEE00000
    vcpu._wait_sipi = bool(st.get("wait_sipi"))
    vcpu._init_pending = False
    vcpu._sipi_vector = None
    vcpu._dead = False
    lib.pv_clear_old_exception(v)
    if st.get("nmi_pending"):
        lib.pv_raise_nmi(v)
    uc.ctl_flush_tb()  # type: ignore[attr-defined]
