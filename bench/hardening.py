"""What hostile guests and clients cost the host (issue 11's figures), pyvmm against QEMU in the same run.

Three measurements:

* **VMM peak RSS, 128 MiB guest, idle vs the long virtio-console chain.**  A small multiboot guest
  (C source below, built with the test-guest toolchain of tests/support/guests) finds the
  virtio-console PCI device, brings it up without interrupts and, in the attack variant, posts
  ``--rounds`` chains of 128 descriptors that all point at one 2 MiB buffer, 254 MiB per chain (the
  attack of tests/unit/devices/virtio/test_virtio_bounds.py, from inside a real guest).  It prints
  ``done`` on COM1 and spins; the VMM's VmHWM is read then.  QEMU runs the same guest with
  ``virtio-serial-pci`` + ``virtconsole`` (the same device to the guest).
* **Daemon peak RSS under a 100 MB request body** (pyvmmd on a unix socket; the body is refused
  with 413 once its Content-Length is seen) against the same daemon's idle peak.
* **Log bytes per minute under a guest log flood**: the reset-loop boot sector of
  tests/system/test_guest_log_flood.py (the guest resets the machine through the i8042 as soon as
  it runs) for ``--seconds``; the VMM's stderr is counted.  And the size a VM's vm.log can reach
  under the manager (pyvmm.manager.logcap: ``--max-bytes`` plus one rotated file).

Usage: python bench/hardening.py [--rounds N] [--seconds S] [--skip-qemu]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QEMU = "qemu-system-x86_64"
GUEST_MIB = 128

CHAIN_GUEST_C = r"""
#include "guest.h"
#ifndef ROUNDS
#define ROUNDS 0
#endif
#define QSIZE 128
#define BUF 0x400000u
#define PIECE (2u << 20)
static u8 ring[16384] __attribute__((aligned(4096)));

static u32 cfg(u32 slot, u32 off) { outl(0xcf8, 0x80000000u | (slot << 11) | (off & 0xfc)); return inl(0xcfc); }
static void wr8(uptr a, u8 v) { *(volatile u8 *)a = v; }
static u8 rd8(uptr a) { return *(volatile u8 *)a; }
static void wr16(uptr a, u16 v) { *(volatile u16 *)a = v; }
static u16 rd16(uptr a) { return *(volatile u16 *)a; }

void guest_main(u32 magic, u32 info)
{
    (void)magic; (void)info;
    uart_init();
    int slot = -1;
    for (int s = 0; s < 32; s++) {
        u32 id = cfg(s, 0);
        if (id == 0x10431af4u || id == 0x10031af4u) slot = s;
    }
    report_dec("slot", (u32)slot);
    if (slot < 0) debug_exit(1);
    outl(0xcf8, 0x80000000u | ((u32)slot << 11) | 4); outw(0xcfc, 0x6);   /* memory + bus master */
    uptr common = 0, notify = 0; u32 mult = 0, ncaps = 0;
    for (u32 p = cfg(slot, 0x34) & 0xff; p && ncaps < 32; p = (cfg(slot, p) >> 8) & 0xff, ncaps++) {
        u32 hdr = cfg(slot, p);
        if ((hdr & 0xff) != 0x09) continue;
        u32 type = hdr >> 24, bar = cfg(slot, p + 4) & 0xff, off = cfg(slot, p + 8);
        uptr base = cfg(slot, 0x10 + 4 * bar) & ~0xfu;
        if (type == 1) common = base + off;
        if (type == 2) { notify = base + off; mult = cfg(slot, p + 16); }
    }
    if (!common || !notify) { report_str("error", "no virtio-pci capabilities"); debug_exit(2); }
    wr8(common + 0x14, 0); wr8(common + 0x14, 1); wr8(common + 0x14, 3);
    mmio_write32(common + 0x08, 1); mmio_write32(common + 0x0c, 1);     /* VERSION_1 only */
    wr8(common + 0x14, 0xb);
    wr16(common + 0x16, 1);                                             /* queue 1: port 0 output */
    u16 qmax = rd16(common + 0x18);
    report_dec("qmax", qmax);
    if (qmax < QSIZE) debug_exit(3);
    wr16(common + 0x18, QSIZE);
    wr16(common + 0x1a, 0xffff);                                        /* no interrupt: polled */
    u32 r = (u32)(uptr)ring;
    mmio_write32(common + 0x20, r); mmio_write32(common + 0x24, 0);
    mmio_write32(common + 0x28, r + 4096); mmio_write32(common + 0x2c, 0);
    mmio_write32(common + 0x30, r + 8192); mmio_write32(common + 0x34, 0);
    wr16(common + 0x1c, 1);
    wr8(common + 0x14, 0xf);
    report_hex("status", rd8(common + 0x14));
    for (u32 i = 0; i < QSIZE; i++) {
        volatile u32 *d = (volatile u32 *)(ring + 16 * i);
        d[0] = BUF; d[1] = 0; d[2] = i == QSIZE - 1 ? PIECE - 4096 : PIECE;
        *(volatile u16 *)(ring + 16 * i + 12) = i == QSIZE - 1 ? 0 : 1;   /* NEXT */
        *(volatile u16 *)(ring + 16 * i + 14) = (u16)(i + 1);
    }
    volatile u16 *avail = (volatile u16 *)(ring + 4096), *used = (volatile u16 *)(ring + 8192);
    u32 done = 0;
    for (int round = 0; round < ROUNDS; round++) {
        avail[2 + (round % QSIZE)] = 0;
        avail[1] = (u16)(round + 1);
        wr16(notify + rd16(common + 0x1e) * mult, 1);
        for (u32 i = 0; i < 400000000u && used[1] != (u16)(round + 1); i++) cpu_relax();
        if (used[1] == (u16)(round + 1)) done++;
    }
    report_dec("chains", done);
    uart_puts("done\n");
    for (;;) cpu_relax();
}
"""

RESET_LOOP = bytes([0xB0, 0xFE, 0xE6, 0x64, 0xEB, 0xFE]).ljust(510, b"\0") + b"\x55\xaa"  # mov al,0xfe; out 0x64


def _guest_build():
    path = ROOT / "tests" / "support" / "guests" / "build.py"
    spec = importlib.util.spec_from_file_location("pyvmm_test_guest_build", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def build_chain_guest(work: Path, rounds: int) -> Path:
    b = _guest_build()
    b.check_toolchain()
    src = work / f"chain{rounds}.c"
    src.write_text(CHAIN_GUEST_C)
    objs = [work / f"entry{rounds}.o", work / f"lib{rounds}.o", work / f"main{rounds}.o"]
    b._cc(b.SRC / "mb_entry.S", objs[0], b.CFLAGS_32)
    b._cc(b.SRC / "guestlib.c", objs[1], b.CFLAGS_32)
    b._cc(src, objs[2], [*b.CFLAGS_32, f"-DROUNDS={rounds}"])
    out = work / f"chain{rounds}.elf"
    b._link(objs, b.LD_DIR / "multiboot.ld", out, "elf_i386")
    return out


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for {pid}")


def vmm_peak(cmd: list[str], serial: Path, timeout: float, env: dict[str, str] | None = None) -> tuple[float, str]:
    """Run a VMM until its guest prints ``done`` on COM1; its peak RSS (MiB) and the serial text."""
    serial.unlink(missing_ok=True)
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=env)
    try:
        deadline = time.monotonic() + timeout
        while True:
            text = serial.read_text(errors="replace") if serial.exists() else ""
            if "done" in text:
                return peak_rss_mib(proc.pid), text
            if proc.poll() is not None:
                raise RuntimeError(f"{cmd[0]} exited {proc.returncode}: {proc.stderr.read().decode()[-2000:]}"
                                   if proc.stderr else "exited")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{cmd[0]}: no 'done' after {timeout:.0f}s; serial: {text[-500:]!r}")
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()


def chain_figures(work: Path, rounds: int, skip_qemu: bool,
                  other_src: Path | None) -> list[tuple[str, float, float | None, float | None]]:
    idle, attack = build_chain_guest(work, 0), build_chain_guest(work, rounds)
    serial = work / "serial.txt"
    rows = []
    for what, guest in (("idle", idle), (f"{rounds} x 254 MiB chains", attack)):
        pyvmm = [sys.executable, "-m", "pyvmm", "run", "--accel", "kvm", "-m", str(GUEST_MIB), "--kernel", str(guest),
                 "--serial", f"file:{serial}", "--device", "virtio-console-pci"]
        p, text = vmm_peak(pyvmm, serial, 300)
        if what != "idle" and f"chains={rounds}\n" not in text:
            raise RuntimeError(f"pyvmm: the guest did not get its chains through: {text!r}")
        o = None
        if other_src is not None:
            o, _ = vmm_peak(pyvmm, serial, 300, env={**os.environ, "PYTHONPATH": str(other_src)})
        q = None
        if not skip_qemu:
            qemu = [QEMU, "-accel", "kvm", "-m", str(GUEST_MIB), "-kernel", str(guest), "-display", "none",
                    "-nodefaults", "-serial", f"file:{serial}", "-device", "virtio-serial-pci,disable-legacy=on",
                    "-device", "virtconsole"]
            q, text = vmm_peak(qemu, serial, 300)
            if what != "idle" and f"chains={rounds}\n" not in text:
                raise RuntimeError(f"QEMU: the guest did not get its chains through: {text!r}")
        rows.append((what, p, q, o))
    return rows


def daemon_figures(work: Path, body_bytes: int) -> tuple[float, float, int]:
    """pyvmmd's peak RSS idle and after a ``body_bytes`` request body, and the status it answered."""
    state = work / "pyvmmd"
    sock = state / "pyvmmd.sock"
    proc = subprocess.Popen([sys.executable, "-m", "pyvmm.manager.daemon", "--state-dir", str(state)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            if sock.exists():
                break
            time.sleep(0.05)
        time.sleep(0.5)
        idle = peak_rss_mib(proc.pid)
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(120)
        s.connect(str(sock))

        def send() -> None:
            with contextlib.suppress(OSError):
                s.sendall(b"POST /api/v1/vms HTTP/1.1\r\nHost: pyvmmd\r\nContent-Type: application/json\r\n"
                          b"Content-Length: %d\r\n\r\n" % body_bytes)
                chunk = b"x" * (1 << 20)
                for _ in range(body_bytes // len(chunk)):
                    s.sendall(chunk)

        t = threading.Thread(target=send, daemon=True)
        t.start()
        answer = b""
        with contextlib.suppress(OSError):
            while b"\r\n" not in answer:
                more = s.recv(4096)
                if not more:
                    break
                answer += more
        t.join(120)
        s.close()
        time.sleep(0.5)
        status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0
        return idle, peak_rss_mib(proc.pid), status
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def log_flood_figures(work: Path, seconds: float, skip_qemu: bool) -> list[tuple[str, float]]:
    bs = work / "resetloop.bin"
    bs.write_bytes(RESET_LOOP)
    cmds = [("pyvmm", [sys.executable, "-m", "pyvmm", "run", "--accel", "kvm", "-m", str(GUEST_MIB),
                       "--kernel", str(bs), "--serial", "null"])]
    if not skip_qemu:
        cmds.append(("QEMU", [QEMU, "-accel", "kvm", "-m", str(GUEST_MIB), "-display", "none", "-nodefaults",
                              "-drive", f"file={bs},format=raw,if=ide", "-serial", "null"]))
    rows = []
    for name, cmd in cmds:
        log = work / f"{name}.log"
        with open(log, "wb") as f:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=f, stderr=f)
            time.sleep(seconds)
            alive = proc.poll() is None
            proc.terminate()
            proc.wait(10)
        if not alive:
            raise RuntimeError(f"{name} exited during the flood: {log.read_text(errors='replace')[-1000:]}")
        rows.append((name, log.stat().st_size * 60 / seconds))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=4, help="chains the attacking guest posts (default 4)")
    ap.add_argument("--seconds", type=float, default=20.0, help="length of the log flood (default 20 s)")
    ap.add_argument("--body-mb", type=int, default=100, help="request body size in MB (default 100)")
    ap.add_argument("--skip-qemu", action="store_true", help="pyvmm only")
    ap.add_argument("--other-src", type=Path, help="also run the chain attack with the pyvmm package in this "
                    "directory (PYTHONPATH), e.g. an older checkout's src, for a before/after column")
    args = ap.parse_args(argv)
    skip_qemu = args.skip_qemu or shutil.which(QEMU) is None
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        print("hardening: /dev/kvm is needed", file=sys.stderr)
        return 1
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    with tempfile.TemporaryDirectory(prefix="pyvmm-hardening-") as tmp:
        work = Path(tmp)
        try:
            chains = chain_figures(work, args.rounds, skip_qemu, args.other_src)
            idle_d, after_d, status = daemon_figures(work, args.body_mb * 1_000_000)
            floods = log_flood_figures(work, args.seconds, skip_qemu)
        except RuntimeError as e:
            print(f"hardening: {e}", file=sys.stderr)
            return 1
    print(f"\nVMM peak RSS (MiB), {GUEST_MIB} MiB guest, virtio-console chain attack")
    print(f"  {'':28} {'pyvmm':>8} {'QEMU':>8} {'pyvmm/QEMU':>11}" + (f" {'other-src':>10}" if args.other_src else ""))
    for what, p, q, o in chains:
        ratio = f"{p / q:11.2f}" if q else f"{'-':>11}"
        print(f"  {what:28} {p:8.1f} {q if q is not None else float('nan'):8.1f} {ratio}"
              + (f" {o:10.1f}" if o is not None else ""))
    idle_p, attack_p = chains[0][1], chains[1][1]
    print(f"  attack - idle (pyvmm): {attack_p - idle_p:+.1f} MiB")
    print(f"\npyvmmd peak RSS (MiB) under a {args.body_mb} MB request body")
    print(f"  idle {idle_d:.1f}, after the body {after_d:.1f} ({after_d - idle_d:+.1f}), answer: {status}")
    print(f"\nVMM log under a guest log flood (reset loop, {args.seconds:.0f} s)")
    for name, rate in floods:
        print(f"  {name:6} {rate:10.0f} bytes/minute")
    from pyvmm.manager.logcap import MAX_LOG_BYTES
    print(f"  under pyvmmd a VM's vm.log is capped at {MAX_LOG_BYTES} bytes plus one rotated file")
    return 0 if status == 413 else 1


if __name__ == "__main__":
    sys.exit(main())
