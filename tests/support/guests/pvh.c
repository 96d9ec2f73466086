/*
 * PVH boot test guest (ELF32 with XEN_ELFNOTE_PHYS32_ENTRY): validates the
 * hvm_start_info the loader passed in EBX.  Expectations come from the
 * command line ("pyvmm-test mem=<MiB> initrd=<bytes>").
 *
 * Exit value: CHECK_* bits, 0x7f when all pass.
 */
#include "guest.h"

enum {
    CHECK_ENTRY = 1 << 0,   /* magic 0x336ec578, version >= 1, CR0.PE=1 PG=0, IF=0, flat 32-bit CS */
    CHECK_CMDLINE = 1 << 1, /* cmdline_paddr -> string with the test token */
    CHECK_MODULE = 1 << 2,  /* one module with the test's initrd size and content */
    CHECK_MEMMAP = 1 << 3,  /* memmap consistent with mem= */
    CHECK_RSDP = 1 << 4,    /* rsdp_paddr -> valid "RSD PTR " */
    CHECK_FWCFG = 1 << 5,   /* fw_cfg signature and RAM size */
    CHECK_STACK = 1 << 6,   /* nothing the loader wrote overlaps our image (start_info outside it) */
};

struct hvm_start_info {
    u32 magic, version, flags, nr_modules;
    u64 modlist_paddr, cmdline_paddr, rsdp_paddr, memmap_paddr;
    u32 memmap_entries, reserved;
} __attribute__((packed));
struct hvm_modlist_entry {
    u64 paddr, size, cmdline_paddr, reserved;
} __attribute__((packed));
struct hvm_memmap_entry {
    u64 addr, size;
    u32 type, reserved;
} __attribute__((packed));
_Static_assert(sizeof(struct hvm_start_info) == 56, "hvm_start_info layout");
_Static_assert(sizeof(struct hvm_modlist_entry) == 32, "hvm_modlist_entry layout");
_Static_assert(sizeof(struct hvm_memmap_entry) == 24, "hvm_memmap_table_entry layout");

#define PCI_HOLE 0xC0000000ull
#define HIGH_RAM 0x100000000ull

extern char pvh_start[], __bss_end[];

static u8 sum8(const u8 *p, u32 n)
{
    u8 s = 0;
    while (n--)
        s += *p++;
    return s;
}

static u32 check_memmap(const struct hvm_start_info *si, u64 mem)
{
    if (si->version < 1 || !si->memmap_paddr || si->memmap_entries == 0 || si->memmap_entries > 128)
        return 0;
    u64 low = mem < PCI_HOLE ? mem : PCI_HOLE, high = mem - low;
    int have_low = 0, have_high = 0, have_above_4g = high == 0, over = 0;
    const struct hvm_memmap_entry *e = (const struct hvm_memmap_entry *)(uptr)si->memmap_paddr;
    for (u32 i = 0; i < si->memmap_entries; i++, e++) {
        uart_puts("memmap ");
        uart_puthex(e->addr);
        uart_putc(' ');
        uart_puthex(e->size);
        uart_putc(' ');
        uart_putdec(e->type);
        uart_putc('\n');
        if (e->type != 1)
            continue;
        if (e->addr == 0 && e->size >= 0x80000)
            have_low = 1;
        if (e->addr <= 0x100000 && e->addr + e->size >= low - 0x100000 && e->addr + e->size <= low)
            have_high = 1;
        if (e->addr < HIGH_RAM && e->addr + e->size > low)
            over = 1;
        if (e->addr == HIGH_RAM && e->size == high)
            have_above_4g = 1;
    }
    return have_low && have_high && have_above_4g && !over;
}

static u32 check_module(const struct hvm_start_info *si, u64 want)
{
    report_dec("nr_modules", si->nr_modules);
    if (si->nr_modules != 1 || !si->modlist_paddr)
        return 0;
    const struct hvm_modlist_entry *m = (const struct hvm_modlist_entry *)(uptr)si->modlist_paddr;
    const u8 *p = (const u8 *)(uptr)m->paddr;
    u32 sum = 0, bad = 0;
    for (u64 i = 0; i < m->size; i++) {
        sum = sum * 31 + p[i];
        bad |= p[i] ^ initrd_pattern((u32)i);
    }
    report_hex("mod_paddr", m->paddr);
    report_dec("mod_size", m->size);
    report_hex("mod_sum", sum);
    return m->size == want && !bad && m->paddr >= 0x100000;
}

void pvh_main(const struct hvm_start_info *si, u32 eflags, u32 cs)
{
    u32 ok = 0, cr0;
    uart_init();
    uart_puts("pvh guest\n");
    __asm__ volatile("mov %%cr0, %0" : "=r"(cr0));
    report_hex("start_info", (uptr)si);
    report_hex("magic", si->magic);
    report_dec("version", si->version);
    report_hex("cr0", cr0);
    report_hex("eflags", eflags);
    report_hex("cs", cs);
    if (si->magic == 0x336ec578 && si->version >= 1 && (cr0 & 0x80000001u) == 1 && !(eflags & 0x20300))
        ok |= CHECK_ENTRY;

    const char *cmdline = si->cmdline_paddr ? (const char *)(uptr)si->cmdline_paddr : "";
    report_str("cmdline", cmdline);
    if (strstr(cmdline, "pyvmm-test"))
        ok |= CHECK_CMDLINE;
    u64 mem = cmdline_get_num(cmdline, "mem", 128) << 20;
    if (check_module(si, cmdline_get_num(cmdline, "initrd", 0)))
        ok |= CHECK_MODULE;
    if (check_memmap(si, mem))
        ok |= CHECK_MEMMAP;
    report_hex("rsdp_paddr", si->rsdp_paddr);
    if (si->rsdp_paddr && si->rsdp_paddr < 0x100000 &&
        memcmp((const void *)(uptr)si->rsdp_paddr, "RSD PTR ", 8) == 0 &&
        sum8((const u8 *)(uptr)si->rsdp_paddr, 20) == 0)
        ok |= CHECK_RSDP;
    if (fw_cfg_present() && fw_cfg_read_u64(FW_CFG_RAM_SIZE) == mem)
        ok |= CHECK_FWCFG;
    uptr s = (uptr)si;
    if (s + sizeof(*si) <= (uptr)pvh_start || s >= (uptr)__bss_end)
        ok |= CHECK_STACK;
    report_hex("result", ok);
    debug_exit((u8)ok);
}
