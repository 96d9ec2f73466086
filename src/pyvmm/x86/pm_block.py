"""The ACPI fixed-hardware power-management block as the platform lays it out (PIIX4-style, as QEMU's pc).

Both the FADT encoder (:mod:`pyvmm.x86.acpi`) and the device model
(:mod:`pyvmm.devices.acpi_pm`) read the register layout from here, so the
tables always describe the registers the device really has.
"""

from __future__ import annotations

from enum import IntEnum

from pyvmm.x86 import layout


class PmReg(IntEnum):
    """Register offsets inside the PM block (see the module docstring)."""

    PM1_STS = 0x00
    PM1_EN = 0x02
    PM1_CNT = 0x04
    PM_TMR = 0x08
    RESET = 0x0C


#: Ports the device occupies; the machine registers ``[pm_base, pm_base + PM_SIZE)``.
PM_SIZE = 0x10
PM1_EVT_LEN = 4
PM1_CNT_LEN = 2
PM_TMR_LEN = 4
#: The guest writes this to the reset register (FADT RESET_VALUE) to reboot.
RESET_VALUE = 0x06
#: SLP_TYP value that means "soft off"; the DSDT's ``\_S5`` package carries it.
SLP_TYP_S5 = 0  # as on the PIIX4 (and QEMU), so the tables also work with that PM block
#: The PM timer's frequency, fixed by the ACPI specification.
PM_TIMER_HZ = 3_579_545
#: The timer is 32 bits wide (FADT flag TMR_VAL_EXT); otherwise 24.
PM_TMR_32BIT = True
#: The SCI's ISA IRQ / GSI (FADT SCI_INT), level-triggered, active high.
SCI_GSI = layout.SCI_GSI

__all__ = ["PM1_CNT_LEN", "PM1_EVT_LEN", "PM_SIZE", "PM_TIMER_HZ", "PM_TMR_32BIT", "PM_TMR_LEN",
           "RESET_VALUE", "SCI_GSI", "SLP_TYP_S5", "PmReg"]
