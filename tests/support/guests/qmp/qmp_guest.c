/*
 * The QMP test guest: a tiny multiboot kernel that makes run-state changes
 * visible on the serial port, so the same test can drive pyvmm and QEMU.
 *
 *   "QMPGUEST BOOT"        once per boot (a reset prints it again);
 *   "tick N"               every 100 ms of ACPI PM-timer time while running
 *                          (output stops while the VM is paused, and N keeps
 *                          counting after a resume, restarting only on reset;
 *                          without ACPI tables: every 2000 polls of the UART);
 *   "POWER BUTTON" / "S5"  when PM1a_STS.PWRBTN_STS is seen: the guest then
 *                          enters S5 (soft-off) through PM1a_CNT, as Linux does;
 *   "GUEST RESET"          with "reset_after=N" on the multiboot command line:
 *                          after N ticks the guest resets the machine itself
 *                          through the keyboard controller (0xFE to port 0x64).
 *   "KEY 0x000000NN"       with "keys=1" on the command line: each byte the
 *                          keyboard controller delivers (scancodes of QMP send-key).
 *   "PVPANIC EVENTS=N"     with "panic_after=N" on the command line: after N
 *                          ticks the guest reads the pvpanic port (0x505, the
 *                          supported-events bitmap), then writes "panic_value=V"
 *                          (default 1, PANICKED) to it and prints "PVPANIC SENT";
 *                          then it keeps ticking, if the VMM lets it (with
 *                          reset_after=N as well it resets right after its report).
 *
 * The ACPI registers are found the way an OS finds them: RSDP in the EBDA or
 * the BIOS area -> RSDT -> FADT (PM1a event/control blocks, PM timer, SMI_CMD)
 * -> DSDT (the \_S5 package's SLP_TYPa).  If the FADT has an SMI command port
 * (QEMU's PIIX4) the guest first switches the chipset into ACPI mode.  Every
 * wait loop is bounded and nothing beyond IN/OUT/MOV/ALU is used, because on
 * some KVM hosts ring-0 code runs in a slow, incomplete instruction emulator.
 */
typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;

#define COM1 0x3f8
#define PM_TIMER_HZ 3579545u
#define TICK_PM (PM_TIMER_HZ / 10u)
#define PM1_PWRBTN 0x0100u
#define PM1_SCI_EN 0x0001u
#define PM1_SLP_EN 0x2000u
#define FADT_TMR_VAL_EXT (1u << 8)

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outw(u16 port, u16 v) { __asm__ volatile("outw %0, %1" : : "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u16 inw(u16 port) { u16 v; __asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u32 inl(u16 port) { u32 v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port)); return v; }

static void putc(char c)
{
    for (u32 i = 0; i < 100000u && !(inb(COM1 + 5) & 0x20); i++)
        ;
    outb(COM1, (u8)c);
}

static void puts(const char *s)
{
    while (*s)
        putc(*s++);
}

static void putdec(u32 v)
{
    char buf[12];
    int n = 0;
    do {
        buf[n++] = (char)('0' + v % 10u);
        v /= 10u;
    } while (v && n < 11);
    while (n)
        putc(buf[--n]);
}

static void puthex(u32 v)
{
    puts("0x");
    for (int s = 28; s >= 0; s -= 4)
        putc("0123456789abcdef"[(v >> s) & 0xf]);
}

/* Physical memory reads; the empty asm hides the constant address from gcc's bounds checks. */
static u32 rd32(u32 addr) { __asm__("" : "+r"(addr)); return *(volatile u32 *)addr; }
static u16 rd16(u32 addr) { __asm__("" : "+r"(addr)); return *(volatile u16 *)addr; }
static u8 rd8(u32 addr) { __asm__("" : "+r"(addr)); return *(volatile u8 *)addr; }

static int sig_is(u32 addr, const char *sig, u32 len)
{
    for (u32 i = 0; i < len; i++)
        if (rd8(addr + i) != (u8)sig[i])
            return 0;
    return 1;
}

static int checksum_ok(u32 addr, u32 len)
{
    u8 sum = 0;
    for (u32 i = 0; i < len; i++)
        sum = (u8)(sum + rd8(addr + i));
    return sum == 0;
}

static u32 scan_rsdp(u32 start, u32 len)
{
    for (u32 a = start; a + 20 <= start + len; a += 16)
        if (sig_is(a, "RSD PTR ", 8) && checksum_ok(a, 20))
            return a;
    return 0;
}

static u32 find_rsdp(void)
{
    u32 ebda = (u32)rd16(0x40e) << 4;
    u32 r = 0;
    if (ebda >= 0x80000 && ebda < 0xa0000)
        r = scan_rsdp(ebda, 1024);
    if (!r)
        r = scan_rsdp(0xe0000, 0x20000);
    return r;
}

/* A table's address if it looks sane (below 1 GiB, plausible length), else 0. */
static u32 table_ok(u32 addr)
{
    if (addr < 0x1000 || addr >= 0x40000000u)
        return 0;
    u32 len = rd32(addr + 4);
    if (len < 36 || len > 0x100000u)
        return 0;
    return addr;
}

static u32 find_fadt(u32 rsdp)
{
    u32 rsdt = table_ok(rd32(rsdp + 16));
    if (!rsdt || !sig_is(rsdt, "RSDT", 4))
        return 0;
    u32 n = (rd32(rsdt + 4) - 36) / 4;
    for (u32 i = 0; i < n; i++) {
        u32 t = table_ok(rd32(rsdt + 36 + 4 * i));
        if (t && sig_is(t, "FACP", 4))
            return t;
    }
    return 0;
}

/* SLP_TYPa of \_S5: NameOp "_S5_" PackageOp PkgLength NumElements <first element>. */
static int find_s5(u32 dsdt, u32 *slp_typ)
{
    u32 len = rd32(dsdt + 4);
    for (u32 a = dsdt + 36; a + 8 < dsdt + len; a++) {
        if (!sig_is(a, "_S5_", 4) || rd8(a + 4) != 0x12)
            continue;
        u32 p = a + 5;
        p += 1 + (rd8(p) >> 6); /* PkgLength: lead byte + 0..3 follow-on bytes */
        p += 1;                 /* NumElements */
        u8 op = rd8(p);
        if (op == 0x0a)
            *slp_typ = rd8(p + 1);
        else if (op == 0x00 || op == 0x01)
            *slp_typ = op;
        else
            continue;
        return 1;
    }
    return 0;
}

struct acpi {
    u16 evt, cnt, tmr;
    u32 tmr_mask;
    u32 s5;
};

static int acpi_init(struct acpi *a)
{
    u32 rsdp = find_rsdp();
    if (!rsdp) {
        puts("no RSDP\n");
        return 0;
    }
    u32 fadt = find_fadt(rsdp);
    if (!fadt) {
        puts("no FADT\n");
        return 0;
    }
    a->evt = (u16)rd32(fadt + 56);
    a->cnt = (u16)rd32(fadt + 64);
    a->tmr = (u16)rd32(fadt + 76);
    a->tmr_mask = (rd32(fadt + 112) & FADT_TMR_VAL_EXT) ? 0xffffffffu : 0x00ffffffu;
    u32 dsdt = table_ok(rd32(fadt + 40));
    a->s5 = 0;
    if (!dsdt || !find_s5(dsdt, &a->s5))
        puts("no _S5, using SLP_TYP 0\n");
    u32 smi_cmd = rd32(fadt + 48);
    u8 enable = rd8(fadt + 52);
    if (smi_cmd && enable && !(inw(a->cnt) & PM1_SCI_EN)) {
        outb((u16)smi_cmd, enable);
        for (u32 i = 0; i < 100000u && !(inw(a->cnt) & PM1_SCI_EN); i++)
            ;
    }
    /* PM1a_EN sits right after PM1a_STS (half of PM1_EVT_LEN). */
    u16 en = (u16)(a->evt + rd8(fadt + 88) / 2);
    outw(en, (u16)(inw(en) | PM1_PWRBTN));
    puts("acpi pm1a_evt=");
    puthex(a->evt);
    puts(" pm1a_cnt=");
    puthex(a->cnt);
    puts(" pm_tmr=");
    puthex(a->tmr);
    puts(" s5=");
    putdec(a->s5);
    puts(" sci_en=");
    putdec(inw(a->cnt) & PM1_SCI_EN);
    puts("\n");
    return a->evt && a->cnt && a->tmr;
}

static void delay(void)
{
    for (volatile u32 i = 0; i < 300; i++)
        ;
}

#define MB_BOOTLOADER_MAGIC 0x2BADB002u
#define MB_INFO_CMDLINE (1u << 2)

/* N from "KEY=N" on the multiboot command line (KEY includes the '='), or 0. */
static u32 cmdline_num(u32 magic, u32 mbi, const char *key)
{
    if (magic != MB_BOOTLOADER_MAGIC || !(rd32(mbi) & MB_INFO_CMDLINE))
        return 0;
    u32 klen = 0;
    while (key[klen])
        klen++;
    u32 p = rd32(mbi + 16);
    for (u32 i = 0; i < 4096 && rd8(p + i); i++) {
        if (!sig_is(p + i, key, klen))
            continue;
        u32 n = 0;
        for (u32 q = p + i + klen; rd8(q) >= '0' && rd8(q) <= '9' && n < 100000u; q++)
            n = n * 10u + (rd8(q) - '0');
        return n;
    }
    return 0;
}

#define PVPANIC_PORT 0x505

static void pvpanic_report(u32 value)
{
    puts("PVPANIC EVENTS=");
    putdec(inb(PVPANIC_PORT));
    puts("\n");
    outb(PVPANIC_PORT, (u8)value);
    puts("PVPANIC SENT\n");
}

static void keyboard_reset(void)
{
    puts("GUEST RESET\n");
    for (u32 i = 0; i < 100000u && (inb(0x64) & 0x02); i++)
        ;
    outb(0x64, 0xfe);
    for (;;)
        __asm__ volatile("cli; hlt");
}

void qmp_guest_main(u32 magic, u32 mbi)
{
    struct acpi a;
    u32 reset_n = cmdline_num(magic, mbi, "reset_after=");
    u32 panic_n = cmdline_num(magic, mbi, "panic_after=");
    u32 panic_v = cmdline_num(magic, mbi, "panic_value=");
    u32 keys = cmdline_num(magic, mbi, "keys=");
    puts("QMPGUEST BOOT\n");
    if (!acpi_init(&a)) {
        /* No PM timer to keep time with: tick every so many polls of the UART instead. */
        puts("QMPGUEST NO ACPI\n");
        for (u32 n = 0;; n++) {
            for (u32 i = 0; i < 2000u; i++)
                (void)inb(COM1 + 5);
            puts("tick ");
            putdec(n);
            puts("\n");
        }
    }
    u32 last = inl(a.tmr) & a.tmr_mask;
    u32 acc = 0, n = 0;
    for (;;) {
        u32 now = inl(a.tmr) & a.tmr_mask;
        acc += (now - last) & a.tmr_mask;
        last = now;
        if (acc >= TICK_PM) {
            /* After a long gap (a pause on a VMM whose timer kept running) print one tick, not a burst. */
            acc = acc >= 2 * TICK_PM ? 0 : acc - TICK_PM;
            puts("tick ");
            putdec(n++);
            puts("\n");
            if (panic_n && n == panic_n)
                pvpanic_report(panic_v ? panic_v : 1u);
            if (reset_n && n >= reset_n)
                keyboard_reset();
        }
        if (keys && (inb(0x64) & 0x01)) {
            puts("KEY ");
            puthex(inb(0x60));
            puts("\n");
        }
        if (inw(a.evt) & PM1_PWRBTN) {
            outw(a.evt, PM1_PWRBTN);
            puts("POWER BUTTON\nS5\n");
            outw(a.cnt, (u16)((a.s5 << 10) | PM1_SLP_EN));
            /* The VMM may act on the request a little later: give it two seconds before complaining. */
            for (u32 t0 = inl(a.tmr), waited = 0; waited < 2 * PM_TIMER_HZ;)
                waited = (inl(a.tmr) - t0) & a.tmr_mask;
            puts("S5 FAILED\n");
            for (;;)
                __asm__ volatile("cli; hlt");
        }
        delay();
    }
}
