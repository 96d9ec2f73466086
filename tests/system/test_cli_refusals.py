"""The CLI refuses what it cannot honour safely, with one line each (issue 11).

Duplicate ids are QEMU's errors: each case runs qemu-system-x86_64 with the same options and
expects it to refuse as well.  A listening socket path given twice is refused by pyvmm only
(QEMU lets the second listener unlink the first one's path, which then cannot be reached).
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import debug_exit_status, run_pyvmm_kvm
from support.vmms import vmm_command

HEADLESS = ("-display", "none", "-nodefaults", "-accel", "tcg")


@pytest.fixture
def work() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="clir-", dir="/tmp"))  # short: unix socket paths
    (d / "disk.img").write_bytes(bytes(1 << 20))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _run(kind: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*vmm_command(kind), *HEADLESS, *args], capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL, cwd=cwd)


def _one_error_line(r: subprocess.CompletedProcess[str], needle: str) -> None:
    assert r.returncode != 0, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("pyvmm: error: ") and needle in lines[0], r.stderr


DUPLICATES = {
    "device": (("-device", "virtio-rng-pci,id=r0", "-device", "virtio-rng-pci,id=r0"),
               "Duplicate ID 'r0' for device"),
    "chardev": (("-chardev", "null,id=c0", "-chardev", "null,id=c0"), "Duplicate ID 'c0' for chardev"),
    "drive": (("-drive", "file=disk.img,format=raw,if=none,id=d0",
               "-drive", "file=disk.img,format=raw,if=none,id=d0"), "Duplicate ID 'd0' for drive"),
    "netdev": (("-netdev", "user,id=n0", "-netdev", "user,id=n0"), "Duplicate ID 'n0' for netdev"),
}


@pytest.mark.parametrize("case", sorted(DUPLICATES))
def test_duplicate_ids_are_refused_as_qemu_does(work, case):
    args, needle = DUPLICATES[case]
    q = _run("qemu", *args, cwd=work)
    assert q.returncode != 0 and needle in q.stderr, q.stderr
    _one_error_line(_run("pyvmm", *args, cwd=work), needle)


SOCKETS = {
    "two -qmp": lambda p: ("-qmp", f"unix:{p},server=on,wait=off", "-qmp", f"unix:{p},server=on,wait=off"),
    "-chardev socket and -qmp": lambda p: ("-chardev", f"socket,id=c1,path={p},server=on,wait=off",
                                           "-qmp", f"unix:{p},server=on,wait=off"),
    "-serial unix and -qmp": lambda p: ("-serial", f"unix:{p},server=on,wait=off",
                                        "-qmp", f"unix:{p},server=on,wait=off"),
    "-mon on a chardev and -qmp": lambda p: ("-qmp", f"unix:{p},server=on,wait=off",
                                             "-chardev", f"socket,id=m1,path={p},server=on,wait=off",
                                             "-mon", "chardev=m1,mode=control"),
}


@pytest.mark.parametrize("case", sorted(SOCKETS))
def test_one_socket_path_twice_is_refused(work, case):
    path = work / "x.sock"
    r = _run("pyvmm", *SOCKETS[case](path), cwd=work)
    _one_error_line(r, f"socket path {path} is already used by")
    assert not path.exists()


@contextlib.contextmanager
def _small_tmpfs(where: Path, size: str) -> Iterator[Path]:
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], check=True,
                   capture_output=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_mem_path_on_a_full_file_system_is_one_line_not_sigbus(work, guests, kvm):
    with _small_tmpfs(work / "small", "8M") as fs:
        # QEMU without -mem-prealloc dies by SIGBUS once the guest touches the missing pages;
        # with -mem-prealloc (what pyvmm always does for --mem-path) it refuses to start.
        q = _run("qemu", "-m", "64", "-mem-path", str(fs / "ram"), "-mem-prealloc", cwd=work)
        assert q.returncode == 1 and "preallocating memory failed" in q.stderr, q.stderr
        r = run_pyvmm_kvm("-m", "64", "--mem-path", fs / "ram", "--kernel", guests["realmode_hello"])
        assert r.returncode == 1, r.describe()
        lines = [line for line in r.stderr.strip().splitlines() if "accelerator:" not in line]
        assert lines == [f"pyvmm: error: --mem-path {fs / 'ram'}: cannot back 64 MiB of guest RAM: "
                         "No space left on device"], r.describe()


def test_mem_path_with_room_boots_with_every_page_backed(work, guests, kvm):
    with _small_tmpfs(work / "roomy", "80M") as fs:
        r = run_pyvmm_kvm("-m", "64", "--mem-path", fs / "ram", "--kernel", guests["realmode_hello"])
        assert r.returncode == debug_exit_status(0x2A) and r.serial == "Hello from real mode\n", r.describe()
        assert (fs / "ram").stat().st_blocks * 512 >= 64 << 20
