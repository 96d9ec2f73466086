/*
 * Multiboot v1 test guest: validates what the loader and fw_cfg told it.
 *
 * The test passes its expectations on the command line
 * ("pyvmm-test mem=<MiB> cpus=<n> initrd=<bytes> [mods=<n>]"), so one binary checks
 * any -m/-smp/-initrd combination.  The exit value is a bit mask of the
 * checks that passed (see CHECK_*), so the test can tell exactly which one
 * failed from the exit status alone; the serial summary carries the values.
 */
#include "guest.h"

#define MB_BOOT_MAGIC 0x2BADB002

enum {
    CHECK_MAGIC = 1 << 0,     /* EAX == 0x2BADB002; CR0.PE=1 PG=0; EFLAGS.IF=0 VM=0 */
    CHECK_MEM = 1 << 1,       /* mem_lower / mem_upper agree with mem= (within 1 MiB) */
    CHECK_CMDLINE = 1 << 2,   /* cmdline present and carries the test token */
    CHECK_MODULE = 1 << 3,    /* mods= modules (default 1), size and content as the test wrote them */
    CHECK_MMAP = 1 << 4,      /* memory map present and consistent with mem= */
    CHECK_FWCFG_SIG = 1 << 5, /* fw_cfg signature "QEMU" */
    CHECK_FWCFG_VAL = 1 << 6, /* fw_cfg RAM_SIZE / NB_CPUS agree with mem= / cpus= */
};

struct mb_info {
    u32 flags, mem_lower, mem_upper, boot_device, cmdline, mods_count, mods_addr;
    u32 syms[4];
    u32 mmap_length, mmap_addr;
} __attribute__((packed));

struct mb_module {
    u32 mod_start, mod_end, string, reserved;
} __attribute__((packed));

struct mb_mmap {
    u32 size;
    u64 addr, len;
    u32 type;
} __attribute__((packed));

_Static_assert(sizeof(struct mb_info) == 52, "mb_info layout");
_Static_assert(sizeof(struct mb_module) == 16, "mb_module layout");
_Static_assert(sizeof(struct mb_mmap) == 24, "mb_mmap layout");

/* The machine state the multiboot spec promises at entry (eflags as saved by mb_entry.S). */
static int entry_state_ok(u32 eflags)
{
    u32 cr0;
    u16 cs, ds, ss;
    __asm__ volatile("mov %%cr0, %0" : "=r"(cr0));
    __asm__ volatile("mov %%cs, %0; mov %%ds, %1; mov %%ss, %2" : "=r"(cs), "=r"(ds), "=r"(ss));
    report_hex("cr0", cr0);
    report_hex("eflags", eflags);
    return (cr0 & 0x80000001u) == 1 && !(eflags & 0x20200) && cs && ds && ss && !(cs & 4);
}

/* PC layout: RAM up to the 32-bit PCI hole at 3 GiB, the rest from 4 GiB up. */
#define PCI_HOLE 0xC0000000ull
#define HIGH_RAM 0x100000000ull

static u32 check_mem(const struct mb_info *mbi, u64 mem)
{
    if (!(mbi->flags & 1))
        return 0;
    report_dec("mem_lower", mbi->mem_lower);
    report_dec("mem_upper", mbi->mem_upper);
    /* Upper memory may stop short of the top of RAM where firmware reserves some. */
    u64 low = mem < PCI_HOLE ? mem : PCI_HOLE;
    u64 top = (u64)mbi->mem_upper * 1024 + 0x100000;
    return mbi->mem_lower >= 512 && mbi->mem_lower <= 640 && top <= low && top + 0x100000 >= low;
}

static u32 check_module(const struct mb_info *mbi, u64 want_size, u32 want_count)
{
    if (!(mbi->flags & 8))
        return 0;
    report_dec("mods_count", mbi->mods_count);
    if (mbi->mods_count != want_count || want_count == 0 || want_count > 8)
        return 0;
    u32 good = 1;
    for (u32 m = 0; m < mbi->mods_count; m++) {
        const struct mb_module *mod = (const struct mb_module *)(uptr)mbi->mods_addr + m;
        u32 size = mod->mod_end - mod->mod_start;
        const u8 *data = (const u8 *)(uptr)mod->mod_start;
        u32 sum = 0, bad = 0;
        for (u32 i = 0; i < size; i++) {
            sum = sum * 31 + data[i];
            bad |= data[i] ^ initrd_pattern(i);
        }
        /* The first module keeps the historical names; the others are numbered. */
        char key[] = "mod0_";
        key[3] = (char)('0' + m);
        uart_puts(m ? key : "mod_");
        report_hex("start", mod->mod_start);
        uart_puts(m ? key : "mod_");
        report_dec("size", size);
        uart_puts(m ? key : "mod_");
        report_hex("sum", sum);
        uart_puts(m ? key : "mod_");
        report_str("cmdline", mod->string ? (const char *)(uptr)mod->string : "");
        if (size != want_size || bad || (mod->mod_start & 0xfff) || mod->mod_end <= mod->mod_start)
            good = 0;
    }
    return good;
}

static u8 cmos_read(u8 idx)
{
    outb(0x70, idx);
    return inb(0x71);
}

static u32 bcd(u32 v, int is_bcd) { return is_bcd ? (v >> 4) * 10 + (v & 15) : v; }

static void put2(u32 v)
{
    uart_putc((char)('0' + v / 10 % 10));
    uart_putc((char)('0' + v % 10));
}

/* Report the RTC date/time and the CMOS bytes firmware and OSes read for memory size / CPUs. */
static void report_cmos(void)
{
    for (int i = 0; i < 100000 && (cmos_read(0x0a) & 0x80); i++)
        cpu_relax();
    u8 b = cmos_read(0x0b);
    int is_bcd = !(b & 4);
    u32 sec = bcd(cmos_read(0x00), is_bcd), min = bcd(cmos_read(0x02), is_bcd);
    u8 hraw = cmos_read(0x04);
    u32 hour = bcd(hraw & 0x7f, is_bcd);
    if (!(b & 2) && (hraw & 0x80)) /* 12-hour mode, PM */
        hour = hour % 12 + 12;
    u32 day = bcd(cmos_read(0x07), is_bcd), mon = bcd(cmos_read(0x08), is_bcd);
    u32 year = bcd(cmos_read(0x09), is_bcd), cent = bcd(cmos_read(0x32), is_bcd);
    report_hex("rtc_status_b", b);
    uart_puts("rtc=");
    put2(cent);
    put2(year);
    uart_putc('-');
    put2(mon);
    uart_putc('-');
    put2(day);
    uart_putc(' ');
    put2(hour);
    uart_putc(':');
    put2(min);
    uart_putc(':');
    put2(sec);
    uart_putc('\n');
    report_dec("cmos_ext_mem_kb", cmos_read(0x30) | (u32)cmos_read(0x31) << 8);
    report_dec("cmos_mem_above_16m_64k", cmos_read(0x34) | (u32)cmos_read(0x35) << 8);
    report_dec("cmos_mem_above_4g_64k", cmos_read(0x5b) | (u32)cmos_read(0x5c) << 8 | (u32)cmos_read(0x5d) << 16);
    report_dec("cmos_cpus_minus_1", cmos_read(0x5f));
}

static u32 check_mmap(const struct mb_info *mbi, u64 mem)
{
    if (!(mbi->flags & 0x40))
        return 0;
    u64 low = mem < PCI_HOLE ? mem : PCI_HOLE, high = mem - low;
    int have_low = 0, have_high = 0, have_above_4g = high == 0, over = 0, n = 0;
    uptr p = mbi->mmap_addr, end = mbi->mmap_addr + mbi->mmap_length;
    while (p < end && n < 64) {
        const struct mb_mmap *e = (const struct mb_mmap *)p;
        uart_puts("mmap ");
        uart_puthex(e->addr);
        uart_putc(' ');
        uart_puthex(e->len);
        uart_putc(' ');
        uart_putdec(e->type);
        uart_putc('\n');
        if (e->type == 1) {
            if (e->addr == 0 && e->len >= 0x80000)
                have_low = 1;
            if (e->addr <= 0x100000 && e->addr + e->len >= low - 0x100000 && e->addr + e->len <= low)
                have_high = 1;
            if (e->addr < HIGH_RAM && e->addr + e->len > low)
                over = 1;
            if (e->addr == HIGH_RAM && e->len == high)
                have_above_4g = 1;
            if (e->addr >= HIGH_RAM && e->addr + e->len > HIGH_RAM + high)
                over = 1;
        }
        p += e->size + 4;
        n++;
    }
    report_dec("mmap_entries", (u64)n);
    return n > 0 && have_low && have_high && have_above_4g && !over;
}

static u32 check_fw_cfg_values(u64 mem, u64 cpus)
{
    u64 ram = fw_cfg_read_u64(FW_CFG_RAM_SIZE);
    u16 ncpu = fw_cfg_read_u16(FW_CFG_NB_CPUS);
    u32 cmdlen = fw_cfg_read_u32(FW_CFG_CMDLINE_SIZE);
    report_hex("fw_cfg_ram", ram);
    report_dec("fw_cfg_cpus", ncpu);
    report_dec("fw_cfg_cmdline_size", cmdlen);
    if (cmdlen > 0 && cmdlen < 256) {
        char buf[256];
        fw_cfg_select(FW_CFG_CMDLINE_DATA);
        fw_cfg_read(buf, cmdlen);
        buf[cmdlen] = 0;
        report_str("fw_cfg_cmdline", buf);
    }
    return ram == mem && ncpu == cpus;
}

void guest_main(u32 magic, const struct mb_info *mbi, u32 entry_eflags)
{
    u32 ok = 0;
    const char *cmdline = "";

    uart_init();
    uart_puts("multiboot guest\n");
    report_hex("magic", magic);
    if (magic == MB_BOOT_MAGIC && entry_state_ok(entry_eflags))
        ok |= CHECK_MAGIC;
    report_hex("mbi_flags", mbi->flags);
    if ((mbi->flags & 4) && mbi->cmdline)
        cmdline = (const char *)(uptr)mbi->cmdline;
    report_str("cmdline", cmdline);
    if (strstr(cmdline, "pyvmm-test"))
        ok |= CHECK_CMDLINE;

    debug_exit_port = (u16)cmdline_get_num(cmdline, "exitport", DEBUG_EXIT_PORT);
    u64 mem = cmdline_get_num(cmdline, "mem", 128) << 20;
    u64 cpus = cmdline_get_num(cmdline, "cpus", 1);
    u64 initrd = cmdline_get_num(cmdline, "initrd", 0);

    if (check_mem(mbi, mem))
        ok |= CHECK_MEM;
    u32 mods = (u32)cmdline_get_num(cmdline, "mods", 1);
    if (check_module(mbi, initrd, mods))
        ok |= CHECK_MODULE;
    if (check_mmap(mbi, mem))
        ok |= CHECK_MMAP;
    if (fw_cfg_present()) {
        ok |= CHECK_FWCFG_SIG;
        if (check_fw_cfg_values(mem, cpus))
            ok |= CHECK_FWCFG_VAL;
    }
    report_cmos();
    report_hex("result", ok);
    debug_exit((u8)ok);
}
