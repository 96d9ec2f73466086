"""The newc cpio writer: byte layout, round trips, and GNU cpio's opinion of our archives."""

from __future__ import annotations

import gzip
import io
import shutil
import stat
import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvmm.guestkit.cpio import HEADER_SIZE, CpioWriter, NodeKind, read_newc, write_archive_file
from pyvmm.guestkit.errors import GuestKitError


def _sample(w: CpioWriter) -> None:
    w.add_dir("etc")
    w.add_file("etc/hostname", b"pyvmm\n")
    for n in range(8):  # every data padding case
        w.add_file(f"data/f{n}", bytes(range(n)), mode=0o600)
    w.add_file("bin/busybox", b"\x7fELF" + b"x" * 1001, mode=0o755)
    w.add_symlink("bin/sh", "/bin/busybox")
    w.add_device("dev/console", NodeKind.CHAR_DEVICE, 5, 1, mode=0o600)
    w.add_device("dev/vda", NodeKind.BLOCK_DEVICE, 254, 0, mode=0o660)
    w.add_dir("tmp", mode=0o1777)
    w.add_file("init", b"#!/bin/sh\n", mode=0o755)


def _build(compress: bool = False) -> bytes:
    buf = io.BytesIO()
    if compress:
        with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as gz, CpioWriter(gz) as w:  # type: ignore[arg-type]
            _sample(w)
    else:
        with CpioWriter(buf) as w:
            _sample(w)
    return buf.getvalue()


def test_round_trip_entries_and_metadata() -> None:
    entries = {e.name: e for e in read_newc(_build())}
    assert stat.S_ISDIR(entries["etc"].mode)
    # parents are created implicitly, before their children
    names = list(entries)
    assert names.index("data") < names.index("data/f0")
    assert names.index("dev") < names.index("dev/console")
    assert entries["etc/hostname"].data == b"pyvmm\n"
    for n in range(8):
        e = entries[f"data/f{n}"]
        assert e.data == bytes(range(n))
        assert stat.S_IMODE(e.mode) == 0o600
        assert stat.S_ISREG(e.mode)
    assert stat.S_IMODE(entries["bin/busybox"].mode) == 0o755
    link = entries["bin/sh"]
    assert stat.S_ISLNK(link.mode) and link.data == b"/bin/busybox"
    con = entries["dev/console"]
    assert stat.S_ISCHR(con.mode) and (con.rdevmajor, con.rdevminor) == (5, 1)
    vda = entries["dev/vda"]
    assert stat.S_ISBLK(vda.mode) and (vda.rdevmajor, vda.rdevminor) == (254, 0)
    assert stat.S_IMODE(entries["tmp"].mode) == 0o1777
    assert all(e.uid == 0 and e.gid == 0 and e.mtime == 0 for e in entries.values())


def test_layout_alignment_and_trailer() -> None:
    blob = _build()
    assert blob.startswith(b"070701")
    assert len(blob) % 4 == 0
    # walk the headers by hand: each starts 4-aligned, the last is the trailer
    pos, names = 0, []
    while True:
        assert pos % 4 == 0
        hdr = blob[pos : pos + HEADER_SIZE]
        assert hdr[:6] == b"070701"
        size = int(hdr[54:62], 16)
        namesize = int(hdr[94:102], 16)
        name = blob[pos + HEADER_SIZE : pos + HEADER_SIZE + namesize]
        assert name.endswith(b"\0")
        names.append(name[:-1].decode())
        data = pos + HEADER_SIZE + namesize
        data += -data % 4
        pos = data + size + (-(data + size) % 4)
        if names[-1] == "TRAILER!!!":
            break
    assert pos == len(blob)
    assert "init" in names


def test_output_is_reproducible() -> None:
    assert _build() == _build()
    assert _build(compress=True) == _build(compress=True)


def test_gzip_round_trip() -> None:
    blob = _build(compress=True)
    assert blob[:2] == b"\x1f\x8b"
    assert [e.name for e in read_newc(blob)] == [e.name for e in read_newc(_build())]


def test_rejects_duplicates_bad_paths_and_late_writes() -> None:
    w = CpioWriter(io.BytesIO())
    w.add_file("a", b"1")
    with pytest.raises(GuestKitError, match="duplicate"):
        w.add_file("a", b"2")
    with pytest.raises(GuestKitError, match="invalid cpio path"):
        w.add_file("../escape", b"")
    with pytest.raises(GuestKitError, match="invalid cpio path"):
        w.add_file("/", b"")
    with pytest.raises(GuestKitError):
        w.add_device("x", NodeKind.REGULAR, 1, 1)
    w.close()
    with pytest.raises(GuestKitError, match="closed"):
        w.add_file("b", b"")


def test_reader_rejects_truncated_and_garbage() -> None:
    blob = _build()
    with pytest.raises(GuestKitError):
        read_newc(blob[: len(blob) // 2])
    with pytest.raises(GuestKitError, match="magic"):
        read_newc(b"070707" + blob[6:])


def _gnu_cpio() -> str:
    path = shutil.which("cpio")
    assert path, "GNU cpio is needed for this test: apt-get install cpio"
    return path


def test_gnu_cpio_lists_and_extracts(tmp_path) -> None:
    cpio = _gnu_cpio()
    archive = tmp_path / "a.cpio"
    write_archive_file(archive, _sample)
    listing = subprocess.run(
        [cpio, "-itv", "--quiet", "-F", str(archive)], capture_output=True, text=True, check=True
    ).stdout
    lines = {ln.split()[-1] if "->" not in ln else ln.split()[-3]: ln for ln in listing.splitlines()}
    assert lines["dev/console"].startswith("crw-------") and "5,   1" in lines["dev/console"]
    assert lines["dev/vda"].startswith("brw-rw----")
    assert lines["bin/sh"].startswith("lrwxrwxrwx") and lines["bin/sh"].endswith("-> /bin/busybox")
    assert lines["tmp"].startswith("drwxrwxrwt")
    # extract the non-device part and compare contents
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run(
        [cpio, "-idm", "--quiet", "--no-absolute-filenames", "-F", str(archive), "etc/*", "data/*", "bin/*"],
        cwd=out,
        check=True,
    )
    assert (out / "etc/hostname").read_bytes() == b"pyvmm\n"
    assert (out / "data/f7").read_bytes() == bytes(range(7))
    assert (out / "bin/sh").is_symlink() and str((out / "bin/sh").readlink()) == "/bin/busybox"
    assert stat.S_IMODE((out / "bin/busybox").stat().st_mode) == 0o755


def test_write_archive_file_is_atomic_on_error(tmp_path) -> None:
    target = tmp_path / "img.cpio"

    def broken(w: CpioWriter) -> None:
        w.add_file("a", b"x")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        write_archive_file(target, broken)
    assert list(tmp_path.iterdir()) == []


_names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_.-", min_size=1, max_size=12).filter(
    lambda s: s not in (".", "..")
)


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(_names, st.binary(max_size=64), min_size=1, max_size=12))
def test_property_round_trip(files: dict[str, bytes]) -> None:
    buf = io.BytesIO()
    with CpioWriter(buf) as w:
        for name, data in files.items():
            w.add_file(f"d/{name}", data)
    parsed = {e.name: e.data for e in read_newc(buf.getvalue()) if stat.S_ISREG(e.mode)}
    assert parsed == {f"d/{k}": v for k, v in files.items()}
