"""QMP protocol layer without a VM: the JSON splitter and the server against a scripted machine.

The VM-level behaviour is covered by test_qmp_vmm.py (pyvmm and QEMU); here
we pin down what needs many cases or exact timing: parser resynchronisation,
limits, error texts, event fan-out and shutdown flushing.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from qemu.qmp import ExecuteError, QMPClient

from pyvmm.errors import ConfigError
from pyvmm.monitor import ChardevInfo, CpuInfo, MonitorServer, MonitorSpec, create_monitor
from pyvmm.monitor.jsonstream import JsonStream, Message, ParseError
from pyvmm.runstate import RunState

# -- JSON splitting ---------------------------------------------------------------------------------


def values(items: list) -> list:
    return [i.value if isinstance(i, Message) else i for i in items]


def test_split_back_to_back_and_across_chunks() -> None:
    s = JsonStream()
    assert values(s.feed(b'{"a": 1}{"b": [1, {"c": "}"}]}\n{"d"')) == [{"a": 1}, {"b": [1, {"c": "}"}]}]
    assert values(s.feed(b': "x\\"y"}')) == [{"d": 'x"y'}]


def test_errors_then_resync() -> None:
    s = JsonStream()
    out = s.feed(b'garbage\n{"execute": "trunc\n{]\n}\n{"ok": 1}\n')
    assert [type(o) for o in out] == [ParseError, ParseError, ParseError, ParseError, Message]
    assert out[0].desc == "JSON parse error, invalid keyword 'garbage'"
    assert out[-1].value == {"ok": 1}


def test_scalars_are_messages_too() -> None:
    s = JsonStream()
    assert values(s.feed(b'123 null "s" true{"x":1}')) == [123, None, "s", True, {"x": 1}]


def test_oversized_message_is_rejected_and_skipped() -> None:
    s = JsonStream(max_message=100)
    out = s.feed(b'{"a": "' + b"x" * 500 + b'", "more": "{{{["}\n{"ok": true}\n')
    assert len(out) == 2 and isinstance(out[0], ParseError) and "exceeds 100 bytes" in out[0].desc
    assert out[1] == Message({"ok": True})


def test_deep_nesting_is_rejected() -> None:
    s = JsonStream(max_nesting=8)
    out = s.feed(b"[" * 9 + b"\n")
    assert isinstance(out[0], ParseError) and "nesting" in out[0].desc


def test_invalid_utf8_and_bad_json_inside_object() -> None:
    s = JsonStream()
    out = s.feed(b'{"a": "\xc3\x28"}{"a": 1,}{"a": tru}')
    assert all(isinstance(o, ParseError) for o in out) and len(out) == 3


@settings(max_examples=300, deadline=None)
@given(junk=st.binary(max_size=2000), cuts=st.lists(st.integers(0, 2100), max_size=6))
def test_any_junk_then_resync_yields_the_next_message(junk: bytes, cuts: list[int]) -> None:
    data = junk + b'\xff\n{"execute": "query-status", "id": 7}\n'
    s = JsonStream(max_message=4096)
    out = []
    prev = 0
    for cut in sorted(c for c in cuts if c < len(data)) + [len(data)]:
        out += s.feed(data[prev:cut])
        prev = cut
        assert len(s._buf) <= 4096
    assert out[-1] == Message({"execute": "query-status", "id": 7})
    # Chunking never changes the result.
    assert JsonStream(max_message=4096).feed(data) == out


@settings(max_examples=300, deadline=None)
@given(data=st.lists(st.sampled_from([b'{"a": "', b"xxxxxxxxxxxxxxxx", b'"}', b"\n", b"[", b"]", b"\\", b"\xff",
                                      b"tru", b"e ", b'"', b"{", b"}", b"\x01"]), max_size=60).map(b"".join),
       cuts=st.lists(st.integers(0, 1000), max_size=8))
def test_chunking_never_changes_the_result_even_past_the_cap(data: bytes, cuts: list[int]) -> None:
    whole = JsonStream(max_message=64, max_nesting=8).feed(data)
    s = JsonStream(max_message=64, max_nesting=8)
    out, prev = [], 0
    for cut in sorted(c for c in cuts if c < len(data)) + [len(data)]:
        out += s.feed(data[prev:cut])
        prev = cut
        assert len(s._buf) <= 64
    assert out == whole


# -- spec parsing -----------------------------------------------------------------------------------


def test_spec_parsing() -> None:
    assert MonitorSpec.parse("unix:/tmp/x.sock,server=on,wait=off") == MonitorSpec("unix", path="/tmp/x.sock",
                                                                                   wait=False)
    assert MonitorSpec.parse("unix:/tmp/x.sock,server,nowait").wait is False
    assert MonitorSpec.parse("tcp:127.0.0.1:4444,server=on").port == 4444
    for bad in ("unix:/x", "unix:/x,server=maybe", "bogus:1,server=on", "unix:/x,server=on,colour=red",
                "tcp:host:99999,server=on"):
        with pytest.raises(ConfigError):
            MonitorSpec.parse(bad)


# -- the server against a scripted machine -----------------------------------------------------------


class FakeMachine:
    """Implements MachineControl; state changes are reported like PcMachine does."""

    def __init__(self) -> None:
        self.state = RunState.RUNNING
        self.monitor: MonitorServer | None = None
        self.calls: list[str] = []

    def _notify(self, state: RunState, reason: str = "") -> None:
        self.state = state
        assert self.monitor is not None
        self.monitor.on_state(state, reason)

    def status(self) -> RunState:
        return self.state

    def pause(self) -> None:
        if self.state is RunState.RUNNING:
            self._notify(RunState.PAUSED)

    def resume(self) -> None:
        if self.state is RunState.PAUSED:
            self._notify(RunState.RUNNING)

    def system_reset(self) -> None:
        self.calls.append("reset")
        assert self.monitor is not None
        threading.Thread(target=self.monitor.on_reset, args=("host-qmp-system-reset",)).start()

    def system_powerdown(self) -> None:
        raise ConfigError("this machine has no ACPI power button")

    def quit(self) -> None:
        self.calls.append("quit")

    def cpus(self) -> list[CpuInfo]:
        return [CpuInfo(0, 100), CpuInfo(1, 101, core_id=1)]

    def cpu_dump(self, index: int) -> str:
        if index == 1:
            raise RuntimeError("boom")
        return f"CPU#{index}\nRIP=0000000000001000\n"

    def chardevs(self) -> list[ChardevInfo]:
        return [ChardevInfo("serial0", "stdio")]

    def guest_name(self) -> str | None:
        return None

    def guest_uuid(self) -> str | None:
        return None

    def key_names(self) -> frozenset[str]:
        return frozenset({"ctrl", "alt", "delete"})

    def send_keys(self, qcodes: list[str]) -> None:
        self.calls.append("keys " + "-".join(qcodes))


@pytest.fixture
def served(tmp_path: Path):
    machine = FakeMachine()
    path = tmp_path / "qmp.sock"
    path.write_bytes(b"")  # a leftover regular file must not be deleted...
    path.unlink()
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))  # ...but a stale socket is replaced, as QEMU does
    stale.close()
    mon = create_monitor(machine, [f"unix:{path},server=on,wait=off"])
    assert mon is not None
    machine.monitor = mon
    mon.start()
    yield machine, mon, path
    mon.close()
    assert not path.exists()


def _raw(path: Path) -> tuple[socket.socket, object]:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(5)
    s.connect(str(path))
    return s, s.makefile("rb")


def _in_command_mode(path: Path) -> tuple[socket.socket, object]:
    """A raw connection past the greeting and capabilities negotiation."""
    s, f = _raw(path)
    f.readline()
    s.sendall(b'{"execute": "qmp_capabilities"}\n')
    assert json.loads(f.readline()) == {"return": {}}
    return s, f


def test_raw_protocol(served) -> None:
    _, _, path = served
    s, f = _raw(path)
    greeting = json.loads(f.readline())
    assert greeting["QMP"]["capabilities"] == [] and greeting["QMP"]["version"]["package"].startswith("pyvmm ")
    s.sendall(b'{"execute": "stop", "id": 1}\n')
    assert json.loads(f.readline()) == {"error": {"class": "CommandNotFound", "desc":
                                                  "Expecting capabilities negotiation with 'qmp_capabilities'"},
                                        "id": 1}
    s.sendall(b'{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}\n')
    assert json.loads(f.readline())["error"]["desc"] == "Capability 'oob' not available"
    s.sendall(b'{"execute": "qmp_capabilities"}{"execute": "query-status", "id": null}')
    assert json.loads(f.readline()) == {"return": {}}
    assert json.loads(f.readline())["id"] is None
    s.sendall(b'\x00{"execute": "system_powerdown", "id": "p"}\n')
    assert json.loads(f.readline())["error"]["desc"].startswith("JSON parse error, stray")
    assert json.loads(f.readline()) == {"error": {"class": "GenericError",
                                                  "desc": "this machine has no ACPI power button"}, "id": "p"}
    s.sendall(b'{"execute": "human-monitor-command", "arguments": {"command-line": "info registers", '
              b'"cpu-index": 1}, "id": "crash"}\n')
    reply = json.loads(f.readline())
    assert reply["id"] == "crash" and reply["error"]["class"] == "GenericError"
    s.sendall(b'{"execute": "human-monitor-command", "arguments": {"command-line": "info registers", '
              b'"cpu-index": 5}}\n')
    assert json.loads(f.readline())["error"]["desc"] == "Invalid CPU index"
    s.sendall(b'{"execute": "query-status"}\n')
    assert json.loads(f.readline())["return"]["status"] == "running"
    s.close()


def test_send_key_checks_every_key_before_typing(served) -> None:
    machine, _, path = served
    s, f = _in_command_mode(path)

    def send_key(args: dict) -> dict:
        s.sendall(json.dumps({"execute": "send-key", "arguments": args}).encode() + b"\n")
        return json.loads(f.readline())

    cad = [{"type": "qcode", "data": k} for k in ("ctrl", "alt", "delete")]
    assert send_key({"keys": cad, "hold-time": 50}) == {"return": {}}
    assert machine.calls == ["keys ctrl-alt-delete"]
    for args, desc in (({"keys": [*cad[:2], {"type": "qcode", "data": "nosuch"}]},
                        "Parameter 'data' does not accept value 'nosuch'"),
                       ({"keys": [{"data": "ctrl"}]}, "Parameter 'type' is missing"),
                       ({"keys": [{"type": "number", "data": 29}]},
                        "pyvmm's send-key takes key names (type qcode) only"),
                       ({"keys": [{"type": "scan", "data": 29}]}, "Parameter 'type' does not accept value 'scan'"),
                       ({"keys": ["ctrl"]}, "Invalid parameter type for 'keys[0]', expected: object"),
                       ({}, "Parameter 'keys' is missing")):
        assert send_key(args)["error"]["desc"] == desc, args
    assert machine.calls == ["keys ctrl-alt-delete"]  # nothing typed by a refused command
    s.close()


def test_huge_message_answered_and_connection_survives(served) -> None:
    _, _, path = served
    s, f = _in_command_mode(path)
    s.sendall(b'{"execute": "query-status", "id": "' + b"A" * (3 << 20) + b'"}\n')
    err = json.loads(f.readline())
    assert err["error"]["class"] == "GenericError" and "exceeds" in err["error"]["desc"]
    s.sendall(b'{"execute": "query-version", "id": 2}\n')
    assert json.loads(f.readline())["id"] == 2
    s.close()


def test_client_library_events_and_hmp(served) -> None:
    machine, mon, path = served

    async def body() -> None:
        a, b = QMPClient("a"), QMPClient("b")
        await a.connect(str(path))
        await b.connect(str(path))
        got: dict[str, list[str]] = {"a": [], "b": []}

        async def collect(name: str, c: QMPClient) -> None:
            async for ev in c.events:
                got[name].append(ev["event"])

        tasks = [asyncio.create_task(collect("a", a)), asyncio.create_task(collect("b", b))]
        await a.execute("stop")
        assert (await b.execute("query-status"))["status"] == "paused"
        assert await a.execute("human-monitor-command", {"command-line": "info status"}) == "VM status: paused\r\n"
        await b.execute("cont")
        await a.execute("system_reset")
        assert await a.execute("human-monitor-command", {"command-line": "info cpus"}) == \
            "* CPU #0: thread_id=100\r\n  CPU #1: thread_id=101\r\n"
        assert await a.execute("human-monitor-command", {"command-line": "frobnicate"}) == \
            "unknown command: 'frobnicate'\r\n"
        assert (await a.execute("human-monitor-command", {"command-line": "info registers"})).endswith(
            "RIP=0000000000001000\r\n")
        with pytest.raises(ExecuteError) as exc:
            await a.execute("query-status", {"verbose": True})
        assert exc.value.error_class == "GenericError"
        cpus = await a.execute("query-cpus-fast")
        assert [c["thread-id"] for c in cpus] == [100, 101]
        chardevs = await a.execute("query-chardev")
        assert [c["label"] for c in chardevs] == ["serial0", "compat_monitor0"]
        deadline = time.monotonic() + 5
        while len(got["b"]) < 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert got["a"] == got["b"] == ["STOP", "RESUME", "RESET"]
        for c in (a, b):
            await c.disconnect()
        for t in tasks:
            t.cancel()

    asyncio.run(body())


def test_close_flushes_the_shutdown_event(tmp_path: Path) -> None:
    machine = FakeMachine()
    path = tmp_path / "q.sock"
    mon = MonitorServer(machine, [MonitorSpec.parse(f"unix:{path},server=on,wait=off")])
    machine.monitor = mon
    mon.start()
    s, f = _raw(path)
    f.readline()
    s.sendall(b'{"execute": "qmp_capabilities"}\n{"execute": "quit"}\n')
    assert json.loads(f.readline()) == {"return": {}}
    assert json.loads(f.readline()) == {"return": {}}
    assert machine.calls == ["quit"]
    # The machine's main thread then reports SHUTDOWN and closes the monitor straight away.
    mon.on_state(RunState.SHUTDOWN, "host-qmp-quit")
    mon.close()
    ev = json.loads(f.readline())
    assert ev["event"] == "SHUTDOWN" and ev["data"] == {"guest": False, "reason": "host-qmp-quit"}
    assert f.readline() == b""  # then EOF
    s.close()


def test_wait_on_blocks_until_a_client_connects(tmp_path: Path) -> None:
    machine = FakeMachine()
    path = tmp_path / "w.sock"
    mon = MonitorServer(machine, [MonitorSpec.parse(f"unix:{path},server=on")])
    machine.monitor = mon
    mon.start()
    waited = threading.Event()
    t = threading.Thread(target=lambda: (mon.wait_for_clients(), waited.set()))
    t.start()
    time.sleep(0.2)
    assert not waited.is_set()
    s, f = _raw(path)
    assert waited.wait(5)
    s.close()
    mon.close()
    t.join(5)


def test_listen_failure_is_a_clear_error(tmp_path: Path) -> None:
    mon = MonitorServer(FakeMachine(), [MonitorSpec.parse(f"unix:{tmp_path}/no/such/dir/q.sock,server=on")])
    with pytest.raises(Exception, match="cannot listen"):
        mon.start()


def test_tcp_listener() -> None:
    machine = FakeMachine()
    mon = MonitorServer(machine, [MonitorSpec.parse("tcp:127.0.0.1:0,server=on,wait=off")])
    machine.monitor = mon
    mon.start()
    try:
        port = mon._socks[0].getsockname()[1]
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        f = s.makefile("rb")
        assert "QMP" in json.loads(f.readline())
        s.sendall(b'{"execute": "qmp_capabilities"}\n{"execute": "query-status"}\n')
        assert json.loads(f.readline()) == {"return": {}}
        assert json.loads(f.readline())["return"]["running"] is True
        s.close()
    finally:
        mon.close()
