"""Guest-panic reports as QMP events and run states, and ``-action`` parsing."""

from __future__ import annotations

import pytest

from pyvmm.errors import ConfigError
from pyvmm.machine.config import MachineConfig, parse_action_option
from pyvmm.monitor.events import StateTracker, guest_panic_event
from pyvmm.runstate import GuestPanic, PanicAction, Request, RequestKind, RunState, VmControl


def _names(events: list[dict]) -> list[str]:
    return [e["event"] for e in events]


def test_guest_panic_events_carry_the_action() -> None:
    ev = guest_panic_event(GuestPanic("pause"))
    assert ev["event"] == "GUEST_PANICKED" and ev["data"] == {"action": "pause"} and "timestamp" in ev
    ev = guest_panic_event(GuestPanic("run", crashloaded=True))
    assert ev["event"] == "GUEST_CRASHLOADED" and ev["data"] == {"action": "run"}


def test_guest_panicked_state_is_a_stop_and_cont_resumes() -> None:
    t = StateTracker()
    assert _names(t.events_for(RunState.RUNNING, "")) == ["RESUME"]
    assert _names(t.events_for(RunState.GUEST_PANICKED, "guest-panic")) == ["STOP"]
    assert t.events_for(RunState.PAUSED, "") == []  # already stopped: QMP stop sends nothing more
    assert _names(t.events_for(RunState.RUNNING, "")) == ["RESUME"]
    shutdown = t.events_for(RunState.SHUTDOWN, "guest-panic")
    assert shutdown[0]["data"] == {"guest": True, "reason": "guest-panic"}


@pytest.mark.parametrize(("action", "reported"), [
    (PanicAction.PAUSE, "pause"), (PanicAction.SHUTDOWN, "poweroff"),
    (PanicAction.EXIT_FAILURE, "poweroff"), (PanicAction.NONE, "run"),
])
def test_reported_actions_are_qemus(action: PanicAction, reported: str) -> None:
    assert action.reported == reported


def test_action_option() -> None:
    cfg = MachineConfig()
    assert cfg.panic_action is PanicAction.SHUTDOWN  # QEMU's default
    parse_action_option("panic=pause", cfg)
    assert cfg.panic_action is PanicAction.PAUSE
    parse_action_option("panic=none,reboot=shutdown,shutdown=poweroff", cfg)
    assert cfg.panic_action is PanicAction.NONE and cfg.no_reboot
    parse_action_option("reboot=reset", cfg)
    assert not cfg.no_reboot
    for bad, msg in [("panic=explode", "panic=explode"), ("shutdown=pause", "not supported"),
                     ("watchdog=reset", "not supported"), ("colour=red", "unknown action"), ("panic", "key=value")]:
        with pytest.raises(ConfigError, match=msg):
            parse_action_option(bad, MachineConfig())


def test_take_guest_requests_leaves_the_hosts() -> None:
    control = VmControl()
    control.request_reset("i8042 reset")
    control.request_exit(0, "host-qmp-quit")
    control.request_poweroff("ACPI S5")
    taken = control.take_guest_requests()
    assert [r.kind for r in taken] == [RequestKind.RESET, RequestKind.POWEROFF]
    assert control.queue == [Request(RequestKind.EXIT, "host-qmp-quit", 0)]
