/*
 * Compiled hooks for the tcg accelerator (built with cffi, see native.py).
 *
 * Unicorn runs QEMU's TCG but leaves out the parts a full-system guest needs:
 * it never delivers exceptions or interrupts through the guest IDT, its
 * `syscall` only calls a hook, and rdmsr/wrmsr of APIC_BASE and TSC are
 * stubs.  QEMU's own delivery code is still inside libunicorn and exported,
 * so these hooks call it with the right CPU state.  They are C, not Python,
 * because (a) some run very often (rdtsc, syscall), and (b) QEMU reports a
 * fault during delivery with siglongjmp back into cpu_exec, which must never
 * unwind through Python frames.  Hardware interrupts use QEMU's own interrupt
 * window (see pv_set_intr); the few unicorn code paths we depend on are
 * redirected by small, byte-checked patches applied from native.py.
 *
 * The offsets below describe unicorn 2.1.4's X86CPU/CPUX86State; native.py
 * verifies them against the loaded library before anything runs.
 */
#include <stdint.h>
#include <string.h>
#include <time.h>
#include <sys/mman.h>
#include <unistd.h>
#include "pvtcg.h"

/* ---- unicorn 2.1.4 (x86_64 target) layout, checked by native.selfcheck ---- */
#define PV_ENV_OFF        0x8a50   /* X86CPU.env from the CPUState pointer */
#define PV_CS_HALTED      0x8198   /* CPUState.halted */
#define PV_CS_EXC_INDEX   0x81a0   /* CPUState.exception_index */
#define PV_EIP            0x80
#define PV_EFLAGS         0x88
#define PV_HFLAGS         0xb0
#define PV_SEGS           0xb8     /* SegmentCache segs[6], 24 bytes each */
#define PV_CR0            0x1a8
#define PV_EXC_IS_INT     0x1508
#define PV_ERROR_CODE     0x150c
#define PV_EXC_NEXT_EIP   0x1510
#define PV_OLD_EXCEPTION  0x1578

#define HF_CPL_MASK       3u
#define HF_INHIBIT_IRQ    (1u << 3)
#define HF_CS32           (1u << 4)
#define HF_SS32           (1u << 5)
#define HF_ADDSEG         (1u << 6)
#define HF_LMA            (1u << 14)
#define HF_CS64           (1u << 15)

#define DESC_A   (1u << 8)
#define DESC_W   (1u << 9)
#define DESC_R   (1u << 9)
#define DESC_CS  (1u << 11)
#define DESC_S   (1u << 12)
#define DESC_P   (1u << 15)
#define DESC_L   (1u << 21)
#define DESC_B   (1u << 22)
#define DESC_G   (1u << 23)

#define R_ES 0
#define R_CS 1
#define R_SS 2
#define R_DS 3

#define UC_HOOK_INTR 1
#define UC_HOOK_INSN 2
#define UC_HOOK_INSN_INVALID 16384
#define UC_X86_INS_RDTSC 608
#define UC_X86_INS_RDTSCP 609
#define UC_X86_INS_SYSCALL 699
#define UC_X86_REG_MSR 248
#define UC_X86_REG_RFLAGS 253

#define MSR_TSC         0x10u
#define MSR_TSC_ADJUST  0x3bu
#define MSR_APIC_BASE   0x1bu
#define MSR_TSC_DEADLINE 0x6e0u
#define MSR_EFER        0xc0000080u
#define MSR_STAR        0xc0000081u
#define MSR_LSTAR       0xc0000082u
#define MSR_FMASK       0xc0000084u
#define MSR_TSC_AUX     0xc0000103u
#define MSR_ARCH_CAPABILITIES 0x10au
#define MSR_MISC_ENABLE 0x1a0u
/* fast strings, BTS and PEBS unavailable */
#define PV_MISC_ENABLE ((1ull << 0) | (1ull << 11) | (1ull << 12))
/* RDCL_NO, SKIP_L1DFL_VMENTRY, SSB_NO, MDS_NO, PSCHANGE_MC_NO, TAA_NO, SBDR_SSDP_NO, FBSDP_NO,
 * PSDP_NO, BHI_NO, PBRSB_NO, GDS_NO, RFDS_NO: a TCG CPU has none of these speculation bugs. */
#define PV_ARCH_CAPABILITIES ((1ull << 0) | (1ull << 3) | (1ull << 4) | (1ull << 5) | (1ull << 6) | \
                              (1ull << 8) | (1ull << 13) | (1ull << 14) | (1ull << 15) | (1ull << 20) | \
                              (1ull << 24) | (1ull << 26) | (1ull << 27))

struct pv_segcache {
    uint32_t selector;
    uint32_t pad;
    uint64_t base;
    uint32_t limit;
    uint32_t flags;
};
_Static_assert(sizeof(struct pv_segcache) == 24, "SegmentCache is 24 bytes");

struct pv_msr { uint32_t rid; uint64_t value; };

#define PV_MAX_VCPUS 64
static struct pv_vcpu *pv_registry[PV_MAX_VCPUS];

static inline uint64_t *pv_u64(char *base, int off) { return (uint64_t *)(base + off); }
static inline uint32_t *pv_u32(char *base, int off) { return (uint32_t *)(base + off); }
static inline struct pv_segcache *pv_seg(char *env, int seg)
{
    return (struct pv_segcache *)(env + PV_SEGS + seg * (int)sizeof(struct pv_segcache));
}

static uint64_t pv_host_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

uint64_t pv_now_ns(void) { return pv_host_ns(); }

uint64_t pv_tsc_now(struct pv_vcpu *v)
{
    uint64_t dt = pv_host_ns() - v->tsc_epoch_ns;
    return v->tsc_at_epoch + (uint64_t)(((unsigned __int128)dt * v->tsc_hz) / 1000000000ull);
}

void pv_tsc_set(struct pv_vcpu *v, uint64_t value)
{
    v->tsc_epoch_ns = pv_host_ns();
    v->tsc_at_epoch = value;
}

/* --- segment loading with QEMU's hidden-flag bookkeeping (cpu_x86_load_seg_cache) --- */
void pv_load_seg(struct pv_vcpu *v, int seg, uint32_t selector, uint64_t base, uint32_t limit,
                 uint32_t flags)
{
    char *env = v->env;
    struct pv_segcache *sc = pv_seg(env, seg);
    uint32_t hf = *pv_u32(env, PV_HFLAGS);
    uint32_t nhf;

    sc->selector = selector;
    sc->base = base;
    sc->limit = limit;
    sc->flags = flags;
    if (seg == R_CS) {
        if ((hf & HF_LMA) && (flags & DESC_L)) {
            hf |= HF_CS32 | HF_SS32 | HF_CS64;
        } else {
            hf = (hf & ~(HF_CS32 | HF_CS64)) | ((flags & DESC_B) >> (22 - 4));
        }
    }
    if (seg == R_SS) {
        hf = (hf & ~HF_CPL_MASK) | ((flags >> 13) & 3);
    }
    nhf = (pv_seg(env, R_SS)->flags & DESC_B) >> (22 - 5);
    if (hf & HF_CS64) {
        /* long mode: ES/DS/SS bases are ignored */
    } else if (!(*pv_u64(env, PV_CR0) & 1) || (*pv_u64(env, PV_EFLAGS) & (1u << 17)) || !(hf & HF_CS32)) {
        nhf |= HF_ADDSEG;
    } else if ((pv_seg(env, R_DS)->base | pv_seg(env, R_ES)->base | pv_seg(env, R_SS)->base) != 0) {
        nhf |= HF_ADDSEG;
    }
    *pv_u32(env, PV_HFLAGS) = (hf & ~(HF_SS32 | HF_ADDSEG)) | nhf;
}

/* --- hooks ---------------------------------------------------------------- */

/* --- maskable interrupts through QEMU's own interrupt window ----------------------
 * The irqchip raises CPU_INTERRUPT_HARD in CPUState.interrupt_request and kicks the CPU
 * (cpu_exit: the check at the next block start returns to cpu_exec's loop).  QEMU then
 * delivers when EFLAGS.IF is set and no sti/mov-ss shadow is active, and re-checks whenever
 * the guest enables interrupts (sti, popf, iret end their block).  Unicorn hardcodes vector 0
 * for that path (it has no PIC); its call to do_interrupt_x86_hardirq goes through the PLT, so
 * the GOT slot is pointed at pv_hardirq_wrapper, which asks the irqchip for the real vector
 * (the interrupt acknowledge cycle).  Other callers (NMI, machine check) pass through.
 */
#define PV_CS_INTERRUPT_REQUEST 0x1c
#define CPU_INTERRUPT_HARD 0x0002
#define CPU_INTERRUPT_NMI  0x0200

static void (*pv_real_hardirq)(void *env, int intno, int is_hw);
static struct pv_vcpu *pv_lookup(char *env);

static void pv_hardirq_wrapper(void *env, int intno, int is_hw)
{
    if (intno == 0 && is_hw == 1) {
        struct pv_vcpu *v = pv_lookup(env);
        if (v) {
            int vec = v->ack(v);
            /* the CPU cleared HARD before calling us; more may be pending */
            if (v->irq_request)
                __atomic_fetch_or((int *)(v->cs + PV_CS_INTERRUPT_REQUEST), CPU_INTERRUPT_HARD,
                                  __ATOMIC_SEQ_CST);
            if (vec < 0)
                return;                    /* withdrawn before acknowledge: nothing to deliver */
            v->n_irq++;
            intno = vec;
        }
    }
    pv_real_hardirq(env, intno, is_hw);
}

/* The irqchip's INTR line for this CPU (any thread). */
void pv_set_intr(struct pv_vcpu *v, int level)
{
    int *req = (int *)(v->cs + PV_CS_INTERRUPT_REQUEST);
    v->irq_request = level;
    if (level) {
        __atomic_fetch_or(req, CPU_INTERRUPT_HARD, __ATOMIC_SEQ_CST);
        v->fns.cpu_exit(v->cs);
    } else {
        __atomic_fetch_and(req, ~CPU_INTERRUPT_HARD, __ATOMIC_SEQ_CST);
    }
}

void pv_raise_nmi(struct pv_vcpu *v)
{
    __atomic_fetch_or((int *)(v->cs + PV_CS_INTERRUPT_REQUEST), CPU_INTERRUPT_NMI, __ATOMIC_SEQ_CST);
    v->fns.cpu_exit(v->cs);
}

int pv_nmi_pending(struct pv_vcpu *v)
{
    return (*(int *)(v->cs + PV_CS_INTERRUPT_REQUEST) & CPU_INTERRUPT_NMI) != 0;
}

/* Point the GOT slot behind a PLT entry (`jmp *slot(%rip)`) at `wrapper`. */
static int pv_plt_redirect(void *plt_entry, void *real_fn, void *wrapper)
{
    unsigned char *plt = plt_entry;
    int32_t disp;
    void **slot;
    long pg = sysconf(_SC_PAGESIZE);
    unsigned char *page;

    if (plt[0] != 0xff || plt[1] != 0x25)
        return -1;
    memcpy(&disp, plt + 2, 4);
    slot = (void **)(plt + 6 + disp);
    if (*slot == wrapper)
        return 0;
    if (*slot != real_fn && *slot != (void *)(plt + 6))
        return -2;                          /* neither resolved to the function nor lazy */
    page = (unsigned char *)((uintptr_t)slot & ~((uintptr_t)pg - 1));
    if (mprotect(page, (size_t)pg, PROT_READ | PROT_WRITE))
        return -3;
    __atomic_store_n(slot, wrapper, __ATOMIC_SEQ_CST);
    return 0;
}

int pv_install_hardirq(void *plt_entry, void *real_fn)
{
    if (pv_real_hardirq)
        return 0;
    pv_real_hardirq = real_fn;
    return pv_plt_redirect(plt_entry, real_fn, (void *)pv_hardirq_wrapper);
}

/* --- kicks: leave emu_start at the next block boundary, decided in the vCPU thread --------
 * uc_emu_stop called from another thread sets uc->stop_request at an arbitrary point, and
 * unicorn's instruction-hook walks (syscall, cpuid, in/out, rdtsc, memory hooks) give up as
 * soon as they see it: a syscall that lands in that window is skipped (EIP advances, nothing
 * runs) and the guest computes garbage.  So another thread only raises a request bit and
 * calls cpu_exit, exactly as the irqchip does for INTR.  The bit is CPU_INTERRUPT_SMI: the
 * machine has no SMM, x86_cpu_exec_interrupt serves it ahead of NMI and INTR whatever
 * EFLAGS.IF is (only GIF, which no guest can clear without SVM, gates it), and it calls
 * do_smm_enter through the PLT.  That slot points at pv_kick_wrapper, which runs in the vCPU
 * thread between two blocks and stops the engine there with uc_emu_stop.
 */
#define CPU_INTERRUPT_SMI 0x0040

static void (*pv_real_smm_enter)(void *cpu);

static void pv_stale_lock(struct pv_vcpu *v)
{
    while (__atomic_exchange_n(&v->stale_lock, 1, __ATOMIC_ACQUIRE))
        __builtin_ia32_pause();
}

static void pv_stale_unlock(struct pv_vcpu *v)
{
    __atomic_store_n(&v->stale_lock, 0, __ATOMIC_RELEASE);
}

/* vCPU thread only (between two blocks, or outside emu_start): drop the translations of the
   queued ranges.  Writers keep appending to the other buffer meanwhile.  Returns 1 if the
   queue had overflowed (the caller then flushes every translation). */
int pv_drop_stale(struct pv_vcpu *v)
{
    uint32_t b, n;
    int overflow;
    struct pv_stale *batch;

    pv_stale_lock(v);
    b = v->stale_fill;
    n = v->n_stale[b];
    overflow = v->stale_overflow;
    v->stale_fill = b ^ 1;
    v->n_stale[b ^ 1] = 0;
    v->stale_overflow = 0;
    pv_stale_unlock(v);
    if (overflow)
        return 1;
    batch = v->stale[b];
    for (uint32_t i = 0; i < n; i++) {
        uint64_t ram = v->fns.ram_addr_from_host(v->uc, (void *)(uintptr_t)batch[i].host);
        if (ram != UINT64_MAX)
            v->fns.tb_invalidate_range(v->uc, ram, ram + batch[i].len);
    }
    return 0;
}

/* Any thread: host memory [host, host+len) inside one RAM block was written.  Adjacent
   writes merge; a full queue turns into a flush of everything. */
void pv_note_written(struct pv_vcpu *v, uint64_t host, uint64_t len)
{
    struct pv_stale *q;
    uint32_t *n;

    pv_stale_lock(v);
    q = v->stale[v->stale_fill];
    n = &v->n_stale[v->stale_fill];
    if (*n && q[*n - 1].host + q[*n - 1].len == host)
        q[*n - 1].len += len;
    else if (*n < PV_STALE_MAX)
        q[(*n)++] = (struct pv_stale){host, len};
    else
        v->stale_overflow = 1;
    pv_stale_unlock(v);
}

static void pv_kick_wrapper(void *cpu)
{
    struct pv_vcpu *v = pv_lookup((char *)cpu + PV_ENV_OFF);
    if (!v) {
        pv_real_smm_enter(cpu);
        return;
    }
    v->n_kick++;
    /* x86_cpu_exec_interrupt returns 1 after this call, so cpu_exec forgets its last block
       and chains no jump into a translation dropped here */
    if (pv_drop_stale(v)) {
        v->stale_overflow = 1;          /* tb_flush is left to the caller of emu_start */
        v->stop_wanted = 1;
    }
    if (v->stop_wanted) {
        v->stop_wanted = 0;
        v->fns.emu_stop(v->uc);
    }
}

int pv_install_kick(void *plt_entry, void *real_fn)
{
    if (pv_real_smm_enter)
        return 0;
    pv_real_smm_enter = real_fn;
    return pv_plt_redirect(plt_entry, real_fn, (void *)pv_kick_wrapper);
}

/* Any thread: the vCPU serves the kick at its next block boundary (or at once on entry to
   emu_start): it drops the queued stale translations and, if `stop` (or stop_wanted), leaves
   emu_start. */
void pv_kick(struct pv_vcpu *v, int stop)
{
    if (stop)
        v->stop_wanted = 1;
    __atomic_fetch_or((int *)(v->cs + PV_CS_INTERRUPT_REQUEST), CPU_INTERRUPT_SMI, __ATOMIC_SEQ_CST);
    v->fns.cpu_exit(v->cs);
}

/* --- stores to pages holding translated code ------------------------------------------
 * notdirty_write() runs for a store to a page whose TLB entry is "not dirty"; it drops the
 * translations overlapping the stored bytes.  QEMU then marks the entry dirty (stores go
 * fast) only if the page holds no code any more; unicorn instead never marks entries of
 * executable mappings dirty, so e.g. the bzImage decompressor runs every store through it.
 * native.py lets unicorn mark them dirty, and this wrapper restores QEMU's invariant by
 * dropping every translation on the page, not only the overlapping ones: a dirty entry
 * then never hides a write to code that is still translated (tb_gen_code re-arms the
 * entry for the address it translates at).
 */
static void (*pv_real_inval_fast)(void *uc, void *pages, uint64_t start, int len, uintptr_t ra);
static void (*pv_inval_range)(void *uc, uint64_t start, uint64_t end);

/* --- several engines (SMP): code written by one CPU, translated by another --------------
 * Each vCPU is its own unicorn engine with its own translations and its own record of
 * which pages hold code, and the engines take turns (one runs at a time: turns.py's
 * Turns).  So that a store by one CPU reaches code another CPU translated, a page that gets
 * code in any engine is write-protected (tlb_protect_code) in every engine, and the slow
 * path that a store to a protected page takes drops that page's translations in every
 * engine.  The other engines are not running while this happens.
 */
static void (*pv_real_protect)(void *uc, uint64_t ram_addr);
static void *(*pv_map_ram)(void *uc, void *block, uint64_t ram_addr);
static uint64_t (*pv_ram_from_host)(void *uc, void *host);

static void pv_other_engines(void *uc, uint64_t ram_addr, int protect)
{
    void *host = 0;
    for (int i = 0; i < PV_MAX_VCPUS; i++) {
        struct pv_vcpu *o = pv_registry[i];
        uint64_t ram;
        if (!o || o->uc == uc)
            continue;
        if (!host)
            host = pv_map_ram(uc, 0, ram_addr);
        ram = pv_ram_from_host(o->uc, host);
        if (ram == UINT64_MAX)
            continue;
        if (protect)
            pv_real_protect(o->uc, ram);
        else
            pv_inval_range(o->uc, ram, ram + 0x1000);
    }
}

static int pv_engines_shared;   /* more than one engine maps the same RAM */

static void pv_protect_wrapper(void *uc, uint64_t ram_addr)
{
    pv_real_protect(uc, ram_addr);
    if (pv_engines_shared)
        pv_other_engines(uc, ram_addr & ~(uint64_t)0xfff, 1);
}

static void pv_inval_fast_wrapper(void *uc, void *pages, uint64_t start, int len, uintptr_t ra)
{
    uint64_t page = start & ~(uint64_t)0xfff;
    if (pv_engines_shared)
        pv_other_engines(uc, page, 0);
    /* precise part next: if the running block is overwritten this does not return */
    pv_real_inval_fast(uc, pages, start, len, ra);
    pv_inval_range(uc, page, page + 0x1000);
}

int pv_install_cross_engine(void *protect_plt, void *real_protect, void *map_ram, void *ram_from_host)
{
    if (pv_real_protect)
        return 0;
    pv_real_protect = real_protect;
    pv_map_ram = map_ram;
    pv_ram_from_host = ram_from_host;
    return pv_plt_redirect(protect_plt, real_protect, (void *)pv_protect_wrapper);
}

/* --- pause-loop exiting (SMP) ---------------------------------------------------------
 * A vCPU spinning with `pause` (a lock, a wait for another CPU's IPI handler) while another
 * vCPU waits for its turn would burn its whole time slice for nothing.  helper_pause asks
 * cpu_svm_check_intercept_param (through the PLT) whether an SVM hypervisor intercepts
 * PAUSE; that slot points here, and when turns.py says a vCPU is waiting, the spinning one
 * gives its turn up at the next block boundary, as VT-x's pause-loop exiting lets a host do.
 * Like PLE's window, only after it has had the turn for a while: a hand-over costs a trip
 * through the Python run loop, and a CPU whose partner spins without `pause` must still
 * make progress.
 */
#define SVM_EXIT_PAUSE 0x77
#define PV_PAUSE_MIN_RUN_NS 200000
static void (*pv_real_svm_check)(void *env, uint32_t type, uint64_t param, uintptr_t ra);
static volatile int pv_turn_waiters;

static void pv_svm_check_wrapper(void *env, uint32_t type, uint64_t param, uintptr_t ra)
{
    if (type == SVM_EXIT_PAUSE && pv_turn_waiters) {
        struct pv_vcpu *v = pv_lookup((char *)env);
        if (v && pv_host_ns() - v->run_start_ns >= PV_PAUSE_MIN_RUN_NS) {
            v->n_pause_yield++;
            pv_kick(v, 1);
        }
    }
    pv_real_svm_check(env, type, param, ra);
}

int pv_install_pause_exit(void *plt_entry, void *real_fn)
{
    if (pv_real_svm_check)
        return 0;
    pv_real_svm_check = real_fn;
    return pv_plt_redirect(plt_entry, real_fn, (void *)pv_svm_check_wrapper);
}

/* turns.py: how many vCPUs wait for their turn. */
void pv_set_turn_waiters(int n) { pv_turn_waiters = n; }

/* Python says whether the engines of this process share guest RAM (an SMP machine). */
void pv_set_engines_shared(int shared) { pv_engines_shared = shared; }

int pv_install_store_invalidate(void *plt_entry, void *real_fast, void *range_fn)
{
    if (pv_real_inval_fast)
        return 0;
    pv_real_inval_fast = real_fast;
    pv_inval_range = range_fn;
    return pv_plt_redirect(plt_entry, real_fast, (void *)pv_inval_fast_wrapper);
}

/* A CPU exception or INT n: deliver it through the IDT/IVT with QEMU's code. */
static void pv_intr_hook(void *uc, uint32_t intno, void *user)
{
    struct pv_vcpu *v = user;
    (void)uc;
    v->n_exc++;
    v->last_exception = (int)intno;
    v->fns.do_interrupt(v->cs);
}

/* #UD arrives here instead of the interrupt hook. */
static int pv_invalid_hook(void *uc, void *user)
{
    struct pv_vcpu *v = user;
    (void)uc;
    v->n_exc++;
    v->last_exception = *(int *)(v->cs + PV_CS_EXC_INDEX);
    v->fns.do_interrupt(v->cs);
    return 1;
}

static uint64_t pv_msr_read(struct pv_vcpu *v, uint32_t rid)
{
    struct pv_msr m = { rid, 0 };
    v->fns.reg_read(v->uc, UC_X86_REG_MSR, &m);
    return m.value;
}

/* syscall in 64-bit mode (unicorn only calls hooks and falls through). */
static void pv_syscall_hook(void *uc, void *user)
{
    struct pv_vcpu *v = user;
    char *env = v->env;
    uint32_t hf = *pv_u32(env, PV_HFLAGS);
    uint64_t efer = pv_msr_read(v, MSR_EFER);
    uint64_t star, rfl, target, fmask;
    uint32_t sel;
    uint64_t *regs = (uint64_t *)env;

    v->n_syscall++;
    if (!(efer & 1) || !(hf & HF_LMA)) {
        /* legacy-mode syscall is not emulated: #UD, as with EFER.SCE clear */
        *(int *)(v->cs + PV_CS_EXC_INDEX) = 6;
        *(int *)(env + PV_EXC_IS_INT) = 0;
        *(int *)(env + PV_ERROR_CODE) = 0;
        v->fns.do_interrupt(v->cs);
        *pv_u64(env, PV_EIP) -= 2;   /* unicorn adds the instruction length afterwards */
        return;
    }
    star = pv_msr_read(v, MSR_STAR);
    fmask = pv_msr_read(v, MSR_FMASK);
    target = (hf & HF_CS64) ? pv_msr_read(v, MSR_LSTAR) : pv_msr_read(v, 0xc0000083u);
    sel = (uint32_t)((star >> 32) & 0xffff);

    regs[1] = *pv_u64(env, PV_EIP) + 2;                   /* RCX = return RIP */
    v->fns.reg_read(uc, UC_X86_REG_RFLAGS, &rfl);
    regs[11] = rfl & ~0x10000ull;                         /* R11 = RFLAGS without RF */
    rfl &= ~(fmask | 0x10000ull);
    v->fns.reg_write(uc, UC_X86_REG_RFLAGS, &rfl);
    pv_load_seg(v, R_CS, sel & 0xfffc, 0, 0xffffffff,
                DESC_G | DESC_P | DESC_S | DESC_CS | DESC_R | DESC_A | DESC_L);
    pv_load_seg(v, R_SS, (sel + 8) & 0xfffc, 0, 0xffffffff,
                DESC_G | DESC_B | DESC_P | DESC_S | DESC_W | DESC_A);
    /* unicorn adds next_eip_addend (2 for 0f 05) after the hook returns */
    *pv_u64(env, PV_EIP) = target - 2;
}

static int pv_rdtsc_hook(void *uc, void *user)
{
    struct pv_vcpu *v = user;
    uint64_t *regs = (uint64_t *)v->env;
    uint64_t t = pv_tsc_now(v);
    (void)uc;
    regs[0] = (uint32_t)t;
    regs[2] = t >> 32;
    return 1;
}

static int pv_rdtscp_hook(void *uc, void *user)
{
    struct pv_vcpu *v = user;
    uint64_t *regs = (uint64_t *)v->env;
    /* read TSC_AUX first: unicorn's MSR accessor saves and restores RAX/RCX/RDX */
    uint32_t aux = (uint32_t)pv_msr_read(v, MSR_TSC_AUX);
    pv_rdtsc_hook(uc, user);
    regs[1] = aux;
    return 1;
}

/* --- rdmsr/wrmsr interposition ---------------------------------------------
 * helper_rdmsr/helper_wrmsr begin with a jump to pv_rdmsr_entry/pv_wrmsr_entry
 * (patched by native.py after checking the original bytes).  The entry asks
 * pv_msr_filter whether the MSR is ours; if not, it continues into the
 * original helper through a trampoline holding the displaced prologue.
 */
#define PV_HIDDEN __attribute__((visibility("hidden"), used))
PV_HIDDEN void *pv_rdmsr_tramp;
PV_HIDDEN void *pv_wrmsr_tramp;

static struct pv_vcpu *pv_lookup(char *env)
{
    for (int i = 0; i < PV_MAX_VCPUS; i++) {
        if (pv_registry[i] && pv_registry[i]->env == env)
            return pv_registry[i];
    }
    return 0;
}

PV_HIDDEN int pv_msr_filter(char *env, int is_write);
PV_HIDDEN int pv_msr_filter(char *env, int is_write)
{
    struct pv_vcpu *v = pv_lookup(env);
    uint64_t *regs = (uint64_t *)env;
    uint32_t rid = (uint32_t)regs[1];
    uint64_t val = ((regs[2] & 0xffffffffull) << 32) | (regs[0] & 0xffffffffull);
    uint64_t out;

    if (!v)
        return 0;
    switch (rid) {
    case MSR_APIC_BASE:
        if (is_write) {
            /* base is fixed at 0xfee00000; BSP bit is read-only */
            uint64_t old = v->apic_base;
            v->apic_base = (v->apic_base & 0x100) | (val & 0xc00) | 0xfee00000ull;
            v->apic_base_writes++;
            if (((old ^ v->apic_base) & 0x800) && v->apic_base_written)
                v->apic_base_written(v);   /* the irqchip turns this CPU's LAPIC off or on */
            return 1;
        }
        out = v->apic_base;
        break;
    case MSR_TSC:
        if (is_write) {
            v->tsc_adjust += val - pv_tsc_now(v);
            pv_tsc_set(v, val);
            return 1;
        }
        out = pv_tsc_now(v);
        break;
    case MSR_TSC_DEADLINE:
        if (is_write) {
            v->tsc_deadline = val;
            v->tsc_deadline_writes++;
            if (v->deadline_written)
                v->deadline_written(v);    /* the LAPIC (Python) arms or disarms its timer */
            return 1;
        }
        /* reads as 0 once the deadline has passed (the timer has fired) */
        out = (v->tsc_deadline && pv_tsc_now(v) < v->tsc_deadline) ? v->tsc_deadline : 0;
        break;
    case MSR_TSC_ADJUST:
        if (is_write) {
            /* as on hardware: the TSC moves by the change of the adjustment */
            v->tsc_at_epoch += val - v->tsc_adjust;
            v->tsc_adjust = val;
            return 1;
        }
        out = v->tsc_adjust;
        break;
    case MSR_MISC_ENABLE:
        if (is_write)
            return 1;
        out = PV_MISC_ENABLE;
        break;
    case MSR_ARCH_CAPABILITIES:
        if (is_write)
            return 1;
        out = PV_ARCH_CAPABILITIES;
        break;
    default:
        return 0;
    }
    regs[0] = (uint32_t)out;
    regs[2] = out >> 32;
    return 1;
}

__asm__(
    ".text\n"
    ".globl pv_rdmsr_entry\n"
    ".hidden pv_rdmsr_entry\n"
    ".type pv_rdmsr_entry,@function\n"
    "pv_rdmsr_entry:\n"
    "    push %rdi\n"
    "    xor %esi, %esi\n"
    "    call pv_msr_filter\n"
    "    pop %rdi\n"
    "    test %eax, %eax\n"
    "    jnz 1f\n"
    "    jmp *pv_rdmsr_tramp(%rip)\n"
    "1:  ret\n"
    ".globl pv_wrmsr_entry\n"
    ".hidden pv_wrmsr_entry\n"
    ".type pv_wrmsr_entry,@function\n"
    "pv_wrmsr_entry:\n"
    "    push %rdi\n"
    "    mov $1, %esi\n"
    "    call pv_msr_filter\n"
    "    pop %rdi\n"
    "    test %eax, %eax\n"
    "    jnz 2f\n"
    "    jmp *pv_wrmsr_tramp(%rip)\n"
    "2:  ret\n");

void pv_rdmsr_entry(void);
void pv_wrmsr_entry(void);

/* Build a trampoline (displaced bytes + jmp back) and redirect `fn` to `entry`. */
static int pv_patch_one(unsigned char *fn, int nbytes, void (*entry)(void), void **tramp_out)
{
    long pg = sysconf(_SC_PAGESIZE);
    unsigned char *tramp, *page;
    uint64_t back = (uint64_t)(fn + nbytes), dst = (uint64_t)entry;

    if (nbytes < 14 || nbytes > 32)
        return -1;
    tramp = mmap(0, (size_t)pg, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (tramp == MAP_FAILED)
        return -2;
    memcpy(tramp, fn, (size_t)nbytes);
    tramp[nbytes] = 0xff;                   /* jmp *0(%rip) */
    tramp[nbytes + 1] = 0x25;
    memset(tramp + nbytes + 2, 0, 4);
    memcpy(tramp + nbytes + 6, &back, 8);
    if (mprotect(tramp, (size_t)pg, PROT_READ | PROT_EXEC))
        return -3;
    page = (unsigned char *)((uintptr_t)fn & ~((uintptr_t)pg - 1));
    if (mprotect(page, (size_t)(2 * pg), PROT_READ | PROT_WRITE | PROT_EXEC))
        return -4;
    *tramp_out = tramp;
    __sync_synchronize();
    fn[0] = 0xff;
    fn[1] = 0x25;
    memset(fn + 2, 0, 4);
    memcpy(fn + 6, &dst, 8);
    for (int i = 14; i < nbytes; i++)
        fn[i] = 0x90;
    mprotect(page, (size_t)(2 * pg), PROT_READ | PROT_EXEC);
    return 0;
}

int pv_patch_msr(void *rdmsr_fn, int rd_len, void *wrmsr_fn, int wr_len)
{
    int r;
    if (pv_rdmsr_tramp || pv_wrmsr_tramp)
        return 0;   /* already patched in this process */
    r = pv_patch_one(rdmsr_fn, rd_len, pv_rdmsr_entry, &pv_rdmsr_tramp);
    if (r)
        return r;
    return pv_patch_one(wrmsr_fn, wr_len, pv_wrmsr_entry, &pv_wrmsr_tramp);
}

int pv_msr_patched(void) { return pv_rdmsr_tramp != 0 && pv_wrmsr_tramp != 0; }

/* --- rdtsc/rdtscp interposition ----------------------------------------------
 * unicorn's helper_rdtsc/helper_rdtscp walk every UC_HOOK_INSN hook and stop the
 * walk as soon as uc->stop_request is set -- also *before* reaching the rdtsc hook
 * (the syscall hook comes first in the list).  Any uc_emu_stop sets it, and an
 * rdtsc executed before the next block boundary then returns the host's raw TSC:
 * the guest clock jumps to the host uptime.  Kicks no longer stop the engine from
 * other threads (see "kicks"), but the walk stays fragile, so the helpers start
 * with a jump to pv_rdtsc_entry, which serves
 * the virtual TSC directly; only the CR4.TSD #GP case (CPL > 0) continues into the
 * original helper, which raises the exception before it looks at any hook.
 */
#define PV_CR4 0x1c8
#define CR4_TSD (1u << 2)
PV_HIDDEN void *pv_rdtsc_tramp;
PV_HIDDEN void *pv_rdtscp_tramp;

PV_HIDDEN int pv_rdtsc_filter(char *env, int is_rdtscp);
PV_HIDDEN int pv_rdtsc_filter(char *env, int is_rdtscp)
{
    struct pv_vcpu *v = pv_lookup(env);
    uint64_t *regs = (uint64_t *)env;
    uint64_t t;
    uint32_t aux = 0;

    if (!v)
        return 0;
    if ((*pv_u64(env, PV_CR4) & CR4_TSD) && (*pv_u32(env, PV_HFLAGS) & HF_CPL_MASK))
        return 0;
    /* read TSC_AUX first: unicorn's MSR accessor saves and restores RAX/RCX/RDX */
    if (is_rdtscp)
        aux = (uint32_t)pv_msr_read(v, MSR_TSC_AUX);
    t = pv_tsc_now(v);
    regs[0] = (uint32_t)t;
    regs[2] = t >> 32;
    if (is_rdtscp)
        regs[1] = aux;
    return 1;
}

__asm__(
    ".text\n"
    ".globl pv_rdtsc_entry\n"
    ".hidden pv_rdtsc_entry\n"
    ".type pv_rdtsc_entry,@function\n"
    "pv_rdtsc_entry:\n"
    "    push %rdi\n"
    "    xor %esi, %esi\n"
    "    call pv_rdtsc_filter\n"
    "    pop %rdi\n"
    "    test %eax, %eax\n"
    "    jnz 1f\n"
    "    jmp *pv_rdtsc_tramp(%rip)\n"
    "1:  ret\n"
    ".globl pv_rdtscp_entry\n"
    ".hidden pv_rdtscp_entry\n"
    ".type pv_rdtscp_entry,@function\n"
    "pv_rdtscp_entry:\n"
    "    push %rdi\n"
    "    mov $1, %esi\n"
    "    call pv_rdtsc_filter\n"
    "    pop %rdi\n"
    "    test %eax, %eax\n"
    "    jnz 2f\n"
    "    jmp *pv_rdtscp_tramp(%rip)\n"
    "2:  ret\n");

void pv_rdtsc_entry(void);
void pv_rdtscp_entry(void);

int pv_patch_tsc(void *rdtsc_fn, int rdtsc_len, void *rdtscp_fn, int rdtscp_len)
{
    int r;
    if (pv_rdtsc_tramp || pv_rdtscp_tramp)
        return 0;   /* already patched in this process */
    r = pv_patch_one(rdtsc_fn, rdtsc_len, pv_rdtsc_entry, &pv_rdtsc_tramp);
    if (r)
        return r;
    return pv_patch_one(rdtscp_fn, rdtscp_len, pv_rdtscp_entry, &pv_rdtscp_tramp);
}

/* --- set-up ------------------------------------------------------------------- */

int pv_attach(struct pv_vcpu *v)
{
    int err;
    /* unicorn leaves cpu_index unassigned (-1) for its single CPU */
    v->cs = v->fns.get_cpu(v->uc, 0);
    if (!v->cs)
        v->cs = v->fns.get_cpu(v->uc, -1);
    if (!v->cs)
        return -1;
    v->env = v->cs + PV_ENV_OFF;
    /* an engine freed without pv_detach may have left its (reused) env address behind */
    for (int i = 0; i < PV_MAX_VCPUS; i++) {
        if (pv_registry[i] && pv_registry[i]->env == v->env)
            pv_registry[i] = 0;
    }
    for (int i = 0; i < PV_MAX_VCPUS; i++) {
        if (!pv_registry[i]) {
            pv_registry[i] = v;
            break;
        }
    }
    err = v->fns.hook_add(v->uc, &v->hooks[1], UC_HOOK_INTR, (void *)pv_intr_hook, v, 1ull, 0ull);
    if (!err)
        err = v->fns.hook_add(v->uc, &v->hooks[2], UC_HOOK_INSN_INVALID, (void *)pv_invalid_hook, v, 1ull, 0ull);
    if (!err)
        err = v->fns.hook_add(v->uc, &v->hooks[3], UC_HOOK_INSN, (void *)pv_syscall_hook, v, 1ull, 0ull,
                              UC_X86_INS_SYSCALL);
    if (!err)
        err = v->fns.hook_add(v->uc, &v->hooks[4], UC_HOOK_INSN, (void *)pv_rdtsc_hook, v, 1ull, 0ull,
                              UC_X86_INS_RDTSC);
    if (!err)
        err = v->fns.hook_add(v->uc, &v->hooks[5], UC_HOOK_INSN, (void *)pv_rdtscp_hook, v, 1ull, 0ull,
                              UC_X86_INS_RDTSCP);
    return err;
}

void pv_detach(struct pv_vcpu *v)
{
    for (int i = 0; i < PV_MAX_VCPUS; i++) {
        if (pv_registry[i] == v)
            pv_registry[i] = 0;
    }
}

/* Before each emu_start: leave the halted state, forget stale exception bookkeeping. */
void pv_prepare_run(struct pv_vcpu *v)
{
    *(int *)(v->cs + PV_CS_HALTED) = 0;
    v->run_start_ns = pv_host_ns();
    /* the CPU clears request bits with a plain read-modify-write: re-assert a level INTR
       that a concurrent pv_set_intr may have lost in that window */
    if (v->irq_request)
        __atomic_fetch_or((int *)(v->cs + PV_CS_INTERRUPT_REQUEST), CPU_INTERRUPT_HARD, __ATOMIC_SEQ_CST);
}

int pv_halted(struct pv_vcpu *v) { return *(int *)(v->cs + PV_CS_HALTED); }
int pv_old_exception(struct pv_vcpu *v) { return *(int *)(v->env + PV_OLD_EXCEPTION); }
void pv_clear_old_exception(struct pv_vcpu *v) { *(int *)(v->env + PV_OLD_EXCEPTION) = -1; }
uint32_t pv_hflags(struct pv_vcpu *v) { return *pv_u32(v->env, PV_HFLAGS); }
uint64_t pv_eflags_raw(struct pv_vcpu *v) { return *pv_u64(v->env, PV_EFLAGS); }
uint64_t pv_env_u64(struct pv_vcpu *v, int off) { return *pv_u64(v->env, off); }
uint32_t pv_env_u32(struct pv_vcpu *v, int off) { return *pv_u32(v->env, off); }

/* Overwrite `len` bytes of libunicorn's code at `addr` (the caller has checked the old bytes). */
int pv_patch_code(void *addr, const void *bytes, int len)
{
    long pg = sysconf(_SC_PAGESIZE);
    unsigned char *page = (unsigned char *)((uintptr_t)addr & ~((uintptr_t)pg - 1));
    if (len <= 0 || len > 64)
        return -1;
    if (mprotect(page, (size_t)(2 * pg), PROT_READ | PROT_WRITE | PROT_EXEC))
        return -2;
    memcpy(addr, bytes, (size_t)len);
    __sync_synchronize();
    mprotect(page, (size_t)(2 * pg), PROT_READ | PROT_EXEC);
    return 0;
}
