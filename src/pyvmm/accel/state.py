"""What an accelerator offers VM state (save/restore, migration).

An accelerator that can be saved has ``save_state()`` (plain data, see
:mod:`pyvmm.vmstate.codec`, taken with the vCPUs paused) and ``load_state(state)`` (after
``setup``, instead of ``set_boot_state``, before ``start``).  KVM's in-kernel irqchip, PIT and
clock belong to its state; tcg's userspace irqchip is a device and the machine saves it.
The state is a dict with at least ``"accel"`` (the accelerator's name), so a stream from a
kvm source is refused by a tcg destination with one line, and the reverse.

RAM dirty tracking needs nothing from the accelerator: :mod:`pyvmm.vmstate.ram` compares
what it sent, which also catches device DMA.  An accelerator may add ``dirty_log_start()``,
``dirty_log_sync() -> list[tuple[int, int]]`` ((gpa, length) ranges written since the last
sync) and ``dirty_log_stop()``; the migration code does not need them.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class StatefulAccelerator(Protocol):
    def save_state(self) -> dict[str, Any]: ...

    def load_state(self, state: dict[str, Any]) -> None: ...
