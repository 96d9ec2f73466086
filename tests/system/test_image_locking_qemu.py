"""Issue 11's block acceptance: pyvmm and QEMU agree on image locks, probing and overlap checks.

Each test runs qemu-system-x86_64 (or qemu-img / qemu-io) and pyvmm with the same options on the
same image, in the same test: the lock bytes each takes (read from /proc/locks), who refuses
whom, and with which message.  Both VMMs start paused (-S): an image is opened and locked at
start-up, before any guest code runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvmm.block import BlockError, open_image
from support.locks import lock_lines, locked_bytes
from support.vmms import vmm_command

KINDS = ("qemu", "pyvmm")
HEADLESS = ("-S", "-display", "none", "-nodefaults", "-accel", "tcg", "-m", "256")


def _tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is missing (Debian package qemu-utils)"
    return path


def _img(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([_tool("qemu-img"), *args], capture_output=True, text=True)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def images(tmp_path: Path) -> dict[str, Path]:
    raw = tmp_path / "disk.raw"
    raw.write_bytes(bytes(1 << 20))
    qcow2, overlay = tmp_path / "disk.qcow2", tmp_path / "overlay.qcow2"
    assert _img("create", "-q", "-f", "qcow2", str(qcow2), "1M").returncode == 0
    assert _img("create", "-q", "-f", "qcow2", "-b", str(raw), "-F", "raw", str(overlay)).returncode == 0
    return {"raw": raw, "qcow2": qcow2, "overlay": overlay}


def _command(kind: str, *args: str) -> list[str]:
    return [*vmm_command(kind), *HEADLESS, *args]


@contextlib.contextmanager
def _holding(kind: str, args: list[str], watch: list[Path], locks: bool = True) -> Iterator[dict]:
    """``kind`` running with ``args``, once each watched image has gained lock lines (or, with
    ``locks=False``, once it has run for 5 s).  Yields {"proc": Popen}; "stderr" is added at exit."""
    baseline = {p: len(lock_lines(p)) for p in watch}
    proc = subprocess.Popen(_command(kind, *args), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    held = {"proc": proc}
    try:
        start = time.monotonic()
        while (not all(len(lock_lines(p)) > baseline[p] for p in watch) if locks
               else time.monotonic() < start + 5):
            if proc.poll() is not None:
                pytest.fail(f"{kind} exited ({proc.returncode}) while {watch} should be open: "
                            f"{proc.communicate()}", pytrace=False)
            if time.monotonic() > start + 60:
                pytest.fail(f"{kind} did not lock {watch} within 60 s", pytrace=False)
            time.sleep(0.1)
        time.sleep(0.2)  # a backing file is locked just after its overlay
        yield held
    finally:
        if proc.poll() is None:
            proc.kill()
        held["stderr"] = proc.communicate()[1]
    deadline = time.monotonic() + 10
    while any(len(lock_lines(p)) > baseline[p] for p in watch) and time.monotonic() < deadline:
        time.sleep(0.05)


def _refused(kind: str, args: list[str]) -> subprocess.CompletedProcess:
    r = subprocess.run(_command(kind, *args), stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=90)
    assert r.returncode != 0, f"{kind} {args} was not refused: {r.stderr}"
    assert "Traceback" not in r.stderr, r.stderr
    return r


def _error_line(r: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith(("qemu-system-x86_64:", "pyvmm: error:"))]
    assert len(lines) == 1, r.stderr
    return lines[0]


def _drive(path: Path, fmt: str | None, extra: str = "") -> str:
    return f"file={path}" + (f",format={fmt}" if fmt else "") + extra


CONFIGS = {
    "raw": lambda i: (["-drive", _drive(i["raw"], "raw", ",if=virtio")], ["raw"]),
    "raw-readonly": lambda i: (["-drive", _drive(i["raw"], "raw", ",if=virtio,readonly=on")], ["raw"]),
    "raw-probed": lambda i: (["-drive", _drive(i["raw"], None, ",if=virtio")], ["raw"]),
    "raw-share-rw": lambda i: (["-drive", _drive(i["raw"], "raw", ",if=none,id=d"),
                                "-device", "virtio-blk-pci,drive=d,share-rw=on"], ["raw"]),
    "qcow2": lambda i: (["-drive", _drive(i["qcow2"], "qcow2", ",if=none,id=d"),
                         "-device", "virtio-blk-pci,drive=d"], ["qcow2"]),
    "qcow2-readonly": lambda i: (["-drive", _drive(i["qcow2"], "qcow2", ",if=virtio,readonly=on")], ["qcow2"]),
    "overlay": lambda i: (["-drive", _drive(i["overlay"], "qcow2", ",if=virtio")], ["overlay", "raw"]),
    "overlay-share-rw": lambda i: (["-drive", _drive(i["overlay"], "qcow2", ",if=none,id=d"),
                                    "-device", "virtio-blk-pci,drive=d,share-rw=on"], ["overlay", "raw"]),
    "overlay-locking-off": lambda i: (["-drive", _drive(i["overlay"], "qcow2", ",if=virtio,file.locking=off")],
                                      ["raw"]),
}


@pytest.mark.parametrize("config", list(CONFIGS))
def test_the_same_lock_bytes_as_qemu(images, config: str) -> None:
    args, names = CONFIGS[config](images)
    seen = {}
    for kind in KINDS:
        with _holding(kind, args, [images[n] for n in names]):
            seen[kind] = {n: sorted(locked_bytes(images[n])) for n in ("raw", "qcow2", "overlay")}
    assert seen["pyvmm"] == seen["qemu"]
    assert any(seen["qemu"].values())


@pytest.mark.parametrize("holder", KINDS)
@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_a_second_writer_is_refused_either_way(images, holder: str, fmt: str) -> None:
    image = images[fmt]
    args = ["-drive", _drive(image, fmt, ",if=virtio")]
    with _holding(holder, args, [image]):
        before = _digest(image)
        for kind in KINDS:
            line = _error_line(_refused(kind, args))
            assert 'Failed to get "write" lock' in line, line
            assert kind != "pyvmm" or f"Is another process using the image [{image}]?" in line, line
        assert _digest(image) == before
    assert _digest(image) == before  # a paused VM never wrote its image either


def test_two_drives_on_one_image_in_one_vmm(images) -> None:
    args = ["-drive", _drive(images["qcow2"], "qcow2", ",if=virtio"),
            "-drive", _drive(images["qcow2"], "qcow2", ",if=virtio")]
    before = _digest(images["qcow2"])
    for kind in KINDS:
        assert 'Failed to get "write" lock' in _error_line(_refused(kind, args))
    assert _digest(images["qcow2"]) == before


def test_qemu_img_and_qemu_io_respect_pyvmms_lock(images) -> None:
    image = images["qcow2"]
    with _holding("pyvmm", ["-drive", _drive(image, "qcow2", ",if=virtio")], [image]):
        info = _img("info", str(image))
        assert info.returncode != 0 and 'Failed to get shared "write" lock' in info.stderr, info
        forced = _img("info", "-U", str(image))
        assert forced.returncode == 0 and "file format: qcow2" in forced.stdout, forced
        io = subprocess.run([_tool("qemu-io"), "-f", "qcow2", "-c", "write 0 512", str(image)],
                            capture_output=True, text=True)
        assert io.returncode != 0 and 'Failed to get "write" lock' in io.stderr, io
    assert _img("check", "-q", str(image)).returncode == 0


@pytest.mark.parametrize("first", KINDS)
def test_share_rw_on_both_sides_lets_both_write(images, first: str) -> None:
    raw = images["raw"]
    args = ["-drive", _drive(raw, "raw", ",if=none,id=d"), "-device", "virtio-blk-pci,drive=d,share-rw=on"]
    second = "pyvmm" if first == "qemu" else "qemu"
    with _holding(first, args, [raw]), _holding(second, args, [raw]):
        assert lock_lines(raw) == [(100, 101), (100, 101)] and locked_bytes(raw) == {100, 101}
    with _holding(first, args, [raw]):  # without share-rw=on the newcomer will not share: refused
        for kind in KINDS:
            line = _error_line(_refused(kind, ["-drive", _drive(raw, "raw", ",if=virtio")]))
            assert 'Failed to get shared "write" lock' in line, line


def test_locking_off_and_the_spellings_qemu_refuses(images) -> None:
    raw = images["raw"]
    with _holding("qemu", ["-drive", _drive(raw, "raw", ",if=virtio")], [raw]):
        held = lock_lines(raw)
        for kind in KINDS:  # file.locking=off: neither checks nor takes a lock
            with _holding(kind, ["-drive", _drive(raw, "raw", ",if=virtio,file.locking=off")], [raw],
                          locks=False) as h:
                assert h["proc"].poll() is None and lock_lines(raw) == held
    for kind in KINDS:
        line = _error_line(_refused(kind, ["-drive", _drive(raw, "raw", ",if=virtio,locking=off")]))
        assert "Block format 'raw' does not support the option 'locking'" in line, line
        line = _error_line(_refused(kind, ["-drive", _drive(raw, "raw", ",if=virtio,share-rw=on")]))
        assert "does not support the option 'share-rw'" in line, line
        line = _error_line(_refused(kind, ["-drive", _drive(raw, "raw", ",if=virtio,file.locking=bogus")]))
        assert "invalid parameter value: bogus" in line, line


def test_probed_raw_warns_and_guards_sector0_as_qemu(images, tmp_path: Path) -> None:
    raw = images["raw"]
    for kind in KINDS:
        with _holding(kind, ["-drive", _drive(raw, None, ",if=virtio")], [raw]) as h:
            pass
        assert "Image format was not specified for" in h["stderr"], (kind, h["stderr"])
        assert "probing guessed raw" in h["stderr"] and "block 0 will be restricted" in h["stderr"]
    evil = tmp_path / "evil.qcow2"
    assert _img("create", "-q", "-f", "qcow2", "-b", "/etc/passwd", "-F", "raw", str(evil)).returncode == 0
    header = evil.read_bytes()[:512]
    (tmp_path / "hdr.bin").write_bytes(header)
    io = subprocess.run([_tool("qemu-io"), "-c", f"write -s {tmp_path / 'hdr.bin'} 0 512", str(raw)],
                        capture_output=True, text=True)
    assert io.returncode != 0 and "probing guessed raw" in io.stderr and "Operation not permitted" in io.stdout
    img = open_image(str(raw), None)
    try:
        with pytest.raises(BlockError, match="sector 0 refused"):
            img.writev([memoryview(bytearray(header))], 0)
    finally:
        img.close()
    assert raw.read_bytes()[:512] == bytes(512)
    assert _img("info", str(raw)).stdout.count("file format: raw") == 1


def _l1_points_at_l1(path: Path) -> None:
    assert _img("create", "-q", "-f", "qcow2", str(path), "1M").returncode == 0
    with open(path, "r+b") as f:
        l1_offset = struct.unpack_from(">Q", f.read(104), 40)[0]
        f.seek(l1_offset)
        f.write(struct.pack(">Q", l1_offset | 1 << 63))


def test_overlap_check_agrees_with_qemu(tmp_path: Path) -> None:
    theirs, ours = tmp_path / "qemu.qcow2", tmp_path / "pyvmm.qcow2"
    _l1_points_at_l1(theirs)
    _l1_points_at_l1(ours)
    io = subprocess.run([_tool("qemu-io"), "-f", "qcow2", "-c", "write -P 0xee 0 512", str(theirs)],
                        capture_output=True, text=True)
    assert "Marking image as corrupt" in io.stderr and "overlaps with active L1 table" in io.stderr, io
    img = open_image(str(ours), "qcow2")
    try:
        with pytest.raises(BlockError, match="active L1 table"):
            img.writev([memoryview(bytearray(b"\xee" * 512))], 0)
    finally:
        img.close()
    for path in (theirs, ours):
        assert "corrupt: true" in _img("info", str(path)).stdout, path
    assert theirs.read_bytes() == ours.read_bytes()  # the same bytes: nothing but the corrupt bit changed


def test_a_failed_start_leaves_the_image_as_it_was(images) -> None:
    """pyvmm opens the disk, then a later option fails: the qcow2 header (autoclear bits) is untouched.
    (No QEMU comparison: QEMU clears autoclear bits it does not know at open.)"""
    image = images["qcow2"]
    with open(image, "r+b") as f:
        f.seek(88)
        f.write(struct.pack(">Q", 1))  # the bitmaps autoclear bit
    before = _digest(image)
    r = _refused("pyvmm", ["-drive", _drive(image, "qcow2", ",if=virtio"), "-device", "virtio-blk-pci,drive=nosuch"])
    assert "nosuch" in _error_line(r)
    assert _digest(image) == before
