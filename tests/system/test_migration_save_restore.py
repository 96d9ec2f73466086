"""Issue 13's save/restore acceptance, on pyvmm and (with the same commands) on QEMU.

A stock Linux guest on tcg runs a workload: a counter printed on the serial console every
0.2 s and appended to a file on a tmpfs, plus blocks written to a virtio-blk disk.  It is
saved with QEMU's spellings (``stop``, ``migrate exec:cat > FILE``) and restored in a new
process with ``-incoming "exec:cat FILE"``; after ``cont`` (the source was stopped, so the
destination waits, as QEMU's does) the guest continues where it stopped: the next counter
value, the uptime going on from where it was, the tmpfs file intact, the disk blocks right,
and the shell answers.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest

from support.migration import READY, WORKLOAD, Vm

BLOCKS = 8


def _machine_args(linux, disk: Path, smp: int) -> list[str]:
    return ["-kernel", str(linux.kernel), "-initrd", str(linux.initrd), "-append", linux.cmdline, "-m", "256",
            "-smp", str(smp),
            "-drive", f"file={disk},format=raw,if=none,id=d0", "-device", "virtio-blk-pci,drive=d0,id=blk0"]


def _write_blocks(vm: Vm, tag: str) -> None:
    vm.ask(f"for i in $(seq 1 {BLOCKS}); do echo {tag}-$i | dd of=/dev/vda bs=512 seek=$i conv=notrunc,fsync "
           "2>/dev/null; done; echo WROTE=yes", "WROTE")


def _read_blocks(vm: Vm) -> list[str]:
    out = vm.ask("sync; echo 3 > /proc/sys/vm/drop_caches; echo BLOCKS=$(for i in $(seq 1 "
                 f"{BLOCKS}); do dd if=/dev/vda bs=512 skip=$i count=1 2>/dev/null | head -n1; done)", "BLOCKS")
    return out.split()


def _uptime(vm: Vm) -> float:
    return float(vm.ask("echo UP=$(cut -d' ' -f1 /proc/uptime)", "UP"))


@pytest.mark.slow
@pytest.mark.parametrize("smp", [1, 2])
@pytest.mark.parametrize("kind", ["pyvmm", "qemu"])
def test_linux_guest_continues_after_save_and_restore(kind: str, smp: int, linux, tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(16 << 20)
    state = tmp_path / "vm.state"
    src = Vm(kind, tmp_path, "src", _machine_args(linux, disk, smp))
    try:
        src.console.wait_for(READY, 300)
        _write_blocks(src, "before")
        src.console.send(WORKLOAD)
        src.wait_tick(5)
        up_before = _uptime(src)
        src.cmd("stop")
        time.sleep(0.5)  # the console has printed everything the guest wrote before it stopped
        last = max(src.ticks())
        src.cmd("migrate", uri=f"exec:cat > {state}")
        info = src.wait_migration()
        assert info["status"] == "completed", info
        assert src.status() == "postmigrate"
        assert max(src.ticks()) == last, "the guest ran after stop"
        src.cmd("quit")
        src.proc.wait(30)
    finally:
        src.close()
    assert state.stat().st_size > 0

    dst = Vm(kind, tmp_path, "dst", [*_machine_args(linux, disk, smp), "-incoming", f"exec:cat {state}"])
    try:
        dst.wait_status("paused", 120)  # loaded; a stopped source stays stopped until 'cont'
        dst.cmd("cont")
        dst.wait_tick(last + 3)
        ticks = dst.ticks()
        assert ticks[0] <= last + 1, f"the counter skipped from {last} to {ticks[0]}"
        assert ticks == list(range(ticks[0], ticks[0] + len(ticks))), ticks
        up_after = _uptime(dst)
        assert up_before <= up_after < up_before + 30, (up_before, up_after)
        n = int(dst.ask("echo LINES=$(wc -l < /t/log)", "LINES"))
        assert n >= last + 2
        log = dst.ask(f"echo LOG=$(head -n {n} /t/log | md5sum)", "LOG").split()[0]
        assert log == hashlib.md5("".join(f"{i}\n" for i in range(1, n + 1)).encode()).hexdigest()
        assert _read_blocks(dst) == [f"before-{i}" for i in range(1, BLOCKS + 1)]
        _write_blocks(dst, "after")
        assert _read_blocks(dst) == [f"after-{i}" for i in range(1, BLOCKS + 1)]
        assert dst.ask("echo SHELL=$((6*7))", "SHELL") == "42"
        assert dst.ask("echo CPUS=$(grep -c ^processor /proc/cpuinfo)", "CPUS") == str(smp)
        dst.cmd("quit")
        dst.proc.wait(30)
    except AssertionError as e:
        raise AssertionError(f"{e}\ndestination stderr:\n{dst.stderr()}") from None
    finally:
        dst.close()
    data = disk.read_bytes()
    for i in range(1, BLOCKS + 1):
        assert data[512 * i:512 * i + 8] == f"after-{i}\n".encode()[:8]
