"""``/dev/kvm``: the system-level handle.

Opening it checks everything pyvmm relies on up front (API version 12 and
the capabilities in :data:`~pyvmm.kvm.ioctls.REQUIRED_CAPS`), so a host that
cannot run the machine fails at start-up with one clear line instead of with
an obscure ioctl error half-way through building the VM.
"""

from __future__ import annotations

import ctypes
import errno
import os

from pyvmm.errors import KvmError
from pyvmm.kvm import abi
from pyvmm.kvm.ioctls import KVM_API_VERSION, REQUIRED_CAPS, Cap, Ioctl
from pyvmm.kvm.syscall import ioctl, ioctl_errno

DEFAULT_DEVICE = "/dev/kvm"


class System:
    """An open ``/dev/kvm`` that has passed the version and capability checks."""

    def __init__(self, path: str = DEFAULT_DEVICE, required: tuple[Cap, ...] = REQUIRED_CAPS) -> None:
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise KvmError(f"{path} does not exist: this host has no KVM (enable virtualization and load "
                           f"the kvm module, or use --accel tcg)") from None
        except PermissionError:
            raise KvmError(f"{path}: permission denied (run as root or join the 'kvm' group, "
                           f"or use --accel tcg)") from None
        except OSError as e:
            raise KvmError(f"cannot open {path}: {e.strerror}") from None
        try:
            version = ioctl(self.fd, Ioctl.GET_API_VERSION)
            if version != KVM_API_VERSION:
                raise KvmError(f"{path}: KVM API version {version}, pyvmm needs {KVM_API_VERSION}")
            missing = [c.name for c in required if self.check_extension(c) <= 0]
            if missing:
                raise KvmError(f"{path}: KVM lacks required capabilities: {', '.join(missing)}")
            self.vcpu_mmap_size = ioctl(self.fd, Ioctl.GET_VCPU_MMAP_SIZE)
            if self.vcpu_mmap_size < ctypes.sizeof(abi.KvmRun):
                raise KvmError(f"{path}: vCPU mmap size {self.vcpu_mmap_size} is smaller than struct kvm_run")
        except BaseException:
            os.close(self.fd)
            raise
        self._supported_cpuid: list[abi.KvmCpuidEntry2] | None = None

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on /dev/kvm: 0 if absent, else a capability-specific positive value."""
        ret, _ = ioctl_errno(self.fd, Ioctl.CHECK_EXTENSION, int(cap))
        return max(ret, 0)

    def supported_cpuid(self) -> list[abi.KvmCpuidEntry2]:
        """KVM_GET_SUPPORTED_CPUID, as a fresh list of entry copies each call."""
        if self._supported_cpuid is None:
            n = 128
            while True:
                buf = abi.kvm_cpuid2_type(n)()
                buf.nent = n
                ret, err = ioctl_errno(self.fd, Ioctl.GET_SUPPORTED_CPUID, buf)
                if ret >= 0:
                    break
                if err != errno.E2BIG or n >= 4096:
                    raise KvmError(f"KVM_GET_SUPPORTED_CPUID failed: {os.strerror(err)}")
                n *= 2
            self._supported_cpuid = [copy_cpuid_entry(buf.entries[i]) for i in range(buf.nent)]
        return [copy_cpuid_entry(e) for e in self._supported_cpuid]

    def msr_index_list(self) -> list[int]:
        """KVM_GET_MSR_INDEX_LIST: the MSRs KVM saves and restores for a vCPU."""
        n = 256
        while True:
            buf = (ctypes.c_uint32 * (n + 1))()
            buf[0] = n
            ret, err = ioctl_errno(self.fd, Ioctl.GET_MSR_INDEX_LIST, buf)
            if ret >= 0:
                return [buf[1 + i] for i in range(buf[0])]
            if err != errno.E2BIG or n >= 16384:
                raise KvmError(f"KVM_GET_MSR_INDEX_LIST failed: {os.strerror(err)}")
            n = max(n * 2, buf[0])

    def create_vm(self):  # -> Vm (import cycle avoided at module level)
        from pyvmm.kvm.vm import Vm

        fd = ioctl(self.fd, Ioctl.CREATE_VM, 0)
        return Vm(self, fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> System:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def copy_cpuid_entry(e: abi.KvmCpuidEntry2) -> abi.KvmCpuidEntry2:
    return abi.KvmCpuidEntry2.from_buffer_copy(e)
