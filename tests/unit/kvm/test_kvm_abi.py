"""The ctypes ABI mirrors and ioctl numbers against the kernel headers, and /dev/kvm start-up checks."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest

from pyvmm.errors import KvmError
from pyvmm.kvm import abi
from pyvmm.kvm.ioctls import KVM_API_VERSION, REQUIRED_CAPS, Cap, ExitReason, Ioctl
from pyvmm.kvm.syscall import ioctl
from pyvmm.kvm.system import System

# (C struct name, ctypes mirror) pairs checked for size.
STRUCTS = [
    ("kvm_run", abi.KvmRun), ("kvm_regs", abi.KvmRegs), ("kvm_sregs", abi.KvmSregs),
    ("kvm_segment", abi.KvmSegment), ("kvm_dtable", abi.KvmDtable), ("kvm_fpu", abi.KvmFpu),
    ("kvm_msr_entry", abi.KvmMsrEntry), ("kvm_msrs", abi.KvmMsrsHeader),
    ("kvm_cpuid_entry2", abi.KvmCpuidEntry2), ("kvm_cpuid2", abi.KvmCpuid2Header),
    ("kvm_lapic_state", abi.KvmLapicState), ("kvm_irqchip", abi.KvmIrqchip),
    ("kvm_pit_config", abi.KvmPitConfig), ("kvm_pit_state2", abi.KvmPitState2),
    ("kvm_pit_channel_state", abi.KvmPitChannelState),
    ("kvm_userspace_memory_region", abi.KvmUserspaceMemoryRegion), ("kvm_ioeventfd", abi.KvmIoeventfd),
    ("kvm_irqfd", abi.KvmIrqfd), ("kvm_irq_routing", abi.KvmIrqRoutingHeader),
    ("kvm_irq_routing_entry", abi.KvmIrqRoutingEntry), ("kvm_clock_data", abi.KvmClockData),
    ("kvm_vcpu_events", abi.KvmVcpuEvents), ("kvm_xsave", abi.KvmXsave), ("kvm_irq_level", abi.KvmIrqLevel),
    ("kvm_mp_state", abi.KvmMpState), ("kvm_msi", abi.KvmMsi), ("kvm_enable_cap", abi.KvmEnableCap),
    ("kvm_sregs2", abi.KvmSregs2), ("kvm_xcrs", abi.KvmXcrs), ("kvm_xcr", abi.KvmXcr),
    ("kvm_debugregs", abi.KvmDebugregs), ("kvm_dirty_log", abi.KvmDirtyLog),
    ("kvm_device_attr", abi.KvmDeviceAttr),
]

# (C expression, ctypes offset) pairs for fields the exit loop reads directly.
OFFSETS = [
    ("offsetof(struct kvm_run, immediate_exit)", abi.KvmRun.immediate_exit.offset),
    ("offsetof(struct kvm_run, exit_reason)", abi.KvmRun.exit_reason.offset),
    ("offsetof(struct kvm_run, io)", abi.KvmRun.u.offset),
    ("offsetof(struct kvm_run, io.data_offset)", abi.KvmRun.u.offset + abi.KvmRunIo.data_offset.offset),
    ("offsetof(struct kvm_run, mmio.data)", abi.KvmRun.u.offset + abi.KvmRunMmio.data.offset),
    ("offsetof(struct kvm_run, mmio.len)", abi.KvmRun.u.offset + abi.KvmRunMmio.len.offset),
    ("offsetof(struct kvm_run, mmio.is_write)", abi.KvmRun.u.offset + abi.KvmRunMmio.is_write.offset),
    ("offsetof(struct kvm_run, internal.data)", abi.KvmRun.u.offset + abi.KvmRunInternal.data.offset),
    ("offsetof(struct kvm_run, system_event.data)",
     abi.KvmRun.u.offset + abi.KvmRunSystemEvent.data.offset),
    ("offsetof(struct kvm_run, hypercall.ret)", abi.KvmRun.u.offset + abi.KvmRunHypercall.ret.offset),
    ("offsetof(struct kvm_run, kvm_valid_regs)", abi.KvmRun.kvm_valid_regs.offset),
    ("offsetof(struct kvm_sregs, efer)", abi.KvmSregs.efer.offset),
    ("offsetof(struct kvm_sregs, interrupt_bitmap)", abi.KvmSregs.interrupt_bitmap.offset),
    ("offsetof(struct kvm_fpu, mxcsr)", abi.KvmFpu.mxcsr.offset),
    ("offsetof(struct kvm_vcpu_events, sipi_vector)", abi.KvmVcpuEvents.sipi_vector.offset),
    ("offsetof(struct kvm_vcpu_events, exception_payload)", abi.KvmVcpuEvents.exception_payload.offset),
    ("offsetof(struct kvm_irq_routing_entry, u)", abi.KvmIrqRoutingEntry.u.offset),
    ("offsetof(struct kvm_ioeventfd, flags)", abi.KvmIoeventfd.flags.offset),
    ("offsetof(struct kvm_clock_data, realtime)", abi.KvmClockData.realtime.offset),
    ("offsetof(struct kvm_sregs2, flags)", abi.KvmSregs2.flags.offset),
    ("offsetof(struct kvm_debugregs, flags)", abi.KvmDebugregs.flags.offset),
    ("offsetof(struct kvm_dirty_log, dirty_bitmap)", abi.KvmDirtyLog.dirty_bitmap.offset),
]


@pytest.fixture(scope="module")
def kernel_values(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    """Compile a C program against <linux/kvm.h> that prints every value we mirror."""
    if shutil.which("gcc") is None:
        pytest.fail("gcc is needed to compare the ABI mirrors with <linux/kvm.h>")
    if not Path("/usr/include/linux/kvm.h").exists():
        pytest.fail("/usr/include/linux/kvm.h is missing (install linux-libc-dev)")
    exprs = [(f"sizeof:{c}", f"sizeof(struct {c})") for c, _ in STRUCTS]
    exprs += [(f"off:{e}", e) for e, _ in OFFSETS]
    exprs += [(f"ioctl:{m.name}", f"KVM_{m.name}") for m in Ioctl]
    exprs += [(f"exit:{m.name}", f"KVM_EXIT_{m.name}") for m in ExitReason]
    exprs += [(f"cap:{m.name}", f"KVM_CAP_{m.name}") for m in Cap]
    body = "".join(f'printf("%s %lu\\n", "{k}", (unsigned long)({e}));\n' for k, e in exprs)
    d = tmp_path_factory.mktemp("kvmabi")
    (d / "abi.c").write_text("#include <stdio.h>\n#include <stddef.h>\n#include <linux/kvm.h>\n"
                             f"int main(void) {{\n{body}return 0;\n}}\n")
    subprocess.run(["gcc", "-o", str(d / "abi"), str(d / "abi.c")], check=True, capture_output=True)
    out = subprocess.run([str(d / "abi")], check=True, capture_output=True, text=True).stdout
    return {k: int(v) for k, v in (line.rsplit(" ", 1) for line in out.splitlines())}


@pytest.mark.parametrize(("cname", "struct"), STRUCTS, ids=[c for c, _ in STRUCTS])
def test_struct_sizes_match_kernel(kernel_values: dict[str, int], cname: str, struct: type) -> None:
    assert ctypes.sizeof(struct) == kernel_values[f"sizeof:{cname}"]


def test_field_offsets_match_kernel(kernel_values: dict[str, int]) -> None:
    wrong = {e: (mine, kernel_values[f"off:{e}"]) for e, mine in OFFSETS if mine != kernel_values[f"off:{e}"]}
    assert not wrong


def test_ioctl_exit_and_cap_numbers_match_kernel(kernel_values: dict[str, int]) -> None:
    wrong = {}
    for enum_cls, prefix in ((Ioctl, "ioctl"), (ExitReason, "exit"), (Cap, "cap")):
        for m in enum_cls:
            if int(m) != kernel_values[f"{prefix}:{m.name}"]:
                wrong[f"{prefix}:{m.name}"] = (hex(m), hex(kernel_values[f"{prefix}:{m.name}"]))
    assert not wrong
    assert len(Ioctl) == len(Ioctl.__members__), "two ioctls share a number (an alias hides one)"


def test_system_checks_version_and_caps() -> None:
    with System() as kvm:
        assert ioctl(kvm.fd, Ioctl.GET_API_VERSION) == KVM_API_VERSION
        for cap in REQUIRED_CAPS:
            assert kvm.check_extension(cap) > 0, cap.name
        assert kvm.vcpu_mmap_size >= ctypes.sizeof(abi.KvmRun)
        entries = kvm.supported_cpuid()
        assert any(e.function == 0 for e in entries)
        assert any(e.function == 1 for e in entries)
        # Copies: editing one list must not change the next.
        original = entries[0].eax
        entries[0].eax = original ^ 0xDEAD
        assert kvm.supported_cpuid()[0].eax == original
        assert kvm.msr_index_list()


def test_missing_device_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(KvmError) as ei:
        System(str(tmp_path / "no-kvm"))
    msg = str(ei.value)
    assert "no-kvm" in msg and "does not exist" in msg and "\n" not in msg


def test_missing_capability_is_one_clear_error() -> None:
    class Bogus(int):
        name = "BOGUS_CAP"

    with pytest.raises(KvmError, match="lacks required capabilities: BOGUS_CAP"):
        System(required=(Bogus(100000),))  # type: ignore[arg-type]


def test_not_a_kvm_device_is_an_error(tmp_path: Path) -> None:
    f = tmp_path / "plain"
    f.write_bytes(b"")
    with pytest.raises(KvmError, match="KVM_GET_API_VERSION"):
        System(str(f))
