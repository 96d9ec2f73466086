/* Shared between pvtcg.c and native.py, which reads the types below as its cffi declarations. */
#ifndef PYVMM_PVTCG_H
#define PYVMM_PVTCG_H
#include <stdint.h>
#include <stddef.h>

struct pv_vcpu;

/* Host memory written behind the CPU's back (device DMA), waiting for its translations to go. */
#define PV_STALE_MAX 2048             /* per buffer: a 1 MiB request of scattered pages takes 256 */
struct pv_stale {
    uint64_t host;
    uint64_t len;
};

struct pv_fns {
    void (*do_interrupt)(void *cs);
    void (*hardirq)(void *env, int intno, int is_hw);
    void (*loop_exit)(void *cs);
    int (*emu_stop)(void *uc);
    int (*reg_read)(void *uc, int regid, void *value);
    int (*reg_write)(void *uc, int regid, const void *value);
    int (*hook_add)(void *uc, size_t *hh, int type, void *cb, void *user, uint64_t begin, uint64_t end, ...);
    char *(*get_cpu)(void *uc, int index);
    void (*cpu_exit)(void *cs);
    uint64_t (*ram_addr_from_host)(void *uc, void *host);
    void (*tb_invalidate_range)(void *uc, uint64_t start, uint64_t end);
};

struct pv_vcpu {
    struct pv_fns fns;
    void *uc;
    char *cs;
    char *env;
    int (*ack)(struct pv_vcpu *v);   /* take the highest deliverable vector, or -1 */
    void (*deadline_written)(struct pv_vcpu *v);  /* IA32_TSC_DEADLINE was written */
    void (*apic_base_written)(struct pv_vcpu *v);  /* IA32_APIC_BASE.EN changed */
    volatile int irq_request;        /* the irqchip's INTR output towards this vCPU */
    int last_exception;
    uint64_t tsc_hz;
    uint64_t tsc_epoch_ns;
    uint64_t tsc_at_epoch;
    uint64_t tsc_deadline;
    uint64_t tsc_adjust;
    uint64_t apic_base;
    uint64_t n_irq;
    uint64_t n_exc;
    uint64_t n_syscall;
    uint64_t n_kick;                 /* kicks served between two blocks */
    uint64_t n_pause_yield;          /* turns given up at a `pause` (SMP) */
    uint64_t run_start_ns;           /* when emu_start was last entered */
    uint64_t apic_base_writes;
    uint64_t tsc_deadline_writes;
    volatile int stop_wanted;        /* the next kick also leaves emu_start (pause, stop) */
    int stale_lock;
    int stale_overflow;              /* the queue overflowed: translations of all RAM must go */
    uint32_t stale_fill;             /* which buffer writers append to; the vCPU drains the other */
    uint32_t n_stale[2];
    struct pv_stale stale[2][PV_STALE_MAX];
    size_t hooks[8];
};

#endif
