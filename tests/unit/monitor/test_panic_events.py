"""Guest-panic reports as QMP events and run states, and ``-action`` parsing."""

from __future__ import annotations

import pytest

from pyvmm.cli import config_from_args, parse_run_args
from pyvmm.config import MachineConfig
from pyvmm.errors import ConfigError
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


def _config(*argv: str) -> MachineConfig:
    return config_from_args(parse_run_args(["-kernel", "k", *argv]))


def test_action_option() -> None:
    assert _config().panic_action is PanicAction.SHUTDOWN  # QEMU's default
    assert _config("-action", "panic=pause").panic_action is PanicAction.PAUSE
    cfg = _config("-action", "panic=none,reboot=shutdown,shutdown=poweroff")
    assert cfg.panic_action is PanicAction.NONE and cfg.no_reboot
    cfg = _config("-action", "panic=pause", "-action", "panic=exit-failure")  # later keys win, as QEMU's
    assert cfg.panic_action is PanicAction.EXIT_FAILURE and not cfg.no_reboot
    for bad, msg in [("panic=explode", "panic"), ("shutdown=pause", "cannot honour"),
                     ("watchdog=reset", "cannot honour"), ("colour=red", "Invalid parameter 'colour'"),
                     ("panic", "panic")]:
        with pytest.raises(ConfigError, match=msg) as e:
            _config("-action", bad)
        assert str(e.value).startswith("-action"), "the error names the option"


def test_take_guest_requests_leaves_the_hosts() -> None:
    control = VmControl()
    control.request_reset("i8042 reset")
    control.request_exit(0, "host-qmp-quit")
    control.request_poweroff("ACPI S5")
    taken = control.take_guest_requests()
    assert [r.kind for r in taken] == [RequestKind.RESET, RequestKind.POWEROFF]
    assert control.queue == [Request(RequestKind.EXIT, "host-qmp-quit", 0)]
