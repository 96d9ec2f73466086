/*
 * SMP test guest (multiboot, 32-bit): the BSP wakes the APs with INIT-SIPI-SIPI
 * through the xAPIC at 0xfee00000.  Every CPU that runs sets the bit of its
 * APIC id (read from the LAPIC ID register) in a shared mask and says so on the
 * UART.  The BSP waits, with a bound, for NB_CPUS bits and exits through
 * isa-debug-exit with the mask, so "-smp 2" should give status (3<<1)|1 = 7.
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

extern const u8 ap_tramp_start[], ap_tramp_end[];

static volatile u32 cpus_up;
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
    __sync_fetch_and_or(&cpus_up, 1u << id);
    lock();
    uart_puts(who);
    uart_puts(" apic_id=");
    uart_putdec(id);
    uart_puts(" up\n");
    unlock();
}

void ap_main(u32 apic_id)
{
    mark_up(apic_id, "AP");
}

void guest_main(u32 magic, void *mbi)
{
    (void)magic;
    (void)mbi;
    uart_init();
    uart_puts("smp guest\n");
    u32 ncpus = fw_cfg_present() ? fw_cfg_read_u16(FW_CFG_NB_CPUS) : 1;
    if (ncpus == 0 || ncpus > 7)
        ncpus = 1;
    report_dec("ncpus", ncpus);

    u32 bsp = lapic_read(LAPIC_ID) >> 24;
    lapic_write(LAPIC_SVR, lapic_read(LAPIC_SVR) | 0x1ff); /* software-enable the LAPIC */
    mark_up(bsp & 7, "BSP");

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
    debug_exit((u8)(cpus_up & 0x7f));
}
