"""A compiled ``ioctl`` for the KVM_RUN hot path, with the ctypes call as fallback.

Each exit costs one foreign call.  A cffi API-mode call goes through far
less generic machinery than ctypes/libffi, which matters most right after a
guest exit, when caches and branch predictors are cold: measured on a busy
host, about 1 microsecond less per exit (see ``bench/exits.py``).

The helper also summarizes the exit in its return value for the commonest
case, a single port access, so the loop need not decode ``kvm_run`` itself.

The helper is built with cffi the first time it is needed (gcc required)
into the pyvmm cache directory, keyed by a hash of its source and the
Python version, and loaded from there afterwards.  When it cannot be built
the ctypes call (:data:`pyvmm.kvm.syscall.kvm_run_ioctl`) is used: same
semantics, a little slower.  Both return -1/EINTR on a kick rather than
retrying, which is what the vCPU loop relies on.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pyvmm.kvm import abi
from pyvmm.kvm.ioctls import ExitReason, Ioctl
from pyvmm.kvm.syscall import kvm_run_ioctl

log = logging.getLogger(__name__)

_MODULE = "_pyvmm_kvmrun"
_CDEF = """
int pv_ioctl(int fd, unsigned long request, unsigned long arg);
long long pv_run(int fd, uintptr_t run, unsigned long pio_off);
"""
# kvm_run layout from the (size-checked) ctypes mirrors, so no kernel headers are needed to build.
_SOURCE_TEMPLATE = """
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>

#define KVM_RUN_IOCTL    @KVM_RUN@UL
#define EXIT_REASON_OFF  @EXIT_REASON_OFF@
#define IO_OFF           @IO_OFF@
#define KVM_EXIT_IO      @EXIT_IO@
#define OTHER_EXIT       0x7f

/* ioctl() returning -errno on failure, so the caller needs no separate errno read. */
static int pv_ioctl(int fd, unsigned long request, unsigned long arg)
{
    int r = ioctl(fd, request, arg);
    return r < 0 ? -errno : r;
}

struct pv_io { uint8_t direction, size; uint16_t port; uint32_t count; uint64_t data_offset; };

/* KVM_RUN plus a summary of the exit, so the common exit needs no further decoding:
 *   < 0      -errno
 *   bit 7    set for one port access (count 1, size 1/2/4) whose data is at pio_off:
 *            bits 0-6 KVM_EXIT_IO, bit 8 direction (1 = out), bits 9-11 size,
 *            bits 12-27 port, bits 28-59 the value written (out)
 *   else     the exit reason, or OTHER_EXIT for reasons >= OTHER_EXIT, which the caller
 *            reads from kvm_run (it decodes kvm_run itself for all of these) */
static long long pv_run(int fd, uintptr_t run, unsigned long pio_off)
{
    uint32_t reason;
    struct pv_io io;
    int r = ioctl(fd, KVM_RUN_IOCTL, 0);
    if (r < 0)
        return -errno;
    memcpy(&reason, (const void *)(run + EXIT_REASON_OFF), sizeof(reason));
    if (reason != KVM_EXIT_IO)
        return reason < OTHER_EXIT ? reason : OTHER_EXIT;
    memcpy(&io, (const void *)(run + IO_OFF), sizeof(io));
    if (io.count != 1 || io.data_offset != pio_off || (io.size != 1 && io.size != 2 && io.size != 4))
        return reason;
    uint32_t value = 0;
    if (io.direction)
        memcpy(&value, (const void *)(run + pio_off), io.size);   /* little-endian host */
    return ((long long)value << 28) | ((long long)io.port << 12) | ((long long)io.size << 9)
           | ((long long)io.direction << 8) | 0x80 | KVM_EXIT_IO;
}
"""


def _render(template: str) -> str:
    values = {"KVM_RUN": int(Ioctl.RUN), "EXIT_REASON_OFF": abi.KVM_RUN_EXIT_REASON_OFFSET,
              "IO_OFF": abi.KVM_RUN_EXIT_OFFSET, "EXIT_IO": int(ExitReason.IO)}
    for name, value in values.items():
        template = template.replace(f"@{name}@", str(value))
    assert "@" not in template
    return template


_SOURCE = _render(_SOURCE_TEMPLATE)

#: Bits of :func:`pv_run`'s result (see the C comment above).
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
    """The fastest available KVM_RUN call (built on first use; never raises)."""
    return _loader.get()


def fallback_call() -> RunCall:
    """The ctypes call, for comparison and for hosts without a compiler."""
    return _FALLBACK


def _cache_dir() -> Path:
    base = os.environ.get("PYVMM_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "pyvmm")
    return Path(base)


def _load() -> RunCall:
    if os.environ.get("PYVMM_KVM_NO_HELPER"):
        return _FALLBACK
    tag = hashlib.sha256((_SOURCE + _CDEF + sys.version).encode()).hexdigest()[:16]
    name = f"{_MODULE}_{tag}"
    try:
        cdir = _cache_dir()
        existing = sorted(cdir.glob(f"{name}*.so")) if cdir.is_dir() else []
        path = existing[0] if existing else _build(cdir, name)
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load {path}")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        fn, run = mod.lib.pv_ioctl, mod.lib.pv_run
    except Exception as e:  # no cffi, no gcc, read-only cache...: the ctypes call works everywhere
        log.debug("KVM_RUN helper unavailable (%s); using ctypes", e)
        return _FALLBACK
    log.debug("KVM_RUN helper loaded from %s", path)
    return RunCall(fn, True, True, run)


def _build(target_dir: Path, name: str) -> Path:
    import cffi

    ffi = cffi.FFI()
    ffi.cdef(_CDEF)
    ffi.set_source(name, _SOURCE, extra_compile_args=["-O2"])
    target_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target_dir) as tmp:
        out = ffi.compile(tmpdir=tmp, verbose=False)
        final = target_dir / Path(out).name
        os.replace(out, final)  # atomic: concurrent builders just overwrite each other
    return final
