"""QEMU's ``pvpanic`` ISA device: the guest says "I panicked" through one I/O port.

The guest reads the port (0x505 by default) to learn the events the device
supports, a bitmap; it writes an event to report it:

* bit 0, ``PANICKED``: the guest kernel panicked.  The VM reacts as
  ``-action panic=`` says (:class:`pyvmm.runstate.PanicAction`; by default
  the machine shuts down, as QEMU's default ``shutdown``).
* bit 1, ``CRASH_LOADED``: the guest panicked and a crash kernel (kdump)
  takes over; the VM keeps running and only the event is reported.

A write with both bits reports ``PANICKED`` only; unknown bits are ignored,
as in QEMU (``hw/misc/pvpanic.c``).  The ``events`` property masks what the
read returns (QEMU's ``events=``, default 3), not what a write reports:
QEMU acts on every write.

The device describes itself in the DSDT (:meth:`PvPanic.acpi_aml`) as QEMU's
``build_pvpanic_isa_aml`` does: ``Device (PEVT)`` with ``_HID "QEMU0001"``,
its port in ``_CRS``, ``_STA`` 0x0F, and an ``OperationRegion``/``Field``
with the ``RDPT``/``WRPT`` helper methods.  Linux's ``pvpanic-mmio`` driver
binds to ``QEMU0001`` and writes the port from its panic notifier.

Locking: the only mutable state is the write counter for tests; reports go
through :class:`VmControl`, which is thread-safe.
"""

from __future__ import annotations

import enum
import logging

from pyvmm.errors import ConfigError
from pyvmm.qdev import BusKind, DeviceContext, DeviceProps, DeviceType, Prop, PropType
from pyvmm.runstate import VmControl
from pyvmm.x86 import aml, layout

log = logging.getLogger(__name__)

DRIVER = "pvpanic"
PVPANIC_IOPORT = layout.PVPANIC_PORT
PVPANIC_IO_SIZE = 1
ACPI_NAME = "PEVT"
ACPI_HID = "QEMU0001"


class PvPanicEvent(enum.IntFlag):
    PANICKED = 1 << 0
    CRASH_LOADED = 1 << 1


#: QEMU's default ``events=``: everything it knows.
DEFAULT_EVENTS = PvPanicEvent.PANICKED | PvPanicEvent.CRASH_LOADED


class PvPanic:
    """One pvpanic device at ``ioport``; reports go to ``control``."""

    vmstate_stateless = True  # nothing to migrate (VM state): its register is a constant

    def __init__(self, control: VmControl, *, ioport: int = PVPANIC_IOPORT,
                 events: int = int(DEFAULT_EVENTS)) -> None:
        if not 0 <= ioport <= 0xFFFF:
            raise ConfigError(f"--device {DRIVER}: ioport={ioport:#x} is not a 16-bit port")
        if not 0 <= events <= 0xFF:
            raise ConfigError(f"--device {DRIVER}: events={events} does not fit in 8 bits")
        self._control = control
        self.ioport = ioport
        self.events = events
        self.writes = 0
        self._unknown_logged = False

    # -- the port ---------------------------------------------------------------------------------
    def io_read(self, offset: int, size: int) -> int:
        # QEMU's region is one byte with 1-byte accesses: wider reads see the bitmap in the low byte.
        return self.events if offset == 0 else 0

    def io_write(self, offset: int, size: int, value: int) -> None:
        if offset != 0:
            return
        event = value & 0xFF
        self.writes += 1
        if event & ~int(DEFAULT_EVENTS) and not self._unknown_logged:
            log.warning("pvpanic: unknown event %#x", event)
            self._unknown_logged = True
        if event & PvPanicEvent.PANICKED:
            self._control.guest_panicked("guest-panic")
        elif event & PvPanicEvent.CRASH_LOADED:
            self._control.guest_crashloaded("guest-crashloaded")

    def reset(self) -> None:
        pass

    # -- its ACPI description (pyvmm.x86.acpi.AcpiDescribed) --------------------------------------
    def acpi_aml(self) -> bytes:
        """``Device (PEVT)`` for the DSDT's ``\\_SB``, as QEMU 7.2 describes its pvpanic."""
        a = aml
        return a.device(
            ACPI_NAME,
            a.name("_HID", ACPI_HID),
            a.name("_CRS", a.resource_template(a.io_port(self.ioport, self.ioport, 1, PVPANIC_IO_SIZE))),
            a.op_region("PEOR", a.RegionSpace.SYSTEM_IO, self.ioport, PVPANIC_IO_SIZE),
            a.field("PEOR", [("PEPT", 8)], access=a.FieldAccess.BYTE),
            a.name("_STA", 0x0F),  # present, enabled, shown, functioning
            a.method("RDPT", 0, a.store(a.ref("PEPT"), a.local(0)), a.ret(a.local(0))),
            a.method("WRPT", 1, a.store(a.arg(0), a.ref("PEPT"))),
        )


# -- its registry entry (pyvmm.qdev) ----------------------------------------------------------------
def _create(ctx: DeviceContext, props: DeviceProps) -> PvPanic:
    dev = PvPanic(ctx.control, ioport=props.get_int("ioport"), events=props.get_int("events"))
    ctx.add_io(dev.ioport, PVPANIC_IO_SIZE, dev, props.name(DRIVER))
    return dev


DEVICE_TYPES = [DeviceType(
    DRIVER, BusKind.ISA, _create,
    (Prop("ioport", PropType.UINT16, PVPANIC_IOPORT), Prop("events", PropType.UINT8, int(DEFAULT_EVENTS))),
    "reports guest panics (ACPI QEMU0001)")]
