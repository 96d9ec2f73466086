"""Boot time of a stock kernel: pyvmm against ``qemu-system-x86_64 -accel tcg``, in the same run.

    python bench/boot.py                        # guest kit kernel + initramfs, best of 3 each
    python bench/boot.py --runs 5 --accel tcg
    python bench/boot.py --kernel vmlinuz --initrd initrd.img --marker 'login:'

Both VMMs boot the same kernel, initramfs and command line with the serial console on a pipe.
The clock starts when the VMM process is started and stops at the first userspace output (by
default the guest kit's /init banner ``pyvmm guest:``), then the guest is powered off
(``poweroff -f`` typed at the prompt) and the VMM must exit.  Runs of the two VMMs are
interleaved so that a burst of host load hits both.  The table shows best and median seconds,
the VMM's CPU seconds, and the pyvmm/QEMU ratio (below 1: pyvmm is faster).
"""

from __future__ import annotations

import argparse
import os
import resource
import selectors
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

DEFAULT_MARKER = "pyvmm guest:"
PROMPT = b"~ # "


@dataclass
class Sample:
    to_userspace: float
    cpu: float


class BenchError(Exception):
    pass


def boot_once(name: str, cmd: list[str], marker: str, timeout: float) -> Sample:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None and proc.stdin is not None
    os.set_blocking(proc.stdout.fileno(), False)
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    out = bytearray()
    seen_at: float | None = None
    powered_off = False
    try:
        while True:
            if time.monotonic() - t0 > timeout:
                raise BenchError(f"{name}: no {marker!r} within {timeout:.0f} s; console tail:\n"
                                 f"{out[-1500:].decode(errors='replace')}")
            for _key, _ in sel.select(0.05):
                chunk = proc.stdout.read()
                if chunk:
                    out.extend(chunk)
            if seen_at is None and marker.encode() in out:
                seen_at = time.monotonic() - t0
            if seen_at is not None and not powered_off and PROMPT in out:
                proc.stdin.write(b"poweroff -f\n")
                proc.stdin.flush()
                powered_off = True
            if proc.poll() is not None:
                break
        if seen_at is None:
            raise BenchError(f"{name} exited with {proc.returncode} before {marker!r}; console tail:\n"
                             f"{out[-1500:].decode(errors='replace')}")
        if proc.returncode != 0:
            raise BenchError(f"{name} exited with status {proc.returncode} after poweroff")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return Sample(seen_at, cpu)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kernel", help="default: the guest kit's stock Debian kernel")
    ap.add_argument("--initrd", help="default: the guest kit's busybox initramfs")
    ap.add_argument("--append", default="console=ttyS0 panic=-1")
    ap.add_argument("--memory", default="512M")
    ap.add_argument("--accel", default="tcg", help="pyvmm's accelerator (QEMU always uses tcg)")
    ap.add_argument("--marker", default=DEFAULT_MARKER, help="first userspace output to wait for")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=180.0)
    args = ap.parse_args(argv)

    kernel, initrd = args.kernel, args.initrd
    if not kernel or not initrd:
        from pyvmm.guestkit import default_guest

        guest = default_guest()
        kernel, initrd = kernel or str(guest.kernel), initrd or str(guest.initrd)
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        print("boot.py: error: qemu-system-x86_64 not found (apt-get install qemu-system-x86)", file=sys.stderr)
        return 1
    mem_mib = str(int(args.memory.rstrip("M")))
    vmms = {
        f"pyvmm ({args.accel})": [sys.executable, "-m", "pyvmm", "run", "-q", "--accel", args.accel,
                                  "--kernel", kernel, "--initrd", initrd, "--append", args.append,
                                  "-m", args.memory],
        "qemu (tcg)": [qemu, "-accel", "tcg", "-m", mem_mib, "-nographic", "-no-reboot", "-kernel", kernel,
                       "-initrd", initrd, "-append", args.append],
    }
    samples: dict[str, list[Sample]] = {name: [] for name in vmms}
    print(f"kernel {kernel}\ninitrd {initrd}\nappend {args.append!r}; {args.runs} run(s) each, "
          f"load average {os.getloadavg()[0]:.1f}")
    try:
        for i in range(args.runs):
            for name, cmd in vmms.items():
                s = boot_once(name, cmd, args.marker, args.timeout)
                samples[name].append(s)
                print(f"  run {i + 1}: {name:12} first userspace output {s.to_userspace:6.2f} s, "
                      f"CPU {s.cpu:6.2f} s", flush=True)
    except BenchError as e:
        print(f"boot.py: error: {e}", file=sys.stderr)
        return 1

    (py_name, py), (q_name, q) = samples.items()
    best = {n: min(s.to_userspace for s in v) for n, v in samples.items()}
    median = {n: statistics.median(s.to_userspace for s in v) for n, v in samples.items()}
    cpu = {n: min(s.cpu for s in v) for n, v in samples.items()}
    print(f"\n{'':28}{py_name:>14}{q_name:>14}{'ratio':>8}")
    for label, table in (("best s to userspace", best), ("median s to userspace", median), ("best CPU s", cpu)):
        print(f"{label:28}{table[py_name]:14.2f}{table[q_name]:14.2f}{table[py_name] / table[q_name]:8.2f}")
    print(f"(ratio = pyvmm / QEMU; load average now {os.getloadavg()[0]:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
