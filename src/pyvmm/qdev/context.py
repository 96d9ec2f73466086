"""What a device factory may ask of the machine it is built into.

The machine builder implements this; a factory never sees the builder, the accelerator
or the other devices.  Back-ends are found by the ids the user gave them (``-chardev``,
``-drive``, ``-netdev``), and each may be used by one device only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from pyvmm.irq import IrqLine
    from pyvmm.loop import MainLoop
    from pyvmm.memory import GuestMemory
    from pyvmm.runstate import VmControl


class DeviceContext(Protocol):
    @property
    def memory(self) -> GuestMemory: ...

    @property
    def control(self) -> VmControl: ...

    @property
    def iothread(self) -> MainLoop:
        """The loop device back-ends (virtio queues) run on."""
        ...

    def irq_line(self, gsi: int) -> IrqLine: ...

    def add_io(self, base: int, size: int, handler: object, name: str) -> None:
        """Put ``handler`` on the port bus at ``base`` (``io_read``/``io_write``)."""
        ...

    def add_mmio(self, base: int, size: int, handler: object, name: str) -> None:
        """Put ``handler`` on the MMIO bus at guest-physical ``base`` (``mmio_read``/``mmio_write``)."""
        ...

    def chardev(self, ident: str) -> Any:
        """The character back-end ``-chardev id=IDENT`` (or, pyvmm's shorthand, a back-end spec)."""
        ...

    def chardev_socket_path(self, ident: str) -> str:
        """The path of ``-chardev socket,id=IDENT,path=P`` (a client socket), claimed for this device."""
        ...

    def drive(self, ident: str) -> Any:
        """The ``-drive id=IDENT`` spec, claimed for this device."""
        ...

    def block_backend(self, ident: str | None, *, read_only: bool, share_rw: bool, device_id: str | None,
                      file: str | None = None, fmt: str | None = None) -> Any:
        """The block backend (:class:`pyvmm.block.graph.Backend`) a disk uses: ``-drive id=IDENT``
        or ``-blockdev node-name=IDENT``, or (``ident`` None) the image ``file``; opened with the
        device's permissions and claimed for it."""
        ...

    def netdev(self, ident: str) -> Any:
        """The opened host back-end of ``-netdev id=IDENT``, claimed for this device."""
        ...

    def plug_virtio(self, device: Any, transport: str, devfn: int | None) -> Any:
        """Put a virtio device on a transport: ``"pci"`` (at ``devfn`` or the next slot) or ``"mmio"``."""
        ...

    def count(self, driver: str) -> int:
        """How many devices of this driver the machine has so far (e.g. the next serial index)."""
        ...
