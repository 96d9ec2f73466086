"""Pure-Python .deb unpacking: every data.tar compression, selection, safety, corruption."""

from __future__ import annotations

import io
import lzma
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from pyvmm.guestkit.deb import extract_deb, list_ar
from pyvmm.guestkit.errors import GuestKitError


def _dpkg_deb() -> str:
    path = shutil.which("dpkg-deb")
    assert path, "dpkg-deb is needed to build test packages: apt-get install dpkg"
    return path


def _build_deb(tmp: Path, compression: str) -> Path:
    root = tmp / f"pkg-{compression}"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        "Package: pyvmm-test\nVersion: 1.0\nArchitecture: all\nMaintainer: t <t@example.invalid>\nDescription: t\n"
    )
    (root / "boot").mkdir()
    (root / "boot" / "vmlinuz-9.9.9-test").write_bytes(b"K" * 5000)
    mod = root / "lib" / "modules" / "9.9.9-test" / "kernel" / "drivers"
    mod.mkdir(parents=True)
    (mod / "a.ko").write_bytes(b"\x7fELFmodule")
    (root / "lib" / "modules" / "9.9.9-test" / "modules.builtin").write_text("kernel/x.ko\n")
    (root / "usr" / "share" / "doc").mkdir(parents=True)
    (root / "usr" / "share" / "doc" / "junk").write_text("not wanted")
    (root / "lib" / "modules" / "9.9.9-test" / "build").symlink_to("/usr/src/linux-headers-9.9.9")
    out = tmp / f"test-{compression}.deb"
    subprocess.run(
        [_dpkg_deb(), f"-Z{compression}", "--root-owner-group", "--build", str(root), str(out)],
        check=True,
        capture_output=True,
    )
    return out


def _want(path: str) -> bool:
    return path.startswith("boot/vmlinuz-") or path.startswith("lib/modules/")


@pytest.mark.parametrize("compression", ["xz", "gzip", "zstd", "none"])
def test_extracts_selected_members(tmp_path: Path, compression: str) -> None:
    deb = _build_deb(tmp_path, compression)
    dest = tmp_path / "out"
    got = extract_deb(deb, dest, _want)
    assert (dest / "boot" / "vmlinuz-9.9.9-test").read_bytes() == b"K" * 5000
    assert (dest / "lib/modules/9.9.9-test/kernel/drivers/a.ko").read_bytes() == b"\x7fELFmodule"
    assert not (dest / "usr").exists()
    assert "boot/vmlinuz-9.9.9-test" in got
    # the absolute symlink pointing outside dest is dropped, not created
    assert not (dest / "lib/modules/9.9.9-test/build").is_symlink()


def test_ar_member_table(tmp_path: Path) -> None:
    deb = _build_deb(tmp_path, "xz")
    with open(deb, "rb") as fh:
        members = list_ar(fh, deb.stat().st_size)
    assert [m.name for m in members] == ["debian-binary", "control.tar.xz", "data.tar.xz"]
    with open(deb, "rb") as fh:
        fh.seek(members[0].offset)
        assert fh.read(members[0].size) == b"2.0\n"


def _ar(members: list[tuple[str, bytes]]) -> bytes:
    out = bytearray(b"!<arch>\n")
    for name, data in members:
        out += f"{name:<16}{0:<12}{0:<6}{0:<6}{'100644':<8}{len(data):<10}`\n".encode()
        out += data + (b"\n" if len(data) % 2 else b"")
    return bytes(out)


def _tar_xz(files: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tar.addfile(info)
    return lzma.compress(raw.getvalue())


def test_hand_made_deb_and_path_traversal_is_skipped(tmp_path: Path) -> None:
    data = _tar_xz(
        {"./boot/vmlinuz-1": b"k", "../../etc/evil": b"x", "./boot/../../evil2": b"y"},
        links={"./boot/escape": "../../../etc/passwd"},
    )
    deb = tmp_path / "h.deb"
    deb.write_bytes(_ar([("debian-binary", b"2.0\n"), ("control.tar.xz", b""), ("data.tar.xz", data)]))
    dest = tmp_path / "out"
    got = extract_deb(deb, dest, lambda p: True)
    assert got == ["boot/vmlinuz-1"]
    assert not (tmp_path / "etc").exists() and not (tmp_path / "evil2").exists()


@pytest.mark.parametrize(
    ("blob", "message"),
    [
        (b"this is not a deb", "ar magic"),
        (_ar([("debian-binary", b"2.0\n"), ("control.tar.xz", b"")]), "no data.tar"),
        (_ar([("debian-binary", b"2.0\n"), ("data.tar.xz", b"garbage, not xz")]), "corrupt"),
        (_ar([("data.tar.lz4", b"x")]), "unsupported"),
        (b"!<arch>\ndebian-binary   0           0     0     100644  99999     `\n2.0\n", "truncated"),
        (b"!<arch>\nshort header", "corrupt ar header"),
    ],
)
def test_corrupt_packages_raise_one_line_errors(tmp_path: Path, blob: bytes, message: str) -> None:
    deb = tmp_path / "bad.deb"
    deb.write_bytes(blob)
    with pytest.raises(GuestKitError, match=message) as info:
        extract_deb(deb, tmp_path / "out", lambda p: True)
    assert "\n" not in str(info.value)


def test_truncated_real_package(tmp_path: Path) -> None:
    deb = _build_deb(tmp_path, "xz")
    blob = deb.read_bytes()
    deb.write_bytes(blob[: len(blob) - 200])
    with pytest.raises(GuestKitError):
        extract_deb(deb, tmp_path / "out", _want)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(GuestKitError, match="cannot open"):
        extract_deb(tmp_path / "nope.deb", tmp_path / "out", _want)
