#!/usr/bin/env python3
"""``pyvmm exec -- true`` wall time, against the same job with qemu-system-x86_64 and Debian's qemu-ga.

Both jobs boot the guest kit's default guest (same kernel, initramfs with Debian's qemu-ga, command
line, memory, tcg), wait for the agent (``guest-sync-delimited``), run ``true`` with ``guest-exec``,
take its status and shut the guest down through the agent, and are timed from process start to
the VMM's exit:

* pyvmm: the command line itself, ``python -m pyvmm exec -accel tcg -- true``;
* QEMU: ``qemu-system-x86_64`` driven by pyvmm's QGA client (``pyvmm.VM(vmm="qemu")``, the same
  sockets and options ``pyvmm exec`` gives pyvmm).

A third row times pyvmm through the same Python driver as QEMU, a fourth ``pyvmm exec
--snapshot`` starting from a snapshot taken (untimed) of a booted guest with its agent up; the
agent-ready column says how much of a job is boot.  Rounds are interleaved; the best of ``--runs`` is reported, with
the ratio pyvmm/QEMU (above 1: pyvmm is slower).  Exits non-zero if a job fails.

    python bench/exec.py [--runs 3] [--memory 512M]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time


def pyvmm_exec(memory: str, snapshot: str | None = None) -> tuple[float, None]:
    t0 = time.monotonic()
    extra = ["--snapshot", snapshot] if snapshot else []
    r = subprocess.run([sys.executable, "-m", "pyvmm", "exec", "-accel", "tcg", "-m", memory, *extra, "--", "true"],
                       capture_output=True, text=True, timeout=600)
    wall = time.monotonic() - t0
    if r.returncode != 0:
        raise SystemExit(f"exec.py: error: pyvmm exec exited {r.returncode}: {r.stderr.strip()[-500:]}")
    return wall, None


def driven(vmm: str, memory: str) -> tuple[float, float]:
    from pyvmm import VM

    t0 = time.monotonic()
    with VM(memory=memory, accel="tcg", vmm=vmm) as vm:
        ready = time.monotonic() - t0
        r = vm.exec(["true"], timeout=120)
        if r.returncode != 0:
            raise SystemExit(f"exec.py: error: true exited {r.returncode} under {vmm}")
        status = vm.stop(timeout=120)
    wall = time.monotonic() - t0
    if status != 0:
        raise SystemExit(f"exec.py: error: {vmm} exited {status}")
    return wall, ready


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--memory", default="512M")
    args = ap.parse_args()
    from pyvmm.guestkit import default_guest

    g = default_guest()  # build/cache the initramfs outside the timed runs
    import tempfile

    from pyvmm import VM

    snap = os.path.join(tempfile.mkdtemp(prefix="pyvmm-bench-"), "exec.snapshot")
    with VM(memory=args.memory, accel="tcg") as vm:  # the snapshot the last job starts from (untimed)
        vm.snapshot(snap)
        vm.kill()
    print(f"guest: {g.kernel.name} {g.initrd.name} ({g.initrd.stat().st_size / 1e6:.1f} MB initramfs with qemu-ga)")
    print(f"load average at start: {os.getloadavg()[0]:.2f}")
    jobs = {"pyvmm exec -- true": lambda: pyvmm_exec(args.memory),
            "qemu + qemu-ga": lambda: driven("qemu", args.memory),
            "pyvmm via the SDK driver": lambda: driven("pyvmm", args.memory),
            "pyvmm exec --snapshot": lambda: pyvmm_exec(args.memory, snap)}
    best: dict[str, tuple[float, float | None]] = {}
    for i in range(args.runs):
        for name, job in jobs.items():
            wall, ready = job()
            print(f"run {i + 1}: {name:26} wall {wall:6.2f} s" + (f", agent ready at {ready:5.2f} s" if ready else ""))
            if name not in best or wall < best[name][0]:
                best[name] = (wall, ready)
    q_wall, q_ready = best["qemu + qemu-ga"]
    print(f"\nbest of {args.runs} (load average now {os.getloadavg()[0]:.2f})")
    print(f"{'job':28} {'wall s':>8} {'agent ready s':>14} {'wall / QEMU':>12}")
    for name, (wall, ready) in best.items():
        print(f"{name:28} {wall:8.2f} {ready if ready is not None else float('nan'):14.2f} {wall / q_wall:12.2f}")
    sdk_ready = best["pyvmm via the SDK driver"][1]
    if sdk_ready and q_ready:
        print(f"agent ready, pyvmm / QEMU: {sdk_ready / q_ready:.2f}")
    os.unlink(snap)
    return 0


if __name__ == "__main__":
    sys.exit(main())
