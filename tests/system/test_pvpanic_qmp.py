"""pvpanic and ``-action panic=``, on pyvmm and, unchanged, on QEMU.

The QMP test guest (``tests/support/guests/qmp``) with ``panic_after=N``
reads the pvpanic port after N ticks, prints what it read, and writes
``panic_value`` (1 = PANICKED, 2 = CRASH_LOADED) to it.  Each panic action
must give QEMU's events, run state and exit status; passing on ``qemu`` shows
the test encodes QEMU 7.2's behaviour.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "support" / "guests" / "qmp"))

from harness import Vmm, build_guest, connected, run_async  # noqa: E402

PANIC_AFTER = 10  # ticks (1 s): time for the client to negotiate before the guest reports

StartVm = Callable[..., Vmm]


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_guest(tmp_path_factory.mktemp("qmp-guest"))


@pytest.fixture
def start_vm(guest: Path, tmp_path: Path) -> Iterator[StartVm]:
    """``start_vm(kind, *args, wait_for_client=True)``: the guest running on ``kind`` with ``args``,
    killed when the test ends.  wait=on (the default): the guest starts only once the client is
    connected, so no event is missed."""
    vms: list[Vmm] = []

    def start(kind: str, *args: str, wait_for_client: bool = True) -> Vmm:
        vm = Vmm(kind, guest, tmp_path, wait_for_client=wait_for_client, extra_args=args)
        vms.append(vm)
        vm.start()
        return vm

    yield start
    for vm in vms:
        vm.kill()


def _panic_vm(start_vm: StartVm, kind: str, action: str | None, value: int = 1) -> Vmm:
    args = ["-device", "pvpanic", "-append", f"panic_after={PANIC_AFTER} panic_value={value}"]
    if action is not None:
        args += ["-action", f"panic={action}"]
    return start_vm(kind, *args)


def _strip(events: list[dict]) -> list[tuple[str, dict | None]]:
    """(name, data) of each event, without a RESUME at start-up: whether the client sees that one
    depends on how fast it negotiates (QEMU starts the guest on connect, before negotiation)."""
    out = [(e["event"], e.get("data")) for e in events]
    return out[1:] if out[:1] == [("RESUME", None)] else out


def _events_read(vm: Vmm) -> int:
    m = re.search(r"PVPANIC EVENTS=(\d+)", vm.serial())
    assert m, f"{vm.kind}: the guest never read the pvpanic port:\n{vm.serial()[-500:]}"
    return int(m.group(1))


@pytest.mark.parametrize("kind", ["pyvmm", "qemu"])
@pytest.mark.parametrize(("action", "status"), [(None, 0), ("shutdown", 0), ("exit-failure", 1)])
def test_panic_shuts_the_vm_down(kind: str, action: str | None, status: int, start_vm: StartVm) -> None:
    """The default (shutdown) and exit-failure: GUEST_PANICKED {poweroff}, then a guest-panic SHUTDOWN."""
    vm = _panic_vm(start_vm, kind, action)

    async def body() -> list[dict]:
        async with connected(vm) as c:
            await c.wait_event("SHUTDOWN", timeout=30)
        return c.events

    events = run_async(body())
    assert _strip(events) == [("GUEST_PANICKED", {"action": "poweroff"}),
                              ("SHUTDOWN", {"guest": True, "reason": "guest-panic"})]
    assert vm.wait_exit(15) == status
    assert _events_read(vm) == 3


@pytest.mark.parametrize("kind", ["pyvmm", "qemu"])
def test_panic_pause_then_cont(kind: str, start_vm: StartVm) -> None:
    """panic=pause: GUEST_PANICKED {pause}, STOP, status guest-panicked; cont runs the guest on."""
    vm = _panic_vm(start_vm, kind, "pause")

    async def body() -> None:
        async with connected(vm) as c:
            await c.wait_event("STOP", timeout=30)
            assert _strip(c.events) == [("GUEST_PANICKED", {"action": "pause"}), ("STOP", None)]
            st = await c.execute("query-status")
            assert (st["status"], st["running"]) == ("guest-panicked", False)
            ticks = len(vm.ticks())
            await asyncio.sleep(0.5)
            assert len(vm.ticks()) <= ticks + 1, "the guest kept running after its panic paused the VM"
            await c.execute("cont")
            await c.wait_event("RESUME")
            st = await c.execute("query-status")
            assert (st["status"], st["running"]) == ("running", True)
            await asyncio.to_thread(vm.wait_ticks, 3, 15)
            await c.execute("quit")
            await c.wait_event("SHUTDOWN")
            assert _strip(c.events)[-1] == ("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})

    run_async(body())
    assert vm.wait_exit(15) == 0
    assert "PVPANIC SENT" in vm.serial()


@pytest.mark.parametrize("kind", ["pyvmm", "qemu"])
def test_panic_pause_holds_what_the_guest_does_next(kind: str, start_vm: StartVm) -> None:
    """The guest resets right after its report: under panic=pause that reset waits for cont (QEMU
    stops the reporting vCPU at its write), then happens."""
    vm = start_vm(kind, "-device", "pvpanic", "-action", "panic=pause", "-append",
                  f"panic_after={PANIC_AFTER} reset_after={PANIC_AFTER}")

    async def body() -> None:
        async with connected(vm) as c:
            await c.wait_event("STOP", timeout=30)
            await asyncio.sleep(1.0)
            assert _strip(c.events) == [("GUEST_PANICKED", {"action": "pause"}), ("STOP", None)]
            assert (await c.execute("query-status"))["status"] == "guest-panicked"
            assert vm.boots() == 1
            await c.execute("cont")
            await c.wait_event("RESET", timeout=15)
            assert _strip(c.events)[2:4] == [("RESUME", None), ("RESET", {"guest": True, "reason": "guest-reset"})]
            await asyncio.to_thread(vm.wait_serial, lambda t: t.count("QMPGUEST BOOT") == 2, 15, "the reboot")
            await c.execute("quit")
            await c.wait_event("SHUTDOWN")

    run_async(body())
    assert vm.wait_exit(15) == 0


@pytest.mark.parametrize("kind", ["pyvmm", "qemu"])
@pytest.mark.parametrize(("action", "value", "event"), [
    ("none", 1, ("GUEST_PANICKED", {"action": "run"})),
    (None, 2, ("GUEST_CRASHLOADED", {"action": "run"})),
])
def test_report_without_stopping(kind: str, action: str | None, value: int, event: tuple, start_vm: StartVm) -> None:
    """panic=none, and a CRASH_LOADED report under any action: the event only, the guest runs on."""
    vm = _panic_vm(start_vm, kind, action, value)

    async def body() -> None:
        async with connected(vm) as c:
            await c.wait_event(event[0], timeout=30)
            await asyncio.to_thread(vm.wait_serial, lambda t: "PVPANIC SENT" in t, 10, "the guest going on")
            await asyncio.to_thread(vm.wait_ticks, 3, 15)
            st = await c.execute("query-status")
            assert (st["status"], st["running"]) == ("running", True)
            assert _strip(c.events) == [event]
            await c.execute("quit")
            await c.wait_event("SHUTDOWN")

    run_async(body())
    assert vm.wait_exit(15) == 0


@pytest.mark.parametrize("kind", ["pyvmm", "qemu"])
def test_events_property_masks_the_read(kind: str, start_vm: StartVm) -> None:
    vm = start_vm(kind, "-device", "pvpanic,events=1", "-append", f"panic_after={PANIC_AFTER} panic_value=4",
                  wait_for_client=False)
    vm.wait_serial(lambda t: "PVPANIC SENT" in t, 30, "the report")  # 4: an unknown event, ignored
    vm.wait_ticks(2, 10)
    assert _events_read(vm) == 1


@pytest.mark.parametrize("kind", ["pyvmm", "qemu"])
@pytest.mark.parametrize(("bad", "word"), [
    (("-device", "pvpanic,ioport=70000"), "ioport"),
    (("-device", "pvpanic,colour=red"), "colour"),
    (("-device", "pvpanic", "-action", "panic=explode"), "panic"),
])
def test_bad_options_are_refused(kind: str, bad: tuple[str, ...], word: str, guest: Path, tmp_path: Path) -> None:
    """Refused before the guest runs: status 1 and one line naming the problem."""
    cmd = Vmm(kind, guest, tmp_path, extra_args=bad).command()
    out = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
    assert out.returncode == 1, out.stderr
    # pyvmm logs its accelerator choice first; its error line says "error:"
    lines = [line for line in out.stderr.splitlines() if line.strip() and
             (not line.startswith("pyvmm: ") or "error" in line)]
    assert len(lines) == 1 and word in lines[0], out.stderr
