"""Instant restore, Firecracker style: RAM is mapped from the state file, not read.

The source is saved with the ``mapped-ram`` capability to ``file:PATH`` (QEMU 9's spelling;
the QEMU here is older, so there is no QEMU run).  The destination, with ``-incoming
file:PATH``, maps the file's RAM ``MAP_PRIVATE``: the guest continues (the next counter
value, a shell that answers), the file is not written, the mapping is in the process's
memory map, and only the pages the guest touched are resident.  Two restores of the same
file run side by side and diverge independently.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest

from support.migration import READY, WORKLOAD, Vm


def _mapping_rss_kib(pid: int, path: Path) -> int:
    """Resident KiB of the process's mappings of ``path``."""
    total, inside = 0, False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        if line[:1].isalnum() and "-" in line.split()[0] and len(line.split()) >= 5:
            inside = line.split()[-1] == str(path)
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total


@pytest.mark.slow
def test_mapped_ram_restore_is_lazy_and_private(linux, tmp_path: Path) -> None:
    args = ["-kernel", str(linux.kernel), "-initrd", str(linux.initrd), "-append", linux.cmdline, "-m", "256"]
    state = tmp_path / "vm.state"
    src = Vm("pyvmm", tmp_path, "src", args)
    try:
        src.console.wait_for(READY, 300)
        src.console.send(WORKLOAD)
        src.wait_tick(3)
        src.cmd("stop")
        time.sleep(0.3)
        last = max(src.ticks())
        src.cmd("migrate-set-capabilities", capabilities=[{"capability": "mapped-ram", "state": True}])
        assert "requires a file: URI" in src.error_of("migrate", uri=f"exec:cat > {state}")
        src.cmd("migrate", uri=f"file:{state}")
        info = src.wait_migration()
        assert info["status"] == "completed", info
        assert src.status() == "postmigrate"
    finally:
        src.close()
    digest = hashlib.sha256(state.read_bytes()).hexdigest()
    ram_bytes = info["ram"]["normal-bytes"]

    clones = [Vm("pyvmm", tmp_path, f"dst{i}", [*args, "-incoming", f"file:{state}"]) for i in range(2)]
    try:
        for i, vm in enumerate(clones):
            vm.wait_status("paused", 60)
            vm.cmd("cont")
            vm.wait_tick(last + 2)
            assert min(vm.ticks()) <= last + 1
            assert vm.ask(f"echo C{i}=$((40+{i}))", f"C{i}") == str(40 + i)
        # each clone has its own memory: a file written in one is not in the other
        clones[0].ask("echo only-here > /t/mine; echo W=ok", "W")
        assert clones[1].ask("echo R=$(cat /t/mine 2>/dev/null || echo none)", "R") == "none"
        for vm in clones:
            rss = _mapping_rss_kib(vm.proc.pid, state)
            assert 0 < rss * 1024 < ram_bytes // 2, (rss, ram_bytes)
    except AssertionError as e:
        raise AssertionError(f"{e}\n" + "\n".join(vm.stderr() for vm in clones)) from None
    finally:
        for vm in clones:
            vm.close()
    assert hashlib.sha256(state.read_bytes()).hexdigest() == digest, "a restore wrote the state file"
