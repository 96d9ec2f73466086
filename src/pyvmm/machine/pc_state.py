"""The PC machine's VM state: what goes into a stream and how a stream comes back.

The stream (:mod:`pyvmm.vmstate.stream`) carries a header with the machine's configuration
(:func:`fingerprint`), one section per device of the device tree (its QOM path as id, its
driver, its own version), the board's sections (the tcg userspace irqchip, the PCI host
bridge, the vCPUs from the accelerator), and RAM.  :func:`load` refuses a stream for another
configuration, a section this machine does not have or cannot read, and a device the stream
does not cover, each with one line, before any vCPU runs.

Devices are quiesced for saving with :func:`quiesced`: every virtio device's lock is taken,
so no request is half done (virtio-blk completes a request before it lets its lock go, which
is how QEMU's drain at stop reads here) and no back-end writes guest memory meanwhile.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pyvmm.accel.state import StatefulAccelerator
from pyvmm.devices import irqchip_state
from pyvmm.devices.pci import state as pci_state
from pyvmm.vmstate import Stateful, VmStateError, mapped
from pyvmm.vmstate import ram as vram
from pyvmm.vmstate import stream as vs

if TYPE_CHECKING:
    from pyvmm.machine.pc import PcMachine

log = logging.getLogger(__name__)

IRQCHIP_ID = "/machine/irqchip"
PCI_HOST_ID = "/machine/i440fx"
CPUS_ID = "/machine/cpus"


@dataclass
class _Section:
    ident: str
    driver: str
    version: int
    save: Any       # () -> plain data
    load: Any       # (state, version) -> None
    post_load: Any = None


def fingerprint(m: PcMachine) -> dict[str, Any]:
    """What source and destination must agree on (QEMU: the same command line)."""
    return {
        "ram": m.memory.ram_size,
        "ram-layout": [[r.gpa, r.size] for r in m.memory.regions],
        "vcpus": m.config.smp,
        "accelerator": m.accel.name,
        "devices": [f"{d.path}={d.driver}" for d in m.qdev.manager.tree],
    }


def sections(m: PcMachine) -> list[_Section]:
    out: list[_Section] = []
    for dev in m.qdev.manager.tree:
        obj = dev.obj
        if getattr(obj, "vmstate_stateless", False):
            continue
        if not isinstance(obj, Stateful):
            raise VmStateError(f"device {dev.path} ({dev.driver}) cannot be migrated: it does not save its state")
        inner = getattr(obj, "device", None)  # a virtio transport: its device must say it is complete
        if inner is not None and not getattr(inner, "vmstate_migratable", False):
            raise VmStateError(f"State blocked by non-migratable device '{dev.path}' ({dev.driver})")
        out.append(_Section(dev.path, dev.driver, obj.vmstate_version, obj.save_state, obj.load_state,
                            getattr(obj, "vmstate_post_load", None)))
    chip = m.irqchip
    if chip is not None:
        out.append(_Section(IRQCHIP_ID, "userspace-irqchip", irqchip_state.VERSION,
                            lambda: irqchip_state.save(chip), lambda st, _v: irqchip_state.load(chip, st)))
    host = m.pci.host
    out.append(_Section(PCI_HOST_ID, "i440FX-pcihost", 1, lambda: pci_state.save_host(host),
                        lambda st, _v: pci_state.load_host(host, st)))
    accel = m.accel
    if not isinstance(accel, StatefulAccelerator):
        raise VmStateError(f"the {accel.name} accelerator cannot save vCPU state")
    out.append(_Section(CPUS_ID, accel.name, 1, accel.save_state, lambda st, _v: accel.load_state(st)))
    return out


@contextlib.contextmanager
def quiesced(m: PcMachine) -> Iterator[None]:
    """Every virtio device's lock held: no request in flight, no DMA from back-ends."""
    with contextlib.ExitStack() as stack:
        for dev in m.qdev.manager.tree:
            device = getattr(dev.obj, "device", None)
            lock = getattr(device, "lock", None)
            if lock is not None:
                stack.enter_context(lock)
        yield


def write_devices(m: PcMachine, w: vs.StreamWriter) -> None:
    """One section per device; the vCPUs are stopped and devices quiesced by the caller."""
    for s in sections(m):
        w.section(s.ident, s.driver, s.version, s.save())


def check_savable(m: PcMachine) -> None:
    """Raise VmStateError now if some device cannot be saved (before anything is sent)."""
    sections(m)


@dataclass
class LoadResult:
    ram_bytes: int = 0
    sections: int = 0
    header: dict[str, Any] = field(default_factory=dict)


def load(m: PcMachine, r: vs.StreamReader, path: str | None = None) -> LoadResult:
    """Read a whole stream into the (not yet started) machine; ``path``: the file it comes from
    (``-incoming file:``), where mapped RAM is mapped from."""
    res = LoadResult()
    kind, payload = r.record()
    if kind != vs.HEADER:
        raise VmStateError("VM state stream corrupt: it does not start with a header")
    res.header = vs.parse_header(payload)
    vs.compare_machines(res.header["machine"], fingerprint(m))
    wanted = {s.ident: s for s in sections(m)}
    got: dict[str, tuple[int, Any]] = {}
    places: list[tuple[int, int, int]] = []
    mem = m.memory
    while True:
        kind, payload = r.record()
        if kind == vs.PAGES:
            gpa, data = vs.parse_pages(payload)
            vram.load_pages(mem, gpa, data)
            res.ram_bytes += len(data)
        elif kind == vs.ZERO:
            gpa, length = vs.parse_zero(payload)
            vram.load_zero(mem, gpa, length)
        elif kind == vs.SECTION:
            ident, driver, version, state = vs.parse_section(payload)
            s = wanted.get(ident)
            if s is None:
                raise VmStateError(f"VM state stream has a section for {ident} ({driver}), which this machine "
                                   "does not have")
            if driver != s.driver:
                raise VmStateError(f"VM state stream section {ident} is a {driver}; here it is a {s.driver}")
            if not 1 <= version <= s.version:
                raise VmStateError(f"VM state stream section {ident} ({driver}) has version {version}; this pyvmm "
                                   f"reads versions 1 to {s.version}")
            got[ident] = (version, state)
        elif kind == vs.MAPPED:
            places.append(mapped.parse(payload))
        elif kind == vs.END:
            break
        else:
            raise VmStateError(f"VM state stream corrupt: unexpected {kind!r} record")
    if places:
        if path is None:
            raise VmStateError("VM state has mapped RAM (mapped-ram): restore it with -incoming file:PATH")
        if not vram._private_anonymous(mem):
            raise VmStateError("mapped RAM cannot be restored into a shared or file memory back-end")
        mapped.map_regions(mem, path, places)
        res.ram_bytes = sum(size for _gpa, size, _off in places)
    missing = [i for i in wanted if i not in got]
    if missing:
        raise VmStateError(f"VM state stream has no state for {missing[0]} ({wanted[missing[0]].driver})")
    for ident, s in wanted.items():
        version, state = got[ident]
        if not isinstance(state, dict):
            raise VmStateError(f"VM state stream corrupt: section {ident} is not a map")
        try:
            s.load(state, version)
        except VmStateError as e:
            raise VmStateError(f"{ident}: {e}") from None
        except (TypeError, ValueError, KeyError, IndexError, OverflowError) as e:
            raise VmStateError(f"VM state stream section {ident} ({s.driver}) is invalid: {e}") from None
        res.sections += 1
    return res


def post_load(m: PcMachine) -> None:
    for s in sections(m):
        if s.post_load is not None:
            s.post_load()
