"""PCI + virtio-pci + MSI-X on real KVM, with a tiny purpose-built guest (stock Linux is too slow here).

The guest (C source below, built with the test-guest toolchain from tests/support/guests) does what a
driver does: finds virtio-rng-pci on bus 0 through 0xcf8/0xcfc, reads the BARs the VMM assigned,
walks the capability list, enables MSI-X with vector 0 -> LAPIC vector 0x41, brings the device
to DRIVER_OK, posts one buffer and waits (interrupts on) for the MSI.  It reports on COM1 and
exits through isa-debug-exit.
"""

from __future__ import annotations

import re

from conftest import guest_build, run_pyvmm_kvm

GUEST_C = r"""
#include "guest.h"
#define LAPIC 0xfee00000u
#define VEC 0x41
struct idt_gate { u16 off_lo, sel; u8 zero, type; u16 off_hi; } __attribute__((packed));
extern const u32 isr_table[256];
void load_flat_gdt(void);
static struct idt_gate idt[256] __attribute__((aligned(8)));
static volatile u32 msis, unexpected;
static u8 ring[8192] __attribute__((aligned(4096)));
static u8 buf[64];

void irq_dispatch(u32 vec)
{
    if (vec < 32) { uart_puts("exception "); uart_putdec(vec); uart_putc('\n'); debug_exit(0); }
    if (vec == VEC) msis++; else if (vec != 0xff) unexpected++;
    if (vec != 0xff) mmio_write32(LAPIC + 0xb0, 0);
}

static u32 cfg(u32 slot, u32 off) { outl(0xcf8, 0x80000000u | (slot << 11) | (off & 0xfc)); return inl(0xcfc); }
static void cfgw16(u32 slot, u32 off, u16 v)
{
    outl(0xcf8, 0x80000000u | (slot << 11) | (off & 0xfc));
    outw(0xcfc + (off & 2), v);
}
static u8 rd8(uptr a) { return *(volatile u8 *)a; }
static void wr8(uptr a, u8 v) { *(volatile u8 *)a = v; }
static u16 rd16(uptr a) { return *(volatile u16 *)a; }
static void wr16(uptr a, u16 v) { *(volatile u16 *)a = v; }

void guest_main(u32 magic, u32 info)
{
    (void)magic; (void)info;
    uart_init();
    load_flat_gdt();
    for (int v = 0; v < 256; v++) {
        idt[v].off_lo = (u16)isr_table[v]; idt[v].off_hi = (u16)(isr_table[v] >> 16);
        idt[v].sel = 0x08; idt[v].zero = 0; idt[v].type = 0x8e;
    }
    struct { u16 limit; u32 base; } __attribute__((packed)) idtr = {sizeof(idt) - 1, (u32)(uptr)idt};
    __asm__ volatile("lidt %0" : : "m"(idtr));
    outb(0x21, 0xff); outb(0xa1, 0xff);                 /* PIC masked */
    mmio_write32(LAPIC + 0xf0, 0x100 | 0xff);          /* LAPIC software enable */
    int slot = -1;
    for (int s = 0; s < 32; s++) if (cfg(s, 0) == 0x10441af4u) slot = s;
    report_dec("slot", (u32)slot);
    if (slot < 0) debug_exit(1);
    report_hex("command", cfg(slot, 4) & 0xffff);
    u32 bar4 = cfg(slot, 0x20) & ~0xfu, bar1 = cfg(slot, 0x14) & ~0xfu;
    report_hex("bar4", bar4); report_hex("bar1", bar1);
    uptr common = 0, notify = 0, isr = 0; u32 mult = 0, msix_cap = 0, ncaps = 0;
    for (u32 p = cfg(slot, 0x34) & 0xff; p && ncaps < 32; p = (cfg(slot, p) >> 8) & 0xff, ncaps++) {
        u32 hdr = cfg(slot, p);
        if ((hdr & 0xff) == 0x11) msix_cap = p;
        if ((hdr & 0xff) != 0x09) continue;
        u32 type = hdr >> 24, bar = cfg(slot, p + 4) & 0xff, off = cfg(slot, p + 8);
        if (bar != 4) continue;
        if (type == 1) common = bar4 + off;
        if (type == 2) { notify = bar4 + off; mult = cfg(slot, p + 16); }
        if (type == 3) isr = bar4 + off;
    }
    report_dec("caps", ncaps);
    report_hex("msix_cap", msix_cap);
    if (!common || !notify || !isr || !msix_cap) debug_exit(2);
    /* MSI-X: entry 0 -> APIC 0, vector VEC; enable */
    mmio_write32(bar1 + 0, 0xfee00000u); mmio_write32(bar1 + 4, 0);
    mmio_write32(bar1 + 8, VEC); mmio_write32(bar1 + 12, 0);
    cfgw16(slot, msix_cap + 2, 0x8000);
    /* virtio init */
    wr8(common + 0x14, 0); wr8(common + 0x14, 1); wr8(common + 0x14, 3);
    mmio_write32(common + 0x08, 1); mmio_write32(common + 0x0c, 1);     /* VERSION_1 */
    wr8(common + 0x14, 0xb);
    report_hex("status", rd8(common + 0x14));
    wr16(common + 0x16, 0);
    wr16(common + 0x18, 8);
    wr16(common + 0x1a, 0);
    report_hex("qvec", rd16(common + 0x1a));
    u32 r = (u32)(uptr)ring;
    mmio_write32(common + 0x20, r); mmio_write32(common + 0x24, 0);
    mmio_write32(common + 0x28, r + 128); mmio_write32(common + 0x2c, 0);
    mmio_write32(common + 0x30, r + 4096); mmio_write32(common + 0x34, 0);
    wr16(common + 0x1c, 1);
    wr8(common + 0x14, 0xf);
    /* one 64-byte device-writable buffer */
    *(volatile u32 *)(ring + 0) = (u32)(uptr)buf; *(volatile u32 *)(ring + 4) = 0;
    *(volatile u32 *)(ring + 8) = sizeof(buf); *(volatile u16 *)(ring + 12) = 2;
    *(volatile u16 *)(ring + 128 + 4) = 0;
    *(volatile u16 *)(ring + 128 + 2) = 1;
    __asm__ volatile("sti");
    wr16(notify + rd16(common + 0x1e) * mult, 0);
    for (u32 i = 0; i < 3000000 && !msis; i++) cpu_relax();
    __asm__ volatile("cli");
    u32 nz = 0;
    for (u32 i = 0; i < sizeof(buf); i++) nz += buf[i] != 0;
    report_dec("msis", msis);
    report_dec("unexpected", unexpected);
    report_dec("used_idx", *(volatile u16 *)(ring + 4096 + 2));
    report_dec("used_len", *(volatile u32 *)(ring + 4096 + 8));
    report_dec("nonzero", nz);
    report_hex("isr", rd8(isr));
    debug_exit(msis && !unexpected && *(volatile u16 *)(ring + 4096 + 2) == 1 ? 0x21 : 3);
}
"""


def _build(tmp_path):
    src = tmp_path / "pci_msix.c"
    src.write_text(GUEST_C)
    b = guest_build
    work = tmp_path / "obj"
    work.mkdir()
    objs = [work / "entry.o", work / "lib.o", work / "main.o", work / "stubs.o"]
    b._cc(b.SRC / "mb_entry.S", objs[0], b.CFLAGS_32)
    b._cc(b.SRC / "guestlib.c", objs[1], b.CFLAGS_32)
    b._cc(src, objs[2], b.CFLAGS_32)
    b._cc(b.SRC / "irq_stubs.S", objs[3], b.CFLAGS_32)
    out = tmp_path / "pci_msix.elf"
    b._link(objs, b.LD_DIR / "multiboot.ld", out, "elf_i386")
    return out


def test_virtio_pci_msix_on_kvm(kvm, tmp_path):
    guest = _build(tmp_path)
    disk = tmp_path / "disk.raw"
    disk.write_bytes(bytes(1 << 20))
    # Other virtio-pci devices on the bus too (the guest drives only the rng), in front of it.
    r = run_pyvmm_kvm("--kernel", guest, "--serial", "stdio", "--device", f"virtio-blk-pci,file={disk},format=raw",
                      "--device", "virtio-console-pci,chardev=null", "--device", "virtio-rng-pci", timeout=120)
    out = r.serial
    vals = dict(re.findall(r"^(\w+)=(\S+)$", out, re.M))
    assert vals.get("slot") == "3", r.describe()
    assert int(vals["command"], 16) & 2, r.describe()  # firmware enabled memory decoding
    assert 0xC000_0000 <= int(vals["bar4"], 16) < 0xFEA0_0000, r.describe()
    assert int(vals["qvec"], 16) == 0 and int(vals["status"], 16) == 0xB, r.describe()
    assert vals["used_idx"] == "1" and vals["used_len"] == "64" and int(vals["nonzero"]) > 32, r.describe()
    assert vals["msis"] != "0" and vals["unexpected"] == "0", r.describe()
    assert int(vals["isr"], 16) & 1  # ISR bit set even with MSI-X (read clears it)
    assert r.returncode == ((0x21 << 1) | 1), r.describe()
