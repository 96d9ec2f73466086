"""VM state of the userspace interrupt controllers (tcg): the 8259 pair, the I/O APIC, the
local APICs and the PIT, as :mod:`pyvmm.vmstate` plain data.

Host-time fields (a LAPIC timer's start, a TSC deadline, a PIT channel's load time) are
saved relative to the moment of saving and rebased on the destination's clock, so timers
continue where they were rather than firing at once or never.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from pyvmm.devices.irqchip import UserspaceIrqchip
from pyvmm.devices.lapic import Lapic
from pyvmm.devices.pic import Pic8259
from pyvmm.devices.pit import PitChannel
from pyvmm.vmstate import VmStateError, fields

VERSION = 1
_PIC_FIELDS = ("irr", "imr", "isr", "priority_add", "irq_base", "read_reg_select", "poll", "special_mask",
               "init_state", "auto_eoi", "rotate_on_auto_eoi", "special_fully_nested", "init4", "single_mode",
               "last_irr", "elcr")
_IOAPIC_FIELDS = ("id", "ioregsel", "irr", "redir")
_LAPIC_FIELDS = ("irr", "isr", "tmr", "tpr", "ldr", "dfr", "svr", "esr", "icr_lo", "icr_hi", "tmict", "tdcr",
                 "pending_nmi", "pending_init")
_PIT_FIELDS = tuple(f.name for f in dataclasses.fields(PitChannel) if f.name not in ("index", "load_ns"))


def save(chip: UserspaceIrqchip) -> dict[str, Any]:
    with chip.lock:
        now = time.monotonic_ns()
        return {
            "pic": [fields.capture(c, _PIC_FIELDS) for c in (chip.pic.master, chip.pic.slave)],
            "pic_output": chip.pic.output,
            "ioapic": fields.capture(chip.ioapic, _IOAPIC_FIELDS),
            "lapics": [_save_lapic(lp, now) for lp in chip.lapics],
            "apic_global_enable": list(chip.apic_global_enable),
            "pit": [dict(fields.capture(ch, _PIT_FIELDS), load_ago_ns=now - ch.load_ns)
                    for ch in chip.pit.channels],
            "speaker_data": chip.pit.speaker_data,
        }


def _save_lapic(lp: Lapic, now: int) -> dict[str, Any]:
    st = fields.capture(lp, _LAPIC_FIELDS)
    st["apic_id"] = lp.apic_id
    st["lvt"] = [[r, v] for r, v in lp.lvt.items()]
    st["timer_started_ago_ns"] = now - lp.timer_start_ns
    st["tsc_deadline_in_ns"] = None if lp.tsc_deadline_ns is None else lp.tsc_deadline_ns - now
    return st


def load(chip: UserspaceIrqchip, state: dict[str, Any]) -> None:
    pics = fields.need(state, "pic", list, "irqchip")
    lapics = fields.need(state, "lapics", list, "irqchip")
    pit = fields.need(state, "pit", list, "irqchip")
    age = fields.need(state, "apic_global_enable", list, "irqchip")
    if len(pics) != 2 or len(pit) != 3:
        raise VmStateError("irqchip: the state has the wrong number of PICs or PIT channels")
    if len(lapics) != len(chip.lapics) or len(age) != len(chip.lapics):
        raise VmStateError(f"irqchip: the state has {len(lapics)} local APICs, this machine {len(chip.lapics)}")
    with chip.lock:
        now = time.monotonic_ns()
        chip.timers.clear()
        for c, st in zip((chip.pic.master, chip.pic.slave), pics, strict=True):
            fields.apply(c, _PIC_FIELDS, st)
            _mask8(c)
        chip.pic.output = bool(state.get("pic_output"))
        io = fields.need(state, "ioapic", dict, "irqchip")
        redir = io.get("redir")
        if (not isinstance(redir, list) or len(redir) != len(chip.ioapic.redir)
                or not all(isinstance(r, int) for r in redir)):
            raise VmStateError("irqchip: I/O APIC redirection table in the state is invalid")
        fields.apply(chip.ioapic, _IOAPIC_FIELDS, io)
        for lp, st in zip(chip.lapics, lapics, strict=True):
            _load_lapic(lp, st, now)
        chip.apic_global_enable = [bool(v) for v in age]
        for ch, st in zip(chip.pit.channels, pit, strict=True):
            fields.apply(ch, _PIT_FIELDS, st)
            ch.load_ns = now - fields.need(st, "load_ago_ns", int, "pit")
        chip.pit.speaker_data = bool(state.get("speaker_data"))
        chip.pit._timer = None
        chip.pit._arm()
        for lp in chip.lapics:
            lp._timer = None
            lp._arm_timer()
        chip.pic._update()
        for i in range(len(chip.cpus)):
            chip._intr[i] = False   # a fresh vCPU's INTR is low: raise it if something is pending
            chip._update(i)


def _mask8(c: Pic8259) -> None:
    for name in ("irr", "imr", "isr", "irq_base", "last_irr", "elcr"):
        setattr(c, name, getattr(c, name) & 0xFF)
    c.priority_add &= 7


def _load_lapic(lp: Lapic, st: dict[str, Any], now: int) -> None:
    if fields.need(st, "apic_id", int, "lapic") != lp.apic_id:
        raise VmStateError(f"irqchip: local APIC id {st['apic_id']} in the state, {lp.apic_id} here")
    lvt = fields.need(st, "lvt", list, "lapic")
    regs = {}
    for item in lvt:
        if (not isinstance(item, list) or len(item) != 2 or item[0] not in lp.lvt
                or not isinstance(item[1], int)):
            raise VmStateError("irqchip: a local APIC's LVT in the state is invalid")
        regs[item[0]] = item[1] & 0xFFFF_FFFF
    fields.apply(lp, _LAPIC_FIELDS, st)
    lp.lvt.update(regs)
    lp.timer_start_ns = now - fields.need(st, "timer_started_ago_ns", int, "lapic")
    deadline = st.get("tsc_deadline_in_ns")
    if deadline is not None and not isinstance(deadline, int):
        raise VmStateError("irqchip: a TSC deadline in the state is invalid")
    lp.tsc_deadline_ns = None if deadline is None else now + deadline
