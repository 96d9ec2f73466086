"""Regression tests for the adversarial review: bad input gives one clear error, guests cannot grow host state."""

from __future__ import annotations

import logging
import struct
import subprocess
import sys

import pytest

from pyvmm.bus import Bus, BusError
from pyvmm.devices.acpi_pm import AcpiPm
from pyvmm.devices.fw_cfg import FwCfg
from pyvmm.devices.i8042 import I8042, QUEUE_LIMIT
from pyvmm.devices.rtc import Reg, RegB, Rtc
from pyvmm.errors import ConfigError, PyvmmError
from pyvmm.irq import IrqLine
from pyvmm.memory import GuestMemory, parse_size
from pyvmm.monitor.jsonstream import JsonStream, Message, ParseError
from pyvmm.runstate import VmControl


class Sink:
    def set_irq(self, gsi: int, level: bool) -> None:
        pass


# -- memory / sizes ------------------------------------------------------------------------------
@pytest.mark.parametrize("text", ["nan", "inf", "-inf", "NaNM", "infG"])
def test_parse_size_rejects_nan_and_infinity(text):
    with pytest.raises(PyvmmError, match="invalid size"):
        parse_size(text)


def test_guest_memory_beyond_physical_address_space_is_one_line():
    with pytest.raises(PyvmmError, match="more than an x86 guest can address") as e:
        GuestMemory(parse_size("99999999T"))
    assert "\n" not in str(e.value)


def test_mem_path_that_cannot_grow_is_an_error_not_a_traceback():
    # /proc files accept O_RDWR|O_CREAT for root but ignore ftruncate: mmap would raise ValueError.
    with pytest.raises(PyvmmError, match="--mem-path /proc/version"):
        GuestMemory(4 << 20, mem_path="/proc/version")


# -- bus ------------------------------------------------------------------------------------------
def test_bus_errors_are_config_errors_and_io_space_is_bounded():
    bus = Bus("io")
    bus.register(0x3F8, 8, object(), "serial0")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="overlaps serial0"):
        bus.register(0x3FC, 4, object(), "dbg")  # type: ignore[arg-type]
    with pytest.raises(BusError, match="outside the bus"):
        bus.register(0xFFFE, 4, object(), "dbg")  # type: ignore[arg-type]
    with pytest.raises(BusError, match="outside the bus"):
        bus.register(-1, 4, object(), "dbg")  # type: ignore[arg-type]
    bus.register(0xFFFC, 4, object(), "top")  # type: ignore[arg-type]  # the last ports are fine
    mmio = Bus("mmio")
    mmio.register(0xFEC0_0000, 0x1000, object(), "ioapic")  # type: ignore[arg-type]
    with pytest.raises(BusError):
        mmio.register((1 << 64) - 0x800, 0x1000, object(), "wrap")  # type: ignore[arg-type]


# -- CLI ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def boot_sector(tmp_path_factory):
    bs = bytearray(512)
    bs[0:5] = bytes([0xB0, 0x00, 0xE6, 0xF4, 0xF4])  # mov al,0; out 0xf4,al; hlt
    bs[510:512] = b"\x55\xaa"
    p = tmp_path_factory.mktemp("audit") / "bs.bin"
    p.write_bytes(bs)
    return str(p)


@pytest.mark.parametrize("extra, message", [
    (["-m", "nan"], "-m nan: Parameter 'size' expects a size"),  # QEMU's words (qemuopts)
    (["-m", "99999999T"], "-m 99999999T: Parameter 'size': 99999999T is too large"),
    (["-m", "9999999T"], "more than an x86 guest can address"),
    (["--kernel", "/dev/null"], "kernel /dev/null: not a regular file"),
    (["--device", "isa-debug-exit,iosize=0"], "empty range for isa-debug-exit"),
    (["--device", "isa-debug-exit,iobase=0x3f8"], "overlaps serial0"),
    (["--device", "isa-debug-exit,iobase=0x10000"], "outside the bus"),
    (["--mem-path", "/proc/version"], "--mem-path /proc/version"),
])
def test_cli_bad_input_gives_one_error_line(boot_sector, extra, message):
    cmd = [sys.executable, "-m", "pyvmm.cli", "run", "-q", "--kernel", boot_sector, "--serial", "null",
           "--accel", "kvm", *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("pyvmm: error: ") and message in lines[0], r.stderr


# -- guest-facing devices -------------------------------------------------------------------------
def test_i8042_controller_replies_are_bounded():
    kbc = I8042(VmControl(), None, None)
    for _ in range(10_000):
        kbc.cmd_port.io_write(0, 1, 0x20)  # "read command byte", never collected from port 0x60
    for _ in range(1000):
        kbc.cmd_port.io_write(0, 1, 0xD2)  # write keyboard output buffer
        kbc.data_port.io_write(0, 1, 0x41)
    assert len(kbc._ctrl_q) <= QUEUE_LIMIT
    # The interface still works: the first reply is the command byte, then the queue drains.
    for _ in range(QUEUE_LIMIT + 2):
        kbc.data_port.io_read(0, 1)
    assert kbc.cmd_port.io_read(0, 1) & 0x01 == 0


def test_acpi_unsupported_sleep_type_is_logged_once(caplog):
    pm = AcpiPm(VmControl(), IrqLine(Sink(), 9))
    with caplog.at_level(logging.INFO, logger="pyvmm.devices.acpi_pm"):
        for _ in range(500):
            pm.io_write(4, 2, (1 << 10) | (1 << 13))  # PM1_CNT: SLP_TYP=1, SLP_EN
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]


def _cmos_write(rtc: Rtc, reg: int, value: int) -> None:
    rtc.io_write(0, 1, reg)
    rtc.io_write(1, 1, value)


def _cmos_read(rtc: Rtc, reg: int) -> int:
    rtc.io_write(0, 1, reg)
    return rtc.io_read(1, 1)


@pytest.mark.parametrize("field, value", [(Reg.MONTH, 0x00), (Reg.MONTH, 0x13), (Reg.DAY_OF_MONTH, 0x45),
                                          (Reg.MONTH, 0xFF), (Reg.DAY_OF_MONTH, 0x00)])
def test_rtc_invalid_date_while_set_does_not_raise(field, value):
    rtc = Rtc(64 << 20)
    _cmos_write(rtc, Reg.B, RegB.SET | RegB.HOUR_24)
    _cmos_write(rtc, field, value)
    for reg in (Reg.SECONDS, Reg.MINUTES, Reg.HOURS, Reg.DAY_OF_WEEK, Reg.DAY_OF_MONTH, Reg.MONTH, Reg.YEAR):
        assert 0 <= _cmos_read(rtc, reg) <= 0xFF
    before = rtc.guest_time()
    _cmos_write(rtc, Reg.B, RegB.HOUR_24)  # clearing SET commits; an invalid date is ignored
    assert abs(rtc.guest_time() - before) < 5


def test_fw_cfg_dma_wraparound_and_huge_lengths_set_the_error_bit():
    mem = GuestMemory(4 << 20)
    fw = FwCfg(mem)
    fw.add_item(0x11, b"K" * 64)
    cases = [((1 << 64) - 8, 64), (mem.ram_size - 8, 64), (0x2000, 0xFFFF_FFFF), (0xC000_0000 - 4, 16)]
    for addr, length in cases:
        mem.write(0x1000, struct.pack(">IIQ", (0x11 << 16) | 0x08 | 0x02, length, addr))
        fw.io_write(4, 4, 0)
        fw.io_write(8, 4, int.from_bytes((0x1000).to_bytes(4, "big"), "little"))
        assert struct.unpack(">I", mem.read(0x1000, 4))[0] == 0x01, (hex(addr), hex(length))
    # A descriptor whose own address runs off the end of RAM is ignored, not a host access.
    fw.io_write(4, 4, 0xFFFF_FFFF)
    fw.io_write(8, 4, 0xF8FF_FFFF)


# -- QMP ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("raw", [b'{"execute":"qmp_capabilities","id":NaN}', b'{"id":Infinity}',
                                 b'{"id":-Infinity}', b'{"id":1e99999}'])
def test_qmp_rejects_non_json_numbers(raw):
    out = JsonStream().feed(raw)
    assert len(out) == 1 and isinstance(out[0], ParseError), out


def test_qmp_still_accepts_ordinary_numbers():
    out = JsonStream().feed(b'{"id":1.5e10,"n":-3}')
    assert out == [Message({"id": 1.5e10, "n": -3})]


# -- manager --------------------------------------------------------------------------------------
def test_manager_vm_log_does_not_follow_planted_symlinks(tmp_path):
    from pyvmm.manager.supervisor import _create_private_file, _read_tail

    victim = tmp_path / "victim"
    victim.write_text("secret line\n")
    log = tmp_path / "vm.log"
    log.symlink_to(victim)  # planted by the (less trusted) VM user, who owns the run directory
    assert _read_tail(log) == ""  # a failed start's error message must not quote the victim
    fd = _create_private_file(log)
    with open(fd, "wb") as f:
        f.write(b"vm output\n")
    assert victim.read_text() == "secret line\n"
    assert not log.is_symlink() and (log.stat().st_mode & 0o777) == 0o600
    assert _read_tail(log) == "vm output\n"


# -- command lines that are not UTF-8 ---------------------------------------------------------------
def test_non_utf8_command_line_bytes_pass_through():
    from pyvmm.boot.common import encode_cmdline

    text = b"console=ttyS0 x=\xff\xfe".decode("utf-8", "surrogateescape")  # how Python decodes such argv
    assert encode_cmdline(text, "k", 2047) == b"console=ttyS0 x=\xff\xfe\0"
    fw = FwCfg()
    fw.set_cmdline(text)
    assert fw.item(0x15) == b"console=ttyS0 x=\xff\xfe\0"


def test_cli_append_with_non_utf8_bytes_boots(boot_sector):
    cmd = [sys.executable.encode(), b"-m", b"pyvmm.cli", b"run", b"-q", b"--kernel", boot_sector.encode(),
           b"--serial", b"null", b"--accel", b"kvm", b"--device", b"isa-debug-exit,iobase=0xf4,iosize=1",
           b"--append", b"a\xffb"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode == 1 and r.stderr == "", r.stderr  # isa-debug-exit wrote 0: status 1, no error


def test_manager_command_line_with_leading_dash_cmdline_parses(tmp_path):
    import uuid

    from pyvmm.cli import build_parser
    from pyvmm.manager.models import VmDefinition
    from pyvmm.manager.supervisor import ManagerConfig, Supervisor, VmHandle

    sup = Supervisor(ManagerConfig(state_dir=tmp_path / "state", pyvmm_command=["pyvmm", "run"]))
    try:
        d = VmDefinition(name="dash", uuid=uuid.uuid4(), kernel="/boot/k", cmdline="-v quiet")
        cmd = sup.command_for(VmHandle(d), tmp_path / "qmp.sock", tmp_path / "serial.sock")
    finally:
        sup.store.close()
    args = build_parser().parse_args(cmd[1:])
    assert args.append == "-v quiet"


def test_manager_client_quotes_vm_names_as_one_path_segment():
    from pyvmm.manager.client import _seg

    assert _seg("web-1.a") == "web-1.a"
    assert _seg("../../api/v1/other") == "..%2F..%2Fapi%2Fv1%2Fother"
    assert _seg("a?x=1#f") == "a%3Fx%3D1%23f"
    for bad in (".", ".."):
        with pytest.raises(PyvmmError, match="invalid VM name"):
            _seg(bad)
