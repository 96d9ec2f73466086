/*
 * Reference KVM exit loop in C for bench/exits.py.
 *
 * Usage: exits_c IMAGE REGS SREGS KIND ADDR N ROUNDS
 *   IMAGE  raw guest-physical image loaded at GPA 0 (its size, rounded up to 2 MiB, is the RAM size)
 *   REGS   raw struct kvm_regs  (written by the Python side, so both loops run the same guest)
 *   SREGS  raw struct kvm_sregs
 *   KIND   "io" or "mmio": what every exit must be (an OUT to port ADDR, or an MMIO write to ADDR)
 *   ADDR   the port or guest-physical address the guest writes to
 *   N      number of exits per timed round
 *   ROUNDS number of rounds (each is timed separately, so the caller can take the best)
 * Prints one line per round: "<exits> <wall nanoseconds> <thread CPU nanoseconds>".
 *
 * No irqchip, one vCPU, no signals: the smallest loop that still reads the
 * I/O data the way a VMM must (through kvm_run + data_offset).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static void die(const char *what) { perror(what); exit(1); }

static void *read_file(const char *path, size_t *len) {
    int fd = open(path, O_RDONLY);
    if (fd < 0) die(path);
    struct stat st;
    if (fstat(fd, &st) < 0) die("fstat");
    void *buf = malloc(st.st_size ? st.st_size : 1);
    if (!buf || read(fd, buf, st.st_size) != st.st_size) die("read");
    close(fd);
    *len = st.st_size;
    return buf;
}

int main(int argc, char **argv) {
    if (argc != 8) { fprintf(stderr, "usage: %s IMAGE REGS SREGS io|mmio ADDR N ROUNDS\n", argv[0]); return 2; }
    size_t img_len, regs_len, sregs_len;
    void *img = read_file(argv[1], &img_len);
    struct kvm_regs *regs = read_file(argv[2], &regs_len);
    struct kvm_sregs *sregs = read_file(argv[3], &sregs_len);
    if (regs_len != sizeof(*regs) || sregs_len != sizeof(*sregs)) { fprintf(stderr, "bad register files\n"); return 2; }
    int mmio = strcmp(argv[4], "mmio") == 0;
    unsigned long long addr = strtoull(argv[5], NULL, 0);
    long n = strtol(argv[6], NULL, 0);
    long rounds = strtol(argv[7], NULL, 0);

    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0) die("/dev/kvm");
    int vm = ioctl(kvm, KVM_CREATE_VM, 0);
    if (vm < 0) die("KVM_CREATE_VM");
    size_t mem_size = (img_len + (2u << 20) - 1) & ~((size_t)(2u << 20) - 1);
    void *mem = mmap(NULL, mem_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) die("mmap");
    memcpy(mem, img, img_len);
    struct kvm_userspace_memory_region region = {
        .slot = 0, .guest_phys_addr = 0, .memory_size = mem_size, .userspace_addr = (uintptr_t)mem};
    if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0) die("KVM_SET_USER_MEMORY_REGION");
    int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
    if (vcpu < 0) die("KVM_CREATE_VCPU");
    int run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    struct kvm_run *run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
    if (run == MAP_FAILED) die("mmap kvm_run");
    /* Same CPUID as KVM supports, so guests that execute CPUID behave alike. */
    struct { struct kvm_cpuid2 c; struct kvm_cpuid_entry2 e[256]; } cpuid = {.c.nent = 256};
    if (ioctl(kvm, KVM_GET_SUPPORTED_CPUID, &cpuid) < 0) die("KVM_GET_SUPPORTED_CPUID");
    if (ioctl(vcpu, KVM_SET_CPUID2, &cpuid) < 0) die("KVM_SET_CPUID2");
    if (ioctl(vcpu, KVM_SET_SREGS, sregs) < 0) die("KVM_SET_SREGS");
    if (ioctl(vcpu, KVM_SET_REGS, regs) < 0) die("KVM_SET_REGS");

    volatile uint64_t sink = 0;
    for (long r = 0; r < rounds; r++) {
        struct timespec t0, t1, c0, c1;
        clock_gettime(CLOCK_THREAD_CPUTIME_ID, &c0);
        clock_gettime(CLOCK_MONOTONIC, &t0);
        for (long i = 0; i < n; i++) {
            if (ioctl(vcpu, KVM_RUN, 0) < 0) die("KVM_RUN");
            if (mmio) {
                if (run->exit_reason != KVM_EXIT_MMIO || run->mmio.phys_addr != addr || !run->mmio.is_write)
                    goto unexpected;
                sink += run->mmio.data[0];
            } else {
                if (run->exit_reason != KVM_EXIT_IO || run->io.port != addr || run->io.direction != KVM_EXIT_IO_OUT)
                    goto unexpected;
                sink += *((uint8_t *)run + run->io.data_offset);
            }
        }
        clock_gettime(CLOCK_MONOTONIC, &t1);
        clock_gettime(CLOCK_THREAD_CPUTIME_ID, &c1);
        printf("%ld %lld %lld\n", n, (t1.tv_sec - t0.tv_sec) * 1000000000LL + (t1.tv_nsec - t0.tv_nsec),
               (c1.tv_sec - c0.tv_sec) * 1000000000LL + (c1.tv_nsec - c0.tv_nsec));
    }
    return 0;
unexpected:
    fprintf(stderr, "unexpected exit %u\n", run->exit_reason);
    return 1;
}
