"""A tiny AML (ACPI Machine Language) byte-code encoder.

The DSDT is a program, not a data table: the guest's ACPI interpreter
executes it to build a namespace of devices.  We only need a small subset of
the language -- named objects, packages, scopes, devices, a few trivial
methods and resource templates -- so instead of shipping precompiled
``.aml`` blobs (opaque, and fixed at build time) we encode those constructs
here, from the grammar in the ACPI specification (chapter "ACPI Machine
Language Specification") and the resource descriptor formats in chapter
"Resource Data Types for ACPI".

Every helper returns ``bytes``; compound helpers take already-encoded terms,
so a table is built by plain nesting of calls::

    scope("\\_SB", device("VR00", name("_HID", "LNRO0005"), name("_UID", 0)))

Plain Python ints and strs passed where a data object is expected are
encoded with :func:`data` (smallest integer encoding, as ``iasl`` emits).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from enum import IntEnum

from pyvmm.errors import ConfigError


class Op(IntEnum):
    """AML opcodes used here (single byte unless noted)."""

    ZERO = 0x00
    ONE = 0x01
    NAME = 0x08
    BYTE_PREFIX = 0x0A
    WORD_PREFIX = 0x0B
    DWORD_PREFIX = 0x0C
    STRING_PREFIX = 0x0D
    QWORD_PREFIX = 0x0E
    SCOPE = 0x10
    BUFFER = 0x11
    PACKAGE = 0x12
    METHOD = 0x14
    DUAL_NAME_PREFIX = 0x2E
    MULTI_NAME_PREFIX = 0x2F
    EXT_PREFIX = 0x5B
    ROOT_CHAR = 0x5C
    PARENT_PREFIX = 0x5E
    LOCAL0 = 0x60
    ARG0 = 0x68
    STORE = 0x70
    AND = 0x7B
    OR = 0x7D
    NOTIFY = 0x86
    RETURN = 0xA4
    ONES = 0xFF


class ExtOp(IntEnum):
    """Second byte of two-byte opcodes (after :attr:`Op.EXT_PREFIX`)."""

    OP_REGION = 0x80
    FIELD = 0x81
    DEVICE = 0x82


_NAME_LEAD = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ_")
_NAME_CHARS = _NAME_LEAD | frozenset("0123456789")


# -- lengths and names ------------------------------------------------------------------------
def pkg_length(body_len: int) -> bytes:
    """Encode a PkgLength for a body of ``body_len`` bytes.

    The encoded value counts the PkgLength bytes themselves plus the body.  One
    byte holds up to 63; otherwise the lead byte's top two bits give the number
    of following bytes (1-3), its low nibble the least significant 4 bits, and
    each following byte 8 more bits.
    """
    if body_len < 0:
        raise ConfigError(f"AML: negative package length {body_len}")
    if body_len + 1 <= 0x3F:
        return bytes([body_len + 1])
    for extra in (1, 2, 3):
        total = body_len + 1 + extra
        if total < 1 << (4 + 8 * extra):
            out = [(extra << 6) | (total & 0x0F)]
            rest = total >> 4
            for _ in range(extra):
                out.append(rest & 0xFF)
                rest >>= 8
            return bytes(out)
    raise ConfigError(f"AML: package of {body_len} bytes is too large to encode")


def name_seg(seg: str) -> bytes:
    """A 4-character NameSeg; shorter names are padded with ``_`` as ASL does."""
    if not seg or len(seg) > 4 or seg[0] not in _NAME_LEAD or any(c not in _NAME_CHARS for c in seg):
        raise ConfigError(f"AML: invalid name segment {seg!r}")
    return seg.ljust(4, "_").encode("ascii")


def name_string(path: str) -> bytes:
    """Encode an ASL path such as ``_HID``, ``\\_SB.PCI0`` or ``^^FOO`` as a NameString."""
    prefix = b""
    if path.startswith("\\"):
        prefix = bytes([Op.ROOT_CHAR])
        path = path[1:]
    else:
        while path.startswith("^"):
            prefix += bytes([Op.PARENT_PREFIX])
            path = path[1:]
    segs = [name_seg(s) for s in path.split(".")] if path else []
    if not segs:
        return prefix + b"\x00"  # NullName
    if len(segs) == 1:
        return prefix + segs[0]
    if len(segs) == 2:
        return prefix + bytes([Op.DUAL_NAME_PREFIX]) + segs[0] + segs[1]
    if len(segs) > 255:
        raise ConfigError("AML: name path has too many segments")
    return prefix + bytes([Op.MULTI_NAME_PREFIX, len(segs)]) + b"".join(segs)


# -- data objects ------------------------------------------------------------------------------
def integer(value: int) -> bytes:
    """The smallest encoding of an unsigned 64-bit integer constant."""
    if not 0 <= value <= 0xFFFF_FFFF_FFFF_FFFF:
        raise ConfigError(f"AML: integer {value} is out of the 64-bit range")
    if value == 0:
        return bytes([Op.ZERO])
    if value == 1:
        return bytes([Op.ONE])
    if value == 0xFFFF_FFFF_FFFF_FFFF:
        return bytes([Op.ONES])
    if value <= 0xFF:
        return bytes([Op.BYTE_PREFIX, value])
    if value <= 0xFFFF:
        return bytes([Op.WORD_PREFIX]) + struct.pack("<H", value)
    if value <= 0xFFFF_FFFF:
        return bytes([Op.DWORD_PREFIX]) + struct.pack("<I", value)
    return bytes([Op.QWORD_PREFIX]) + struct.pack("<Q", value)


def dword(value: int) -> bytes:
    """A DWordConst regardless of magnitude (how ASL emits ``EisaId``)."""
    return bytes([Op.DWORD_PREFIX]) + struct.pack("<I", value & 0xFFFF_FFFF)


def string(text: str) -> bytes:
    """A String constant: ASCII, NUL-terminated, no embedded NULs."""
    raw = text.encode("ascii")
    if b"\x00" in raw:
        raise ConfigError("AML: strings cannot contain NUL")
    return bytes([Op.STRING_PREFIX]) + raw + b"\x00"


def eisa_id(text: str) -> bytes:
    """Compress a 7-character PNP id (``PNP0A03``) into the 32-bit EISA form, as ``EisaId()``."""
    if len(text) != 7 or not text[:3].isalpha() or not text[:3].isupper():
        raise ConfigError(f"AML: invalid EISA id {text!r}")
    try:
        product = int(text[3:], 16)
    except ValueError:
        raise ConfigError(f"AML: invalid EISA id {text!r}") from None
    c1, c2, c3 = (ord(c) - 0x40 for c in text[:3])
    b0 = (c1 << 2) | (c2 >> 3)
    b1 = ((c2 & 0x7) << 5) | c3
    value = b0 | (b1 << 8) | ((product >> 8) << 16) | ((product & 0xFF) << 24)
    return dword(value)


def data(value: int | str | bytes) -> bytes:
    """Encode a data object: ints and strs are converted, bytes are taken as already encoded."""
    if isinstance(value, bool):
        return integer(int(value))
    if isinstance(value, int):
        return integer(value)
    if isinstance(value, str):
        return string(value)
    return bytes(value)


def buffer(payload: bytes) -> bytes:
    """A Buffer object initialised with ``payload``."""
    body = integer(len(payload)) + bytes(payload)
    return bytes([Op.BUFFER]) + pkg_length(len(body)) + body


def package(*elements: int | str | bytes) -> bytes:
    """A fixed-size Package of data objects (at most 255 elements)."""
    if len(elements) > 255:
        raise ConfigError("AML: Package() holds at most 255 elements")
    body = bytes([len(elements)]) + b"".join(data(e) for e in elements)
    return bytes([Op.PACKAGE]) + pkg_length(len(body)) + body


# -- named objects and scopes ------------------------------------------------------------------
def name(path: str, value: int | str | bytes) -> bytes:
    """``Name(path, value)``."""
    return bytes([Op.NAME]) + name_string(path) + data(value)


def _terms(terms: Iterable[bytes]) -> bytes:
    return b"".join(terms)


def scope(path: str, *terms: bytes) -> bytes:
    """``Scope(path) { terms }``."""
    body = name_string(path) + _terms(terms)
    return bytes([Op.SCOPE]) + pkg_length(len(body)) + body


def device(path: str, *terms: bytes) -> bytes:
    """``Device(path) { terms }``."""
    body = name_string(path) + _terms(terms)
    return bytes([Op.EXT_PREFIX, ExtOp.DEVICE]) + pkg_length(len(body)) + body


def method(path: str, nargs: int, *terms: bytes, serialized: bool = False, sync_level: int = 0) -> bytes:
    """``Method(path, nargs, Serialized/NotSerialized, sync_level) { terms }``."""
    if not 0 <= nargs <= 7 or not 0 <= sync_level <= 15:
        raise ConfigError("AML: Method() takes 0-7 arguments and a sync level of 0-15")
    flags = nargs | (0x08 if serialized else 0) | (sync_level << 4)
    body = name_string(path) + bytes([flags]) + _terms(terms)
    return bytes([Op.METHOD]) + pkg_length(len(body)) + body


class RegionSpace(IntEnum):
    """``OperationRegion`` address spaces (RegionSpace byte)."""

    SYSTEM_MEMORY = 0x00
    SYSTEM_IO = 0x01
    PCI_CONFIG = 0x02


class FieldAccess(IntEnum):
    """``Field`` AccessType (FieldFlags bits 0-3)."""

    ANY = 0
    BYTE = 1
    WORD = 2
    DWORD = 3
    QWORD = 4


def op_region(path: str, space: RegionSpace, offset: int, length: int) -> bytes:
    """``OperationRegion(path, space, offset, length)``."""
    return (bytes([Op.EXT_PREFIX, ExtOp.OP_REGION]) + name_string(path) + bytes([space])
            + integer(offset) + integer(length))


def _field_length(bits: int) -> bytes:
    """A field unit's width in bits, in PkgLength form (the value itself, no length bytes counted)."""
    if not 0 < bits < 1 << 28:
        raise ConfigError(f"AML: field width {bits} bits is out of range")
    if bits <= 0x3F:
        return bytes([bits])
    for extra in (1, 2, 3):
        if bits < 1 << (4 + 8 * extra):
            out = [(extra << 6) | (bits & 0x0F)]
            rest = bits >> 4
            for _ in range(extra):
                out.append(rest & 0xFF)
                rest >>= 8
            return bytes(out)
    raise ConfigError(f"AML: field width {bits} bits is out of range")  # pragma: no cover


def field(region: str, units: Iterable[tuple[str, int]], *, access: FieldAccess = FieldAccess.BYTE,
          lock: bool = False, preserve: bool = True) -> bytes:
    """``Field(region, access, Lock|NoLock, Preserve|WriteAsOnes|WriteAsZeros) { NAME, bits, ... }``.

    ``units`` are ``(name, width in bits)`` pairs, laid out from bit 0 of the region.
    Only ``Preserve`` (0) and ``WriteAsZeros`` (2) are offered for the update rule.
    """
    flags = int(access) | (0x10 if lock else 0) | (0 if preserve else 0x40)
    body = name_string(region) + bytes([flags])
    for unit, bits in units:
        body += name_seg(unit) + _field_length(bits)
    return bytes([Op.EXT_PREFIX, ExtOp.FIELD]) + pkg_length(len(body)) + body


# -- statements and operands -------------------------------------------------------------------
def local(n: int) -> bytes:
    """``LocalN`` (0-7)."""
    if not 0 <= n <= 7:
        raise ConfigError(f"AML: Local{n} does not exist")
    return bytes([Op.LOCAL0 + n])


def arg(n: int) -> bytes:
    """``ArgN`` (0-6)."""
    if not 0 <= n <= 6:
        raise ConfigError(f"AML: Arg{n} does not exist")
    return bytes([Op.ARG0 + n])


def ref(path: str) -> bytes:
    """A reference to a named object, used as an operand or target."""
    return name_string(path)


def ret(value: int | str | bytes) -> bytes:
    """``Return(value)``."""
    return bytes([Op.RETURN]) + data(value)


def store(source: int | str | bytes, target: bytes) -> bytes:
    """``Store(source, target)``; ``target`` is an encoded SuperName (``local(0)``, ``ref("FOO")``)."""
    return bytes([Op.STORE]) + data(source) + target


def _binary(op: Op, a: int | str | bytes, b: int | str | bytes, target: bytes | None) -> bytes:
    return bytes([op]) + data(a) + data(b) + (target if target is not None else b"\x00")


def and_(a: int | str | bytes, b: int | str | bytes, target: bytes | None = None) -> bytes:
    """``And(a, b, target)``; without a target the result is only the expression's value."""
    return _binary(Op.AND, a, b, target)


def or_(a: int | str | bytes, b: int | str | bytes, target: bytes | None = None) -> bytes:
    """``Or(a, b, target)``."""
    return _binary(Op.OR, a, b, target)


def notify(obj: bytes, value: int | bytes) -> bytes:
    """``Notify(obj, value)``; ``obj`` is an encoded name (``ref("\\_SB.PWRB")``)."""
    return bytes([Op.NOTIFY]) + obj + data(value)


# -- resource templates ------------------------------------------------------------------------
class ResTag(IntEnum):
    """Resource descriptor tags (small: type<<3|len; large: 0x80|type)."""

    IRQ_NO_FLAGS = 0x22  # small IRQ, 2 data bytes
    IRQ = 0x23  # small IRQ with an information byte
    IO = 0x47  # small I/O port, 7 data bytes
    END = 0x79  # small end tag, 1 checksum byte
    MEMORY32_FIXED = 0x86
    DWORD_ADDRESS = 0x87
    WORD_ADDRESS = 0x88
    EXTENDED_IRQ = 0x89
    QWORD_ADDRESS = 0x8A


class AddrSpace(IntEnum):
    """Resource type of an address space descriptor."""

    MEMORY = 0
    IO = 1
    BUS_NUMBER = 2


def _large(tag: ResTag, payload: bytes) -> bytes:
    return bytes([tag]) + struct.pack("<H", len(payload)) + payload


def memory32_fixed(base: int, size: int, *, read_write: bool = True) -> bytes:
    """``Memory32Fixed(ReadWrite, base, size)``."""
    if not (0 <= base <= 0xFFFF_FFFF and 0 <= size <= 0xFFFF_FFFF):
        raise ConfigError(f"AML: Memory32Fixed {base:#x}+{size:#x} does not fit in 32 bits")
    return _large(ResTag.MEMORY32_FIXED, struct.pack("<BII", 1 if read_write else 0, base, size))


def io_port(minimum: int, maximum: int, alignment: int, length: int, *, decode16: bool = True) -> bytes:
    """``IO(Decode16, min, max, align, length)``."""
    if not (0 <= minimum <= 0xFFFF and 0 <= maximum <= 0xFFFF and 0 <= alignment <= 0xFF
            and 0 <= length <= 0xFF):
        raise ConfigError("AML: IO() descriptor values out of range")
    return struct.pack("<BBHHBB", ResTag.IO, 1 if decode16 else 0, minimum, maximum, alignment, length)


def irq(irqs: Iterable[int], *, level: bool = False, active_low: bool = False,
        shared: bool = False) -> bytes:
    """``IRQ(Edge|Level, ActiveHigh|ActiveLow, Exclusive|Shared) {irqs}`` (ISA IRQs 0-15)."""
    mask = 0
    for n in irqs:
        if not 0 <= n <= 15:
            raise ConfigError(f"AML: ISA IRQ {n} out of range")
        mask |= 1 << n
    info = (0x01 if not level else 0) | (0x08 if active_low else 0) | (0x10 if shared else 0)
    return struct.pack("<BHB", ResTag.IRQ, mask, info)


def irq_no_flags(irqs: Iterable[int]) -> bytes:
    """``IRQNoFlags() {irqs}``: edge, active high, exclusive."""
    mask = 0
    for n in irqs:
        if not 0 <= n <= 15:
            raise ConfigError(f"AML: ISA IRQ {n} out of range")
        mask |= 1 << n
    return struct.pack("<BH", ResTag.IRQ_NO_FLAGS, mask)


def interrupt(gsis: Iterable[int], *, consumer: bool = True, level: bool = True,
              active_low: bool = False, shared: bool = False) -> bytes:
    """``Interrupt(ResourceConsumer, Level|Edge, ActiveHigh|ActiveLow, Exclusive|Shared) {gsis}``."""
    nums = list(gsis)
    if not 1 <= len(nums) <= 255 or any(not 0 <= g <= 0xFFFF_FFFF for g in nums):
        raise ConfigError("AML: Interrupt() needs 1-255 interrupt numbers of 32 bits")
    flags = ((0x01 if consumer else 0) | (0 if level else 0x02) | (0x04 if active_low else 0)
             | (0x08 if shared else 0))
    payload = bytes([flags, len(nums)]) + b"".join(struct.pack("<I", g) for g in nums)
    return _large(ResTag.EXTENDED_IRQ, payload)


def _addr_flags(consumer: bool) -> int:
    # General flags: bit0 consumer, bit2 MinFixed, bit3 MaxFixed (we always describe fixed windows).
    return (0x01 if consumer else 0) | 0x04 | 0x08


def _mem_type_flags(cacheable: bool, read_write: bool) -> int:
    return (0x01 if read_write else 0) | ((0x01 << 1) if cacheable else 0)


def qword_memory(minimum: int, maximum: int, *, translation: int = 0, granularity: int = 0,
                 consumer: bool = False, cacheable: bool = True, read_write: bool = True) -> bytes:
    """``QWordMemory(ResourceProducer|Consumer, PosDecode, MinFixed, MaxFixed, Cacheable, ReadWrite,
    granularity, min, max, translation, length)``."""
    if not 0 <= minimum <= maximum <= 0xFFFF_FFFF_FFFF_FFFF:
        raise ConfigError("AML: QWordMemory range is invalid")
    payload = struct.pack("<BBBQQQQQ", AddrSpace.MEMORY, _addr_flags(consumer),
                          _mem_type_flags(cacheable, read_write), granularity, minimum, maximum,
                          translation, maximum - minimum + 1)
    return _large(ResTag.QWORD_ADDRESS, payload)


def dword_memory(minimum: int, maximum: int, *, translation: int = 0, granularity: int = 0,
                 consumer: bool = False, cacheable: bool = False, read_write: bool = True) -> bytes:
    """``DWordMemory(...)`` with fixed min/max, positive decode."""
    if not 0 <= minimum <= maximum <= 0xFFFF_FFFF:
        raise ConfigError("AML: DWordMemory range is invalid")
    payload = struct.pack("<BBBIIIII", AddrSpace.MEMORY, _addr_flags(consumer),
                          _mem_type_flags(cacheable, read_write), granularity, minimum, maximum,
                          translation, maximum - minimum + 1)
    return _large(ResTag.DWORD_ADDRESS, payload)


def word_io(minimum: int, maximum: int, *, translation: int = 0, consumer: bool = False) -> bytes:
    """``WordIO(ResourceProducer, MinFixed, MaxFixed, PosDecode, EntireRange, 0, min, max, 0, len)``."""
    if not 0 <= minimum <= maximum <= 0xFFFF:
        raise ConfigError("AML: WordIO range is invalid")
    payload = struct.pack("<BBBHHHHH", AddrSpace.IO, _addr_flags(consumer), 0x03, 0, minimum,
                          maximum, translation, maximum - minimum + 1)
    return _large(ResTag.WORD_ADDRESS, payload)


def word_bus_number(minimum: int, maximum: int) -> bytes:
    """``WordBusNumber(ResourceProducer, MinFixed, MaxFixed, PosDecode, 0, min, max, 0, len)``."""
    if not 0 <= minimum <= maximum <= 0xFF:
        raise ConfigError("AML: WordBusNumber range is invalid")
    payload = struct.pack("<BBBHHHHH", AddrSpace.BUS_NUMBER, _addr_flags(False), 0, 0, minimum,
                          maximum, 0, maximum - minimum + 1)
    return _large(ResTag.WORD_ADDRESS, payload)


def resource_template(*descriptors: bytes) -> bytes:
    """``ResourceTemplate() { descriptors }``: a Buffer ending with an End Tag.

    The End Tag's checksum byte is 0, which the specification defines as
    "treat the template as checksummed correctly" and is what ``iasl`` emits.
    """
    return buffer(b"".join(descriptors) + bytes([ResTag.END, 0]))
