"""The AML encoder against hand-checked encodings and against ``iasl`` (Debian's acpica-tools).

``iasl`` compiles a small ASL program; the body of the resulting table (after
the 36-byte header) must equal what :mod:`pyvmm.x86.aml` produces for the
same constructs, byte for byte.  A missing ``iasl`` fails the test (scripts/bootstrap
installs it).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pyvmm.errors import ConfigError
from pyvmm.x86 import aml
from support.iasl import compile_asl


# -- hand-checked encodings --------------------------------------------------------------------
@pytest.mark.parametrize(("body_len", "expected"), [
    (0, b"\x01"),
    (62, b"\x3f"),  # 62 + 1 = 63: the largest one-byte length
    (63, bytes([0x40 | (65 & 0xF), 65 >> 4])),  # needs two bytes: 63 + 2 = 65
    (0xFFD, bytes([0x40 | 0xF, 0xFF])),  # 0xFFD + 2 = 0xFFF: largest two-byte length
    (0xFFE, bytes([0x80 | 0x1, 0x00, 0x01])),  # 0xFFE + 3 = 0x1001
    (0xFFFFC, bytes([0x80 | 0xF, 0xFF, 0xFF])),  # largest three-byte length
    (0xFFFFD, bytes([0xC0 | 0x1, 0x00, 0x00, 0x01])),  # 0xFFFFD + 4 = 0x100001
])
def test_pkg_length_boundaries(body_len: int, expected: bytes) -> None:
    assert aml.pkg_length(body_len) == expected


def test_pkg_length_decodes_back() -> None:
    for n in (0, 1, 61, 62, 63, 64, 100, 4000, 4093, 4094, 70000, 1 << 20, (1 << 28) - 10):
        enc = aml.pkg_length(n)
        lead = enc[0]
        extra = lead >> 6
        if extra == 0:
            total = lead & 0x3F
        else:
            total = lead & 0x0F
            for i in range(extra):
                total |= enc[1 + i] << (4 + 8 * i)
        assert total == n + len(enc), n
    with pytest.raises(ConfigError):
        aml.pkg_length(1 << 28)


def test_name_strings() -> None:
    assert aml.name_string("_HID") == b"_HID"
    assert aml.name_string("S5") == b"S5__"
    assert aml.name_string("\\_SB") == b"\\_SB_"
    assert aml.name_string("\\_SB.PCI0") == b"\\\x2e_SB_PCI0"
    assert aml.name_string("\\_SB.PCI0.ISA") == b"\\\x2f\x03_SB_PCI0ISA_"
    assert aml.name_string("^^FOO") == b"^^FOO_"
    assert aml.name_string("\\") == b"\\\x00"
    for bad in ("", "TOOLONG", "1ABC", "ab", "A-B"):
        with pytest.raises(ConfigError):
            aml.name_seg(bad)


def test_integers_use_smallest_encoding() -> None:
    assert aml.integer(0) == b"\x00"
    assert aml.integer(1) == b"\x01"
    assert aml.integer(2) == b"\x0a\x02"
    assert aml.integer(0x100) == b"\x0b\x00\x01"
    assert aml.integer(0x10000) == b"\x0c\x00\x00\x01\x00"
    assert aml.integer(0x1_0000_0000) == b"\x0e" + (1 << 32).to_bytes(8, "little")
    assert aml.integer(2**64 - 1) == b"\xff"
    with pytest.raises(ConfigError):
        aml.integer(2**64)
    with pytest.raises(ConfigError):
        aml.integer(-1)


def test_eisa_id() -> None:
    assert aml.eisa_id("PNP0A03") == b"\x0c" + (0x030AD041).to_bytes(4, "little")
    assert aml.eisa_id("PNP0C0C") == b"\x0c" + (0x0C0CD041).to_bytes(4, "little")
    with pytest.raises(ConfigError):
        aml.eisa_id("pnp0a03")


def test_resource_template_end_tag_and_lengths() -> None:
    rt = aml.resource_template(aml.memory32_fixed(0xD000_0000, 0x200), aml.interrupt([5]))
    # Buffer op, one-byte PkgLength, BytePrefix size, then 12 + 9 + 2 descriptor bytes.
    assert rt[0] == 0x11
    assert rt[2:4] == b"\x0a\x17"
    assert rt[4:7] == b"\x86\x09\x00"
    assert rt[-2:] == b"\x79\x00"
    with pytest.raises(ConfigError):
        aml.memory32_fixed(0x1_0000_0000, 16)
    with pytest.raises(ConfigError):
        aml.irq([16])


# -- byte-for-byte against iasl ----------------------------------------------------------------
ASL = r"""
    Name (I0, 0)
    Name (I1, 1)
    Name (I2, 0x12)
    Name (I3, 0x1234)
    Name (I4, 0x12345678)
    Name (I5, 0x123456789A)
    Name (I6, 0xFFFFFFFFFFFFFFFF)
    Name (S0, "LNRO0005")
    Name (\_S5, Package (0x04) { 0x05, 0x05, Zero, Zero })
    Scope (\_SB)
    {
        Device (VR00)
        {
            Name (_HID, "LNRO0005")
            Name (_UID, Zero)
            Name (_CRS, ResourceTemplate ()
            {
                Memory32Fixed (ReadWrite, 0xD0000000, 0x00000200)
                Interrupt (ResourceConsumer, Level, ActiveHigh, Exclusive) { 16 }
                Interrupt (ResourceConsumer, Edge, ActiveLow, Shared) { 5, 7 }
            })
        }
        Device (PCI0)
        {
            Name (_HID, EisaId ("PNP0A03"))
            Method (_STA, 0, NotSerialized) { Return (0x0F) }
            Method (FOO, 2, Serialized)
            {
                Store (Arg0, Local0)
                And (Local0, 0xFF, Local1)
                Or (Local1, Arg1, Local2)
                Notify (\_SB.PCI0, 0x80)
                Return (Local2)
            }
            Name (_CRS, ResourceTemplate ()
            {
                WordBusNumber (ResourceProducer, MinFixed, MaxFixed, PosDecode,
                    0x0000, 0x0000, 0x00FF, 0x0000, 0x0100,,,)
                IO (Decode16, 0x0CF8, 0x0CF8, 0x01, 0x08, )
                WordIO (ResourceProducer, MinFixed, MaxFixed, PosDecode, EntireRange,
                    0x0000, 0x0D00, 0xFFFF, 0x0000, 0xF300,,, , TypeStatic, DenseTranslation)
                DWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed, NonCacheable, ReadWrite,
                    0x00000000, 0xC0000000, 0xFEBFFFFF, 0x00000000, 0x3EC00000,,, ,
                    AddressRangeMemory, TypeStatic)
                QWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed, Cacheable, ReadWrite,
                    0x0, 0x8000000000, 0x8FFFFFFFFF, 0x0, 0x1000000000,,, , AddressRangeMemory, TypeStatic)
                IRQNoFlags () {4}
                IRQ (Level, ActiveLow, Shared, ) {9}
            })
        }
    }
    Scope (\_SB.PCI0) { Name (BIG, Buffer (0x50) { BIGBYTES }) }
""".replace("BIGBYTES", ", ".join(f"0x{i:02X}" for i in range(0x50)))


def ours() -> bytes:
    a = aml
    return b"".join([
        a.name("I0", 0), a.name("I1", 1), a.name("I2", 0x12), a.name("I3", 0x1234),
        a.name("I4", 0x12345678), a.name("I5", 0x123456789A), a.name("I6", 0xFFFFFFFFFFFFFFFF),
        a.name("S0", "LNRO0005"),
        a.name("\\_S5", a.package(5, 5, 0, 0)),
        a.scope(
            "\\_SB",
            a.device(
                "VR00", a.name("_HID", "LNRO0005"), a.name("_UID", 0),
                a.name("_CRS", a.resource_template(
                    a.memory32_fixed(0xD0000000, 0x200),
                    a.interrupt([16]),
                    a.interrupt([5, 7], level=False, active_low=True, shared=True),
                )),
            ),
            a.device(
                "PCI0", a.name("_HID", a.eisa_id("PNP0A03")),
                a.method("_STA", 0, a.ret(0x0F)),
                a.method("FOO", 2,
                         a.store(a.arg(0), a.local(0)),
                         a.and_(a.local(0), 0xFF, a.local(1)),
                         a.or_(a.local(1), a.arg(1), a.local(2)),
                         a.notify(a.ref("\\_SB.PCI0"), 0x80),
                         a.ret(a.local(2)),
                         serialized=True),
                a.name("_CRS", a.resource_template(
                    a.word_bus_number(0, 0xFF),
                    a.io_port(0xCF8, 0xCF8, 1, 8),
                    a.word_io(0xD00, 0xFFFF),
                    a.dword_memory(0xC0000000, 0xFEBFFFFF),
                    a.qword_memory(0x8000000000, 0x8FFFFFFFFF),
                    a.irq_no_flags([4]),
                    a.irq([9], level=True, active_low=True, shared=True),
                )),
            ),
        ),
        # A buffer longer than 63 bytes exercises a two-byte PkgLength.
        a.scope("\\_SB.PCI0", a.name("BIG", a.buffer(bytes(range(0x50))))),
    ])


def test_matches_iasl_byte_for_byte(tmp_path: Path) -> None:
    reference = compile_asl(tmp_path, ASL)
    mine = ours()
    if mine != reference:
        first = next(i for i, (x, y) in enumerate(zip(mine, reference, strict=False)) if x != y)
        pytest.fail(f"AML differs from iasl at byte {first:#x}: ours {mine[first:first + 16].hex()} "
                    f"iasl {reference[first:first + 16].hex()} (lengths {len(mine)} / {len(reference)})")


def test_large_scope_matches_iasl(tmp_path: Path) -> None:
    """A scope over 4 KiB needs a three-byte PkgLength."""
    names = "".join(f"    Name (N{i:03X}, 0x{i + 0x1000:04X})\n" for i in range(900))
    reference = compile_asl(tmp_path, "Scope (\\_SB)\n{\n" + names + "}\n")
    mine = aml.scope("\\_SB", *(aml.name(f"N{i:03X}", i + 0x1000) for i in range(900)))
    assert len(mine) > 4096
    assert mine == reference
