"""One tcg vCPU: a unicorn engine, its hooks, and the thread that runs it.

The engine shares guest RAM with the device models (``mem_map_ptr`` on the
GuestMemory host mappings) and sends port I/O and everything in the 32-bit
MMIO hole (and above RAM) to the machine's buses.  The compiled hooks
(pvtcg.c) deliver exceptions and interrupts through the guest's IDT, emulate
``syscall``, and serve the TSC and a few MSRs; the irqchip raises INTR with
:meth:`TcgVcpu.set_intr`, and pause/stop/code invalidation leave ``emu_start``
at the next block boundary through :meth:`TcgVcpu.kick`.  This class decides what to do when
``emu_start`` returns: idle on ``hlt`` until INTR (no CPU burnt), report a
triple fault as a reset request, or report an emulation error with a
register dump.
"""

from __future__ import annotations

import logging
import threading
import weakref
from typing import Any

import unicorn
from unicorn import x86_const as X

from pyvmm.accel.base import MachineContext
from pyvmm.accel.tcg import native as nat_mod
from pyvmm.accel.tcg.turns import Turns
from pyvmm.cpu_state import CpuState, Segment
from pyvmm.errors import AccelError
from pyvmm.ratelimit import guest_log
from pyvmm.x86 import layout
from pyvmm.x86.boot_tables import real_mode_state
from pyvmm.x86.cpuid import CpuidTable

log = logging.getLogger(__name__)

CPU_MODELS = {
    "host": X.UC_CPU_X86_SKYLAKE_CLIENT,
    "max": X.UC_CPU_X86_SKYLAKE_CLIENT,
    "qemu64": X.UC_CPU_X86_QEMU64,
    "skylake": X.UC_CPU_X86_SKYLAKE_CLIENT,
    "haswell": X.UC_CPU_X86_HASWELL,
    "nehalem": X.UC_CPU_X86_NEHALEM,
}

_SEG_REGS = (("es", 0), ("cs", 1), ("ss", 2), ("ds", 3), ("fs", 4), ("gs", 5))
_GPRS = (("rax", X.UC_X86_REG_RAX), ("rbx", X.UC_X86_REG_RBX), ("rcx", X.UC_X86_REG_RCX),
         ("rdx", X.UC_X86_REG_RDX), ("rsi", X.UC_X86_REG_RSI), ("rdi", X.UC_X86_REG_RDI),
         ("rsp", X.UC_X86_REG_RSP), ("rbp", X.UC_X86_REG_RBP), ("r8", X.UC_X86_REG_R8),
         ("r9", X.UC_X86_REG_R9), ("r10", X.UC_X86_REG_R10), ("r11", X.UC_X86_REG_R11),
         ("r12", X.UC_X86_REG_R12), ("r13", X.UC_X86_REG_R13), ("r14", X.UC_X86_REG_R14),
         ("r15", X.UC_X86_REG_R15))
MSR_EFER = 0xC0000080
IF_MASK = 0x200
EXCP_DOUBLE_FAULT = 8
FOUR_GIB = 1 << 32
PHYS_LIMIT = 1 << 40          # CPUID 0x80000008 reports 40 physical address bits


def seg_flags(s: Segment) -> int:
    """CpuState's unpacked segment as QEMU's SegmentCache.flags (descriptor high dword bits)."""
    if s.unusable:
        return 0
    return ((s.type & 0xF) << 8) | (s.s << 12) | ((s.dpl & 3) << 13) | (s.present << 15) | (s.avl << 20) \
        | (s.l << 21) | (s.db << 22) | (s.g << 23)


class TcgVcpu:
    """A vCPU.  ``intc`` is the irqchip (ack / bind_current_cpu); ``port_io`` handles IN/OUT."""

    def __init__(self, index: int, ctx: MachineContext, intc, cpuid: CpuidTable | None, tsc_hz: int,
                 model: int, turns: Turns | None = None) -> None:
        self.index = index
        self.ctx = ctx
        self.intc = intc
        self.cpuid = cpuid or CpuidTable()   # the accelerator fills it from native_cpuid()
        self.tsc_hz = tsc_hz
        self.model = model
        self.nat = nat_mod.native()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._quit = False
        self._paused = False
        self._parked = threading.Event()
        self._dead = False                  # stopped itself after a triple fault or an error
        self.turns = turns                  # SMP: one engine runs guest code at a time
        self._wait_sipi = False             # an AP after power-on or INIT: parked until a SIPI
        self._init_pending = False
        self._sipi_vector: int | None = None
        self.exits = {"hlt": 0, "kick": 0, "triple_fault": 0, "error": 0}
        self.uc: unicorn.Uc | None = None
        self._v: Any = None                 # the cffi ``struct pv_vcpu *`` (untyped)
        self._ack_cb = None
        self._keep: list[object] = []
        self._create_engine()

    # -- engine ---------------------------------------------------------------------------------
    def _create_engine(self) -> None:
        ffi, lib = self.nat.ffi, self.nat.lib
        uc = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_64)
        uc.ctl_set_cpu_model(self.model)
        nat_mod.set_no_exit_request(uc._uch.value)
        mem = self.ctx.memory
        for r in mem.regions:
            uc.mem_map_ptr(r.gpa, r.size, unicorn.UC_PROT_ALL, r.host_addr)
        hole = mem.below_4g
        if hole < FOUR_GIB:
            uc.mmio_map(hole, FOUR_GIB - hole, self._mmio_read, hole, self._mmio_write, hole)
        # Everything above RAM up to the CPU's physical address width also goes to the MMIO bus
        # (unassigned: reads all-ones), as on a PC, instead of stopping the engine.
        top = max((r.end for r in mem.regions), default=0)
        above = max(top, FOUR_GIB)
        if above < PHYS_LIMIT:
            uc.mmio_map(above, PHYS_LIMIT - above, self._mmio_read, above, self._mmio_write, above)
        uc.ctl_exits_enabled(True)          # no 'until' address: run until a hook stops us
        uc.hook_add(unicorn.UC_HOOK_INSN, self._in, None, 1, 0, X.UC_X86_INS_IN)
        uc.hook_add(unicorn.UC_HOOK_INSN, self._out, None, 1, 0, X.UC_X86_INS_OUT)
        uc.hook_add(unicorn.UC_HOOK_INSN, self._cpuid, None, 1, 0, X.UC_X86_INS_CPUID)
        v = ffi.new("struct pv_vcpu *")
        nat_mod.fill_fns(self.nat, v)
        v.uc = ffi.cast("void *", uc._uch.value)
        self._ack_cb = ffi.callback("int(struct pv_vcpu *)", self._ack, onerror=self._ack_error)
        v.ack = self._ack_cb
        self._deadline_cb = ffi.callback("void(struct pv_vcpu *)", self._tsc_deadline_written,
                                         onerror=self._ack_error)
        v.deadline_written = self._deadline_cb
        self._apic_base_cb = ffi.callback("void(struct pv_vcpu *)", self._apic_base_written,
                                          onerror=self._ack_error)
        v.apic_base_written = self._apic_base_cb
        v.tsc_hz = self.tsc_hz
        v.apic_base = layout.LAPIC_ADDR | (1 << 11) | ((1 << 8) if self.index == 0 else 0)
        lib.pv_tsc_set(v, 0)
        rc = lib.pv_attach(v)
        if rc != 0:
            raise AccelError(f"tcg: could not install the compiled hooks (unicorn error {rc})")
        nat_mod.selfcheck_engine(self.nat, uc, v)
        # whatever drops this vCPU, the C registry must forget the struct before it is freed
        self._finalizer = weakref.finalize(self, lib.pv_detach, v)
        self.uc = uc
        self._v = v
        self._native_cpuid = ffi.cast("void (*)(char *, uint32_t, uint32_t, uint32_t *, uint32_t *, "
                                      "uint32_t *, uint32_t *)", self.nat.fns["cpu_x86_cpuid_x86_64"])

    def copy_tsc_from(self, other: TcgVcpu) -> None:
        """Count the same virtual TSC as ``other`` (SMP: synchronized TSCs)."""
        self._v.tsc_epoch_ns = other._v.tsc_epoch_ns
        self._v.tsc_at_epoch = other._v.tsc_at_epoch

    def native_cpuid(self, leaf: int, subleaf: int) -> tuple[int, int, int, int]:
        """The CPU model's own CPUID answer (what unicorn's TCG can execute)."""
        ffi = self.nat.ffi
        out = ffi.new("uint32_t[4]")
        self._native_cpuid(self._v.env, leaf, subleaf, out + 0, out + 1, out + 2, out + 3)
        return out[0], out[1], out[2], out[3]

    def destroy(self) -> None:
        if self._v is not None:
            self._finalizer()
        self._keep.append(self._v)          # the C struct must outlive any late callback
        self.uc = None
        self._v = None

    def recreate(self) -> None:
        """Power-on state: a fresh engine (also drops every translated block)."""
        self.destroy()
        self._dead = False
        self._init_pending = False
        self._sipi_vector = None
        self._create_engine()

    # -- code written by the host ---------------------------------------------------------------
    def invalidate_code(self, gpa: int, length: int) -> None:
        """Guest RAM ``[gpa, gpa+length)`` was written by the host (device DMA, a loader).

        Translated code for those pages must go before the guest runs again.  The engine is
        not thread-safe, so the range is queued (pvtcg.c, ``pv_note_written``) and the vCPU
        is kicked: it drops the translations itself at its next block boundary, without
        leaving ``emu_start``, or before it next enters it.
        """
        v = self._v
        if v is None:
            return
        lib, mem = self.nat.lib, self.ctx.memory
        end = gpa + length
        while gpa < end:
            try:
                r = mem.region_for(gpa)
            except Exception:
                break                       # not RAM: nothing can be translated there
            chunk = min(end, r.end) - gpa
            lib.pv_note_written(v, r.host_addr + (gpa - r.gpa), chunk)
            gpa += chunk
        # also from the vCPU thread itself (a device's DMA inside a port or MMIO hook): the
        # translations go at the next block boundary, before the guest can branch to the data
        lib.pv_kick(v, 0)

    # -- hooks (Python) -------------------------------------------------------------------------
    def _in(self, uc, port: int, size: int, user_data) -> int:
        return self.ctx.io_bus.read(port, size)

    def _out(self, uc, port: int, size: int, value: int, user_data) -> None:
        self.ctx.io_bus.write(port, size, value)

    def _mmio_read(self, uc, offset: int, size: int, base: int) -> int:
        return self.ctx.mmio_bus.read(base + offset, size)

    def _mmio_write(self, uc, offset: int, size: int, value: int, base: int) -> None:
        self.ctx.mmio_bus.write(base + offset, size, value)

    def _cpuid(self, uc, user_data) -> int:
        leaf = uc.reg_read(X.UC_X86_REG_RAX) & 0xFFFFFFFF
        sub = uc.reg_read(X.UC_X86_REG_RCX) & 0xFFFFFFFF
        a, b, c, d = self.cpuid.lookup(leaf, sub)
        if leaf == 1:
            # OSXSAVE and APIC-enabled track CR4 and APIC_BASE, as on hardware
            if not self._v.apic_base & (1 << 11):
                d &= ~(1 << 9)
        uc.reg_write(X.UC_X86_REG_RAX, a)
        uc.reg_write(X.UC_X86_REG_RBX, b)
        uc.reg_write(X.UC_X86_REG_RCX, c)
        uc.reg_write(X.UC_X86_REG_RDX, d)
        return 1

    def _ack(self, v) -> int:
        return self.intc.ack(self.index)

    def _tsc_deadline_written(self, v) -> None:
        """IA32_TSC_DEADLINE written: tell the LAPIC when (host time) that TSC value is reached."""
        deadline = v.tsc_deadline
        when = None
        if deadline:
            delta = deadline - v.tsc_at_epoch
            when = v.tsc_epoch_ns + max(0, delta) * 1_000_000_000 // self.tsc_hz
        self.intc.set_tsc_deadline(self.index, when)

    def _apic_base_written(self, v) -> None:
        """IA32_APIC_BASE's global-enable bit changed: the irqchip switches this CPU's LAPIC."""
        self.intc.set_apic_global_enable(self.index, bool(v.apic_base & (1 << 11)))

    def _ack_error(self, exc_type, exc, tb) -> None:
        log.error("tcg: interrupt acknowledge failed: %s", exc)

    # -- irqchip side ---------------------------------------------------------------------------
    def set_intr(self, level: bool) -> None:
        """The irqchip's INTR line (called under the irqchip lock, from any thread)."""
        v = self._v
        if v is None:
            return
        self.nat.lib.pv_set_intr(v, 1 if level else 0)
        if level:
            with self._cond:
                self._cond.notify_all()

    def raise_nmi(self) -> None:
        """An NMI for this CPU (QEMU's NMI path: vector 2, blocked until the handler's IRET)."""
        v = self._v
        if v is None:
            return
        self.nat.lib.pv_raise_nmi(v)
        with self._cond:
            self._cond.notify_all()

    def kick(self) -> None:
        """Leave emu_start at the next block boundary (or wake from hlt).

        Any thread may call this.  It never calls ``uc_emu_stop`` itself: the request goes
        through the CPU's interrupt-request word and the vCPU thread stops the engine
        between two blocks (pvtcg.c, "kicks").  A kick that arrives between two
        ``emu_start`` calls stays pending and ends the next one at once.
        """
        v = self._v
        if v is not None:
            self.nat.lib.pv_kick(v, 1)
        with self._cond:
            self._cond.notify_all()

    # -- boot state -----------------------------------------------------------------------------
    def set_state(self, st: CpuState) -> None:
        uc, lib, v = self.uc, self.nat.lib, self._v
        assert uc is not None
        # Leave unicorn's default long mode: with PAE on, toggling PG clears EFER.LMA.
        uc.reg_write(X.UC_X86_REG_CR4, 0x20)
        uc.reg_write(X.UC_X86_REG_CR0, 0x80000011)
        uc.reg_write(X.UC_X86_REG_CR0, 0x11)
        uc.reg_write(X.UC_X86_REG_MSR, (MSR_EFER, st.efer & ~(1 << 10)))
        uc.reg_write(X.UC_X86_REG_CR4, st.cr4)
        uc.reg_write(X.UC_X86_REG_CR3, st.cr3)
        uc.reg_write(X.UC_X86_REG_CR0, st.cr0)   # PG with EFER.LME sets LMA again
        if bool(lib.pv_hflags(v) & (1 << 14)) != bool(st.efer & (1 << 10)):
            raise AccelError("tcg: boot state has EFER.LMA without CR0.PG/CR4.PAE/EFER.LME (or the reverse)")
        uc.reg_write(X.UC_X86_REG_GDTR, (0, st.gdt[0], st.gdt[1], 0))
        uc.reg_write(X.UC_X86_REG_IDTR, (0, st.idt[0], st.idt[1], 0))
        uc.reg_write(X.UC_X86_REG_TR, (st.tr.selector, st.tr.base, st.tr.limit, seg_flags(st.tr)))
        uc.reg_write(X.UC_X86_REG_LDTR, (st.ldt.selector, st.ldt.base, st.ldt.limit, seg_flags(st.ldt)))
        segs = st.segments()
        # CS first (its L/D bits decide 64/32-bit), SS next (it carries the CPL)
        for name, idx in sorted(_SEG_REGS, key=lambda t: {"cs": 0, "ss": 1}.get(t[0], 2)):
            s = segs[name]
            lib.pv_load_seg(v, idx, s.selector, s.base, s.limit, seg_flags(s))
        for name, reg in _GPRS:
            uc.reg_write(reg, st.regs.get(name, 0))
        uc.reg_write(X.UC_X86_REG_RFLAGS, st.regs.get("rflags", 0x2) | 0x2)
        uc.reg_write(X.UC_X86_REG_RIP, st.regs.get("rip", 0))
        lib.pv_clear_old_exception(v)

    # -- thread ---------------------------------------------------------------------------------
    @property
    def thread_id(self) -> int | None:
        t = self._thread
        return t.native_id if t is not None else None

    def start(self) -> None:
        if self._thread is not None:
            return
        self._quit = False
        self._thread = threading.Thread(target=self._main, name=f"tcg-vcpu{self.index}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._quit = True
        t = self._thread
        if t is not None and t is not threading.current_thread():
            while t.is_alive():
                self.kick()
                t.join(0.05)
        self._thread = None

    def pause(self) -> None:
        self._parked.clear()
        self._paused = True
        t = self._thread
        while t is not None and t.is_alive() and not self._parked.is_set():
            self.kick()
            self._parked.wait(0.05)

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    # -- INIT and SIPI (the irqchip, under its lock, from any thread) ----------------------------
    def wait_for_sipi(self) -> None:
        """Power-on state of an application processor: parked until a Startup IPI."""
        self._wait_sipi = True

    def init_ipi(self) -> None:
        """INIT: the CPU stops what it runs and waits for a SIPI (applied by its own thread)."""
        with self._cond:
            self._init_pending = True
            self._sipi_vector = None        # a SIPI counts only after the INIT before it
            self._cond.notify_all()
        self.kick()

    def startup_ipi(self, vector: int) -> None:
        """SIPI: a CPU waiting for one starts in real mode at ``vector << 12``."""
        with self._cond:
            if self._wait_sipi or self._init_pending:
                self._sipi_vector = vector
                self._cond.notify_all()

    def _apply_init_sipi(self) -> None:
        """vCPU thread, outside emu_start, with ``_cond`` held."""
        if self._init_pending:
            self._init_pending = False
            if self.index == 0:
                guest_log(log, logging.WARNING, "tcg: INIT to the boot CPU ignored")
            else:
                self._wait_sipi = True
        if self._wait_sipi and self._sipi_vector is not None:
            self.set_state(real_mode_state(self._sipi_vector << 8, 0, stack=(0, 0)))
            self._sipi_vector = None
            self._wait_sipi = False

    def _main(self) -> None:
        self.intc.bind_current_cpu(self.index)
        try:
            while True:
                with self._cond:
                    while not self._quit:
                        self._apply_init_sipi()
                        if not (self._paused or self._dead or self._wait_sipi):
                            break
                        self._parked.set()
                        self._cond.wait()
                    if self._quit:
                        return
                self._run_once()
        finally:
            self._parked.set()

    def _run_once(self) -> None:
        turns = self.turns
        if turns is None:
            halted = self._run_slice()
        else:
            turns.acquire(self)
            try:
                halted = self._run_slice()
            finally:
                turns.release(self)     # a halted vCPU does not hold the turn while it idles
        if halted:
            self._halt_wait()

    def _run_slice(self) -> bool:
        """One ``emu_start``; True if the guest executed hlt."""
        uc, lib, v = self.uc, self.nat.lib, self._v
        assert uc is not None
        if lib.pv_drop_stale(v):
            # the queue of written ranges overflowed (the ignore: mypy takes unicorn.Uc for the Python 2 class)
            uc.ctl_flush_tb()  # type: ignore[attr-defined]
        lib.pv_prepare_run(v)
        rip = uc.reg_read(X.UC_X86_REG_RIP)
        try:
            uc.emu_start(rip, 0)
        except unicorn.UcError as e:
            self._fatal(f"tcg: {e} at rip={uc.reg_read(X.UC_X86_REG_RIP):#x}")
            return False
        except Exception as e:  # a device model raised inside a hook
            log.exception("tcg: device error during guest execution")
            self._fatal(f"tcg: device error: {e}")
            return False
        halted = lib.pv_halted(v)
        if not halted and lib.pv_old_exception(v) == EXCP_DOUBLE_FAULT:
            self.exits["triple_fault"] += 1
            guest_log(log, logging.WARNING, "tcg: vCPU %d triple fault\n%s", self.index, self.dump())
            self._dead = True
            self.ctx.control.request_reset("triple fault")
            return False
        self.exits["hlt" if halted else "kick"] += 1
        return bool(halted)

    def _halt_wait(self) -> None:
        v, lib = self._v, self.nat.lib
        with self._cond:
            while not self._quit and not self._paused and not self._init_pending:
                if v.irq_request and lib.pv_eflags_raw(v) & IF_MASK:
                    return
                if lib.pv_nmi_pending(v):
                    return
                self._cond.wait()

    def _fatal(self, reason: str) -> None:
        self.exits["error"] += 1
        dump = self.dump()
        log.error("%s\n%s", reason, dump)
        self._dead = True
        self.ctx.control.request_error(f"{reason}\n{dump}")

    # -- introspection --------------------------------------------------------------------------
    @property
    def stats(self) -> dict[str, int]:
        v = self._v
        out = dict(self.exits)
        if v is not None:
            out.update(irqs=v.n_irq, exceptions=v.n_exc, syscalls=v.n_syscall, kicks_served=v.n_kick,
                       pause_yields=v.n_pause_yield)
        return out

    def dump(self) -> str:
        uc = self.uc
        if uc is None:
            return "(no engine)"
        r = {n: uc.reg_read(reg) for n, reg in _GPRS}
        rip = uc.reg_read(X.UC_X86_REG_RIP)
        rfl = uc.reg_read(X.UC_X86_REG_RFLAGS)
        lib, v = self.nat.lib, self._v
        hf = lib.pv_hflags(v)
        lines = [
            f"RAX={r['rax']:016x} RBX={r['rbx']:016x} RCX={r['rcx']:016x} RDX={r['rdx']:016x}",
            f"RSI={r['rsi']:016x} RDI={r['rdi']:016x} RBP={r['rbp']:016x} RSP={r['rsp']:016x}",
            f"R8 ={r['r8']:016x} R9 ={r['r9']:016x} R10={r['r10']:016x} R11={r['r11']:016x}",
            f"R12={r['r12']:016x} R13={r['r13']:016x} R14={r['r14']:016x} R15={r['r15']:016x}",
            f"RIP={rip:016x} RFL={rfl:08x} CPL={hf & 3} HFLAGS={hf:08x}",
        ]
        env = v.env
        ffi = self.nat.ffi
        for name, idx in _SEG_REGS:
            p = ffi.cast("uint8_t *", env) + nat_mod.ENV_SEGS + 24 * idx
            sel = ffi.cast("uint32_t *", p)[0]
            base = ffi.cast("uint64_t *", p + 8)[0]
            limit, flags = ffi.cast("uint32_t *", p + 16)[0], ffi.cast("uint32_t *", p + 20)[0]
            lines.append(f"{name.upper()} ={sel:04x} {base:016x} {limit:08x} {flags:08x}")
        gdt = uc.reg_read(X.UC_X86_REG_GDTR)
        idt = uc.reg_read(X.UC_X86_REG_IDTR)
        lines.append(f"GDT=     {gdt[1]:016x} {gdt[2]:08x}")
        lines.append(f"IDT=     {idt[1]:016x} {idt[2]:08x}")
        lines.append(f"CR0={uc.reg_read(X.UC_X86_REG_CR0):08x} CR2={uc.reg_read(X.UC_X86_REG_CR2):016x} "
                     f"CR3={uc.reg_read(X.UC_X86_REG_CR3):016x} CR4={uc.reg_read(X.UC_X86_REG_CR4):08x}")
        lines.append(f"EFER={uc.reg_read(X.UC_X86_REG_MSR, MSR_EFER):016x} last-exception={v.last_exception} "
                     f"irq_request={v.irq_request}")
        return "\n".join(lines)
