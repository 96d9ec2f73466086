"""The ``ioctl`` system call, called through ctypes.

ctypes rather than :func:`fcntl.ioctl` because KVM_RUN must behave the same
on every Python version: a signal that interrupts KVM_RUN ("kick") must come
back as ``-1/EINTR`` so the vCPU loop can look at its pause/stop flags.
Python 3.11's ``fcntl.ioctl`` raises ``InterruptedError`` instead, and newer
versions retry the call on EINTR, which would re-enter the guest and swallow
the kick.  A ctypes foreign call also releases the GIL while the guest runs.
"""

from __future__ import annotations

import ctypes
import os

from pyvmm.errors import KvmError

_libc = ctypes.CDLL(None, use_errno=True)

#: The raw libc ``ioctl``: ``(fd, request, arg) -> int``; ``arg`` is an int or a ``byref``/pointer.
raw_ioctl = _libc.ioctl
raw_ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
raw_ioctl.restype = ctypes.c_int

#: ``ioctl`` for the KVM_RUN hot path: a separate function object without ``argtypes``, because
#: converting through ``argtypes`` costs measurably more per call than passing plain ints (all three
#: arguments are small ints there: the vCPU fd, KVM_RUN and 0).
kvm_run_ioctl = _libc["ioctl"]
kvm_run_ioctl.restype = ctypes.c_int

get_errno = ctypes.get_errno

# ctypes objects passed to the kernel by address.
_BY_REFERENCE = (ctypes.Structure, ctypes.Union, ctypes.Array, ctypes._SimpleCData)


def ioctl(fd: int, request: int, arg: object = 0, what: str | None = None) -> int:
    """Issue an ioctl and return its non-negative result; raise :class:`KvmError` on failure.

    ``arg`` is an integer, ``None`` or a ctypes object (passed by reference).
    EINTR is retried here: only KVM_RUN treats it as meaningful, and it uses
    :data:`raw_ioctl` directly.
    """
    if isinstance(arg, _BY_REFERENCE):
        arg = ctypes.byref(arg)
    while True:
        ret = raw_ioctl(fd, request, arg)
        if ret >= 0:
            return ret
        err = get_errno()
        if err == 4:  # EINTR
            continue
        name = what or _ioctl_name(request)
        raise KvmError(f"KVM ioctl {name} failed: {os.strerror(err)} (errno {err})")


def ioctl_errno(fd: int, request: int, arg: object = 0) -> tuple[int, int]:
    """Like :func:`ioctl` but return ``(result, errno)`` instead of raising (for probing)."""
    if isinstance(arg, _BY_REFERENCE):
        arg = ctypes.byref(arg)
    ret = raw_ioctl(fd, request, arg)
    return ret, (get_errno() if ret < 0 else 0)


def _ioctl_name(request: int) -> str:
    from pyvmm.kvm.ioctls import Ioctl

    try:
        return "KVM_" + Ioctl(request).name
    except ValueError:
        return f"{request:#x}"
