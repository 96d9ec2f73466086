"""QMP acceptance tests, run against pyvmm and, unchanged, against QEMU.

Each test boots the purpose-built guest of ``tests/support/guests/qmp`` (a multiboot
kernel that prints ``tick N`` ten times a second and powers off through ACPI
S5 when it sees the power button) and drives the VMM with the official
``qemu.qmp`` client.  Passing on ``qemu`` shows the tests encode QEMU's
behaviour; passing on ``pyvmm`` shows we match it.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "support" / "guests" / "qmp"))

from harness import TICK_RE, Client, RawQmp, Vmm, build_guest, run_async  # noqa: E402

REQUIRED_COMMANDS = {"qmp_capabilities", "query-status", "query-version", "query-commands", "query-cpus-fast",
                     "query-block", "query-chardev", "stop", "cont", "system_reset", "system_powerdown", "quit",
                     "human-monitor-command"}


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_guest(tmp_path_factory.mktemp("qmp-guest"))


@pytest.fixture(params=["pyvmm", "qemu"])
def vmm(request: pytest.FixtureRequest, guest: Path, tmp_path: Path):
    vm = Vmm(request.param, guest, tmp_path)
    vm.start()
    try:
        vm.wait_serial(lambda t: "QMPGUEST BOOT" in t, 15, "the boot banner")
        yield vm
    finally:
        vm.kill()


async def _connect(vm: Vmm, name: str = "test") -> Client:
    c = Client(name)
    await c.connect(vm.qmp_path)
    return c


def test_greeting_and_queries(vmm: Vmm) -> None:
    async def body() -> None:
        c = await _connect(vmm)
        greeting = c.qmp.greeting
        assert greeting is not None
        ver = greeting.QMP.version
        assert set(ver["qemu"]) == {"major", "minor", "micro"} and isinstance(ver["package"], str)
        assert await c.execute("query-version") == dict(ver)

        status = await c.execute("query-status")
        assert status["status"] == "running" and status["running"] is True

        names = {entry["name"] for entry in await c.execute("query-commands")}
        assert REQUIRED_COMMANDS <= names

        cpus = await c.execute("query-cpus-fast")
        assert [cpu["cpu-index"] for cpu in cpus] == [0]
        assert isinstance(cpus[0]["thread-id"], int) and cpus[0]["target"] == "x86_64"

        assert await c.execute("query-block") == []
        labels = {d["label"] for d in await c.execute("query-chardev")}
        assert "serial0" in labels

        info = await c.execute("human-monitor-command", {"command-line": "info status"})
        assert info == "VM status: running\r\n"
        regs = await c.execute("human-monitor-command", {"command-line": "info registers"})
        assert ("RIP=" in regs or "EIP=" in regs) and "EFER=" in regs and "CR0=" in regs  # 32-bit guest: EIP
        await c.close()

    run_async(body())


def test_pause_and_resume(vmm: Vmm) -> None:
    async def body() -> None:
        c = await _connect(vmm)
        vmm.wait_ticks(3)
        await c.execute("stop")
        stop = await c.wait_event("STOP")
        assert set(stop["timestamp"]) == {"seconds", "microseconds"}
        assert abs(stop["timestamp"]["seconds"] - time.time()) < 60
        assert (await c.execute("query-status"))["status"] == "paused"
        assert await c.execute("human-monitor-command", {"command-line": "info status"}) == "VM status: paused\r\n"

        await asyncio.sleep(0.3)  # output already in flight may land
        frozen = vmm.ticks()
        await asyncio.sleep(1.2)
        assert vmm.ticks() == frozen, "the guest kept printing while paused"

        await c.execute("cont")
        await c.wait_event("RESUME")
        assert (await c.execute("query-status"))["status"] == "running"
        after = vmm.wait_ticks(3)
        assert after[: len(frozen)] == frozen and after[len(frozen)] == frozen[-1] + 1, \
            "ticks did not continue where they stopped"
        assert vmm.boots() == 1
        await c.close()

    run_async(body())


def test_system_reset(vmm: Vmm) -> None:
    async def body() -> None:
        c = await _connect(vmm)
        vmm.wait_ticks(2)
        await c.execute("system_reset")
        ev = await c.wait_event("RESET")
        assert ev["data"] == {"guest": False, "reason": "host-qmp-system-reset"}
        vmm.wait_serial(lambda t: t.count("QMPGUEST BOOT") == 2, 15, "a second boot banner")
        text = vmm.wait_serial(lambda t: "tick 1\n" in t.rsplit("QMPGUEST BOOT", 1)[1], 10, "ticks after the reset")
        before, after = text.split("QMPGUEST BOOT")[1:3]
        assert "tick 1\n" in before, "the guest had not been running before the reset"
        assert TICK_RE.findall(after)[:2] == ["0", "1"], "tick numbering did not restart: not a fresh boot"
        assert (await c.execute("query-status"))["status"] == "running"
        await c.close()

    run_async(body())


def test_system_reset_while_paused_stays_stopped_until_cont(vmm: Vmm) -> None:
    async def body() -> None:
        c = await _connect(vmm)
        vmm.wait_ticks(2)
        await c.execute("stop")
        await c.wait_event("STOP")
        await c.execute("system_reset")
        ev = await c.wait_event("RESET")
        assert ev["data"] == {"guest": False, "reason": "host-qmp-system-reset"}
        await asyncio.sleep(1.0)
        status = await c.execute("query-status")
        assert status["running"] is False and status["status"] in ("prelaunch", "paused")
        assert vmm.boots() == 1, "the guest rebooted while the VM was stopped"
        mark = len(c.events)
        await c.execute("cont")
        await c.wait_event("RESUME", after=mark)
        vmm.wait_serial(lambda t: t.count("QMPGUEST BOOT") == 2, 15, "the boot banner after cont")
        assert (await c.execute("query-status"))["status"] == "running"
        await c.close()

    run_async(body())


def test_system_powerdown_shuts_the_guest_down_cleanly(vmm: Vmm) -> None:
    async def body() -> None:
        c = await _connect(vmm)
        vmm.wait_serial(lambda t: "acpi " in t, 10, "the guest's ACPI setup")
        vmm.wait_ticks(2)
        await c.execute("system_powerdown")
        await c.wait_event("POWERDOWN")
        ev = await c.wait_event("SHUTDOWN", timeout=15)
        assert ev["data"] == {"guest": True, "reason": "guest-shutdown"}
        await c.close()

    run_async(body())
    assert vmm.wait_exit(15) == 0
    text = vmm.serial()
    assert "POWER BUTTON\nS5\n" in text and "S5 FAILED" not in text


@pytest.mark.parametrize("paused", [False, True], ids=["running", "paused"])
def test_quit(vmm: Vmm, paused: bool) -> None:
    async def body() -> None:
        c = await _connect(vmm)
        if paused:
            await c.execute("stop")
        assert await c.execute("quit") == {}
        ev = await c.wait_event("SHUTDOWN")
        assert ev["data"] == {"guest": False, "reason": "host-qmp-quit"}
        await c.close()

    run_async(body())
    assert vmm.wait_exit(10) == 0


def test_quit_is_prompt_and_clean_while_another_client_has_unread_replies(vmm: Vmm) -> None:
    stuck = RawQmp(vmm.qmp_path)
    stuck.recv()
    stuck.execute("qmp_capabilities")
    stuck.sock.setblocking(False)
    flood, sent, deadline = b'{"execute": "query-status"}\n' * 500, 0, time.monotonic() + 2.0
    while time.monotonic() < deadline:  # until both directions' socket buffers are full
        try:
            sent += stuck.sock.send(flood)
        except BlockingIOError:
            time.sleep(0.05)
    assert sent > 100_000
    quitter = RawQmp(vmm.qmp_paths[1])  # QEMU serves one client per socket
    quitter.recv()
    quitter.execute("qmp_capabilities")
    t0 = time.monotonic()
    quitter.send(b'{"execute": "quit", "id": 1}\n')
    reply, _ = quitter.reply_to(1)
    assert reply["return"] == {}
    assert vmm.wait_exit(10) == 0
    took = time.monotonic() - t0
    assert took < 1.5, f"{vmm.kind} took {took:.1f}s to quit"
    err = vmm.stderr()
    assert "Traceback" not in err and "Exception" not in err, err[-2000:]
    stuck.close()
    quitter.close()


def test_events_reach_every_negotiated_client(vmm: Vmm) -> None:
    async def body() -> None:
        a = await _connect(vmm, "a")
        b = Client("b")
        await b.connect(vmm.qmp_paths[1])
        raw = RawQmp(vmm.qmp_paths[2])  # connected but never negotiates: gets no events
        assert "QMP" in raw.recv()
        extra = None
        if vmm.kind == "pyvmm":  # pyvmm also serves several clients on one socket (QEMU: one at a time)
            extra = await _connect(vmm, "extra")
        await a.execute("stop")
        for c in (a, b, extra):
            if c is not None:
                await c.wait_event("STOP")
        assert (await b.execute("query-status"))["status"] == "paused"
        await b.execute("cont")
        for c in (a, b, extra):
            if c is not None:
                await c.wait_event("RESUME")
                await c.close()
        assert raw.try_recv(0.3) is None
        raw.close()

    run_async(body())


def test_command_errors(vmm: Vmm) -> None:
    raw = RawQmp(vmm.qmp_path)
    greeting = raw.recv()
    assert greeting["QMP"]["capabilities"] in ([], ["oob"])

    reply = raw.execute("query-status", msg_id="early")
    assert reply == {"id": "early", "error": {"class": "CommandNotFound",
                                              "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}}
    assert raw.execute("qmp_capabilities", msg_id=[1, 2]) == {"return": {}, "id": [1, 2]}
    again = raw.execute("qmp_capabilities", msg_id=3)
    assert again["error"]["class"] == "CommandNotFound" and again["id"] == 3

    nope = raw.execute("no-such-command", msg_id={"n": 1})
    assert nope == {"id": {"n": 1}, "error": {"class": "CommandNotFound",
                                              "desc": "The command no-such-command has not been found"}}
    bad = raw.execute("query-status", {"bogus": 1}, msg_id="b")
    assert bad["error"] == {"class": "GenericError", "desc": "Parameter 'bogus' is unexpected"}
    missing = raw.execute("human-monitor-command", {}, msg_id="m")
    assert missing["error"] == {"class": "GenericError", "desc": "Parameter 'command-line' is missing"}
    wrong = raw.execute("human-monitor-command", {"command-line": 5}, msg_id="w")
    assert wrong["error"]["class"] == "GenericError" and wrong["id"] == "w"

    raw.send(b'{"execute": "query-status", "id": "q", "extra": 1}\n')
    assert raw.recv()["error"] == {"class": "GenericError", "desc": "QMP input member 'extra' is unexpected"}
    raw.send(b'{"execute": 42}\n')
    assert raw.recv()["error"]["desc"] == "QMP input member 'execute' must be a string"
    raw.send(b'{"execute": "query-status", "arguments": [1]}\n')
    assert raw.recv()["error"]["desc"] == "QMP input member 'arguments' must be an object"
    raw.send(b"[1, 2]\n")
    assert raw.recv()["error"] == {"class": "GenericError", "desc": "QMP input must be a JSON object"}
    raw.send(b"garbage\n")
    assert raw.recv()["error"]["class"] == "GenericError"
    assert raw.execute("query-status", msg_id="ok")["return"]["status"] == "running"
    raw.close()


def test_garbage_leaves_the_vmm_answering(vmm: Vmm) -> None:
    raw = RawQmp(vmm.qmp_path, timeout=20)
    raw.recv()
    assert raw.execute("qmp_capabilities")["return"] == {}
    rng = random.Random(1234)
    junk = [
        bytes(rng.randrange(256) for _ in range(4096)),
        b'{"execute": "query-sta',                                  # truncated ...
        b"\n",                                                      # ... and cut off by a newline
        b'{"execute": "query-status", "id": 1]\n',                  # mismatched bracket
        b"}}}]]]\n",
        b"[" * 5000 + b"\n",                                        # absurd nesting
        b"\x00\x01\x02\x1b[2J\x7f\xfe\xff\n",
    ]
    for piece in junk:
        raw.send(piece)
    raw.send(b"\xff\n")  # resynchronise the parser whatever state the junk left it in (QEMU's rule too)
    reply = raw.execute("query-status", msg_id="after-junk")
    assert reply["return"]["status"] == "running"

    # A message far bigger than any command gets an error, never a crash or a hang, and the connection keeps
    # working.  pyvmm caps a message at 1 MiB; QEMU's cap is 64 MiB and it reads QMP input a byte at a time
    # (~80 KB/s), so QEMU gets a merely large message, which it rejects for its unknown argument.
    size = (2 << 20) if vmm.kind == "pyvmm" else (64 << 10)
    raw.send(b'{"execute": "query-status", "id": "huge", "arguments": {"x": "' + b"A" * size + b'"}}\n')
    msg = raw.recv()
    assert msg["error"]["class"] == "GenericError"
    if vmm.kind == "pyvmm":
        assert "exceeds" in msg["error"]["desc"] and "id" not in msg
    raw.send(b"\xff\n")
    assert raw.execute("query-version", msg_id="after-huge")["return"]["qemu"]
    raw.close()

    vmm.wait_ticks(2)  # the guest still runs
    assert vmm.proc is not None and vmm.proc.poll() is None


def test_many_connections_and_abrupt_disconnects(vmm: Vmm) -> None:
    for i in range(20):
        raw = RawQmp(vmm.qmp_path)
        if i % 2:
            raw.recv()
            raw.send(b'{"execute": "qmp_capabilities"}\n{"execute": "query-st')
        raw.close()
    raw = RawQmp(vmm.qmp_path)
    raw.recv()
    raw.execute("qmp_capabilities")
    reply = raw.execute("query-status", msg_id=json.loads('"z"'))
    assert reply["return"]["running"] is True
    raw.close()


@pytest.mark.parametrize("kind", ["pyvmm", "qemu"])
def test_wait_on_holds_the_guest_until_a_client_connects(kind: str, guest: Path, tmp_path: Path) -> None:
    vm = Vmm(kind, guest, tmp_path, wait_for_client=True)
    vm.start()
    try:
        time.sleep(1.0)
        assert vm.serial() == "", "the guest ran before the QMP client connected"
        assert vm.proc is not None and vm.proc.poll() is None

        async def body() -> None:
            c = await _connect(vm)
            vm.wait_serial(lambda t: "QMPGUEST BOOT" in t, 15, "the boot banner")
            await c.execute("quit")
            await c.wait_event("SHUTDOWN")
            await c.close()

        run_async(body())
        assert vm.wait_exit(10) == 0
    finally:
        vm.kill()


@pytest.mark.parametrize("kind", ["pyvmm", "qemu"])
def test_guest_reset_and_no_reboot(kind: str, guest: Path, tmp_path: Path) -> None:
    """A reset the guest asks for (keyboard controller) is RESET {guest: true}; with -no-reboot, SHUTDOWN."""
    async def body(vm: Vmm, no_reboot: bool) -> None:
        c = await _connect(vm)
        ev = await c.wait_event("SHUTDOWN" if no_reboot else "RESET", timeout=20)
        assert ev["data"] == {"guest": True, "reason": "guest-reset"}
        if not no_reboot:
            vm.wait_serial(lambda t: t.count("QMPGUEST BOOT") >= 2, 15, "a boot banner after the guest's reset")
            await c.execute("quit")
        await c.close()

    for no_reboot in (False, True):
        # The guest resets itself after 20 ticks (2 s): time to negotiate even on a loaded host.
        args = ("-append", "reset_after=20", *(("-no-reboot",) if no_reboot else ()))
        # wait=on: the guest starts only when the client connects, so it cannot reset before we listen.
        vm = Vmm(kind, guest, tmp_path / f"no_reboot_{no_reboot}", wait_for_client=True, extra_args=args)
        vm.workdir.mkdir()
        vm.start()
        try:
            run_async(body(vm, no_reboot))
            assert vm.wait_exit(15) == 0
            assert "GUEST RESET" in vm.serial()
        finally:
            vm.kill()
