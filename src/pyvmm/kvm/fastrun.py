"""A compiled ``ioctl`` for the KVM_RUN hot path, with the ctypes call as fallback.

Each exit costs one foreign call.  A cffi API-mode call goes through far
less generic machinery than ctypes/libffi, which matters most right after a
guest exit, when caches and branch predictors are cold: measured on a busy
host, about 1 microsecond less per exit (see ``bench/exits.py``).

The helper also summarizes the exit in its return value for the commonest
case, a single port access, so the loop need not decode ``kvm_run`` itself.

The helper is compiled when pyvmm is installed (cffi, see
:mod:`pyvmm.kvm.kvmrun_build`) into the extension module ``pyvmm.kvm._kvmrun``;
the runtime only imports it, and refuses an extension that is missing or was
built from other sources.  ``PYVMM_KVM_NO_HELPER=1`` selects the ctypes call
(:data:`pyvmm.kvm.syscall.kvm_run_ioctl`) instead: same semantics, a little
slower.  Both return -1/EINTR on a kick rather than retrying, which is what
the vCPU loop relies on.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass

from pyvmm.errors import KvmError
from pyvmm.kvm import kvmrun_build
from pyvmm.kvm.syscall import kvm_run_ioctl

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
