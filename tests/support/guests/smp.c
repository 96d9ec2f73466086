/*
 * SMP test guest (multiboot, 32-bit): the BSP wakes the APs with INIT-SIPI-SIPI
 * through the xAPIC at 0xfee00000.  Every CPU that runs sets the bit of its
 * APIC id (read from the LAPIC ID register) in a shared mask and says so on the
 * UART.  The BSP waits, with a bound, for NB_CPUS bits (fw_cfg; at most 4).
 *
 * It also validates the MP table (floating pointer + "PCMP" configuration
 * table: checksums, one enabled processor entry per CPU with APIC ids
 * 0..N-1, the BSP flagged).  With "reboot=1" on the command line, the first
 * boot (with "wipe=1": after zeroing the EBDA and 0xe0000-0xfffff, where the MP
 * and ACPI tables are; QEMU's SeaBIOS cannot recover from that) triple-faults once all CPUs are up, and the second boot (counted in
 * CMOS) starts the APs again, which checks that reset returns them to
 * wait-for-SIPI.  With "apfault=1" as well, AP 1 triple-faults instead of the
 * BSP: a shutdown on any CPU must reset the whole machine.
 *
 * With "stress=<n>", once all CPUs are up every CPU runs n rounds of device
 * accesses at the same time (fw_cfg DMA with its own descriptor, fw_cfg and
 * CMOS port reads without any guest lock, port 0x80, UART scratch, LAPIC), so
 * the VMM's device models are entered from several vCPU threads at once.  Each
 * DMA read of the signature must come back intact (a DMA request is atomic);
 * the racy port reads only have to be answered.
 *
 * With "ipi=1", every CPU loads a shared IDT and software-enables its LAPIC;
 * each AP sends the BSP a fixed IPI with its own vector (0x40 + APIC id) and
 * then halts with interrupts on; the BSP, halted too (a periodic LAPIC timer
 * wakes it to check a deadline), collects all vectors and then wakes every
 * AP with an IPI (vector 0x50).  This checks inter-processor interrupts and
 * wake-up from HLT in both directions, and the LAPIC timer.
 *
 * Exit value: bits 0-3 = CPUs seen, bit 4 = MP table OK, bit 5 = second boot
 * after the reset with a freshly loaded image, bit 6 = the stress= or ipi=
 * run passed.  "-smp 2" gives 0x13 -> status 39.
 */
#include "guest.h"

#define LAPIC_BASE 0xfee00000u
#define LAPIC_ID 0x20
#define LAPIC_SVR 0xf0
#define LAPIC_ICR_LO 0x300
#define LAPIC_ICR_HI 0x310
#define ICR_BUSY (1u << 12)
#define ICR_ALL_BUT_SELF (3u << 18)
#define ICR_INIT_ASSERT (0x500u | (1u << 14))
#define ICR_STARTUP 0x600u
#define TRAMP_BASE 0x8000u
#define MAX_CPUS 4
#define CMOS_MAGIC_IDX 0x7a
#define CMOS_COUNT_IDX 0x7b
#define CMOS_MAGIC 0x5a

enum {
    RESULT_MPTABLE_OK = 1 << 4,
    RESULT_REBOOTED = 1 << 5,
    RESULT_MODE_OK = 1 << 6, /* the optional stress= or ipi= run passed */
};

struct fw_cfg_dma {
    u32 control, length;
    u64 address;
} __attribute__((packed));

static volatile u32 stress_go, stress_rounds, stress_done, stress_bad;
static struct fw_cfg_dma dma_desc[MAX_CPUS] __attribute__((aligned(16)));
static u8 dma_buf[MAX_CPUS][16];

static u32 be32(u32 v) { return (v >> 24) | ((v >> 8) & 0xff00) | ((v << 8) & 0xff0000) | (v << 24); }

/* One CPU's share of the stress run; returns the number of failed DMA reads. */
static u32 stress(u32 cpu)
{
    u32 bad = 0;
    struct fw_cfg_dma *d = &dma_desc[cpu];
    volatile u8 *b = dma_buf[cpu];
    for (u32 i = 0; i < stress_rounds; i++) {
        for (int k = 0; k < 4; k++)
            b[k] = 0;
        d->control = be32((FW_CFG_SIGNATURE << 16) | 0x08 | 0x02); /* select + read */
        d->length = be32(4);
        d->address = (u64)be32((u32)(uptr)b) << 32;
        outl(FW_CFG_DMA_LO, be32((u32)(uptr)d));
        u32 ctl = 1;
        for (int k = 0; k < 1000; k++) {
            ctl = be32(*(volatile u32 *)&d->control);
            if (ctl == 0 || (ctl & 1))
                break;
        }
        if (ctl != 0 || b[0] != 'Q' || b[1] != 'E' || b[2] != 'M' || b[3] != 'U')
            bad++;
        fw_cfg_select(FW_CFG_ID); /* racy on purpose: no lock */
        inb(FW_CFG_DATA);
        outb(0x70, 0x00);
        inb(0x71);
        outb(0x80, (u8)i);
        outb(COM1 + 7, (u8)cpu);
        inb(COM1 + 7);
        mmio_read32(LAPIC_BASE + LAPIC_ID);
    }
    return bad;
}

static void stress_join(u32 cpu)
{
    while (!stress_go)
        cpu_relax();
    u32 bad = stress(cpu);
    __sync_fetch_and_add(&stress_bad, bad);
    __sync_fetch_and_add(&stress_done, 1);
}

extern const u8 ap_tramp_start[], ap_tramp_end[];

static volatile u32 cpus_up, bsp_id;
/* Initialised data: a reset must reload the image, so boot 2 sees this value again. */
static volatile u32 image_marker = 0x1234abcd;
static volatile u32 uart_lock;

static u32 lapic_read(u32 reg) { return mmio_read32(LAPIC_BASE + reg); }
static void lapic_write(u32 reg, u32 v) { mmio_write32(LAPIC_BASE + reg, v); }

static void lock(void)
{
    while (__sync_lock_test_and_set(&uart_lock, 1))
        cpu_relax();
}

static void unlock(void) { __sync_lock_release(&uart_lock); }

static void delay(u32 n)
{
    for (volatile u32 i = 0; i < n; i++)
        cpu_relax();
}

static void send_ipi(u32 icr)
{
    lapic_write(LAPIC_ICR_HI, 0);
    lapic_write(LAPIC_ICR_LO, icr);
    for (int i = 0; i < 10000 && (lapic_read(LAPIC_ICR_LO) & ICR_BUSY); i++)
        cpu_relax();
}

static void mark_up(u32 id, const char *who)
{
    lock();
    uart_puts(who);
    uart_puts(" apic_id=");
    uart_putdec(id);
    uart_puts(" up\n");
    /* only once the line is out: the BSP may report and exit as soon as every bit is set */
    __sync_fetch_and_or(&cpus_up, 1u << id);
    unlock();
}

/* -- ipi=1 ------------------------------------------------------------------------------- */
#define IPI_TO_BSP_BASE 0x40
#define IPI_TO_AP 0x50
#define TIMER_VEC 0x60
#define SPURIOUS_VEC 0xff

struct idt_gate {
    u16 off_lo, sel;
    u8 zero, type;
    u16 off_hi;
} __attribute__((packed));

extern const u32 isr_table[256];
void load_flat_gdt(void);

static struct idt_gate idt[256] __attribute__((aligned(8)));
static volatile u32 ipi_mode, ipi_at_bsp, ipi_at_ap, ipi_bad, timer_ticks;

static void load_idt(void)
{
    struct {
        u16 limit;
        u32 base;
    } __attribute__((packed)) idtr = {sizeof(idt) - 1, (u32)(uptr)idt};
    __asm__ volatile("lidt %0" : : "m"(idtr));
}

static void build_idt(void)
{
    for (int v = 0; v < 256; v++) {
        idt[v].off_lo = (u16)isr_table[v];
        idt[v].off_hi = (u16)(isr_table[v] >> 16);
        idt[v].sel = 0x08;
        idt[v].zero = 0;
        idt[v].type = 0x8e;
    }
}

void irq_dispatch(u32 vec)
{
    u32 id = (lapic_read(LAPIC_ID) >> 24) & 7;
    if (vec == SPURIOUS_VEC)
        return;
    if (vec < 32) {
        lock();
        uart_puts("unexpected exception ");
        uart_putdec(vec);
        uart_putc('\n');
        unlock();
        debug_exit(0);
    }
    if (vec >= IPI_TO_BSP_BASE && vec < IPI_TO_BSP_BASE + MAX_CPUS)
        __sync_fetch_and_or(&ipi_at_bsp, 1u << (vec - IPI_TO_BSP_BASE));
    else if (vec == IPI_TO_AP)
        __sync_fetch_and_or(&ipi_at_ap, 1u << id);
    else if (vec == TIMER_VEC)
        timer_ticks++;
    else
        ipi_bad++;
    lapic_write(0xb0, 0); /* EOI */
}

static void send_ipi_to(u32 dest, u32 vector)
{
    lapic_write(LAPIC_ICR_HI, dest << 24);
    lapic_write(LAPIC_ICR_LO, vector); /* fixed, physical, edge */
    for (int i = 0; i < 10000 && (lapic_read(LAPIC_ICR_LO) & ICR_BUSY); i++)
        cpu_relax();
}

static void ap_ipi(u32 id)
{
    load_idt();
    lapic_write(LAPIC_SVR, 0x100 | SPURIOUS_VEC);
    lapic_write(0x80, 0); /* TPR */
    __asm__ volatile("sti");
    send_ipi_to(bsp_id, IPI_TO_BSP_BASE + id);
    /* Halt until the BSP's wake-up IPI; interrupts are on, so HLT must wake. */
    for (int i = 0; i < 1000 && !(ipi_at_ap & (1u << id)); i++)
        __asm__ volatile("hlt");
    __asm__ volatile("cli");
}

static u8 rtc_sec(void)
{
    outb(0x70, 0);
    return inb(0x71);
}

/* BSP side: returns 1 when every AP's IPI arrived and every AP acknowledged the wake-up IPI. */
static int bsp_ipi(u32 ncpus, u32 want)
{
    u32 aps = want & ~(1u << bsp_id);
    lapic_write(0x3e0, 0x3);               /* timer divide by 16 */
    lapic_write(0x320, (1u << 17) | TIMER_VEC); /* periodic */
    lapic_write(0x380, 200000);            /* initial count */
    u8 last = rtc_sec();
    int secs = 0;
    for (;;) {
        __asm__ volatile("cli");
        if ((ipi_at_bsp & aps) == aps)
            break;
        __asm__ volatile("sti; hlt");
        u8 now = rtc_sec();
        if (now != last) {
            last = now;
            if (++secs > 5)
                break;
        }
    }
    __asm__ volatile("sti");
    for (u32 id = 0; id < ncpus; id++)
        if (aps & (1u << id))
            send_ipi_to(id, IPI_TO_AP);
    for (u32 i = 0; i < 3000000 && (ipi_at_ap & aps) != aps; i++)
        cpu_relax();
    /* The periodic LAPIC timer must keep waking a halted CPU. */
    secs = 0;
    last = rtc_sec();
    for (;;) {
        __asm__ volatile("cli");
        if (timer_ticks >= 3)
            break;
        __asm__ volatile("sti; hlt");
        u8 now = rtc_sec();
        if (now != last) {
            last = now;
            if (++secs > 3)
                break;
        }
    }
    __asm__ volatile("cli");
    lapic_write(0x320, 1u << 16); /* mask the timer */
    lock();
    report_hex("ipi_at_bsp", ipi_at_bsp);
    report_hex("ipi_at_ap", ipi_at_ap);
    report_dec("ipi_bad", ipi_bad);
    report_dec("lapic_timer_ticks", timer_ticks);
    unlock();
    return (ipi_at_bsp & aps) == aps && (ipi_at_ap & aps) == aps && ipi_bad == 0 && timer_ticks >= 3;
}

static volatile u32 ap_fault;
static __attribute__((noreturn)) void triple_fault(void);

void ap_main(u32 apic_id)
{
    mark_up(apic_id, "AP");
    if (ap_fault && apic_id == 1) {
        lock();
        uart_puts("AP 1 triple faults now\n");
        unlock();
        triple_fault();
    }
    if (apic_id < MAX_CPUS && ipi_mode)
        ap_ipi(apic_id);
    else if (apic_id < MAX_CPUS)
        stress_join(apic_id);
}

static u8 cmos_read(u8 idx)
{
    outb(0x70, idx);
    return inb(0x71);
}

static void cmos_write(u8 idx, u8 v)
{
    outb(0x70, idx);
    outb(0x71, v);
}

static u8 sum8(const u8 *p, u32 n)
{
    u8 s = 0;
    while (n--)
        s += *p++;
    return s;
}

/* Find the MP floating pointer in the places the MP spec lists. */
static const u8 *find_mp_floating(void)
{
    uptr ebda = (uptr)(*(const u16 *)0x40e) << 4;
    uptr basemem = (uptr)(*(const u16 *)0x413) * 1024;
    const uptr ranges[3][2] = {{ebda, ebda + 1024}, {basemem - 1024, basemem}, {0xf0000, 0x100000}};
    for (int r = 0; r < 3; r++) {
        if (ranges[r][0] < 0x400 || ranges[r][1] > 0x100000)
            continue;
        for (uptr p = ranges[r][0] & ~15u; p + 16 <= ranges[r][1]; p += 16)
            if (memcmp((const void *)p, "_MP_", 4) == 0 && sum8((const u8 *)p, 16) == 0)
                return (const u8 *)p;
    }
    return 0;
}

static int check_mptable(u32 ncpus, u32 bsp)
{
    const u8 *fp = find_mp_floating();
    if (!fp) {
        uart_puts("mptable: no floating pointer\n");
        return 0;
    }
    u32 cfg = *(const u32 *)(fp + 4);
    report_hex("mp_floating", (uptr)fp);
    report_hex("mp_config", cfg);
    if (cfg < 0x400 || cfg >= 0x100000 - 44)
        return 0;
    const u8 *t = (const u8 *)(uptr)cfg;
    u16 len = *(const u16 *)(t + 4), count = *(const u16 *)(t + 34);
    u32 lapic = *(const u32 *)(t + 36);
    if (memcmp(t, "PCMP", 4) != 0 || len < 44 || cfg + len > 0x100000 || sum8(t, len) != 0) {
        uart_puts("mptable: bad PCMP header or checksum\n");
        return 0;
    }
    u32 ids = 0, nproc = 0, bsp_flags = 0, bad = 0;
    const u8 *e = t + 44, *end = t + len;
    for (u32 i = 0; i < count && e < end; i++) {
        if (e[0] == 0) {
            if (e + 20 > end)
                return 0;
            nproc++;
            if (!(e[3] & 1) || e[1] >= 32)
                bad = 1;
            else
                ids |= 1u << e[1];
            if (e[3] & 2)
                bsp_flags |= 1u << (e[1] & 31);
            e += 20;
        } else if (e[0] <= 4) {
            e += 8;
        } else {
            return 0;
        }
    }
    report_dec("mp_processors", nproc);
    report_hex("mp_apic_ids", ids);
    report_hex("mp_bsp", bsp_flags);
    return !bad && nproc == ncpus && ids == (1u << ncpus) - 1 && bsp_flags == (1u << bsp) &&
           lapic == LAPIC_BASE;
}

static __attribute__((noreturn)) void triple_fault(void)
{
    static const struct {
        u16 limit;
        u32 base;
    } __attribute__((packed)) empty_idt = {0, 0};
    __asm__ volatile("lidt %0; ud2" : : "m"(empty_idt));
    for (;;)
        ;
}

void guest_main(u32 magic, const u32 *mbi)
{
    (void)magic;
    const char *cmdline = (mbi[0] & 4) && mbi[4] ? (const char *)(uptr)mbi[4] : "";
    int reboot = cmdline_get_num(cmdline, "reboot", 0) != 0;
    u32 result = 0;

    cpus_up = 0;
    uart_lock = 0;
    stress_go = stress_done = stress_bad = 0;
    stress_rounds = (u32)cmdline_get_num(cmdline, "stress", 0);
    ipi_mode = cmdline_get_num(cmdline, "ipi", 0) != 0;
    ap_fault = 0;
    ipi_at_bsp = ipi_at_ap = ipi_bad = timer_ticks = 0;
    uart_init();
    uart_puts("smp guest\n");
    u32 boot = 1;
    if (reboot) {
        if (cmos_read(CMOS_MAGIC_IDX) != CMOS_MAGIC) {
            cmos_write(CMOS_MAGIC_IDX, CMOS_MAGIC);
            cmos_write(CMOS_COUNT_IDX, 0);
        }
        boot = cmos_read(CMOS_COUNT_IDX) + 1u;
        cmos_write(CMOS_COUNT_IDX, (u8)boot);
        report_dec("boot", boot);
    }
    u32 ncpus = fw_cfg_present() ? fw_cfg_read_u16(FW_CFG_NB_CPUS) : 1;
    if (ncpus == 0 || ncpus > MAX_CPUS)
        ncpus = 1;
    report_dec("ncpus", ncpus);
    if (reboot && boot == 1 && ncpus > 1 && cmdline_get_num(cmdline, "apfault", 0))
        ap_fault = 1;

    u32 bsp = (lapic_read(LAPIC_ID) >> 24) & 7;
    bsp_id = bsp;
    lapic_write(LAPIC_SVR, lapic_read(LAPIC_SVR) | 0x1ff); /* software-enable the LAPIC */
    if (ipi_mode) {
        outb(0x21, 0xff); /* no PIC interrupts: firmware may have left the PIT running */
        outb(0xa1, 0xff);
        load_flat_gdt();
        build_idt();
        load_idt();
        lapic_write(0x80, 0);
    }
    mark_up(bsp, "BSP");

    memcpy((void *)TRAMP_BASE, ap_tramp_start, (uptr)(ap_tramp_end - ap_tramp_start));
    u32 want = (1u << ncpus) - 1;
    if (ncpus > 1) {
        send_ipi(ICR_ALL_BUT_SELF | ICR_INIT_ASSERT);
        delay(10000);
        for (int i = 0; i < 2 && cpus_up != want; i++) {
            send_ipi(ICR_ALL_BUT_SELF | ICR_STARTUP | (TRAMP_BASE >> 12));
            delay(2000);
        }
        for (u32 i = 0; i < 3000000 && cpus_up != want; i++)
            cpu_relax();
    }
    lock();
    report_hex("cpus_up", cpus_up);
    unlock();
    if (ipi_mode && cpus_up == want && bsp_ipi(ncpus, want))
        result |= RESULT_MODE_OK;
    if (stress_rounds && cpus_up == want) {
        stress_go = 1;
        stress_join(bsp);
        for (u32 i = 0; i < 20000000 && stress_done != ncpus; i++)
            cpu_relax();
        lock();
        report_dec("stress_done", stress_done);
        report_dec("stress_bad", stress_bad);
        unlock();
        if (stress_done == ncpus && stress_bad == 0)
            result |= RESULT_MODE_OK;
    }
    lock();
    if (check_mptable(ncpus, bsp))
        result |= RESULT_MPTABLE_OK;
    unlock();
    if (ap_fault) {
        /* A shutdown on any CPU resets the whole machine: wait for it (~5 s). */
        outb(0x70, 0);
        u8 last = inb(0x71);
        for (int secs = 0, i = 0; secs < 5 && i < 50000000; i++) {
            outb(0x70, 0);
            u8 now = inb(0x71);
            if (now != last) {
                last = now;
                secs++;
            }
        }
        lock();
        uart_puts("no reset after the AP's triple fault\n");
        unlock();
        cmos_write(CMOS_MAGIC_IDX, 0);
        debug_exit((u8)(cpus_up & 0xf));
    }
    if (reboot && boot == 1 && cpus_up == want) {
        uart_puts("all cpus up, triple fault now\n");
        image_marker = 0xdeadbeef;
        if (cmdline_get_num(cmdline, "wipe", 0)) {
            /* Firmware tables live in (reserved) RAM: a reset must rebuild them. */
            memset((void *)0x9fc00, 0, 0x400);
            memset((void *)0xe0000, 0, 0x20000);
        }
        triple_fault();
    }
    if (reboot) {
        cmos_write(CMOS_MAGIC_IDX, 0);
        report_hex("image_marker", image_marker);
        if (boot == 2 && image_marker == 0x1234abcd)
            result |= RESULT_REBOOTED;
    }
    result |= cpus_up & 0xf;
    report_hex("result", result);
    debug_exit((u8)result);
}
