"""-mem-prealloc, as QEMU means it: every page of guest RAM is backed when the VMM starts.

Both VMMs boot the same boot sector (it prints ``ok`` on COM1 and halts) with 160 MiB of RAM, with
and without ``-mem-prealloc``; once the guest has printed, the VMM's resident memory holds all of
guest RAM with the option and much less without it.  With ``-mem-path DIR`` too, both accept it
and boot; a memory back-end's ``prealloc=on`` does the same for the back-end.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from support.vmms import vmm_command

MIB = 160
#: mov dx,0x3f8; mov al,'o'; out dx,al; mov al,'k'; out dx,al; mov al,10; out dx,al; cli; hlt; jmp hlt
OK_AND_HALT = bytes([0xBA, 0xF8, 0x03, 0xB0, 0x6F, 0xEE, 0xB0, 0x6B, 0xEE, 0xB0, 0x0A, 0xEE, 0xFA, 0xF4, 0xEB, 0xFD])


@pytest.fixture
def boot_sector(tmp_path: Path) -> Path:
    p = tmp_path / "ok.bin"
    p.write_bytes(OK_AND_HALT.ljust(510, b"\0") + b"\x55\xaa")
    return p


def _rss_once_up(kind: str, boot_sector: Path, extra: list[str], tmp: Path) -> int:
    """Start ``kind`` on the boot sector; its VmRSS in bytes once the guest has printed ``ok``."""
    serial = tmp / f"{kind}-serial.txt"
    serial.unlink(missing_ok=True)
    guest = ["-kernel", str(boot_sector)] if kind == "pyvmm" else \
        ["-drive", f"file={boot_sector},format=raw,if=ide"]
    cmd = [*vmm_command(kind), "-accel", "kvm", "-m", str(MIB), "-display", "none", "-nodefaults",
           "-serial", f"file:{serial}", *guest, *extra]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not (serial.exists() and "ok" in serial.read_text(errors="replace")):
            if proc.poll() is not None:
                out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
                raise AssertionError(f"{kind} exited {proc.returncode} before the guest printed: {out}")
            assert time.monotonic() < deadline, f"{kind}: the guest did not print within 60 s"
            time.sleep(0.05)
        for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError(f"no VmRSS for {kind}")
    finally:
        proc.kill()
        proc.wait(10)


@pytest.mark.parametrize("kind", ["qemu", "pyvmm"])
def test_mem_prealloc_backs_all_guest_ram_at_start(kind, boot_sector, tmp_path, kvm):
    lazy = _rss_once_up(kind, boot_sector, [], tmp_path)
    eager = _rss_once_up(kind, boot_sector, ["-mem-prealloc"], tmp_path)
    assert lazy < (MIB << 20) // 2, f"{kind} without -mem-prealloc: RSS {lazy >> 20} MiB"
    assert eager >= MIB << 20, f"{kind} with -mem-prealloc: RSS {eager >> 20} MiB for a {MIB} MiB guest"


@pytest.mark.parametrize("kind", ["qemu", "pyvmm"])
def test_mem_prealloc_with_mem_path(kind, boot_sector, tmp_path, kvm):
    ram = tmp_path / f"{kind}-ram"
    ram.mkdir()
    rss = _rss_once_up(kind, boot_sector, ["-mem-path", str(ram), "-mem-prealloc"], tmp_path)
    assert rss >= MIB << 20, f"{kind}: RSS {rss >> 20} MiB"  # the shared file pages are mapped and resident


@pytest.mark.parametrize("kind", ["qemu", "pyvmm"])
def test_memory_backend_prealloc_on(kind, boot_sector, tmp_path, kvm):
    backend = ["-object", f"memory-backend-ram,id=ram0,size={MIB}M,prealloc=on", "-machine", "memory-backend=ram0"]
    rss = _rss_once_up(kind, boot_sector, backend, tmp_path)
    assert rss >= MIB << 20, f"{kind}: RSS {rss >> 20} MiB"
    lazy = ["-object", f"memory-backend-ram,id=ram0,size={MIB}M", "-machine", "memory-backend=ram0"]
    rss = _rss_once_up(kind, boot_sector, lazy, tmp_path)
    assert rss < (MIB << 20) // 2, f"{kind} without prealloc: RSS {rss >> 20} MiB"
