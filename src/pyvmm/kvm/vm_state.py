"""Save and restore the in-kernel platform of a KVM VM as plain data.

* the PIC pair and the IOAPIC (KVM_GET_IRQCHIP / KVM_SET_IRQCHIP), kept as the raw 512-byte
  chip images;
* the i8254 (KVM_GET_PIT2 / KVM_SET_PIT2);
* the KVM clock (KVM_GET_CLOCK / KVM_SET_CLOCK).

The clock is saved when the VM stops and set to the same value when it starts again, as
QEMU's kvmclock device does, so guest time continues from where it stopped instead of
jumping by the time the VM spent saved or in flight.  (The TSC is per vCPU: its MSR travels
with the vCPU state, see :mod:`pyvmm.kvm.vcpu_state`.)

Load the platform before the vCPUs: writing MSR_KVM_SYSTEM_TIME then publishes the restored
clock to the guest, and interrupts pending in the IOAPIC find their LAPICs.
"""

from __future__ import annotations

import ctypes
from collections.abc import Mapping
from typing import TYPE_CHECKING

from pyvmm.errors import KvmError
from pyvmm.kvm import abi

if TYPE_CHECKING:
    from pyvmm.kvm.vm import Vm

PLATFORM_STATE_VERSION = 1

_CHIPS = {"pic_master": abi.KVM_IRQCHIP_PIC_MASTER, "pic_slave": abi.KVM_IRQCHIP_PIC_SLAVE,
          "ioapic": abi.KVM_IRQCHIP_IOAPIC}
_CHIP_SIZE = ctypes.sizeof(abi.KvmIrqchip) - abi.KvmIrqchip.chip.offset
KVM_CLOCK_TSC_STABLE = 2


def save_platform(vm: Vm) -> dict[str, int | bytes]:
    st: dict[str, int | bytes] = {"version": PLATFORM_STATE_VERSION}
    if vm.has_irqchip:
        for key, chip_id in _CHIPS.items():
            st[key] = bytes(vm.get_irqchip(chip_id).chip)
    if vm.has_pit:
        st["pit2"] = bytes(vm.get_pit2())
    clock = vm.get_clock()
    st["clock"] = clock.clock
    st["clock_stable"] = int(bool(clock.flags & KVM_CLOCK_TSC_STABLE))
    return st


def check_platform_state(vm: Vm, st: Mapping[str, object]) -> None:
    version = st.get("version")
    if version != PLATFORM_STATE_VERSION:
        raise KvmError(f"KVM platform state version {version!r} is not supported (this pyvmm reads "
                       f"version {PLATFORM_STATE_VERSION})")
    for key in _CHIPS:
        if (key in st) != vm.has_irqchip:
            raise KvmError("KVM platform state: the in-kernel irqchip of the saved VM and of this one differ")
        value = st.get(key)
        if value is not None and (not isinstance(value, bytes | bytearray) or len(value) != _CHIP_SIZE):
            raise KvmError(f"KVM platform state: '{key}' must be {_CHIP_SIZE} bytes")
    if ("pit2" in st) != vm.has_pit:
        raise KvmError("KVM platform state: the in-kernel PIT of the saved VM and of this one differ")
    pit = st.get("pit2")
    if pit is not None and (not isinstance(pit, bytes | bytearray) or len(pit) != ctypes.sizeof(abi.KvmPitState2)):
        raise KvmError(f"KVM platform state: 'pit2' must be {ctypes.sizeof(abi.KvmPitState2)} bytes")
    clock = st.get("clock")
    if not isinstance(clock, int) or not 0 <= clock < 1 << 64:
        raise KvmError(f"KVM platform state: clock {clock!r} is out of range")


def load_platform(vm: Vm, st: Mapping[str, object]) -> None:
    check_platform_state(vm, st)
    for key, chip_id in _CHIPS.items():
        data = st.get(key)
        if isinstance(data, bytes | bytearray):
            chip = abi.KvmIrqchip(chip_id=chip_id)
            ctypes.memmove(chip.chip, bytes(data), _CHIP_SIZE)
            vm.set_irqchip(chip)
    pit = st.get("pit2")
    if isinstance(pit, bytes | bytearray):
        vm.set_pit2(abi.KvmPitState2.from_buffer_copy(bytes(pit)))
    clock = st["clock"]
    assert isinstance(clock, int)
    vm.set_clock(clock)
