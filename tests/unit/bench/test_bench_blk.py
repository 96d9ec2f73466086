"""Smoke tests for bench/blk.py: the guest program builds statically, runs, and its output parses.

The full benchmark (two Linux boots under TCG) is not part of the suite; these
tests cover the pieces it is built from, on the host, in a few seconds.
"""

from __future__ import annotations

import importlib.util
import io
import subprocess
import sys
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from pyvmm.guestkit.cpio import CpioWriter, read_newc

_BLK = Path(__file__).resolve().parents[3] / "bench" / "blk.py"


def _load_blk():
    spec = importlib.util.spec_from_file_location("bench_blk", _BLK)
    assert spec is not None and spec.loader is not None, f"cannot load {_BLK}"
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_blk"] = mod  # dataclasses look the module up by name
    spec.loader.exec_module(mod)
    return mod


blk = _load_blk()

SAMPLE = (
    "pyvmm guest: Linux 6.1.0-56-cloud-amd64 on x86_64, userspace at 18.18s\r\n"
    "BLKBENCH-ENV device=/dev/vda sysfs=/sys/devices/pci0000:00/0000:00:04.0/virtio0 clocksource=tsc\r\n"
    "BLKBENCH-PHASE seq_write begin t=18.858839\r\n"
    "BLKBENCH-PHASE rand_write end t=25.808066\r\n"
    "BLKBENCH mode=direct size_mib=32 seq_block_kib=1024 seq_write_mibs=65.98 seq_read_mibs=94.80 "
    "rand_read_iops=462.4 rand_write_iops=131.4 seq_write_s=0.485 seq_read_s=0.338 rand_read_ops=1408 "
    "rand_write_ops=400 rand_seconds=3\r\n"
    "pyvmm-guest: exit status 0\r\n"
)


@pytest.fixture(scope="module")
def program(tmp_path_factory) -> Path:
    return blk.build_guest_program(tmp_path_factory.mktemp("blkbench"))


def test_guest_program_is_a_static_x86_64_executable(program):
    with open(program, "rb") as f:
        elf = ELFFile(f)
        assert elf["e_machine"] == "EM_X86_64"
        kinds = {seg["p_type"] for seg in elf.iter_segments()}
    assert "PT_INTERP" not in kinds, "blkbench must be static: the initramfs has no dynamic loader"
    assert program.stat().st_mode & 0o111


def test_guest_program_measures_a_file_and_its_output_parses(program, tmp_path):
    target = tmp_path / "disk.img"
    target.write_bytes(bytes(8 << 20))
    proc = subprocess.run([str(program), str(target), "4", "1", "256"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    res = blk.BlkResult.parse(proc.stdout)
    assert res.size_mib == 4 and res.mode in ("direct", "sync")
    assert res.fields["seq_block_kib"] == "256"
    assert min(res.seq_write_mibs, res.seq_read_mibs, res.rand_read_iops, res.rand_write_iops) > 0
    assert int(res.fields["rand_read_ops"]) > 0 and int(res.fields["rand_write_ops"]) > 0
    phases = [ln.split()[1:3] for ln in proc.stdout.splitlines() if ln.startswith("BLKBENCH-PHASE")]
    assert phases == [[p, w] for p in blk.PHASES for w in ("begin", "end")]
    env = blk.parse_env(proc.stdout)
    assert env["device"] == str(target) and env["sysfs"] == "none"
    data = target.read_bytes()
    assert data[4 << 20:] == bytes(4 << 20), "the program wrote outside its region"
    assert data[:4 << 20].count(bytes(4096)) < 1024, "the region was not written"


def test_guest_program_failure_is_one_error_line(program, tmp_path):
    proc = subprocess.run([str(program), str(tmp_path / "absent")], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1
    with pytest.raises(blk.BenchError, match="guest program failed: open .*absent"):
        blk.BlkResult.parse(proc.stdout)
    small = tmp_path / "small.img"
    small.write_bytes(bytes(1 << 20))
    proc = subprocess.run([str(program), str(small), "2"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1 and "BLKBENCH-ERROR" in proc.stdout and "needs" in proc.stdout


def test_sample_line_parses():
    res = blk.BlkResult.parse(SAMPLE)
    assert (res.mode, res.size_mib) == ("direct", 32)
    assert (res.seq_write_mibs, res.seq_read_mibs, res.rand_read_iops, res.rand_write_iops) == (
        65.98, 94.80, 462.4, 131.4)
    assert res.fields["rand_write_ops"] == "400"
    assert blk.parse_env(SAMPLE)["clocksource"] == "tsc"
    assert blk.transport_of(blk.parse_env(SAMPLE)["sysfs"]) == "virtio-pci"
    assert blk.transport_of("/sys/devices/platform/LNRO0005:00/virtio0") == "virtio-mmio"
    assert blk.transport_of("").startswith("unknown")


@pytest.mark.parametrize("text, message", [
    ("booted\nnothing here\n", "no BLKBENCH result line"),
    ("BLKBENCH-ERROR data check failed at offset 4096\n", "data check failed"),
    ("BLKBENCH mode=direct size_mib=32 seq_write_mibs=1\n", "malformed"),
    (SAMPLE.replace("seq_read_mibs=94.80", "seq_read_mibs=fast"), "malformed"),
    (SAMPLE.replace("rand_read_iops=462.4", "rand_read_iops=0"), "non-positive"),
    (SAMPLE.replace("mode=direct", "mode=cached"), "unknown I/O mode"),
])
def test_bad_output_is_rejected(text, message):
    with pytest.raises(blk.BenchError, match=message):
        blk.BlkResult.parse(text)


def test_clock_ratio_compares_guest_and_host_time():
    lines = [blk.Line(10.0, "BLKBENCH-PHASE seq_write begin t=100.000000\r"),
             blk.Line(12.0, "other"),
             blk.Line(14.0, "BLKBENCH-PHASE rand_write end t=102.000000")]
    assert blk.clock_ratio(lines) == pytest.approx(0.5)
    assert blk.clock_ratio(lines[:1]) != blk.clock_ratio(lines[:1])  # NaN: not enough marks


def test_initrd_gets_the_program_as_a_second_archive(tmp_path):
    base = tmp_path / "base.cpio"
    buf = io.BytesIO()
    with CpioWriter(buf) as w:
        w.add_file("init", b"#!/bin/sh\n", mode=0o755)
    base.write_bytes(buf.getvalue() + b"\0\0")  # a base whose length is not a multiple of 4
    prog = tmp_path / "prog"
    prog.write_bytes(b"\x7fELF-not-really")
    out = blk.build_initrd(base, prog, tmp_path / "out.cpio")
    blob = out.read_bytes()
    first = read_newc(blob)
    assert [e.name for e in first] == ["init"]
    second_at = len(base.read_bytes()) + (-len(base.read_bytes()) % 4)
    assert blob[:second_at].rstrip(b"\0") == buf.getvalue().rstrip(b"\0")
    second = read_newc(blob[second_at:])
    assert [(e.name, e.data, e.mode & 0o7777) for e in second] == [("blkbench", prog.read_bytes(), 0o755)]


def test_command_lines_use_the_same_kernel_initrd_and_append(tmp_path):
    s = blk.Setup(Path("/k"), Path("/i"), 'console=ttyS0 pyvmm_run="/blkbench /dev/vda 32 3"', 512, "tcg")
    img = tmp_path / "x.raw"
    mmio, pci, qemu = blk.pyvmm_command(s, img), blk.pyvmm_command(s, img, "pci"), blk.qemu_command(s, img)
    for cmd in (mmio, pci, qemu):
        assert cmd[cmd.index("-append" if cmd is qemu else "--append") + 1] == s.append
        assert str(s.kernel) in cmd and str(s.initrd) in cmd
    assert f"file={img},format=raw,if=virtio" in mmio and f"file={img},format=raw,if=virtio" in qemu
    assert f"virtio-blk-pci,file={img},format=raw" in pci
    assert qemu[:3] == ["qemu-system-x86_64", "-accel", "tcg"]


def test_a_guest_clock_jump_fails_the_run():
    """Seen on tcg: CLOCK_MONOTONIC jumped by ~5000 s inside one phase, which made rand_write_iops 0.0."""
    good = [blk.Line(10.0, "BLKBENCH-PHASE rand_read begin t=11.319537"),
            blk.Line(13.2, "BLKBENCH-PHASE rand_read end t=14.436387"),
            blk.Line(13.3, "BLKBENCH-PHASE rand_write begin t=14.437703")]
    assert blk.check_guest_clock(good) is None
    bad = [*good, blk.Line(16.4, "BLKBENCH-PHASE rand_write end t=5372.707333")]
    assert "phase rand_write took 5358" in blk.check_guest_clock(bad)
    backwards = [*good, blk.Line(16.4, "BLKBENCH-PHASE rand_write end t=12.0")]
    assert "guest clock jumped" in blk.check_guest_clock(backwards)


def _fake_vmm(tmp_path, script: str, **kw):
    return blk.run_vmm("fake", ["sh", "-c", script], kw.pop("timeout", 30), tmp_path / "fake.log", **kw)


def test_run_vmm_accepts_a_good_run_and_names_the_transport(tmp_path):
    lines = SAMPLE.replace("\r\n", "\n").replace("\n", "\\n")
    o = _fake_vmm(tmp_path, f"printf '{lines}'", expect_transport="virtio-pci")
    assert (o.transport, o.clocksource, o.result.rand_read_iops) == ("virtio-pci", "tsc", 462.4)
    assert o.wall_s >= o.boot_s > 0 and (tmp_path / "fake.log").read_text().startswith("pyvmm guest")


@pytest.mark.parametrize("tail, message", [
    ("echo 'pyvmm-guest: exit status 0'; exit 3", "VMM exited with status 3"),
    ("echo 'pyvmm-guest: exit status 1'", "exit status 1"),
])
def test_run_vmm_failures_are_errors(tmp_path, tail, message):
    lines = SAMPLE.replace("pyvmm-guest: exit status 0\r\n", "").replace("\r\n", "\\n")
    with pytest.raises(blk.BenchError, match=message):
        _fake_vmm(tmp_path, f"printf '{lines}'; {tail}")
    with pytest.raises(blk.BenchError, match="expected virtio-mmio"):
        _fake_vmm(tmp_path, f"printf '{SAMPLE}'", expect_transport="virtio-mmio")


def test_run_vmm_kills_a_vmm_that_hangs_after_poweroff(tmp_path, monkeypatch):
    monkeypatch.setattr(blk, "POWEROFF_GRACE_S", 1.0)
    t0 = blk.time.monotonic()
    with pytest.raises(blk.BenchError, match="did not exit within 1 s"):
        _fake_vmm(tmp_path, "echo 'pyvmm-guest: exit status 0'; exec sleep 60")
    assert blk.time.monotonic() - t0 < 10
    with pytest.raises(blk.BenchError, match="no result within 1 s"):
        _fake_vmm(tmp_path, "exec sleep 60", timeout=1)


def test_table_shows_best_or_median_and_ratios():
    r = blk.BlkResult.parse(SAMPLE)

    def run(factor: float, transport: str):
        return blk.Outcome("x", blk.dataclasses.replace(r, seq_write_mibs=10 * factor), transport, "tsc",
                           boot_s=factor, wall_s=2 * factor, cpu_s=3 * factor, clock_ratio=1.0)

    by_vmm = {"pyvmm": [run(1, "virtio-mmio"), run(3, "virtio-mmio"), run(2, "virtio-mmio")],
              "qemu": [run(4, "virtio-pci")]}
    rows = {ln[:24].strip(): ln[24:].split() for ln in blk.format_table(by_vmm).splitlines()[1:]}
    assert rows["seq write MiB/s"] == ["30.00", "40.00", "0.750"]  # best throughput: max
    assert rows["boot+run wall s"] == ["2.00", "8.00", "0.250"]  # best time: min
    rows = {ln[:24].strip(): ln[24:].split() for ln in blk.format_table(by_vmm, "median").splitlines()[1:]}
    assert rows["seq write MiB/s"] == ["20.00", "40.00", "0.500"]
    assert "pyvmm (virtio-mmio)" in blk.format_table(by_vmm).splitlines()[0]
