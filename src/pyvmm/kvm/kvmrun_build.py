"""How the KVM_RUN helper of :mod:`pyvmm.kvm.fastrun` is compiled, at install time.

``setup.py`` names :func:`ffibuilder` in ``cffi_modules``, so ``pip install``
compiles the C below into the extension module ``pyvmm.kvm._kvmrun`` and the
runtime never needs a compiler.  The extension carries the hash of the source
it was built from (:func:`source_hash`), which :mod:`pyvmm.kvm.fastrun`
compares with this file's rendering to refuse a stale build.

The ``kvm_run`` layout comes from the (size-checked) ctypes mirrors in
:mod:`pyvmm.kvm.abi`, so no kernel headers are needed to build.  cffi executes
this file by path in the build environment; it then puts the source tree on
``sys.path`` to import those mirrors.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Any

if __name__ == "__cffi__":   # executed by cffi's setuptools hook from the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pyvmm.kvm import abi  # noqa: E402
from pyvmm.kvm.ioctls import ExitReason, Ioctl  # noqa: E402

MODULE_NAME = "pyvmm.kvm._kvmrun"
CDEF = """
const char *pv_build_hash(void);
int pv_ioctl(int fd, unsigned long request, unsigned long arg);
long long pv_run(int fd, uintptr_t run, unsigned long pio_off);
"""
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


def source() -> str:
    """The C source with the kvm_run layout filled in."""
    values = {"KVM_RUN": int(Ioctl.RUN), "EXIT_REASON_OFF": abi.KVM_RUN_EXIT_REASON_OFFSET,
              "IO_OFF": abi.KVM_RUN_EXIT_OFFSET, "EXIT_IO": int(ExitReason.IO)}
    text = _SOURCE_TEMPLATE
    for name, value in values.items():
        text = text.replace(f"@{name}@", str(value))
    if "@" in text:
        raise ValueError("unfilled placeholder in the KVM_RUN helper source")
    return text


def source_hash() -> str:
    """A digest of everything the extension is built from (source and declarations)."""
    return hashlib.sha256((source() + CDEF).encode()).hexdigest()[:16]


def ffibuilder() -> Any:
    """The cffi builder for ``pyvmm.kvm._kvmrun`` (``setup.py``'s ``cffi_modules``)."""
    import cffi

    ffi = cffi.FFI()
    ffi.cdef(CDEF)
    ffi.set_source(MODULE_NAME, source() + f'\nconst char *pv_build_hash(void) {{ return "{source_hash()}"; }}\n',
                   extra_compile_args=["-O2"])
    return ffi
