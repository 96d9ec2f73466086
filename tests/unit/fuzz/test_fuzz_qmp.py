"""Fuzz targets: QMP input, from raw bytes and from arbitrary JSON, through the splitter and dispatch.

``qmp-bytes``: any bytes (mixed with JSON fragments: quotes, brackets, backslashes, 0xff,
newlines, command names), cut into chunks anyhow, go through
:class:`~pyvmm.monitor.jsonstream.JsonStream` and the monitor's dispatch, as from a client socket.
``qmp-objects``: arbitrary JSON values, and command-shaped objects (known and unknown names,
arguments of any JSON type for each command's parameters, any ``id``), serialised as a client
would, go the same way.

Asserted: the splitter never raises and never buffers more than its limit; every message gets
exactly one reply, which is a well-formed QMP reply (``return`` or ``error`` with a class and a
text, the client's ``id`` echoed) and is strict JSON; a JSON text is parsed to the value it
encodes; no handler fails with an internal error or logs one; afterwards the monitor still
answers ``query-status``.  (test_qmp_protocol.py checks chunking invariance and resynchronisation.)
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

from hypothesis import strategies as st

from pyvmm.block.graph import BlockGraph
from pyvmm.monitor import ChardevInfo, CpuInfo, MonitorServer
from pyvmm.monitor.commands import COMMANDS
from pyvmm.monitor.jsonstream import MAX_MESSAGE, JsonStream, Message, ParseError
from pyvmm.runstate import RunState


class Machine:
    """A MachineControl that does everything at once, in the calling thread."""

    def __init__(self) -> None:
        self.state = RunState.RUNNING
        self.blocks = BlockGraph()  # no disks

    def status(self) -> RunState:
        return self.state

    def pause(self) -> None:
        self.state = RunState.PAUSED if self.state is RunState.RUNNING else self.state

    def resume(self) -> None:
        self.state = RunState.RUNNING if self.state is RunState.PAUSED else self.state

    def system_reset(self) -> None:
        pass

    def system_powerdown(self) -> None:
        pass

    def quit(self) -> None:
        self.state = RunState.SHUTDOWN

    def cpus(self) -> list[CpuInfo]:
        return [CpuInfo(0, 100), CpuInfo(1, 101, core_id=1)]

    def cpu_dump(self, index: int) -> str:
        return f"CPU#{index}\nRIP=0000000000001000\n"

    def chardevs(self) -> list[ChardevInfo]:
        return [ChardevInfo("serial0", "stdio")]

    def guest_name(self) -> str | None:
        return "fuzz"

    def guest_uuid(self) -> str | None:
        return None

    def key_names(self) -> frozenset[str]:
        return frozenset({"ctrl", "alt", "delete", "a"})

    def send_keys(self, qcodes: list[str]) -> None:
        pass

    def block_graph(self) -> BlockGraph:
        return self.blocks


class Session:
    """The client end as the dispatcher sees it: replies are collected, serialised as sent."""

    def __init__(self) -> None:
        self.negotiated = False
        self.replies: list[dict[str, Any]] = []

    def send(self, msg: dict[str, Any]) -> None:
        text = json.dumps(msg, allow_nan=False)  # what goes on the wire must be strict JSON
        assert json.loads(text) == msg or _has_nan(msg)
        self.replies.append(msg)


def _has_nan(v: object) -> bool:
    return isinstance(v, float) and math.isnan(v)


def check_reply(reply: dict[str, Any], sent: object) -> None:
    keys = set(reply) - {"id"}
    assert keys in ({"return"}, {"error"}), reply
    if "error" in reply:
        err = reply["error"]
        assert set(err) == {"class", "desc"} and isinstance(err["desc"], str) and err["desc"], reply
        assert err["class"] in ("GenericError", "CommandNotFound", "DeviceNotActive", "DeviceNotFound")
        assert not err["desc"].startswith("internal error"), reply
    if isinstance(sent, dict) and "id" in sent:
        assert "id" in reply and reply["id"] == sent["id"], (reply, sent)
    else:
        assert "id" not in reply


class Harness:
    def __init__(self, caplog, negotiate: bool) -> None:
        self.server = MonitorServer(Machine(), [])
        self.stream = JsonStream()
        self.session = Session()
        self.caplog = caplog
        if negotiate:  # most clients negotiate first; only then do the other commands run
            self.feed(b'{"execute": "qmp_capabilities"}')
            assert self.session.replies == [{"return": {}}]

    def feed(self, data: bytes) -> list[Message | ParseError]:
        items = self.stream.feed(data)
        assert len(self.stream._buf) <= MAX_MESSAGE + 1
        for item in items:
            assert isinstance(item, Message | ParseError)
            before = len(self.session.replies)
            self.server._dispatch(self.session, item)  # type: ignore[arg-type]
            assert len(self.session.replies) == before + 1, "one reply per message"
            check_reply(self.session.replies[-1], item.value if isinstance(item, Message) else None)
        return items

    def still_answers(self) -> None:
        self.session.replies.clear()
        self.feed(b'\xff\n{"execute": "qmp_capabilities"}\n{"execute": "query-status", "id": "last"}\n')
        last = self.session.replies[-1]
        assert last["id"] == "last" and "return" in last and "status" in last["return"], last
        errors = [r for r in self.caplog.records if r.levelno >= logging.ERROR]
        assert not errors, errors[0].getMessage()


# -- qmp-bytes ----------------------------------------------------------------------------------

fragment_st = st.one_of(
    st.binary(max_size=40),
    st.sampled_from([b'{"execute": "', b'query-status', b'qmp_capabilities', b'human-monitor-command', b'send-key',
                     b'", "arguments": {', b'"command-line": "info registers -a"', b'"keys": [', b'{"type": "qcode"',
                     b'"data": "ctrl"}', b'"id": ', b'1e999', b'-0', b'NaN', b'Infinity', b'[]', b'{}', b'}', b']',
                     b'"', b'\\', b'\\u', b'\\ud800', b'\xff', b'\xfe', b'\n', b'\x00', b'\xc3', b'\xe2\x82', b', ',
                     b': ', b'true', b'null', b'9' * 30, b'[' * 300, b'"cpu-index": 1']),
)


@st.composite
def byte_stream(draw):
    data = b"".join(draw(st.lists(fragment_st, min_size=1, max_size=40)))
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=5)))
    bounds = [0, *cuts, len(data)]
    return [data[bounds[i]:bounds[i + 1]] for i in range(len(bounds) - 1)]


def test_fuzz_qmp_bytes(fuzz, caplog) -> None:
    caplog.set_level(logging.WARNING)

    def check(sc: tuple[list[bytes], bool]) -> None:
        chunks, negotiate = sc
        caplog.clear()
        h = Harness(caplog, negotiate)
        for chunk in chunks:
            h.feed(chunk)
        h.still_answers()

    fuzz.run("qmp-bytes", st.tuples(byte_stream(), st.booleans()), check)


# -- qmp-objects ---------------------------------------------------------------------------------

json_st = st.recursive(
    st.none() | st.booleans() | st.integers() | st.integers(-(1 << 70), 1 << 70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12)


@st.composite
def command_st(draw):
    name = draw(st.sampled_from(sorted(COMMANDS)) | st.text(max_size=12))
    params = [p.name for p in COMMANDS[name].params] if name in COMMANDS else []
    msg: dict[str, Any] = {"execute": name}
    if draw(st.booleans()):
        keys = draw(st.lists(st.sampled_from(params) if params and draw(st.booleans()) else st.text(max_size=8),
                             max_size=3))
        args = {k: draw(json_st) for k in keys}
        if name == "send-key" and draw(st.booleans()):
            args["keys"] = draw(st.lists(st.fixed_dictionaries(
                {"type": st.sampled_from(["qcode", "number", "x"]) | json_st,
                 "data": st.sampled_from(["ctrl", "alt", "delete", "nope"]) | json_st}), max_size=4))
        if name == "human-monitor-command" and draw(st.booleans()):
            args["command-line"] = draw(st.sampled_from(["info registers", "info registers -a", "info", "info cpus",
                                                         "stop", "cont", "c", "q", "help", "info chardev",
                                                         "info status", "info version", "x"]) | st.text(max_size=20))
        msg["arguments"] = draw(st.sampled_from([args, args, args, [], "x", None]))
    if draw(st.booleans()):
        msg["id"] = draw(json_st)
    if draw(st.integers(0, 9)) == 0:
        msg[draw(st.text(max_size=6))] = draw(json_st)
    return msg


def test_fuzz_qmp_objects(fuzz, caplog) -> None:
    caplog.set_level(logging.WARNING)

    def check(sc: tuple[list[Any], bool, bool]) -> None:
        messages, ascii_only, negotiate = sc
        caplog.clear()
        h = Harness(caplog, negotiate)
        for msg in messages:
            text = json.dumps(msg, ensure_ascii=ascii_only).encode()
            items = h.feed(text + b"\n")
            if isinstance(msg, dict | list | str):  # a complete value: parsed at its end
                assert len(items) == 1 and isinstance(items[0], Message), (text[:200], items)
                assert items[0].value == msg
            else:  # a top-level scalar ends at the newline
                assert len(items) == 1
        h.still_answers()

    fuzz.run("qmp-objects", st.tuples(st.lists(command_st() | json_st, min_size=1, max_size=8), st.booleans(),
                                      st.booleans()), check)
