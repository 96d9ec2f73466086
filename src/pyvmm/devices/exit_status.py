"""``pyvmm-exit-status``: the guest reports the status the VMM process should exit with.

One MMIO byte at :data:`EXIT_STATUS_ADDR` (after the virtio-mmio windows): a write of ``v``
ends the VM and ``pyvmm run`` exits with status ``v`` itself (unlike ``isa-debug-exit``'s
``(v << 1) | 1``).  MMIO rather than a port: the guest kit's stock kernel has no
``/dev/port``, while busybox's ``devmem`` writes physical memory through ``/dev/mem``.  The
guest kit's /init writes its ``pyvmm_run=`` command's status here before it powers off, so
``pyvmm run --append 'pyvmm_run="exit 3"'`` exits 3.  ``pyvmm run`` adds the device when the
kernel command line has ``pyvmm_run=``; under QEMU the write goes nowhere and the guest powers
off as before.
"""

from __future__ import annotations

import logging

from pyvmm.qdev import BusKind, DeviceContext, DeviceProps, DeviceType, Prop, PropType
from pyvmm.runstate import VmControl

log = logging.getLogger(__name__)

DRIVER = "pyvmm-exit-status"
EXIT_STATUS_ADDR = 0xFEB0_1000


class ExitStatus:
    vmstate_stateless = True  # nothing to migrate (VM state): a write ends the run

    def __init__(self, control: VmControl) -> None:
        self._control = control

    def io_read(self, offset: int, size: int) -> int:
        return 0

    def io_write(self, offset: int, size: int, value: int) -> None:
        status = value & 0xFF
        log.debug("%s: the guest reports exit status %d", DRIVER, status)
        self._control.request_exit(status, f"the guest reported exit status {status}")

    def reset(self) -> None:
        pass


def _create(ctx: DeviceContext, props: DeviceProps) -> ExitStatus:
    dev = ExitStatus(ctx.control)
    ctx.add_mmio(props.get_int("addr"), 1, dev, props.name(DRIVER))
    return dev


DEVICE_TYPES = [DeviceType(DRIVER, BusKind.SYSTEM, _create, (Prop("addr", PropType.UINT64, EXIT_STATUS_ADDR),),
                           "a guest write ends pyvmm with that exit status (the guest kit's pyvmm_run=)")]
