"""Choosing an accelerator: ``--accel kvm|tcg|auto``.

``auto`` picks ``kvm`` when /dev/kvm exists, is usable, and runs ring-0 guest
code natively; otherwise ``tcg``.  Some KVM implementations (for example PVM,
``kvm_pvm``, KVM without VT-x) run only guest user mode natively and emulate
kernel-mode code instruction by instruction; a stock kernel cannot boot on
those.  We detect that honestly with a short timed probe: a tight ring-0 loop
that takes microseconds under hardware virtualization and tens of
milliseconds under an instruction emulator.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from pyvmm.accel.base import Accelerator
from pyvmm.errors import AccelError, KvmError

log = logging.getLogger(__name__)

#: Iterations of the probe loop (2 instructions each).
PROBE_ITERATIONS = 20_000
#: Above this many instructions per second, ring-0 code is taken to run natively.
NATIVE_THRESHOLD_IPS = 50_000_000


@dataclass(frozen=True)
class Choice:
    name: str
    reason: str


def probe_kvm() -> tuple[bool, str]:
    """Return (usable natively, explanation)."""
    if not os.path.exists("/dev/kvm"):
        return False, "/dev/kvm does not exist"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "/dev/kvm is not accessible (permission denied)"
    try:
        from pyvmm.accel.kvm_probe import ring0_instructions_per_second
    except ImportError as e:  # pragma: no cover - bindings missing is a packaging error
        return False, f"KVM bindings unavailable: {e}"
    try:
        ips = ring0_instructions_per_second(PROBE_ITERATIONS)
    except KvmError as e:
        return False, f"KVM is not usable: {e}"
    pvm = os.path.isdir("/sys/module/kvm_pvm")
    if ips < NATIVE_THRESHOLD_IPS:
        what = "the kvm_pvm module (KVM without VT-x)" if pvm else "the host kernel"
        return False, (f"/dev/kvm emulates ring-0 guest code ({ips / 1e6:.1f} M instructions/s in a timed probe, "
                       f"by {what}); a stock kernel would not boot")
    return True, f"/dev/kvm runs ring-0 guest code natively ({ips / 1e6:.0f} M instructions/s in a timed probe)"


def choose(requested: str) -> Choice:
    if requested == "kvm":
        return Choice("kvm", "requested with --accel kvm")
    if requested == "tcg":
        return Choice("tcg", "requested with --accel tcg")
    if requested != "auto":
        raise AccelError(f"unknown accelerator {requested!r}: use kvm, tcg or auto")
    native, why = probe_kvm()
    return Choice("kvm" if native else "tcg", why)


def create(name: str) -> Accelerator:
    if name == "kvm":
        from pyvmm.accel.kvm import KvmAccelerator

        return KvmAccelerator()
    if name == "tcg":
        try:
            from pyvmm.accel.tcg import TcgAccelerator
        except ImportError as e:
            raise AccelError(f"the tcg accelerator is unavailable: {e}") from None
        return TcgAccelerator()
    raise AccelError(f"unknown accelerator {name!r}")
