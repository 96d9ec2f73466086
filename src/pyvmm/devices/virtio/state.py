"""VM state of virtio devices and their transports: negotiated features, status, each queue's
ring addresses and indices, the transport registers, and what a back-end holds for the guest
(a console's unread input, a received frame not yet delivered).

Requests are never in flight when state is saved: a device handles its queues under its own
lock and completes every request it pops before it lets go (virtio-blk reads and writes
synchronously), so the machine's quiesce step, which takes every device lock, is QEMU's drain
of the block layer.  After loading, each ready queue is looked at once more, as a driver's
kick that arrived while the source stopped is not lost.
"""

from __future__ import annotations

from typing import Any

from pyvmm.devices.virtio.device import Status, VirtioDevice
from pyvmm.devices.virtio.queue import Virtqueue, VirtqueueError
from pyvmm.vmstate import VmStateError, fields

_QUEUE_FIELDS = ("size", "ready", "desc_addr", "avail_addr", "used_addr", "event_idx", "indirect", "last_avail_idx",
                 "used_idx", "signalled_used", "signalled_used_valid", "notify_enabled")
_DEVICE_FIELDS = ("driver_features", "status", "config_generation", "broken_reason")


def save_device(dev: VirtioDevice) -> dict[str, Any]:
    """Device lock held by the caller (or taken here: it is re-entrant)."""
    with dev.lock:
        st = fields.capture(dev, _DEVICE_FIELDS)
        st["device_features"] = dev.device_features
        st["queues"] = [fields.capture(q, _QUEUE_FIELDS) for q in dev.queues]
        backend = getattr(dev, "save_backend_state", None)
        st["backend"] = backend() if backend is not None else None
        return st


def load_device(dev: VirtioDevice, st: dict[str, Any]) -> None:
    what = dev.name
    queues = fields.need(st, "queues", list, what)
    if len(queues) != len(dev.queues):
        raise VmStateError(f"{what}: {len(queues)} queues in the state, {len(dev.queues)} here")
    features = fields.need(st, "device_features", int, what)
    if features != dev.device_features:
        raise VmStateError(f"{what}: device features {features:#x} in the state, {dev.device_features:#x} here "
                           "(different device properties)")
    with dev.lock:
        fields.apply(dev, _DEVICE_FIELDS, st)
        if dev.driver_features & ~dev.device_features:
            raise VmStateError(f"{what}: driver features in the state were not offered")
        for q, qs in zip(dev.queues, queues, strict=True):
            _load_queue(q, qs, what)
        loader = getattr(dev, "load_backend_state", None)
        if loader is not None:
            loader(st.get("backend"))


def _load_queue(q: Virtqueue, st: dict[str, Any], what: str) -> None:
    fields.apply(q, _QUEUE_FIELDS, st)
    if not 0 < q.size <= q.max_size or q.size & (q.size - 1):
        raise VmStateError(f"{what}: queue {q.index} size {q.size} in the state is invalid")
    for name in ("last_avail_idx", "used_idx", "signalled_used"):
        setattr(q, name, getattr(q, name) & 0xFFFF)
    if q.ready:
        try:
            q.validate()
        except VirtqueueError as e:
            raise VmStateError(f"{what}: queue {q.index}: {e}") from None


def kick_ready_queues(dev: VirtioDevice) -> None:
    """After loading: process whatever the driver queued while the source was stopping."""
    if dev.status & Status.DRIVER_OK:
        for i, q in enumerate(dev.queues):
            if q.ready:
                dev.notify(i)
