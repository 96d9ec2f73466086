/*
 * blkbench: block-device throughput measured inside a guest, for bench/blk.py.
 *
 * Usage: blkbench DEVICE [SIZE_MIB [SECONDS [SEQ_BLOCK_KIB]]]
 *   DEVICE        block device to test (its contents are overwritten), e.g. /dev/vda;
 *                 a regular file of at least SIZE_MIB works too (for trying it on a host)
 *   SIZE_MIB      region used by every phase, from offset 0 (default 32)
 *   SECONDS       duration of each random-I/O phase (default 3)
 *   SEQ_BLOCK_KIB request size of the sequential phases (default 1024)
 *
 * Phases, in order: sequential write of the region, sequential read of it
 * (every block's stamp is checked, so a device that loses or misplaces data
 * fails the run instead of looking fast), 4 KiB random reads, 4 KiB random
 * writes.  The device is opened with O_DIRECT so the guest page cache is out of
 * the picture; if the device refuses O_DIRECT the program falls back to O_SYNC
 * plus dropping the page cache between phases, and says so (mode=sync).
 *
 * Output (on stdout, unbuffered so the host can timestamp each line):
 *   BLKBENCH-ENV device=.. sysfs=.. clocksource=..   where the device sits (virtio-mmio or PCI)
 *   BLKBENCH-PHASE <name> begin|end t=<guest seconds>  around every phase
 *   BLKBENCH mode=.. size_mib=.. seq_write_mibs=.. seq_read_mibs=.. rand_read_iops=.. rand_write_iops=.. ...
 * and exit status 0; on any failure one "BLKBENCH-ERROR ..." line and status 1.
 * Times come from clock_gettime(CLOCK_MONOTONIC) in the guest.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <time.h>
#include <unistd.h>

#define RAND_BLOCK 4096u
#define ALIGN 4096u

static int direct = 1;
static int regular_file; /* a plain file instead of a device: for testing the program on a host */

static void fail(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    printf("BLKBENCH-ERROR ");
    vprintf(fmt, ap);
    printf("\n");
    va_end(ap);
    exit(1);
}

static double now(void)
{
    struct timespec ts;
    if (clock_gettime(CLOCK_MONOTONIC, &ts) != 0)
        fail("clock_gettime: %s", strerror(errno));
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void phase(const char *name, const char *what)
{
    printf("BLKBENCH-PHASE %s %s t=%.6f\n", name, what, now());
}

/* One line about the environment: which bus the device sits on, and the guest's clock source. */
static void describe(const char *dev, const struct stat *st)
{
    char link[512], path[4096], clock[64] = "unknown";
    const char *where = "none";
    if (S_ISBLK(st->st_mode)) {
        snprintf(link, sizeof link, "/sys/dev/block/%u:%u/device", major(st->st_rdev), minor(st->st_rdev));
        if (realpath(link, path) != NULL)
            where = path;
    }
    FILE *f = fopen("/sys/devices/system/clocksource/clocksource0/current_clocksource", "r");
    if (f != NULL) {
        if (fscanf(f, "%63s", clock) != 1)
            strcpy(clock, "unknown");
        fclose(f);
    }
    printf("BLKBENCH-ENV device=%s sysfs=%s clocksource=%s\n", dev, where, clock);
}

/* xorshift64*: a fixed-seed generator, so both VMMs see the same offsets. */
static uint64_t rng_state = 0x9E3779B97F4A7C15ull;

static uint64_t rng_next(void)
{
    uint64_t x = rng_state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    rng_state = x;
    return x * 0x2545F4914F6CDD1Dull;
}

static void full_pwrite(int fd, const void *buf, size_t len, off_t off)
{
    ssize_t n = pwrite(fd, buf, len, off);
    if (n < 0)
        fail("pwrite %zu bytes at %lld: %s", len, (long long)off, strerror(errno));
    if ((size_t)n != len)
        fail("short pwrite at %lld: %zd of %zu bytes", (long long)off, n, len);
}

static void full_pread(int fd, void *buf, size_t len, off_t off)
{
    ssize_t n = pread(fd, buf, len, off);
    if (n < 0)
        fail("pread %zu bytes at %lld: %s", len, (long long)off, strerror(errno));
    if ((size_t)n != len)
        fail("short pread at %lld: %zd of %zu bytes", (long long)off, n, len);
}

/* Without O_DIRECT, make the next phase read from the device again. */
static void drop_cache(int fd)
{
    if (direct)
        return;
    if (fsync(fd) != 0)
        fail("fsync: %s", strerror(errno));
    if (regular_file) {
        int err = posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
        if (err != 0)
            fail("posix_fadvise: %s", strerror(err));
    } else if (ioctl(fd, BLKFLSBUF, 0) != 0) {
        fail("BLKFLSBUF: %s", strerror(errno));
    }
}

/* Stamp every 4 KiB of a sequential block with its absolute offset. */
static void stamp(unsigned char *buf, size_t len, uint64_t off)
{
    for (size_t i = 0; i < len; i += RAND_BLOCK) {
        uint64_t v = off + i;
        memcpy(buf + i, &v, sizeof v);
        memcpy(buf + i + RAND_BLOCK - sizeof v, &v, sizeof v);
    }
}

static void check_stamp(const unsigned char *buf, size_t len, uint64_t off)
{
    for (size_t i = 0; i < len; i += RAND_BLOCK) {
        uint64_t head, tail;
        memcpy(&head, buf + i, sizeof head);
        memcpy(&tail, buf + i + RAND_BLOCK - sizeof tail, sizeof tail);
        if (head != off + i || tail != off + i)
            fail("data check failed at offset %llu: read back stamps %llu/%llu",
                 (unsigned long long)(off + i), (unsigned long long)head, (unsigned long long)tail);
    }
}

static double run_random(int fd, unsigned char *buf, uint64_t blocks, double seconds, int write, long *ops_out)
{
    long ops = 0;
    double t0 = now(), t = t0;
    while (t - t0 < seconds) {
        /* check the clock every 16 requests: cheap, and short enough to stop on time */
        for (int k = 0; k < 16; k++) {
            off_t off = (off_t)(rng_next() % blocks) * RAND_BLOCK;
            if (write) {
                memcpy(buf, &ops, sizeof ops);
                full_pwrite(fd, buf, RAND_BLOCK, off);
            } else {
                full_pread(fd, buf, RAND_BLOCK, off);
            }
            ops++;
        }
        t = now();
    }
    if (write && !direct && fsync(fd) != 0)
        fail("fsync: %s", strerror(errno));
    t = now();
    *ops_out = ops;
    return (double)ops / (t - t0);
}

static long parse_arg(const char *text, const char *what, long lo, long hi)
{
    char *end;
    errno = 0;
    long v = strtol(text, &end, 10);
    if (errno || *end || v < lo || v > hi)
        fail("bad %s %s (want %ld..%ld)", what, text, lo, hi);
    return v;
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IONBF, 0);
    if (argc < 2 || argc > 5)
        fail("usage: blkbench DEVICE [SIZE_MIB [SECONDS [SEQ_BLOCK_KIB]]]");
    const char *dev = argv[1];
    long size_mib = argc > 2 ? parse_arg(argv[2], "SIZE_MIB", 1, 1 << 20) : 32;
    long seconds = argc > 3 ? parse_arg(argv[3], "SECONDS", 1, 3600) : 3;
    long seq_kib = argc > 4 ? parse_arg(argv[4], "SEQ_BLOCK_KIB", 4, 65536) : 1024;
    if (seq_kib % 4)
        fail("SEQ_BLOCK_KIB must be a multiple of 4");
    uint64_t size = (uint64_t)size_mib << 20;
    size_t seq_block = (size_t)seq_kib << 10;
    if (size % seq_block)
        fail("SIZE_MIB must be a multiple of the sequential block size");

    int fd = open(dev, O_RDWR | O_DIRECT);
    if (fd < 0 && errno == EINVAL) {
        direct = 0;
        fd = open(dev, O_RDWR | O_SYNC);
    }
    if (fd < 0)
        fail("open %s: %s", dev, strerror(errno));
    uint64_t dev_size = 0;
    struct stat st;
    if (fstat(fd, &st) != 0)
        fail("fstat %s: %s", dev, strerror(errno));
    regular_file = S_ISREG(st.st_mode);
    describe(dev, &st);
    if (regular_file)
        dev_size = (uint64_t)st.st_size;
    else if (ioctl(fd, BLKGETSIZE64, &dev_size) != 0)
        fail("BLKGETSIZE64 %s: %s (not a block device?)", dev, strerror(errno));
    if (dev_size < size)
        fail("%s has %llu bytes, the benchmark needs %llu", dev, (unsigned long long)dev_size,
             (unsigned long long)size);

    unsigned char *buf;
    if (posix_memalign((void **)&buf, ALIGN, seq_block) != 0)
        fail("out of memory for a %zu-byte buffer", seq_block);
    memset(buf, 0xA5, seq_block);

    /* sequential write (including the final flush to the device) */
    phase("seq_write", "begin");
    double t0 = now();
    for (uint64_t off = 0; off < size; off += seq_block) {
        stamp(buf, seq_block, off);
        full_pwrite(fd, buf, seq_block, (off_t)off);
    }
    if (fdatasync(fd) != 0)
        fail("fdatasync: %s", strerror(errno));
    double seq_write_s = now() - t0;
    phase("seq_write", "end");
    drop_cache(fd);

    /* sequential read, verifying what the write phase stored */
    phase("seq_read", "begin");
    t0 = now();
    for (uint64_t off = 0; off < size; off += seq_block) {
        full_pread(fd, buf, seq_block, (off_t)off);
        check_stamp(buf, seq_block, off);
    }
    double seq_read_s = now() - t0;
    phase("seq_read", "end");
    drop_cache(fd);

    uint64_t blocks = size / RAND_BLOCK;
    long rr_ops, rw_ops;
    phase("rand_read", "begin");
    double rr = run_random(fd, buf, blocks, (double)seconds, 0, &rr_ops);
    phase("rand_read", "end");
    phase("rand_write", "begin");
    double rw = run_random(fd, buf, blocks, (double)seconds, 1, &rw_ops);
    phase("rand_write", "end");
    if (close(fd) != 0)
        fail("close: %s", strerror(errno));

    double mib = (double)size / (1 << 20);
    printf("BLKBENCH mode=%s size_mib=%ld seq_block_kib=%ld seq_write_mibs=%.2f seq_read_mibs=%.2f "
           "rand_read_iops=%.1f rand_write_iops=%.1f seq_write_s=%.3f seq_read_s=%.3f "
           "rand_read_ops=%ld rand_write_ops=%ld rand_seconds=%ld\n",
           direct ? "direct" : "sync", size_mib, seq_kib, mib / seq_write_s, mib / seq_read_s, rr, rw,
           seq_write_s, seq_read_s, rr_ops, rw_ops, seconds);
    return 0;
}
