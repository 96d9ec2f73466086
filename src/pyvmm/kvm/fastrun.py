"""A compiled ``ioctl`` for the KVM_RUN hot path, with the ctypes call as fallback.

Each exit costs one foreign call.  A cffi API-mode call goes through far
less generic machinery than ctypes/libffi, which matters most right after a
guest exit, when caches and branch predictors are cold: measured on a busy
host, about 1 microsecond less per exit (see ``bench/exits.py``).

The helper also summarizes the exit in its return value for the commonest
case, a single port access, so the loop need not decode ``kvm_run`` itself.
:func:`run_step` hides which call is used: it returns a :class:`RunStep`
whose ``fn(*args)`` runs KVM_RUN once and returns that summary, either the
compiled ``pv_run`` itself or its Python twin over the ctypes call.  The vCPU
loop has one body for both.

The helper is compiled when pyvmm is installed (cffi, see
:mod:`pyvmm.kvm.kvmrun_build`) into the extension module ``pyvmm.kvm._kvmrun``;
the runtime only imports it, and refuses an extension that is missing or was
built from other sources.  ``PYVMM_KVM_NO_HELPER=1`` selects the ctypes call
(:data:`pyvmm.kvm.syscall.kvm_run_ioctl`) instead: same semantics, a little
slower.  Both return -1/EINTR on a kick rather than retrying, which is what
the vCPU loop relies on.
"""

from __future__ import annotations

import ctypes
import importlib
import logging
import os
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pyvmm.errors import KvmError
from pyvmm.kvm import abi, kvmrun_build
from pyvmm.kvm.ioctls import ExitReason, Ioctl
from pyvmm.kvm.syscall import get_errno, kvm_run_ioctl

log = logging.getLogger(__name__)


#: Bits of ``pv_run``'s result (see the C comment in :mod:`pyvmm.kvm.kvmrun_build`).
SIMPLE_PIO = 0x80
PIO_OUT = 0x100
OTHER_EXIT = 0x7F


@dataclass(frozen=True)
class RunCall:
    """How to call ioctl on the hot path.

    ``fn(fd, request, arg)`` returns the ioctl result; on failure it returns
    ``-errno`` when ``negative_errno`` is true, else -1 with the error in
    :func:`ctypes.get_errno`.
    """

    fn: Callable[[int, int, int], int]
    negative_errno: bool
    compiled: bool
    #: ``run(fd, kvm_run_address, pio_offset)``: KVM_RUN plus an exit summary (compiled helper only).
    run: Callable[[int, int, int], int] | None = None


_FALLBACK = RunCall(kvm_run_ioctl, False, False)

#: Where KVM puts port I/O data (KVM_PIO_PAGE_OFFSET pages into the vCPU mapping); a single port
#: access is summarized only if its ``data_offset`` is exactly this.
PIO_DATA_OFF = 4096
_EXIT_OFF = abi.KVM_RUN_EXIT_OFFSET
_EXIT_REASON_OFF = abi.KVM_RUN_EXIT_REASON_OFFSET
# exit_reason, then (skipping to the exit union) kvm_run.io: direction, size, port, count, data_offset.
_EXIT_HEAD = struct.Struct(f"<I{_EXIT_OFF - _EXIT_REASON_OFF - 4}xBBHIQ")
assert _EXIT_HEAD.size == _EXIT_OFF - _EXIT_REASON_OFF + ctypes.sizeof(abi.KvmRunIo)
_PIO_VALUE = {1: struct.Struct("<B").unpack_from, 2: struct.Struct("<H").unpack_from,
              4: struct.Struct("<I").unpack_from}


@dataclass(frozen=True)
class RunStep:
    """KVM_RUN once on one vCPU: ``fn(*args)`` returns the exit summary.

    The summary is ``pv_run``'s (see :mod:`pyvmm.kvm.kvmrun_build`): ``-errno``; or
    :data:`SIMPLE_PIO` set for one port access (count 1, size 1/2/4, data at
    :data:`PIO_DATA_OFF`) with the direction in :data:`PIO_OUT`, the size in bits
    9-11, the port in bits 12-27 and the value written in bits 28 and up; or the
    exit reason, :data:`OTHER_EXIT` for reasons that do not fit, which the caller
    reads from ``kvm_run``.
    """

    fn: Callable[[int, int, int], int]
    args: tuple[int, int, int]
    compiled: bool


def run_step(call: RunCall, fd: int, run_map: Any, run_addr: int) -> RunStep:
    """The KVM_RUN step for the vCPU ``fd`` whose ``kvm_run`` is ``run_map`` (mapped at ``run_addr``)."""
    if len(run_map) < PIO_DATA_OFF + 4:
        raise KvmError(f"the kvm_run mapping ({len(run_map)} bytes) has no port I/O data page")
    if call.run is not None:
        return RunStep(call.run, (fd, run_addr, PIO_DATA_OFF), True)
    return RunStep(_ctypes_step(call, run_map), (fd, int(Ioctl.RUN), PIO_DATA_OFF), False)


def _ctypes_step(call: RunCall, mm: Any) -> Callable[[int, int, int], int]:
    """``pv_run`` in Python over ``call.fn``: the same summary, decoded from ``mm``."""
    ioctl, negative_errno = call.fn, call.negative_errno
    head = _EXIT_HEAD.unpack_from
    value = _PIO_VALUE
    reason_off = _EXIT_REASON_OFF
    EXIT_IO = int(ExitReason.IO)
    IN, OUT = SIMPLE_PIO | EXIT_IO, PIO_OUT | SIMPLE_PIO | EXIT_IO

    def step(fd: int, request: int, pio_off: int) -> int:
        r = ioctl(fd, request, 0)
        if r < 0:
            return r if negative_errno else -get_errno()
        reason, out, size, port, count, off = head(mm, reason_off)
        if reason == EXIT_IO and count == 1 and off == pio_off:
            if out:
                unpack = value.get(size)
                if unpack is not None:
                    return (unpack(mm, off)[0] << 28) | (port << 12) | (size << 9) | OUT
            elif size in value:
                return (port << 12) | (size << 9) | IN
            return reason
        return reason if reason < OTHER_EXIT else OTHER_EXIT
    return step


class _Loader:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._call: RunCall | None = None

    def get(self) -> RunCall:
        with self._lock:
            if self._call is None:
                self._call = _load()
            return self._call


_loader = _Loader()


def run_call() -> RunCall:
    """The fastest available KVM_RUN call, loaded on first use.

    Raises :class:`KvmError` when the compiled helper is missing or stale (a broken install).
    """
    return _loader.get()


def fallback_call() -> RunCall:
    """The ctypes call, for comparison and for ``PYVMM_KVM_NO_HELPER=1``."""
    return _FALLBACK


def _load() -> RunCall:
    if os.environ.get("PYVMM_KVM_NO_HELPER"):
        return _FALLBACK
    name = kvmrun_build.MODULE_NAME
    reinstall = ("reinstall pyvmm (pip install . or scripts/bootstrap) to build it, "
                 "or set PYVMM_KVM_NO_HELPER=1 for the slower ctypes call")
    try:
        mod = importlib.import_module(name)
    except ImportError as e:
        raise KvmError(f"the compiled KVM_RUN helper {name} is missing ({e}); {reinstall}") from None
    if mod.ffi.string(mod.lib.pv_build_hash()).decode() != kvmrun_build.source_hash():
        raise KvmError(f"the compiled KVM_RUN helper {name} was built from another source; {reinstall}")
    log.debug("KVM_RUN helper loaded from %s", mod.__file__)
    return RunCall(mod.lib.pv_ioctl, True, True, mod.lib.pv_run)
