"""The monitor's view of a machine.

The monitor never reaches into machine internals: it drives the VM through
:class:`MachineControl` and learns about changes through two callbacks the
machine calls (:class:`MachineObserver`).  That keeps the QMP layer testable
against any object with these methods, and keeps the machine free of QMP.

Threading: the monitor calls these methods from its own thread.  ``pause``
and ``resume`` act at once (they kick and park the vCPUs); ``system_reset``,
``system_powerdown`` and ``quit`` only post requests that the machine's main
thread carries out, so they return immediately.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from pyvmm.runstate import GuestPanic, RunState

if TYPE_CHECKING:
    from pyvmm.block.graph import BlockGraph


@dataclass(frozen=True)
class CpuInfo:
    """One vCPU, as ``query-cpus-fast`` reports it."""

    index: int
    thread_id: int
    socket_id: int = 0
    core_id: int = 0
    thread_in_core: int = 0
    target: str = "x86_64"

    @property
    def qom_path(self) -> str:
        return f"/machine/unattached/device[{self.index}]"


@dataclass(frozen=True)
class ChardevInfo:
    """One character device back-end, as ``query-chardev`` reports it."""

    label: str
    filename: str
    frontend_open: bool = True


class MachineControl(Protocol):
    def status(self) -> RunState:
        """The current run state."""
        ...

    def pause(self) -> None:
        """Stop the vCPUs (QMP ``stop``); a no-op unless running."""
        ...

    def resume(self) -> None:
        """Restart the vCPUs (QMP ``cont``); a no-op unless paused."""
        ...

    def system_reset(self) -> None:
        """Ask for a machine reset (QMP ``system_reset``)."""
        ...

    def system_powerdown(self) -> None:
        """Press the ACPI power button; the guest decides what to do."""
        ...

    def quit(self) -> None:
        """Ask the machine to stop and the process to exit with status 0."""
        ...

    def cpus(self) -> list[CpuInfo]: ...

    def cpu_dump(self, index: int) -> str:
        """A register dump of one vCPU, lines separated by ``\\n``."""
        ...

    def chardevs(self) -> list[ChardevInfo]: ...

    def guest_name(self) -> str | None:
        """``-name guest=`` (QMP ``query-name``), None when not given."""
        ...

    def guest_uuid(self) -> str | None:
        """``-uuid`` in lower case (QMP ``query-uuid``), None when not given."""
        ...

    def key_names(self) -> frozenset[str]:
        """The QEMU key names (qcodes) :meth:`send_keys` can type."""
        ...

    def send_keys(self, qcodes: list[str]) -> None:
        """Press the keys in order, then release them in reverse order (QMP ``send-key``)."""
        ...

    def block_graph(self) -> BlockGraph:
        """The block nodes and backends (QMP query-block, query-named-block-nodes, query-blockstats)."""
        ...


class MachineObserver(Protocol):
    """What the machine tells a monitor; called from any thread, must not block."""

    def on_state(self, state: RunState, reason: str) -> None: ...

    def on_reset(self, reason: str) -> None: ...

    def on_guest_panic(self, report: GuestPanic) -> None:
        """The guest reported a panic (pvpanic); sent before the state change the panic action makes."""
        ...
