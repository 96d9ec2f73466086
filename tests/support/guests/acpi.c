/*
 * ACPI test guest (multiboot, 32-bit): finds and validates the ACPI tables
 * the way an OS does, then powers the machine off through PM1a_CNT (S5) or,
 * with "reset=1", reboots through the FADT reset register.
 *
 * Checks (bits of `acpi_checks`, printed before the power-off):
 *   0 RSDP found in the BIOS area with valid checksum(s)
 *   1 RSDT/XSDT and every table they list have valid checksums
 *   2 FADT: PM1a_CNT and PM_TMR blocks present, DSDT pointer valid
 *   3 DSDT has \_S5 with a SLP_TYPa value
 *   4 MADT: one enabled LAPIC per CPU (fw_cfg NB_CPUS), an I/O APIC at
 *     0xfec00000, and an override sending ISA IRQ0 to GSI 2
 *   5 the PM timer counts
 * "poweroff": exit status 0 expected; if the VMM ignores the request the guest
 * prints "still running" and exits via isa-debug-exit with acpi_checks.
 * "reset=1": boot 1 writes the reset register (with "wipe=1", after zeroing the
 * EBDA and 0xe0000-0xfffff, so boot 2 must find rebuilt tables); boot 2 exits
 * via isa-debug-exit with acpi_checks | 0x40.
 */
#include "guest.h"

struct sdt {
    char sig[4];
    u32 length;
    u8 revision, checksum;
    char oem[6], oem_table[8];
    u32 oem_rev, creator, creator_rev;
} __attribute__((packed));
_Static_assert(sizeof(struct sdt) == 36, "ACPI table header layout");

static u8 sum8(const void *p, u32 n)
{
    const u8 *b = p;
    u8 s = 0;
    while (n--)
        s += *b++;
    return s;
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

static const u8 *find_rsdp(void)
{
    uptr ebda = (uptr)(*(const u16 *)0x40e) << 4;
    if (ebda >= 0x80000 && ebda < 0xa0000)
        for (uptr p = ebda; p < ebda + 1024; p += 16)
            if (memcmp((const void *)p, "RSD PTR ", 8) == 0 && sum8((const void *)p, 20) == 0)
                return (const u8 *)p;
    for (uptr p = 0xe0000; p < 0x100000; p += 16)
        if (memcmp((const void *)p, "RSD PTR ", 8) == 0 && sum8((const void *)p, 20) == 0)
            return (const u8 *)p;
    return 0;
}

static int table_ok(uptr addr, u32 ram_end)
{
    if (addr < 0x1000 || addr >= ram_end - 36)
        return 0;
    const struct sdt *t = (const struct sdt *)addr;
    return t->length >= 36 && t->length < 0x100000 && addr + t->length <= ram_end && sum8(t, t->length) == 0;
}

/* SLP_TYPa from "_S5_" Package: 0x08 '_S5_' 0x12 PkgLength NumElements <elem>... */
static int find_s5(const struct sdt *dsdt, u32 *slp_typ)
{
    const u8 *p = (const u8 *)dsdt + 36, *end = (const u8 *)dsdt + dsdt->length;
    for (; p + 8 < end; p++) {
        if (memcmp(p, "_S5_", 4) != 0 || p[4] != 0x12)
            continue;
        const u8 *q = p + 5;
        q += 1 + (*q >> 6); /* PkgLength: lead byte + (bits 7:6) more bytes */
        q += 1;             /* NumElements */
        if (q >= end)
            return 0;
        if (*q == 0x0a && q + 1 < end)
            *slp_typ = q[1];
        else if (*q == 0x00 || *q == 0x01)
            *slp_typ = *q;
        else
            return 0;
        return 1;
    }
    return 0;
}

static int check_madt(const struct sdt *madt, u32 ncpus)
{
    const u8 *p = (const u8 *)madt + 44, *end = (const u8 *)madt + madt->length;
    u32 cpus = 0, ioapic = 0, irq0_gsi2 = 0;
    while (p + 2 <= end && p[1] >= 2 && p + p[1] <= end) {
        if (p[0] == 0 && p[1] >= 8 && (*(const u32 *)(p + 4) & 1))
            cpus++;
        else if (p[0] == 1 && p[1] >= 12 && *(const u32 *)(p + 4) == 0xfec00000u)
            ioapic++;
        else if (p[0] == 2 && p[1] >= 10 && p[3] == 0 && *(const u32 *)(p + 4) == 2)
            irq0_gsi2 = 1;
        p += p[1];
    }
    report_dec("madt_cpus", cpus);
    report_dec("madt_ioapics", ioapic);
    report_dec("madt_irq0_to_gsi2", irq0_gsi2);
    return cpus == ncpus && ioapic == 1 && irq0_gsi2;
}

void guest_main(u32 magic, const u32 *mbi)
{
    (void)magic;
    const char *cmdline = (mbi[0] & 4) && mbi[4] ? (const char *)(uptr)mbi[4] : "";
    int reset_mode = cmdline_get_num(cmdline, "reset", 0) != 0;
    /* Tables may sit in reserved RAM above mem_upper: bound them by the RAM size instead. */
    u64 ram = fw_cfg_present() ? fw_cfg_read_u64(FW_CFG_RAM_SIZE) : 0;
    u32 ram_end = ram && ram < 0xc0000000u ? (u32)ram : 0xc0000000u;
    u32 ok = 0, boot = 1;

    uart_init();
    uart_puts("acpi guest\n");
    if (reset_mode) {
        if (cmos_read(0x78) != 0x3c) {
            cmos_write(0x78, 0x3c);
            cmos_write(0x79, 0);
        }
        boot = cmos_read(0x79) + 1u;
        cmos_write(0x79, (u8)boot);
        report_dec("boot", boot);
    }

    const u8 *rsdp = find_rsdp();
    if (!rsdp) {
        uart_puts("no RSDP\n");
        debug_exit(0);
    }
    report_hex("rsdp", (uptr)rsdp);
    u8 rev = rsdp[15];
    int xsdt = rev >= 2 && sum8(rsdp, 36) == 0 && *(const u32 *)(rsdp + 28) == 0 && *(const u32 *)(rsdp + 24);
    if (rev < 2 || sum8(rsdp, 36) == 0)
        ok |= 1 << 0;

    uptr root = xsdt ? *(const u32 *)(rsdp + 24) : *(const u32 *)(rsdp + 16);
    const struct sdt *fadt = 0, *madt = 0;
    int all_ok = table_ok(root, ram_end);
    if (all_ok) {
        const struct sdt *r = (const struct sdt *)root;
        u32 esize = xsdt ? 8 : 4, n = (r->length - 36) / esize;
        for (u32 i = 0; i < n && i < 64; i++) {
            const u8 *e = (const u8 *)r + 36 + i * esize;
            if (xsdt && *(const u32 *)(e + 4)) {
                all_ok = 0;
                continue;
            }
            uptr a = *(const u32 *)e;
            if (!table_ok(a, ram_end)) {
                all_ok = 0;
                continue;
            }
            const struct sdt *t = (const struct sdt *)a;
            uart_puts("table ");
            for (int k = 0; k < 4; k++)
                uart_putc(t->sig[k]);
            uart_putc('\n');
            if (memcmp(t->sig, "FACP", 4) == 0)
                fadt = t;
            else if (memcmp(t->sig, "APIC", 4) == 0)
                madt = t;
        }
    }
    if (all_ok)
        ok |= 1 << 1;

    u32 pm1a_cnt = 0, pm_tmr = 0, slp_typ = 0, reset_port = 0, reset_val = 0;
    if (fadt && fadt->length >= 116) {
        const u8 *f = (const u8 *)fadt;
        uptr dsdt = *(const u32 *)(f + 40);
        pm1a_cnt = *(const u32 *)(f + 64);
        pm_tmr = *(const u32 *)(f + 76);
        if (fadt->length >= 129 && f[116] == 1) { /* RESET_REG in system I/O space */
            reset_port = *(const u32 *)(f + 120);
            reset_val = f[128];
        }
        report_hex("pm1a_cnt", pm1a_cnt);
        report_hex("pm_tmr", pm_tmr);
        report_hex("reset_port", reset_port);
        report_hex("reset_value", reset_val);
        if (pm1a_cnt && pm1a_cnt < 0x10000 && pm_tmr && pm_tmr < 0x10000 && table_ok(dsdt, ram_end)) {
            ok |= 1 << 2;
            if (find_s5((const struct sdt *)dsdt, &slp_typ)) {
                ok |= 1 << 3;
                report_dec("s5_slp_typ", slp_typ);
            }
        }
    }
    u32 ncpus = fw_cfg_present() ? fw_cfg_read_u16(FW_CFG_NB_CPUS) : 1;
    if (madt && check_madt(madt, ncpus))
        ok |= 1 << 4;
    if (pm_tmr && pm_tmr < 0x10000) {
        u32 t0 = inl((u16)pm_tmr) & 0xffffff, t1 = t0;
        for (int i = 0; i < 1000 && t1 == t0; i++)
            t1 = inl((u16)pm_tmr) & 0xffffff;
        report_hex("pm_tmr_delta", (t1 - t0) & 0xffffff);
        if (t1 != t0)
            ok |= 1 << 5;
    }
    report_hex("acpi_checks", ok);

    if (reset_mode) {
        if (boot >= 2) {
            cmos_write(0x78, 0);
            debug_exit((u8)(ok | 0x40));
        }
        if (reset_port) {
            if (cmdline_get_num(cmdline, "wipe", 0)) {
                /* Firmware tables live in (reserved) RAM: a reset must rebuild them. */
                memset((void *)0x9fc00, 0, 0x400);
                memset((void *)0xe0000, 0, 0x20000);
            }
            uart_puts("resetting through the FADT reset register\n");
            outb((u16)reset_port, (u8)reset_val);
        }
        uart_puts("still running\n");
        cmos_write(0x78, 0);
        debug_exit((u8)ok);
    }
    if (ok & (1 << 2)) {
        uart_puts("powering off\n");
        outw((u16)pm1a_cnt, (u16)((slp_typ << 10) | (1 << 13)));
        /* A VMM may finish the power-off asynchronously: give it ~2 s (RTC) before complaining. */
        outb(0x70, 0);
        u8 last = inb(0x71);
        for (int ticks = 0, i = 0; ticks < 3 && i < 50000000; i++) {
            outb(0x70, 0);
            u8 now = inb(0x71);
            if (now != last) {
                last = now;
                ticks++;
            }
        }
    }
    uart_puts("still running\n");
    debug_exit((u8)ok);
}
