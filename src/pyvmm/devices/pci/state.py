"""VM state of PCI functions: configuration space (BARs and command register included), the
INTx level and the MSI-X table and pending bits.  Loading puts each BAR back on the buses."""

from __future__ import annotations

from typing import Any

from pyvmm.devices.pci.host import PciDevice, PciHost
from pyvmm.vmstate import VmStateError, fields


def save_function(dev: PciDevice) -> dict[str, Any]:
    with dev.cfg_lock:
        st: dict[str, Any] = {"config": bytes(dev.config.data), "intx": dev._intx_level}
        if dev.msix is not None:
            with dev.msix.lock:
                st["msix_table"] = bytes(dev.msix.table)
                st["msix_pending"] = dev.msix.pending
        return st


def load_function(dev: PciDevice, st: dict[str, Any]) -> None:
    what = f"PCI function {dev.name}"
    config = fields.need(st, "config", bytes, what)
    if len(config) != len(dev.config.data):
        raise VmStateError(f"{what}: configuration space of {len(config)} bytes in the state")
    table = pending = None
    if dev.msix is not None:
        table = fields.need(st, "msix_table", bytes, what)
        pending = fields.need(st, "msix_pending", int, what)
        if len(table) != len(dev.msix.table):
            raise VmStateError(f"{what}: MSI-X table of {len(table)} bytes in the state")
    with dev.cfg_lock:
        # read-only header fields (ids, capabilities) must match: only writable bits may differ
        for i, (a, b) in enumerate(zip(config, dev.config.data, strict=True)):
            if (a ^ b) & ~(dev.config.wmask[i] | dev.config.w1cmask[i]) & 0xFF and not _device_owned(i):
                raise VmStateError(f"{what}: read-only configuration byte {i:#x} differs ({a:#x} in the state, "
                                   f"{b:#x} here)")
        dev.config.data[:] = config
        dev._intx_level = bool(st.get("intx"))
        if dev.msix is not None and table is not None and pending is not None:
            with dev.msix.lock:
                dev.msix.table[:] = table
                dev.msix.pending = pending & ((1 << dev.msix.nvectors) - 1)
        dev.update_mappings()
        dev._drive_intx()


def _device_owned(offset: int) -> bool:
    """Bytes the device itself changes (status register, MSI-X control's read-only part)."""
    return offset in (0x06, 0x07) or offset >= 0x40


def save_host(host: PciHost) -> dict[str, Any]:
    return {"address": host.address, "bridge": save_function(host.devices[0]) if 0 in host.devices else None}


def load_host(host: PciHost, st: dict[str, Any]) -> None:
    host.address = fields.need(st, "address", int, "PCI host") & 0xFFFF_FFFF
    bridge = st.get("bridge")
    if isinstance(bridge, dict) and 0 in host.devices:
        load_function(host.devices[0], bridge)
