"""QEMU's pvpanic ISA device: the port, the reports it makes, and its own ACPI node.

The node is checked twice against ``iasl`` (Debian's acpica-tools): byte for
byte against the ASL that QEMU 7.2's ``build_pvpanic_isa_aml`` corresponds to,
and by disassembling a whole DSDT from :func:`pyvmm.x86.acpi.build_tables`
with the device handed in through the generic ``device_aml`` path.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pyvmm.bus import Bus
from pyvmm.devices import device_registry
from pyvmm.devices.pvpanic import PVPANIC_IOPORT, PvPanic, PvPanicEvent
from pyvmm.errors import ConfigError
from pyvmm.runstate import GuestPanic, PanicAction, RequestKind, VmControl
from pyvmm.x86 import acpi
from pyvmm.x86 import aml as aml_mod
from support.iasl import compile_asl, compile_dsl, iasl_disassemble


def _wired(action: PanicAction = PanicAction.SHUTDOWN, **kw) -> tuple[Bus, PvPanic, VmControl, list[GuestPanic]]:
    control = VmControl()
    control.panic_action = action
    told: list[GuestPanic] = []
    control.panic_listeners.append(told.append)
    dev = PvPanic(control, **kw)
    bus = Bus("io")
    bus.register(dev.ioport, 1, dev, "pvpanic")
    return bus, dev, control, told


def test_read_returns_the_supported_events() -> None:
    bus, _, control, told = _wired()
    assert bus.read(0x505, 1) == 0x03  # PANICKED | CRASH_LOADED, QEMU's default events=3
    assert bus.read(0x504, 1) == 0xFF and bus.read(0x506, 1) == 0xFF  # one port only
    bus2, _, _, _ = _wired(events=1)
    assert bus2.read(0x505, 1) == 0x01
    assert not control.pending() and told == []  # reading reports nothing


@pytest.mark.parametrize(("action", "reported", "status"), [
    (PanicAction.SHUTDOWN, "poweroff", 0),
    (PanicAction.EXIT_FAILURE, "poweroff", 1),
    (PanicAction.PAUSE, "pause", 0),
])
def test_panicked_is_told_then_requested(action: PanicAction, reported: str, status: int) -> None:
    bus, dev, control, told = _wired(action)
    bus.write(0x505, 1, PvPanicEvent.PANICKED)
    assert told == [GuestPanic(reported)]
    req = control.wait(1.0)
    assert req is not None and req.kind is RequestKind.PANIC and req.status == status
    assert req.reason == "guest-panic"
    assert dev.writes == 1


def test_action_none_only_tells() -> None:
    bus, _, control, told = _wired(PanicAction.NONE)
    bus.write(0x505, 1, 1)
    assert told == [GuestPanic("run")]
    assert not control.pending()


def test_crash_loaded_and_combined_writes() -> None:
    bus, _, control, told = _wired()
    bus.write(0x505, 1, PvPanicEvent.CRASH_LOADED)
    assert told == [GuestPanic("run", crashloaded=True)] and not control.pending()
    told.clear()
    bus.write(0x505, 1, 0x03)  # both: PANICKED wins, as in QEMU's handle_event
    assert told == [GuestPanic("poweroff")]
    assert control.wait(1.0).kind is RequestKind.PANIC  # type: ignore[union-attr]


def test_unknown_bits_are_ignored_and_writes_act_whatever_events_says() -> None:
    bus, _, control, told = _wired(events=0)
    bus.write(0x505, 1, 0xFC)
    assert told == [] and not control.pending()
    bus.write(0x505, 1, 0x101)  # a byte port: only the low byte reaches it
    assert told == [GuestPanic("poweroff")]  # events= masks the read only, as in QEMU


def test_properties_are_checked() -> None:
    t = device_registry().lookup("pvpanic")
    p = t.resolve({"ioport": "0x600", "events": "1", "id": "pp"}, ident="pp")
    assert (p.get_int("ioport"), p.get_int("events"), p.id) == (0x600, 1, "pp")
    assert t.resolve({}).get_int("ioport") == PVPANIC_IOPORT
    assert t.resolve({"ioport": 0x506}, typed=True).get_int("ioport") == 0x506
    for props, msg in [({"ioport": "70000"}, "expects uint16_t"), ({"events": "256"}, "expects uint8_t"),
                       ({"iobase": "1"}, "Property 'pvpanic.iobase' not found"), ({"ioport": "x"}, "expects integer")]:
        with pytest.raises(ConfigError, match=msg):
            t.resolve(props)
    with pytest.raises(ConfigError, match="expected: integer"):
        t.resolve({"ioport": "0x506"}, typed=True)  # JSON: a string is not a number


# -- ACPI ------------------------------------------------------------------------------------------
#: QEMU 7.2's hw/misc/pvpanic-isa.c build_pvpanic_isa_aml(), written as ASL.
QEMU_PEVT_ASL = """
Device (PEVT)
{
    Name (_HID, "QEMU0001")
    Name (_CRS, ResourceTemplate ()
    {
        IO (Decode16, PORT, PORT, 0x01, 0x01, )
    })
    OperationRegion (PEOR, SystemIO, PORT, 0x01)
    Field (PEOR, ByteAcc, NoLock, Preserve)
    {
        PEPT,   8
    }
    Name (_STA, 0x0F)
    Method (RDPT, 0, NotSerialized)
    {
        Store (PEPT, Local0)
        Return (Local0)
    }
    Method (WRPT, 1, NotSerialized)
    {
        Store (Arg0, PEPT)
    }
}
"""


@pytest.mark.parametrize("port", [0x505, 0x1234])
def test_acpi_node_matches_qemus_byte_for_byte(tmp_path: Path, port: int) -> None:
    reference = compile_asl(tmp_path, QEMU_PEVT_ASL.replace("PORT", f"0x{port:04X}"))
    assert PvPanic(VmControl(), ioport=port).acpi_aml() == reference


def test_field_encoding_against_iasl(tmp_path: Path) -> None:
    """Field widths above 63 bits need a multi-byte length; check the encoder against iasl."""
    reference = compile_asl(tmp_path, """
    OperationRegion (R0, SystemMemory, 0xFED00000, 0x400)
    Field (R0, DWordAcc, Lock, WriteAsZeros) { A0, 32, A1, 96, A2, 5000 }
    """)
    a = aml_mod
    mine = (a.op_region("R0", a.RegionSpace.SYSTEM_MEMORY, 0xFED00000, 0x400)
            + a.field("R0", [("A0", 32), ("A1", 96), ("A2", 5000)], access=a.FieldAccess.DWORD, lock=True,
                      preserve=False))
    assert mine == reference


def test_dsdt_carries_the_node_through_the_generic_path(tmp_path: Path) -> None:
    dev = PvPanic(VmControl())
    nodes = acpi.device_nodes([object(), dev, dev])  # devices without acpi_aml are skipped, each device once
    assert nodes == [dev.acpi_aml()]
    img = acpi.build_tables(ncpus=1, pm_base=0x600, device_aml=nodes)
    dsl = iasl_disassemble(tmp_path, "dsdt", img.tables["DSDT"][1])
    m = re.search(r"Device \(PEVT\)\s*\{(.*?)\n        \}", dsl, re.S)
    assert m, dsl
    body = m.group(1)
    assert 'Name (_HID, "QEMU0001")' in body
    assert re.search(r"IO \(Decode16,\s*0x0505,\s*// Range Minimum\s*0x0505,\s*// Range Maximum\s*"
                     r"0x01,\s*// Alignment\s*0x01,\s*// Length", body), body
    assert "OperationRegion (PEOR, SystemIO, 0x0505, One)" in body
    assert re.search(r"Field \(PEOR, ByteAcc, NoLock, Preserve\)\s*\{\s*PEPT,\s*8", body), body
    assert "Name (_STA, 0x0F)" in body
    assert "Method (RDPT, 0, NotSerialized)" in body and "Method (WRPT, 1, NotSerialized)" in body
    assert "Scope (_SB)" in dsl
    # and iasl compiles the disassembly back to the same bytes
    assert compile_dsl(tmp_path, tmp_path / "dsdt.dsl")[36:] == img.tables["DSDT"][1][36:]


def test_duplicate_self_described_names_are_refused() -> None:
    nodes = [PvPanic(VmControl()).acpi_aml(), PvPanic(VmControl(), ioport=0x506).acpi_aml()]
    with pytest.raises(ConfigError, match="PEVT is used twice"):
        acpi.build_tables(ncpus=1, pm_base=0x600, device_aml=nodes)
