"""KVM save/restore and live migration of a running -smp 2 guest, driven through QMP as QEMU is.

The guest (tests/support/guests/migrate_smp.c) takes PIT interrupts through the I/O APIC on
the BSP and LAPIC-timer interrupts on the AP, and prints "tick N ap" lines whose text is the
same on every run as long as its state survives.  Each test runs pyvmm (on the real /dev/kvm)
and QEMU with the same options and the same QMP commands:

* an uninterrupted run, the reference;
* live migration to a second process over ``unix:`` while the guest runs: the source ends in
  ``postmigrate``, the destination runs on by itself, and the source's serial output followed
  by the destination's is the reference text;
* ``stop`` + ``migrate exec:cat > FILE``, a new process with ``-incoming "exec:cat FILE"``, then
  ``cont``: again the reference text.
"""

from __future__ import annotations

import asyncio
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "support" / "guests" / "qmp"))

from harness import Client, Vmm, connected, run_async  # noqa: E402

TICKS = 12
#: KiB of RAM the guest's AP keeps rewriting and checking (slow where ring-0 code is emulated).
DIRTY_KIB = 64
#: isa-debug-exit value 0x21 -> exit status (0x21 << 1) | 1, as QEMU and pyvmm spell it.
EXIT_STATUS = 67
KINDS = ["pyvmm", "qemu"]


@pytest.fixture(scope="module")
def kernel(guests: Any, kvm: None) -> Path:
    return guests["migrate_smp"]  # type: ignore[no-any-return]


def make_vmm(kind: str, kernel: Path, workdir: Path, *extra: str, ticks: int = TICKS, dirty: int = 0) -> Vmm:
    workdir.mkdir(parents=True, exist_ok=True)
    return Vmm(kind, kernel, workdir, extra_args=(
        "-smp", "2", "-append", f"ticks={ticks} dirty={dirty}",
        "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04", *extra))


def reference_serial(kind: str, kernel: Path, workdir: Path, ticks: int = TICKS, dirty: int = 0) -> str:
    vm = make_vmm(kind, kernel, workdir / "reference", ticks=ticks, dirty=dirty)
    vm.start()
    try:
        assert vm.wait_exit(60) == EXIT_STATUS, vm.stderr()[-2000:]
    finally:
        vm.kill()
    text = vm.serial()
    assert text.endswith("done\n") and "stalled" not in text, text
    assert ("dirty=ok\n" in text) == bool(dirty), text
    return text


async def wait_migration(client: Client, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        info = await client.execute("query-migrate")
        if info.get("status") in ("completed", "failed", "cancelled"):
            return info
        if time.monotonic() > deadline:
            raise AssertionError(f"migration did not finish within {timeout}s: {info}")
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("kind", KINDS)
def test_live_unix_migration_of_a_running_smp_guest(kind: str, kernel: Path, tmp_path: Path) -> None:
    """The AP rewrites and checks 64 KiB of RAM all along ("dirty=ok"): pages it writes during the
    passes must reach the destination (the KVM dirty log, then the final pass)."""
    reference = reference_serial(kind, kernel, tmp_path, dirty=DIRTY_KIB)
    sock = tmp_path / "migrate.sock"
    src = make_vmm(kind, kernel, tmp_path / "src", dirty=DIRTY_KIB)
    dst = make_vmm(kind, kernel, tmp_path / "dst", "-incoming", f"unix:{sock}", dirty=DIRTY_KIB)
    dst.start()
    src.start()

    async def body() -> dict[str, Any]:
        async with connected(src) as s, connected(dst) as d:
            src.wait_serial(lambda t: "tick 3 " in t, 30, "tick 3 on the source")
            assert (await d.execute("query-status"))["status"] == "inmigrate"
            await s.execute("migrate", {"uri": f"unix:{sock}"})
            info = await wait_migration(s)
            assert info["status"] == "completed", info
            assert (await s.execute("query-status"))["status"] == "postmigrate"
            for _ in range(100):
                if (await d.execute("query-status"))["status"] == "running":
                    break
                await asyncio.sleep(0.05)
            assert (await d.execute("query-status"))["status"] == "running"
            await s.execute("quit")
            return info

    try:
        info = run_async(body(), 90)
        assert dst.wait_exit(60) == EXIT_STATUS, dst.stderr()[-2000:]
    finally:
        src.kill()
        dst.kill()
    assert isinstance(info.get("downtime"), int) and isinstance(info.get("total-time"), int), info
    assert src.serial() + dst.serial() == reference, (src.serial(), dst.serial())
    print(f"{kind}: total-time {info['total-time']} ms, downtime {info['downtime']} ms")


@pytest.mark.parametrize("kind", KINDS)
def test_stop_save_to_file_and_restore_in_a_new_process(kind: str, kernel: Path, tmp_path: Path) -> None:
    reference = reference_serial(kind, kernel, tmp_path)
    state = tmp_path / "vm.state"
    src = make_vmm(kind, kernel, tmp_path / "src")
    src.start()

    async def save() -> None:
        async with connected(src) as s:
            src.wait_serial(lambda t: "tick 4 " in t, 30, "tick 4 on the source")
            await s.execute("stop")
            await s.execute("migrate", {"uri": f"exec:cat > {shlex.quote(str(state))}"})
            info = await wait_migration(s)
            assert info["status"] == "completed", info
            await s.execute("quit")

    try:
        run_async(save(), 60)
        src.wait_exit(10)
    finally:
        src.kill()
    assert state.stat().st_size > 0
    dst = make_vmm(kind, kernel, tmp_path / "dst", "-incoming", f"exec:cat {shlex.quote(str(state))}")
    dst.start()

    async def restore() -> None:
        async with connected(dst) as d:
            for _ in range(200):
                if (await d.execute("query-status"))["status"] == "paused":
                    break
                await asyncio.sleep(0.05)
            assert (await d.execute("query-status"))["status"] == "paused"  # the source was stopped
            await d.execute("cont")

    try:
        run_async(restore(), 60)
        assert dst.wait_exit(60) == EXIT_STATUS, dst.stderr()[-2000:]
    finally:
        dst.kill()
    assert src.serial() + dst.serial() == reference, (src.serial(), dst.serial())


@pytest.mark.parametrize("kind", KINDS)
def test_cancelled_migration_leaves_the_guest_running_and_a_second_one_works(
        kind: str, kernel: Path, tmp_path: Path) -> None:
    """migrate_cancel mid-stream (throttled by max-bandwidth): the source runs on; then a second
    migration to a fresh destination completes and the guest's output is still the reference."""
    ticks = 25
    reference = reference_serial(kind, kernel, tmp_path, ticks)
    src = make_vmm(kind, kernel, tmp_path / "src", ticks=ticks)
    first_sock, second_sock = tmp_path / "first.sock", tmp_path / "second.sock"
    first = make_vmm(kind, kernel, tmp_path / "first", "-incoming", f"unix:{first_sock}", ticks=ticks)
    second = make_vmm(kind, kernel, tmp_path / "second", "-incoming", f"unix:{second_sock}", ticks=ticks)
    for vm in (first, second, src):
        vm.start()

    async def body() -> None:
        async with connected(src) as s:
            src.wait_serial(lambda t: "tick 2 " in t, 30, "tick 2 on the source")
            await s.execute("migrate-set-parameters", {"max-bandwidth": 64 << 10})  # bytes/s: seconds of stream
            await s.execute("migrate", {"uri": f"unix:{first_sock}"})
            await asyncio.sleep(0.2)
            assert (await s.execute("query-migrate"))["status"] == "active"
            await s.execute("migrate_cancel")
            info = await wait_migration(s)
            assert info["status"] == "cancelled", info
            assert (await s.execute("query-status"))["status"] == "running"
            seen = len(src.serial())
            src.wait_serial(lambda t: len(t) > seen + 8, 10, "ticks after the cancel")
            await s.execute("migrate-set-parameters", {"max-bandwidth": 1 << 30})
            await s.execute("migrate", {"uri": f"unix:{second_sock}"})
            info = await wait_migration(s)
            assert info["status"] == "completed", info
            assert (await s.execute("query-status"))["status"] == "postmigrate"
            await s.execute("quit")

    try:
        run_async(body(), 120)
        assert second.wait_exit(60) == EXIT_STATUS, second.stderr()[-2000:]
    finally:
        for vm in (src, first, second):
            vm.kill()
    assert src.serial() + second.serial() == reference, (src.serial(), second.serial())
