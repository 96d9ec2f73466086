"""Boot a kernel + initramfs under pyvmm and time it to the shell prompt.

    python bench/boot.py --kernel vmlinuz --initrd initrd.gz [--accel tcg] [--append ...]

Starts ``python -m pyvmm run`` with the serial console on stdio, waits for
the busybox prompt, runs a command through the console to prove the shell
is interactive, and prints the elapsed times.  Exit status 0 on success.
"""

from __future__ import annotations

import argparse
import os
import resource
import selectors
import subprocess
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kernel", required=True)
    ap.add_argument("--initrd", required=True)
    ap.add_argument("--accel", default="tcg")
    ap.add_argument("--append", default="console=ttyS0")
    ap.add_argument("--memory", default="512M")
    ap.add_argument("--prompt", default="/ # ")
    ap.add_argument("--timeout", type=float, default=120.0)
    ap.add_argument("--log", help="write the console output here")
    ap.add_argument("--reboot", action="store_true", help="then run 'reboot -f' and wait for the prompt again")
    args = ap.parse_args()

    cmd = [sys.executable, "-m", "pyvmm", "run", "--accel", args.accel, "--kernel", args.kernel,
           "--initrd", args.initrd, "--append", args.append, "-m", args.memory]
    if not args.reboot:
        cmd.append("--no-reboot")
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None and proc.stdin is not None
    os.set_blocking(proc.stdout.fileno(), False)
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    out = bytearray()
    marks: dict[str, float] = {}

    def wait_for(token: bytes, start: int = 0, within: float | None = None) -> bool:
        until = t0 + args.timeout if within is None else min(t0 + args.timeout, time.monotonic() + within)
        while time.monotonic() < until:
            if token in out[start:]:
                return True
            for _key, _ in sel.select(0.2):
                chunk = proc.stdout.read()
                if chunk:
                    out.extend(chunk)
            if proc.poll() is not None and token not in out[start:]:
                return False
        return False

    ok = False
    try:
        if wait_for(b"Linux version"):
            marks["kernel banner"] = time.monotonic() - t0
        if wait_for(b"Run /init"):
            marks["/init started"] = time.monotonic() - t0
        if wait_for(args.prompt.encode()):
            marks["shell prompt"] = time.monotonic() - t0
            mark = len(out)
            answered = False
            for _attempt in range(3):
                # (input that races the shell's switch to raw mode can be swallowed: retry)
                time.sleep(1.0)
                proc.stdin.write(b"echo sum=$((6*7))\r")
                proc.stdin.flush()
                answered = wait_for(b"sum=42", mark, within=15)
                if answered:
                    break
            if answered:
                marks["command answered"] = time.monotonic() - t0
                ok = True
            if ok and args.reboot:
                mark = len(out)
                proc.stdin.write(b"reboot -f\r")
                proc.stdin.flush()
                ok = wait_for(b"Linux version", mark) and wait_for(args.prompt.encode(), mark + 100)
                if ok:
                    marks["prompt after reboot"] = time.monotonic() - t0
    finally:
        proc.kill()
        proc.wait()
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        marks_cpu = ru.ru_utime + ru.ru_stime
        if args.log:
            with open(args.log, "wb") as f:
                f.write(out)
    for name, t in marks.items():
        print(f"{name:>18}: {t:7.2f} s")
    print(f"{'VM CPU time':>18}: {marks_cpu:7.2f} s (whole run, all threads)")
    if not ok:
        print("FAILED: no interactive shell; last output:")
        print(out[-2000:].decode(errors="replace"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
