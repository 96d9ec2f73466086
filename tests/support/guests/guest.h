/*
 * Freestanding helpers shared by the C test guests (built -m32 and -m64).
 *
 * Everything here is port I/O and plain loops: the guests must run on KVM
 * hosts whose instruction emulator is slow and incomplete, so nothing fancier
 * than IN/OUT, MOV and simple ALU instructions is used, and every wait loop
 * is bounded.
 */
#ifndef PYVMM_TEST_GUEST_H
#define PYVMM_TEST_GUEST_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
#if defined(__x86_64__)
typedef unsigned long uptr;
#else
typedef unsigned int uptr;
#endif

#define COM1 0x3f8
#define DEBUG_EXIT_PORT 0xf4
#define FW_CFG_SEL 0x510
#define FW_CFG_DATA 0x511
#define FW_CFG_DMA_HI 0x514
#define FW_CFG_DMA_LO 0x518

#define FW_CFG_SIGNATURE 0x00
#define FW_CFG_ID 0x01
#define FW_CFG_RAM_SIZE 0x03
#define FW_CFG_NB_CPUS 0x05
#define FW_CFG_CMDLINE_SIZE 0x14
#define FW_CFG_CMDLINE_DATA 0x15

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outw(u16 port, u16 v) { __asm__ volatile("outw %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u16 inw(u16 port) { u16 v; __asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u32 inl(u16 port) { u32 v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port)); return v; }

static inline u32 mmio_read32(uptr addr) { return *(volatile u32 *)addr; }
static inline void mmio_write32(uptr addr, u32 v) { *(volatile u32 *)addr = v; }
static inline void cpu_relax(void) { __asm__ volatile("pause" ::: "memory"); }

/* guestlib.c */
void *memset(void *dst, int c, uptr n);
void *memcpy(void *dst, const void *src, uptr n);
int memcmp(const void *a, const void *b, uptr n);
uptr strlen(const char *s);
const char *strstr(const char *hay, const char *needle);
/* Value of "key=<decimal or 0xhex>" inside cmdline, or dflt when absent. */
u64 cmdline_get_num(const char *cmdline, const char *key, u64 dflt);

void uart_init(void);
void uart_putc(char c);
void uart_puts(const char *s);
void uart_puthex(u64 v);
void uart_putdec(u64 v);
/* "name=value\n" helpers keep the serial summary machine-readable for the tests. */
void report_hex(const char *name, u64 v);
void report_dec(const char *name, u64 v);
void report_str(const char *name, const char *s);

int fw_cfg_present(void);
void fw_cfg_select(u16 key);
void fw_cfg_read(void *buf, u32 len);
u64 fw_cfg_read_u64(u16 key);
u32 fw_cfg_read_u32(u16 key);
u16 fw_cfg_read_u16(u16 key);

/* isa-debug-exit port (0xf4 unless a guest takes "exitport=" from its command line). */
extern u16 debug_exit_port;
__attribute__((noreturn)) void debug_exit(u8 value);

/* Pattern the tests put in the initrd/module file: byte i = (i * 7 + 3) & 0xff. */
static inline u8 initrd_pattern(u32 i) { return (u8)(i * 7 + 3); }

#endif
