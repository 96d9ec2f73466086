"""QEMU's ``-machine none``: a QMP monitor and no guest.

No RAM is mapped, no vCPU runs, no device exists.  The process serves QMP until ``quit``
(or a signal), as ``qemu-system-x86_64 -machine none`` does; management tools use it to
ask what the VMM can do.  ``stop`` and ``cont`` only move the run state.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from pyvmm.block.graph import BlockGraph
from pyvmm.config import MachineConfig
from pyvmm.machine.result import RunResult
from pyvmm.monitor import ChardevInfo, CpuInfo, create_monitor
from pyvmm.runstate import RequestKind, RunState, VmControl
from pyvmm.sandbox import SandboxConfig
from pyvmm.sandbox import prepare as prepare_sandbox

log = logging.getLogger(__name__)


def _open_kvm() -> object | None:
    from pyvmm.errors import KvmError
    from pyvmm.kvm.system import System

    try:
        return System()
    except KvmError as e:
        log.info("accelerator: tcg (%s)", e)
        return None


class NoneMachine:
    """An empty machine: implements :class:`~pyvmm.monitor.MachineControl` for the monitor."""

    def __init__(self, config: MachineConfig, *, control: VmControl | None = None,
                 sandbox: SandboxConfig | None = None) -> None:
        config.validate()
        self.config = config
        self.sandbox = sandbox or SandboxConfig()
        self.control = control or VmControl()
        self._lock = threading.Lock()
        self.state = RunState.PRELAUNCH
        self.state_listeners: list[Callable[[RunState, str], None]] = []
        self.monitor = create_monitor(self, config.qmp)
        self._kvm = _open_kvm() if config.accel == "kvm" else None  # QMP query-kvm: what the VM would run on

    def accelerator(self) -> str:
        """``kvm`` once /dev/kvm passed pyvmm's checks (as QEMU's -machine none initialises KVM), else tcg."""
        return "kvm" if self._kvm is not None else "tcg"

    def _set_state(self, state: RunState, reason: str = "") -> None:
        with self._lock:
            self.state = state
        for cb in list(self.state_listeners):
            cb(state, reason)

    def run(self) -> RunResult:
        try:
            load_sandbox = prepare_sandbox(self.sandbox)  # built before clients can connect
            if self.monitor is not None:
                self.state_listeners.append(self.monitor.on_state)
                self.monitor.start()
            load_sandbox()  # -sandbox: after the monitor listens
            if self.monitor is not None:
                self.monitor.wait_for_clients()
            self._set_state(RunState.PRELAUNCH if self.config.start_paused else RunState.RUNNING)
            while True:
                req = self.control.wait()
                if req is None:
                    continue
                if req.kind is RequestKind.RESET:
                    continue  # nothing to reset
                self._set_state(RunState.SHUTDOWN, req.reason)
                if req.kind is RequestKind.ERROR:
                    return RunResult(req.status or 1, req.reason)
                return RunResult(req.status if req.kind is RequestKind.EXIT else 0, req.reason)
        finally:
            if self.monitor is not None:
                self.monitor.close()

    # -- MachineControl ------------------------------------------------------------------------
    def status(self) -> RunState:
        return self.state

    def pause(self) -> None:
        if self.state is RunState.RUNNING:
            self._set_state(RunState.PAUSED)

    def resume(self) -> None:
        if self.state in (RunState.PAUSED, RunState.PRELAUNCH):
            self._set_state(RunState.RUNNING)

    def system_reset(self) -> None:
        self.control.request_reset("host-qmp-system-reset")

    def system_powerdown(self) -> None:
        pass  # no guest to tell

    def quit(self) -> None:
        self.control.request_exit(0, "host-qmp-quit")

    def cpus(self) -> list[CpuInfo]:
        return []

    def cpu_dump(self, index: int) -> str:
        return ""

    def chardevs(self) -> list[ChardevInfo]:
        return []

    def guest_name(self) -> str | None:
        return self.config.name

    def guest_uuid(self) -> str | None:
        return self.config.uuid

    def key_names(self) -> frozenset[str]:
        from pyvmm.devices.i8042 import QCODES

        return frozenset(QCODES)

    def block_graph(self) -> BlockGraph:
        return BlockGraph()  # no block nodes: -blockdev and -drive need a machine

    def send_keys(self, qcodes: list[str]) -> None:
        pass  # no keyboard: the keys go nowhere, as on QEMU's -machine none


__all__ = ["NoneMachine"]
