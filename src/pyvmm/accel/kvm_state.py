"""The KVM accelerator's side of snapshots and live migration (:class:`~pyvmm.accel.base.AcceleratorState`).

Plain data in, plain data out: the migration framework puts the dicts into stream sections
and knows nothing of KVM.  vCPU state comes from :mod:`pyvmm.kvm.vcpu_state`, the in-kernel
PIC/IOAPIC/PIT and the KVM clock from :mod:`pyvmm.kvm.vm_state`.

The whole accelerator at once: :meth:`KvmMigration.save_state` / :meth:`load_state` (one dict
with ``"accel": "kvm"``, the platform and every vCPU), the form the machine's stream section
takes; ``dirty_log_start`` / ``dirty_log_sync`` (written ``(gpa, length)`` ranges) /
``dirty_log_stop`` for its RAM passes.

Dirty pages.  :meth:`KvmMigration.start_dirty_log` sets KVM_MEM_LOG_DIRTY_PAGES on every RAM
slot and starts the host-side log that device DMA marks (:class:`pyvmm.memory.DirtyPages`,
fed through the accelerator's DMA hook); :meth:`get_and_clear_dirty` returns, per RAM region,
KVM_GET_DIRTY_LOG ORed with the DMA log.  Both work while the vCPUs run, which pre-copy needs.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

from pyvmm.errors import AccelError, KvmError
from pyvmm.kvm import abi
from pyvmm.kvm.vcpu_state import VcpuFeatures, check_vcpu_state, load_vcpu, save_vcpu
from pyvmm.kvm.vm_state import check_platform_state, load_platform, save_platform
from pyvmm.memory import PAGE_SIZE, GuestMemory
from pyvmm.vmstate.protocol import VmStateError

if TYPE_CHECKING:
    from pyvmm.accel.base import MachineContext
    from pyvmm.accel.kvm_vcpu import VcpuRunner
    from pyvmm.kvm.system import System
    from pyvmm.kvm.vm import Vm

log = logging.getLogger(__name__)

StateDict = dict[str, "int | bytes"]
ACCEL_STATE_VERSION = 1


def bitmap_runs(bitmap: bytes | bytearray, base: int) -> list[tuple[int, int]]:
    """``(gpa, length)`` of each run of set bits (bit i = the page at ``base + i * PAGE_SIZE``)."""
    runs: list[tuple[int, int]] = []
    start = end = -1  # the open run, in pages
    data = bytes(bitmap) + b"\0" * (-len(bitmap) % 8)
    for wi, word in enumerate(memoryview(data).cast("Q")):
        if not word:
            continue
        if word == 0xFFFF_FFFF_FFFF_FFFF:  # 64 dirty pages: extend or open a run in one step
            page = wi * 64
            if page != end:
                if start >= 0:
                    runs.append((base + start * PAGE_SIZE, (end - start) * PAGE_SIZE))
                start = page
            end = page + 64
            continue
        while word:  # one step per set bit
            low = word & -word
            word ^= low
            page = wi * 64 + low.bit_length() - 1
            if page == end:
                end += 1
            else:
                if start >= 0:
                    runs.append((base + start * PAGE_SIZE, (end - start) * PAGE_SIZE))
                start, end = page, page + 1
    if start >= 0:
        runs.append((base + start * PAGE_SIZE, (end - start) * PAGE_SIZE))
    return runs


class KvmMigration:
    """Mixed into :class:`pyvmm.accel.kvm.KvmAccelerator`: state save/load and dirty logging."""

    system: System | None
    vm: Vm | None
    runners: list[VcpuRunner]
    _ctx: MachineContext | None
    _dirty_logging: bool = False
    _state_features: VcpuFeatures | None = None

    # -- helpers -----------------------------------------------------------------------------------
    def _features(self) -> VcpuFeatures:
        if self.vm is None or self.system is None:
            raise AccelError("kvm: no VM (setup() first)")
        if self._state_features is None:
            self._state_features = VcpuFeatures.probe(self.vm, self.system.msr_index_list())
        return self._state_features

    def _quiet_runner(self, index: int) -> VcpuRunner:
        if not 0 <= index < len(self.runners):
            raise AccelError(f"no vCPU {index} (this machine has {len(self.runners)})")
        r = self.runners[index]
        if r.running and not r.parked:
            raise AccelError(f"kvm: vCPU {index} is running; pause the VM before saving or loading its state")
        return r

    def _memory(self) -> GuestMemory:
        if self._ctx is None:
            raise AccelError("kvm: setup() first")
        return self._ctx.memory

    # -- vCPU and platform state ------------------------------------------------------------------
    def save_cpu_state(self, index: int) -> StateDict:
        """The complete KVM state of vCPU ``index`` (VM paused or not yet started)."""
        r = self._quiet_runner(index)
        feats = self._features()
        return r.call(lambda: save_vcpu(r.vcpu, feats))  # type: ignore[no-any-return]

    def load_cpu_state(self, index: int, state: Mapping[str, object]) -> None:
        """Load a :meth:`save_cpu_state` result into vCPU ``index`` (before start, or while paused).

        Load the guest's RAM and :meth:`load_platform_state` first.  A state this host cannot load
        raises :class:`~pyvmm.errors.KvmError` before the vCPU is changed.
        """
        r = self._quiet_runner(index)
        feats = self._features()
        r.call(lambda: load_vcpu(r.vcpu, state, feats))

    def save_platform_state(self) -> StateDict:
        """The in-kernel PIC, IOAPIC, PIT and the KVM clock (VM paused: the clock stops with it)."""
        if self.vm is None:
            raise AccelError("kvm: no VM (setup() first)")
        return save_platform(self.vm)

    def load_platform_state(self, state: Mapping[str, object]) -> None:
        if self.vm is None:
            raise AccelError("kvm: no VM (setup() first)")
        load_platform(self.vm, state)

    # -- the whole accelerator, for one stream section -------------------------------------------------
    def save_state(self) -> dict[str, object]:
        """Platform and every vCPU (VM paused or not started), tagged ``"accel": "kvm"``."""
        return {"accel": "kvm", "version": ACCEL_STATE_VERSION, "platform": self.save_platform_state(),
                "vcpus": [self.save_cpu_state(i) for i in range(len(self.runners))]}

    def load_state(self, state: Mapping[str, object]) -> None:
        """After setup() and loading RAM, instead of set_boot_state(), before start().

        Everything is checked before anything is loaded, so a refused state leaves the VM as it was.
        A refusal is a :class:`~pyvmm.vmstate.VmStateError` (the stream's error), with one line.
        """
        try:
            self._load_whole_state(state)
        except KvmError as e:
            raise VmStateError(str(e)) from None

    def _load_whole_state(self, state: Mapping[str, object]) -> None:
        if state.get("accel") != "kvm":
            raise KvmError(f"the stream holds {state.get('accel')} vCPU state; this machine runs kvm")
        if state.get("version") != ACCEL_STATE_VERSION:
            raise KvmError(f"kvm state version {state.get('version')!r} is not supported (this pyvmm reads "
                           f"version {ACCEL_STATE_VERSION})")
        vcpus, platform = state.get("vcpus"), state.get("platform")
        if not isinstance(vcpus, list) or not all(isinstance(v, Mapping) for v in vcpus):
            raise KvmError("kvm state: the vCPU list is missing or corrupt")
        if len(vcpus) != len(self.runners):
            raise KvmError(f"the stream has {len(vcpus)} vCPUs; this machine has {len(self.runners)}")
        if not isinstance(platform, Mapping):
            raise KvmError("kvm state: the platform state is missing or corrupt")
        if self.vm is None:
            raise AccelError("kvm: no VM (setup() first)")
        feats = self._features()
        check_platform_state(self.vm, platform)
        for v in vcpus:
            check_vcpu_state(v, feats)
        self.load_platform_state(platform)
        for i, v in enumerate(vcpus):
            self.load_cpu_state(i, v)

    def dirty_log_start(self) -> None:
        self.start_dirty_log()

    def dirty_log_sync(self) -> list[tuple[int, int]]:
        """Guest-physical ``(gpa, length)`` runs of pages written since the last sync (or the start)."""
        runs: list[tuple[int, int]] = []
        for i, region in enumerate(self._memory().regions):
            runs += bitmap_runs(self.get_and_clear_dirty(i), region.gpa)
        return runs

    def dirty_log_stop(self) -> None:
        self.stop_dirty_log()

    # -- dirty pages ------------------------------------------------------------------------------
    def _slot_flags(self) -> int:
        return abi.KVM_MEM_LOG_DIRTY_PAGES if self._dirty_logging else 0

    def start_dirty_log(self) -> None:
        """Log guest and DMA writes from now on (the first :meth:`get_and_clear_dirty` has only those)."""
        if self.vm is None:
            raise AccelError("kvm: no VM (setup() first)")
        self._memory().dirty.start()
        self._dirty_logging = True
        for slot in list(self.vm.slots):
            self.vm.set_slot_flags(slot.slot, self._slot_flags())
        log.debug("kvm: dirty logging on for %d slots", len(self.vm.slots))

    def get_and_clear_dirty(self, region: int) -> bytearray:
        """Pages of RAM region ``region`` written since the last call (or since start_dirty_log).

        Bit ``i`` (byte ``i // 8``, bit ``i % 8``) is page ``i`` of ``memory.regions[region]``.
        """
        if self.vm is None:
            raise AccelError("kvm: no VM (setup() first)")
        if not self._dirty_logging:
            raise AccelError("kvm: dirty logging is off (start_dirty_log() first)")
        bitmap = self._memory().dirty.take(region)
        kvm_log = self.vm.get_dirty_log(region)  # slot numbers follow region order (Vm.map_memory)
        if len(kvm_log) != len(bitmap):
            raise AccelError(f"kvm: dirty bitmap of slot {region} has {len(kvm_log)} bytes, expected {len(bitmap)}")
        merged = int.from_bytes(bitmap, "little") | int.from_bytes(kvm_log, "little")
        return bytearray(merged.to_bytes(len(bitmap), "little"))

    def stop_dirty_log(self) -> None:
        self._dirty_logging = False
        if self._ctx is not None:
            self._ctx.memory.dirty.stop()
        if self.vm is not None:
            for slot in list(self.vm.slots):
                self.vm.set_slot_flags(slot.slot, 0)
