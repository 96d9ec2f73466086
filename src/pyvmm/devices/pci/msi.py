"""Choosing the MSI sender for a machine's interrupt sink.

* KVM: the sink's ``signal_msi(address, data)`` (KVM_SIGNAL_MSI).
* A userspace irqchip (tcg) without ``signal_msi``: :class:`ApicBusMsi` decodes the
  message as the APIC bus would (x86 MSI format: address 0xFEExxxxx with destination
  in bits 19:12 and destination mode in bit 2; data with the vector in bits 7:0 and the
  delivery mode in bits 10:8) and hands the vector to the matching local APICs through
  their public ``match_destination``/``accept`` methods, under the irqchip lock.
* Anything else: None, and PCI devices then offer no MSI-X (INTx only).
"""

from __future__ import annotations

import logging
from enum import IntEnum

from pyvmm.devices.pci.msix import MsiSender

log = logging.getLogger(__name__)

MSI_ADDRESS_BASE = 0xFEE0_0000


class MsiDelivery(IntEnum):
    FIXED = 0
    LOWEST = 1


class ApicBusMsi:
    """MSI delivery into a userspace irqchip that exposes ``lock`` and ``lapics``."""

    def __init__(self, chip: object) -> None:
        self.chip = chip
        self.dropped = 0

    def __call__(self, address: int, data: int) -> None:
        if address & 0xFFF0_0000 != MSI_ADDRESS_BASE or address >> 32:
            self.dropped += 1
            log.debug("MSI to %#x (not the APIC window) dropped", address)
            return
        dest = (address >> 12) & 0xFF
        logical = bool(address & 0x4)
        vector = data & 0xFF
        mode = (data >> 8) & 7
        if mode not in (MsiDelivery.FIXED, MsiDelivery.LOWEST):
            self.dropped += 1
            log.debug("MSI delivery mode %d not supported; dropped", mode)
            return
        chip = self.chip
        with chip.lock:  # type: ignore[attr-defined]
            targets = [la for la in chip.lapics if la.match_destination(dest, logical)]  # type: ignore[attr-defined]
            if mode == MsiDelivery.LOWEST:
                targets = targets[:1]
            for lapic in targets:
                lapic.accept(vector, False)


def msi_sender_for(sink: object) -> MsiSender | None:
    """The MSI sender for ``sink``, or None if MSIs cannot be delivered there."""
    signal = getattr(sink, "signal_msi", None)
    if callable(signal):
        return signal
    if hasattr(sink, "lapics") and hasattr(sink, "lock"):
        return ApicBusMsi(sink)
    return None
