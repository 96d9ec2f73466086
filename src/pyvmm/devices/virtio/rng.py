"""virtio-rng (virtio 1.x section 5.4): an entropy source for the guest.

One queue of device-writable buffers; each is filled from the host kernel's
CSPRNG by ``readv`` on ``/dev/urandom`` straight into guest memory (the
same source as ``os.urandom``/``getrandom``; never blocks once the host pool
is initialised), at most IOV_MAX buffers per call.  At most :data:`MAX_BYTES_PER_REQUEST` per buffer chain, so
a guest cannot make one request monopolise the iothread.

Threading: :meth:`handle_queue` runs with the device lock held on the
device's loop.
"""

from __future__ import annotations

import os

from pyvmm.block.iov import iov_slice, readv_bounded
from pyvmm.devices.virtio.device import DeviceId, VirtioDevice
from pyvmm.devices.virtio.queue import Virtqueue
from pyvmm.loop import MainLoop
from pyvmm.memory import GuestMemory
from pyvmm.qdev import DeviceContext, DeviceProps, VirtioType

MAX_BYTES_PER_REQUEST = 64 << 10


class VirtioRng(VirtioDevice):
    vmstate_migratable = True  # its whole state is in pyvmm.devices.virtio.state
    device_id = DeviceId.RNG

    def __init__(self, memory: GuestMemory, *, name: str = "virtio-rng", loop: MainLoop | None = None,
                 queue_size: int = 64) -> None:
        super().__init__(memory, name=name, queue_sizes=[queue_size], loop=loop)
        self._fd = os.open("/dev/urandom", os.O_RDONLY | os.O_CLOEXEC)

    def handle_queue(self, queue: Virtqueue) -> None:
        pushed = False
        while (chain := queue.pop()) is not None:
            try:
                n = min(chain.write_len, MAX_BYTES_PER_REQUEST)
                got = readv_bounded(self._fd, iov_slice(chain.writable, 0, n)) if n else 0
            finally:
                chain.release()
            queue.push(chain.head, got)
            pushed = True
        if pushed:
            self.notify_used(queue)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


# -- its registry entry (pyvmm.qdev): virtio-rng-pci, virtio-rng-device ---------------------------
def _create(ctx: DeviceContext, props: DeviceProps) -> VirtioRng:
    return VirtioRng(ctx.memory, name=props.name("virtio-rng"), loop=ctx.iothread)


DEVICE_TYPES = [VirtioType("virtio-rng", _create, (), "entropy from the host's /dev/urandom",
                           aliases={"virtio-rng": "device"})]
