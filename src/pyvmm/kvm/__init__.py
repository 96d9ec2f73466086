"""Python bindings for the Linux KVM API (x86-64).

* :mod:`~pyvmm.kvm.abi` - ctypes mirrors of the kernel structures (size-checked)
* :mod:`~pyvmm.kvm.ioctls` - ioctl numbers, exit reasons, capabilities
* :mod:`~pyvmm.kvm.syscall` - the ``ioctl`` call (ctypes, EINTR visible)
* :mod:`~pyvmm.kvm.fastrun` - compiled KVM_RUN call for the exit loop (ctypes fallback)
* :mod:`~pyvmm.kvm.system` - ``/dev/kvm`` (:class:`~pyvmm.kvm.system.System`)
* :mod:`~pyvmm.kvm.vm` - a VM fd (:class:`~pyvmm.kvm.vm.Vm`)
* :mod:`~pyvmm.kvm.vcpu` - a vCPU fd and its ``kvm_run`` area (:class:`~pyvmm.kvm.vcpu.Vcpu`)
* :mod:`~pyvmm.kvm.dump` - QEMU-style register dumps and CPU state conversion

The accelerator built on these lives in :mod:`pyvmm.accel.kvm`.
"""
