"""The compiled part of the tcg accelerator: build, load and self-check.

``pvtcg.c`` is compiled when pyvmm is installed (cffi, see
:mod:`pyvmm.accel.tcg.pvtcg_build`) into the extension module
``pyvmm.accel.tcg._pvtcg``; the runtime only imports it, and refuses an
extension that is missing or was built from other sources.

The accelerator depends on unicorn 2.1.4's private internals, and changes
eight things in the loaded library, once per process:

1. ``helper_rdmsr``/``helper_wrmsr`` start with a jump to a filter that serves
   APIC_BASE, TSC, TSC_ADJUST, TSC_DEADLINE, MISC_ENABLE and
   ARCH_CAPABILITIES and otherwise continues into the original code;
2. the PLT slot through which ``x86_cpu_exec_interrupt`` calls
   ``do_interrupt_x86_hardirq`` points at a wrapper that supplies the vector
   from the irqchip (unicorn hardcodes 0);
3. one conditional jump in ``notdirty_write`` so that stores to pages mapped
   executable stop taking the slow path forever, plus a wrapper (PLT slot of
   ``tb_invalidate_phys_page_fast``) that then drops every translation of the
   page, as QEMU's dirty-page rule requires, and the same page in the other
   engines of an SMP machine (``PYVMM_TCG_STRICT_SMC=1`` keeps the wrapper
   but leaves the jump alone);
4. per engine, ``uc_struct.no_exit_request`` drops the exit check unicorn
   emits after every guest load/store (``PYVMM_TCG_EXIT_CHECKS=1`` keeps it);
5. ``helper_rdtsc``/``helper_rdtscp`` start with a jump to the virtual-TSC
   code: unicorn's own hook walk gives up when a stop is pending and then
   returns the host TSC (a guest clock jump to the host's uptime).
6. the PLT slot through which ``x86_cpu_exec_interrupt`` calls
   ``do_smm_enter`` points at the kick handler: other threads stop the vCPU
   by raising CPU_INTERRUPT_SMI, and the vCPU thread itself calls
   ``uc_emu_stop`` between two blocks (a stop requested from another thread
   makes unicorn skip instruction hooks, e.g. a guest ``syscall``);
7. the PLT slot through which translation calls ``tlb_protect_code`` points
   at a wrapper that write-protects the page in every engine of an SMP
   machine, so a store by one vCPU reaches code another vCPU translated;
8. the PLT slot of ``cpu_svm_check_intercept_param`` (which ``helper_pause``
   calls) points at a wrapper that makes a vCPU spinning with ``pause`` give
   its turn up when another vCPU waits (pause-loop exiting).

Every patch site is verified byte for byte first, and :func:`selfcheck_engine`
probes the CPU-state offsets on each new engine with real register writes.
Any mismatch raises :class:`AccelError` before a guest instruction runs.
"""

from __future__ import annotations

import ctypes
import importlib
import logging
import os
import threading
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from pyvmm.accel.tcg import pvtcg_build
from pyvmm.errors import AccelError

log = logging.getLogger(__name__)

UNICORN_VERSION = "2.1.4"
# Offsets (must match the #defines in pvtcg.c); probed by selfcheck().
ENV_EIP = 0x80
ENV_EFLAGS = 0x88
ENV_HFLAGS = 0xB0
ENV_HFLAGS2 = 0xB4
HF2_GIF = 1               # the SMI request used for kicks is only served with GIF set
ENV_SEGS = 0xB8
ENV_CR0 = 0x1A8
ENV_ERROR_CODE = 0x150C

# The first bytes of the unicorn functions whose private-field offsets we rely on.
# They contain those offsets as immediates, so a different build fails here.
_EXPECTED_CODE = {
    "x86_cpu_do_interrupt_x86_64": bytes.fromhex(
        "538bb7a081000048 89fb8b8f589f0000 81feff0000007e18".replace(" ", "")),
    "do_interrupt_x86_hardirq_x86_64": bytes.fromhex("4189d14881ef508a00004531c031c931d2"),
    # ... the HARD case: `mov $1,%edx; xor %esi,%esi; mov %r12,%rdi; andl $~0x102,0x1c(%rbp);
    # call do_interrupt_x86_hardirq@plt` (vector 0, interrupt_request at CPUState+0x1c).
    "x86_cpu_exec_interrupt_x86_64+0x106": bytes.fromhex("ba0100000031f64c89e781651cfdfeffffe8"),
    # ... the SMI case: `andl $~0x40,0x1c(%rbp); mov %rbp,%rdi; call do_smm_enter@plt` (the kick path).
    "x86_cpu_exec_interrupt_x86_64+0x4d": bytes.fromhex("83651cbf4889efe8"),
    # helper_pause: `... mov $0x77,%esi (SVM_EXIT_PAUSE) ... call cpu_svm_check_intercept_param@plt`.
    "helper_pause_x86_64": bytes.fromhex("5531d24863eebe77000000534889fb4883ec08488b4c2418e8"),
    "helper_hlt_x86_64": bytes.fromhex("5531d24863ee be78000000 534889fb".replace(" ", "")),
    # Its second instruction tests uc_struct.no_exit_request (offset 0x7f2).
    "check_exit_request_x86_64": bytes.fromhex("488bb77099000080bef2070000007408c3"),
    # Displaced prologues of the MSR helpers (position independent, no rip-relative operands).
    "helper_rdmsr_x86_64": bytes.fromhex("53488b4c24084889fb31d2be7c000000e8"),
    "helper_wrmsr_x86_64": bytes.fromhex("55488b4c24084889fdba01000000be7c000000e8"),
    # The TSC helpers: an 18-byte displaced prologue (push r14/r13/r12; mov %rdi,%r12; push rbp/rbx;
    # mov uc(%rdi),%r14), then the CR4.TSD test (cr[4] at +0x1c8) and the CPL test (hflags +0xb0).
    "helper_rdtsc_x86_64": bytes.fromhex("4156415541544989fc55534c8bb7581b0000f687c801000004740df687b000000003"),
    "helper_rdtscp_x86_64": bytes.fromhex("4156415541544989fc55534c8bb7581b0000f687c801000004740df687b000000003"),
}
# uc_struct.no_exit_request: when set, unicorn stops emitting a helper call after every guest
# load and store (it only exists to stop mid-block after an invalid access); the check at the
# start of each block, which emu_stop relies on, stays.  Roughly halves the cost of memory ops.
UC_NO_EXIT_REQUEST_OFFSET = 0x7F2
# x86_cpu_exec_interrupt calls do_interrupt_x86_hardirq through this PLT entry (checked below).
_HARDIRQ_ANCHOR_ADDR = 0x44BF90
_HARDIRQ_PLT_ADDR = 0x3AAFE0
# ... and do_smm_enter through the rel32 call that ends the SMI bytes above.
_SMM_CALL_OFFSET = 0x4D + 7
# ... and the rel32 call that ends helper_pause's bytes above.
_PAUSE_CALL_OFFSET = 0x18
_RDMSR_PROLOGUE = 16
_WRMSR_PROLOGUE = 19
_TSC_PROLOGUE = 18
# Helpers whose first bytes become a jump into pvtcg.c (a second engine in the process sees them patched).
_INTERPOSED = ("helper_rdmsr_x86_64", "helper_wrmsr_x86_64", "helper_rdtsc_x86_64", "helper_rdtscp_x86_64")

# Unicorn keeps every store to a page that the guest's page tables map executable on the slow
# path (its notdirty_write never marks such TLB entries dirty), which makes the bzImage
# decompressor and other code writing through executable mappings ~100x slower.  QEMU marks
# the entry dirty after invalidating the page's translations, and unicorn re-arms the check
# for the executing address when it translates code there (tb_gen_code), so we restore
# QEMU's behaviour by turning the `je` that requires a non-executable entry into a `jmp`.
# notdirty_write is a local symbol; it is found relative to an exported neighbour and its
# bytes are checked first.  PYVMM_TCG_STRICT_SMC=1 leaves unicorn's behaviour alone.
_SMC_ANCHOR = "helper_le_stq_mmu_x86_64"
_SMC_ANCHOR_ADDR = 0x417D60
_SMC_SITE_ADDR = 0x41331D
_SMC_EXPECTED = bytes.fromhex("48837d10ff747c4883c428")
_SMC_PATCHED = bytes.fromhex("48837d10ffeb7c4883c428")
# notdirty_write calls tb_invalidate_phys_page_fast through this PLT entry.
_INVAL_FAST_PLT_ADDR = 0x3B2040
# tb_page_add (inlined in tb_link_page) calls tlb_protect_code through this PLT entry.
_PROTECT_PLT_ADDR = 0x3AE5B0


@dataclass
class Native:
    """The loaded module plus the libunicorn function pointers it is wired to."""

    ffi: Any     # cffi.FFI and the compiled module's lib: their attributes exist only at run time
    lib: Any
    fns: dict[str, int]


class _Loader:
    """Loads and wires the module once per process (a per-process cache, not guest state)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._native: Native | None = None

    def get(self) -> Native:
        with self._lock:
            if self._native is None:
                self._native = _load()
            return self._native


_loader = _Loader()


def native() -> Native:
    """The compiled helper, loaded on first use and checked against libunicorn."""
    return _loader.get()


def _import_extension() -> ModuleType:
    """The compiled helper, checked to be built from the sources installed next to it."""
    reinstall = "reinstall pyvmm (pip install . or scripts/bootstrap) to build it"
    try:
        mod = importlib.import_module(pvtcg_build.MODULE_NAME)
    except ImportError as e:
        raise AccelError(f"the tcg accelerator's compiled helper {pvtcg_build.MODULE_NAME} is missing ({e}); "
                         f"{reinstall}") from None
    built = mod.ffi.string(mod.lib.pv_build_hash()).decode()
    if built != pvtcg_build.source_hash():
        raise AccelError(f"the tcg accelerator's compiled helper {pvtcg_build.MODULE_NAME} was built from "
                         f"other sources than pvtcg.c/pvtcg.h; {reinstall}")
    return mod


def _load() -> Native:
    import unicorn

    if unicorn.__version__ != UNICORN_VERSION:
        raise AccelError(f"the tcg accelerator needs unicorn=={UNICORN_VERSION}, found {unicorn.__version__}")
    mod = _import_extension()
    ffi, lib = mod.ffi, mod.lib
    fns = _unicorn_functions()
    _check_code(fns)
    rc = lib.pv_patch_msr(ffi.cast("void *", fns["helper_rdmsr_x86_64"]), _RDMSR_PROLOGUE,
                          ffi.cast("void *", fns["helper_wrmsr_x86_64"]), _WRMSR_PROLOGUE)
    if rc != 0:
        raise AccelError(f"could not interpose unicorn's rdmsr/wrmsr helpers (error {rc})")
    rc = lib.pv_patch_tsc(ffi.cast("void *", fns["helper_rdtsc_x86_64"]), _TSC_PROLOGUE,
                          ffi.cast("void *", fns["helper_rdtscp_x86_64"]), _TSC_PROLOGUE)
    if rc != 0:
        raise AccelError(f"could not interpose unicorn's rdtsc/rdtscp helpers (error {rc})")
    _patch_store_fast_path(ffi, lib, fns, fast=os.environ.get("PYVMM_TCG_STRICT_SMC") != "1")
    # PLT slots pointed at pvtcg.c's wrappers (each slot must hold the function or its lazy stub)
    _redirect(ffi, lib.pv_install_cross_engine, fns[_SMC_ANCHOR] - _SMC_ANCHOR_ADDR + _PROTECT_PLT_ADDR,
              "tlb_protect_code", fns["tlb_protect_code_x86_64"], fns["qemu_map_ram_ptr_x86_64"],
              fns["qemu_ram_addr_from_host_x86_64"])
    _redirect(ffi, lib.pv_install_hardirq, fns["x86_cpu_exec_interrupt_x86_64"] - _HARDIRQ_ANCHOR_ADDR
              + _HARDIRQ_PLT_ADDR, "do_interrupt_x86_hardirq", fns["do_interrupt_x86_hardirq_x86_64"])
    _redirect(ffi, lib.pv_install_kick, _call_target(fns["x86_cpu_exec_interrupt_x86_64"] + _SMM_CALL_OFFSET),
              "do_smm_enter", fns["do_smm_enter_x86_64"])
    _redirect(ffi, lib.pv_install_pause_exit, _call_target(fns["helper_pause_x86_64"] + _PAUSE_CALL_OFFSET),
              "cpu_svm_check_intercept_param", fns["cpu_svm_check_intercept_param_x86_64"])
    log.debug("tcg helper loaded from %s", mod.__file__)
    return Native(ffi, lib, fns)


def _call_target(call_addr: int) -> int:
    """Where the ``call rel32`` at ``call_addr`` goes."""
    return call_addr + 5 + int.from_bytes(ctypes.string_at(call_addr + 1, 4), "little", signed=True)


def _redirect(ffi, install, plt: int, what: str, *args: int) -> None:
    """Point the PLT entry ``plt`` (calls to ``what``) at a pvtcg.c wrapper through ``install``."""
    if ctypes.string_at(plt, 2) != b"\xff\x25":
        raise AccelError(f"unicorn's PLT entry for {what} is not where expected")
    rc = install(ffi.cast("void *", plt), *(ffi.cast("void *", a) for a in args))
    if rc != 0:
        raise AccelError(f"could not redirect unicorn's calls to {what} (error {rc})")


def _patch_store_fast_path(ffi, lib, fns: dict[str, int], fast: bool) -> None:
    # First make the slow path drop every translation on the page (pvtcg.c explains why; it
    # also serves other engines of an SMP machine), and only then, if ``fast``, let the
    # entries of executable mappings become dirty.
    plt = fns[_SMC_ANCHOR] - _SMC_ANCHOR_ADDR + _INVAL_FAST_PLT_ADDR
    rc = lib.pv_install_store_invalidate(ffi.cast("void *", plt),
                                         ffi.cast("void *", fns["tb_invalidate_phys_page_fast_x86_64"]),
                                         ffi.cast("void *", fns["tb_invalidate_phys_range_x86_64"]))
    if rc != 0:
        raise AccelError(f"could not wrap unicorn's code-invalidation on stores (error {rc})")
    if not fast:
        return
    site = fns[_SMC_ANCHOR] - _SMC_ANCHOR_ADDR + _SMC_SITE_ADDR
    have = ctypes.string_at(site, len(_SMC_EXPECTED))
    if have == _SMC_PATCHED:
        return
    if have != _SMC_EXPECTED:
        raise AccelError(f"unicorn's notdirty_write is not the code the tcg accelerator expects "
                         f"(have {have.hex()}); reinstall unicorn=={UNICORN_VERSION} or set PYVMM_TCG_STRICT_SMC=1")
    rc = lib.pv_patch_code(ffi.cast("void *", site), _SMC_PATCHED, len(_SMC_PATCHED))
    if rc != 0:
        raise AccelError(f"could not patch unicorn's store path (error {rc})")


def _unicorn_functions() -> dict[str, int]:
    from unicorn.unicorn_py3.unicorn import uclib

    names = ["x86_cpu_do_interrupt_x86_64", "do_interrupt_x86_hardirq_x86_64", "cpu_loop_exit_x86_64",
             "uc_emu_stop", "uc_reg_read", "uc_reg_write", "uc_hook_add", "qemu_get_cpu_x86_64",
             "helper_hlt_x86_64", "helper_rdmsr_x86_64", "helper_wrmsr_x86_64", "helper_rdtsc_x86_64",
             "helper_rdtscp_x86_64", "tb_flush_x86_64",
             "cpu_x86_cpuid_x86_64", "x86_cpu_exec_interrupt_x86_64", "helper_le_stq_mmu_x86_64",
             "check_exit_request_x86_64", "cpu_exit", "qemu_ram_addr_from_host_x86_64",
             "tb_invalidate_phys_range_x86_64", "tb_invalidate_phys_page_fast_x86_64",
             "do_smm_enter_x86_64", "tlb_protect_code_x86_64", "qemu_map_ram_ptr_x86_64",
             "helper_pause_x86_64", "cpu_svm_check_intercept_param_x86_64"]
    out = {}
    for n in names:
        try:
            out[n] = ctypes.cast(getattr(uclib, n), ctypes.c_void_p).value or 0
        except AttributeError:
            raise AccelError(f"libunicorn does not export {n}: not the unicorn {UNICORN_VERSION} build "
                             "the tcg accelerator was written for") from None
    return out


def _check_code(fns: dict[str, int]) -> None:
    for name, expected in _EXPECTED_CODE.items():
        base, _, off = name.partition("+")
        have = ctypes.string_at(fns[base] + (int(off, 16) if off else 0), len(expected))
        if name in _INTERPOSED and have[:2] == b"\xff\x25":
            continue  # already interposed by this process
        if have != expected:
            raise AccelError(f"unicorn's {name} is not the code the tcg accelerator expects "
                             f"(have {have.hex()}, want {expected.hex()}); its private CPU layout "
                             "may differ - reinstall unicorn==" + UNICORN_VERSION)


def selfcheck_engine(nat: Native, uc, v) -> None:
    """Probe the private offsets on a live engine: registers written through unicorn's API
    must appear where pvtcg.c reads them.  Raises AccelError on any mismatch."""
    from unicorn import x86_const as X

    ffi = nat.ffi
    env = ffi.cast("uint8_t *", v.env)

    def u64(off: int) -> int:
        return ffi.cast("uint64_t *", env + off)[0]

    def u32(off: int) -> int:
        return ffi.cast("uint32_t *", env + off)[0]

    saved = {r: uc.reg_read(r) for r in (X.UC_X86_REG_RAX, X.UC_X86_REG_RCX, X.UC_X86_REG_RIP,
                                         X.UC_X86_REG_CR0)}
    problems = []
    uc.reg_write(X.UC_X86_REG_RAX, 0x1122334455667788)
    uc.reg_write(X.UC_X86_REG_RCX, 0x0123456789ABCDEF)
    uc.reg_write(X.UC_X86_REG_RIP, 0xFEDCBA9876543210)
    if u64(0) != 0x1122334455667788 or u64(8) != 0x0123456789ABCDEF:
        problems.append("general registers")
    if u64(ENV_EIP) != 0xFEDCBA9876543210:
        problems.append("eip")
    if u64(ENV_CR0) != saved[X.UC_X86_REG_CR0]:
        problems.append("cr0")
    uc.reg_write(X.UC_X86_REG_RFLAGS, 0x202)
    if u64(ENV_EFLAGS) & 0x200 != 0x200:
        problems.append("eflags")
    nat.lib.pv_load_seg(v, 2, 0x2B, 0, 0xFFFFFFFF, 0x00CFF300)      # SS, DPL 3
    if u32(ENV_HFLAGS) & 3 != 3 or uc.reg_read(X.UC_X86_REG_SS) != 0x2B:
        problems.append("hflags/segments")
    nat.lib.pv_load_seg(v, 2, 0x18, 0, 0xFFFFFFFF, 0x00CF9300)
    if u32(ENV_HFLAGS) & 3 != 0:
        problems.append("hflags")
    if not u32(ENV_HFLAGS2) & HF2_GIF:
        problems.append("hflags2 (GIF clear: kicks could not stop the vCPU)")
    for r, val in saved.items():
        uc.reg_write(r, val)
    if problems:
        raise AccelError("unicorn's CPU state layout is not what the tcg accelerator expects ("
                         + ", ".join(problems) + "); reinstall unicorn==" + UNICORN_VERSION)


def set_no_exit_request(uc_handle: int) -> None:
    """Drop unicorn's per-memory-access exit checks for this engine (see UC_NO_EXIT_REQUEST_OFFSET)."""
    if os.environ.get("PYVMM_TCG_EXIT_CHECKS") == "1":
        return
    ctypes.c_uint8.from_address(uc_handle + UC_NO_EXIT_REQUEST_OFFSET).value = 1


def fill_fns(nat: Native, v) -> None:
    """Point a ``struct pv_vcpu``'s function table at libunicorn."""
    ffi, f = nat.ffi, nat.fns
    v.fns.do_interrupt = ffi.cast("void (*)(void *)", f["x86_cpu_do_interrupt_x86_64"])
    v.fns.hardirq = ffi.cast("void (*)(void *, int, int)", f["do_interrupt_x86_hardirq_x86_64"])
    v.fns.loop_exit = ffi.cast("void (*)(void *)", f["cpu_loop_exit_x86_64"])
    v.fns.emu_stop = ffi.cast("int (*)(void *)", f["uc_emu_stop"])
    v.fns.reg_read = ffi.cast("int (*)(void *, int, void *)", f["uc_reg_read"])
    v.fns.reg_write = ffi.cast("int (*)(void *, int, const void *)", f["uc_reg_write"])
    v.fns.hook_add = ffi.cast("int (*)(void *, size_t *, int, void *, void *, uint64_t, uint64_t, ...)",
                              f["uc_hook_add"])
    v.fns.get_cpu = ffi.cast("char *(*)(void *, int)", f["qemu_get_cpu_x86_64"])
    v.fns.cpu_exit = ffi.cast("void (*)(void *)", f["cpu_exit"])
    v.fns.ram_addr_from_host = ffi.cast("uint64_t (*)(void *, void *)", f["qemu_ram_addr_from_host_x86_64"])
    v.fns.tb_invalidate_range = ffi.cast("void (*)(void *, uint64_t, uint64_t)",
                                         f["tb_invalidate_phys_range_x86_64"])
