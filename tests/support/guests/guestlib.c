/* Freestanding runtime for the C test guests: string helpers, UART, fw_cfg, debug-exit. */
#include "guest.h"

/* String instructions: an instruction emulator runs them in large batches, a byte loop it does not. */
void *memset(void *dst, int c, uptr n)
{
    void *d = dst;
    __asm__ volatile("cld; rep stosb" : "+D"(d), "+c"(n) : "a"(c) : "memory");
    return dst;
}

void *memcpy(void *dst, const void *src, uptr n)
{
    void *d = dst;
    __asm__ volatile("cld; rep movsb" : "+D"(d), "+S"(src), "+c"(n) : : "memory");
    return dst;
}

int memcmp(const void *a, const void *b, uptr n)
{
    const u8 *x = a, *y = b;
    for (; n; n--, x++, y++)
        if (*x != *y)
            return *x < *y ? -1 : 1;
    return 0;
}

uptr strlen(const char *s)
{
    uptr n = 0;
    while (s[n])
        n++;
    return n;
}

const char *strstr(const char *hay, const char *needle)
{
    uptr n = strlen(needle);
    for (; *hay; hay++)
        if (memcmp(hay, needle, n) == 0)
            return hay;
    return 0;
}

u64 cmdline_get_num(const char *cmdline, const char *key, u64 dflt)
{
    uptr klen = strlen(key);
    const char *p = cmdline;
    while (p && *p) {
        /* match only at the start of a word */
        if ((p == cmdline || p[-1] == ' ') && memcmp(p, key, klen) == 0 && p[klen] == '=') {
            u64 v = 0;
            const char *d = p + klen + 1;
            if (*d < '0' || *d > '9')
                return dflt;
            if (d[0] == '0' && (d[1] == 'x' || d[1] == 'X')) {
                for (d += 2;; d++) {
                    char c = *d | 0x20;
                    if (*d >= '0' && *d <= '9')
                        v = v * 16 + (u64)(*d - '0');
                    else if (c >= 'a' && c <= 'f')
                        v = v * 16 + (u64)(c - 'a' + 10);
                    else
                        return v;
                }
            }
            while (*d >= '0' && *d <= '9')
                v = v * 10 + (u64)(*d++ - '0');
            return v;
        }
        p++;
    }
    return dflt;
}

#define UART_LSR 5
#define LSR_THRE 0x20

void uart_init(void)
{
    outb(COM1 + 1, 0x00);  /* no interrupts: every guest polls */
    outb(COM1 + 3, 0x80);  /* DLAB */
    outb(COM1 + 0, 0x01);  /* 115200 baud */
    outb(COM1 + 1, 0x00);
    outb(COM1 + 3, 0x03);  /* 8N1 */
    /* FCR untouched: switching the FIFOs on clears them, losing input that already arrived. */
    outb(COM1 + 4, 0x03);  /* DTR | RTS */
}

static u8 rtc_seconds(void)
{
    outb(0x70, 0x00);
    return inb(0x71);
}

void uart_putc(char c)
{
    /*
     * Wait for THRE, bounded by time rather than a count: a busy host can
     * stall the VMM's back-end for a while (dropping output would make tests
     * flaky), but a VMM that never sets THRE must not hang the guest forever.
     */
    if (!(inb(COM1 + UART_LSR) & LSR_THRE)) {
        u8 last = rtc_seconds();
        int secs = 0;
        for (int i = 0; !(inb(COM1 + UART_LSR) & LSR_THRE); i++) {
            if (i % 1000 == 999) {
                u8 now = rtc_seconds();
                if (now != last) {
                    last = now;
                    if (++secs > 3)
                        break;
                }
            }
        }
    }
    outb(COM1, (u8)c);
}

void uart_puts(const char *s)
{
    while (*s)
        uart_putc(*s++);
}

void uart_puthex(u64 v)
{
    static const char digits[] = "0123456789abcdef";
    int shift = 60;
    uart_puts("0x");
    while (shift > 0 && ((v >> shift) & 0xf) == 0)
        shift -= 4;
    for (; shift >= 0; shift -= 4)
        uart_putc(digits[(v >> shift) & 0xf]);
}

void uart_putdec(u64 v)
{
    char buf[24];
    int n = 0;
    do {
        /* 64-bit division would need libgcc on i386: divide by 10 via subtraction of shifts. */
        u64 q = 0, r = v;
        for (int b = 63; b >= 0; b--) {
            if ((r >> b) >= 10) {
                r -= (u64)10 << b;
                q |= (u64)1 << b;
            }
        }
        buf[n++] = (char)('0' + r);
        v = q;
    } while (v);
    while (n)
        uart_putc(buf[--n]);
}

void report_hex(const char *name, u64 v)
{
    uart_puts(name);
    uart_putc('=');
    uart_puthex(v);
    uart_putc('\n');
}

void report_dec(const char *name, u64 v)
{
    uart_puts(name);
    uart_putc('=');
    uart_putdec(v);
    uart_putc('\n');
}

void report_str(const char *name, const char *s)
{
    uart_puts(name);
    uart_puts("=\"");
    uart_puts(s);
    uart_puts("\"\n");
}

void fw_cfg_select(u16 key) { outw(FW_CFG_SEL, key); }

void fw_cfg_read(void *buf, u32 len)
{
    u8 *b = buf;
    while (len--)
        *b++ = inb(FW_CFG_DATA);
}

int fw_cfg_present(void)
{
    char sig[4];
    fw_cfg_select(FW_CFG_SIGNATURE);
    fw_cfg_read(sig, 4);
    return memcmp(sig, "QEMU", 4) == 0;
}

u64 fw_cfg_read_u64(u16 key)
{
    u64 v = 0;
    fw_cfg_select(key);
    fw_cfg_read(&v, 8);
    return v;
}

u32 fw_cfg_read_u32(u16 key)
{
    u32 v = 0;
    fw_cfg_select(key);
    fw_cfg_read(&v, 4);
    return v;
}

u16 fw_cfg_read_u16(u16 key)
{
    u16 v = 0;
    fw_cfg_select(key);
    fw_cfg_read(&v, 2);
    return v;
}

u16 debug_exit_port = DEBUG_EXIT_PORT;

void debug_exit(u8 value)
{
    outb(debug_exit_port, value);
    /* Without an isa-debug-exit device the write is ignored: stop here quietly. */
    for (;;)
        __asm__ volatile("cli; hlt");
}
