"""A device written in Python in this script, attached to a VM through the public API.

The device is a 4-byte MMIO register at 0xfeb02000: reading it gives how many times the guest
has written to it, and each written byte is also kept in a log that the host process prints.
The VMM process loads this same file as a plug-in (``VM(plugins=[__file__])``) and finds
``DEVICE_TYPES``; ``VM(devices=["hello-counter"])`` creates the device.  The guest pokes it
with busybox's ``devmem`` (the guest kit's kernel has /dev/mem).

Run: ``.venv/bin/python examples/custom_device.py``
"""

from __future__ import annotations

import sys
import threading

from pyvmm.qdev import BusKind, DeviceContext, DeviceProps, DeviceType, Prop, PropType

ADDR = 0xFEB0_2000


class HelloCounter:
    """The device protocol: io_read/io_write with an offset into the device's own range."""

    def __init__(self) -> None:
        self.lock = threading.Lock()  # vCPU threads may call at once
        self.writes = 0

    def io_read(self, offset: int, size: int) -> int:
        with self.lock:
            return self.writes if offset == 0 else 0

    def io_write(self, offset: int, size: int, value: int) -> None:
        with self.lock:
            self.writes += 1
        print(f"hello-counter: the guest wrote {value:#x} (write number {self.writes})", file=sys.stderr)

    def reset(self) -> None:
        with self.lock:
            self.writes = 0


def _create(ctx: DeviceContext, props: DeviceProps) -> HelloCounter:
    dev = HelloCounter()
    ctx.add_mmio(props.get_int("addr"), 4, dev, props.name("hello-counter"))
    return dev


DEVICE_TYPES = [DeviceType("hello-counter", BusKind.SYSTEM, _create, (Prop("addr", PropType.UINT64, ADDR),),
                           "an example MMIO register written in a user's script")]


def main() -> int:
    from pyvmm import VM

    with VM(memory="256M", plugins=[__file__], devices=["hello-counter"]) as vm:
        script = f"devmem {ADDR:#x} 32 0x41; devmem {ADDR:#x} 32 0x42; devmem {ADDR:#x} 32"
        r = vm.exec(["sh", "-c", script], timeout=60)
        count = int(r.stdout.strip(), 16)
        print(f"the guest read back {count} writes")
        assert count == 2, r
    return 0


if __name__ == "__main__":
    sys.exit(main())
