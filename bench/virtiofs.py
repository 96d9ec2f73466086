"""virtio-fs sequential read MiB/s inside a Linux guest: pyvmm against QEMU, same virtiofsd, same run.

    python bench/virtiofs.py                     # pyvmm (virtio-pci) and QEMU, tcg, 64 MiB, 3 reads each
    python bench/virtiofs.py --transport both    # pyvmm over virtio-pci and virtio-mmio
    python bench/virtiofs.py --size 128 --reads 5 --vmm pyvmm-pci

Each VMM gets its own Debian virtiofsd (``pyvmm.vhost_user.virtiofsd``) on one directory
holding a file of ``--size`` MiB of random bytes, and boots the guest kit's kernel with
``-accel tcg`` and the same options (``share_options``).  The guest's /init mounts the tag
and, ``--reads`` times, drops its page cache and reads the file with ``dd bs=1M``, timing
each read with its own clock (``now at N nsecs`` of /proc/timer_list); the row is the best read.  The
ratio is pyvmm/QEMU (above 1: pyvmm is faster).  Under tcg both VMMs emulate the guest CPU,
so the guest's FUSE client dominates; what differs is the VMM's part of each request (the
kick and the call) and guest RAM access.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pyvmm.guestkit import default_guest
from pyvmm.vhost_user.virtiofsd import share_options, start_virtiofsd

MEMORY = 512 << 20
TAG = "bench"
_LINE = re.compile(r"VFSBENCH run=(\d+) bytes=(\d+) ns=(\d+)")


class BenchError(Exception):
    pass


def guest_script(reads: int) -> str:
    now = "$(grep -m1 now /proc/timer_list | cut -d' ' -f3)"  # the guest's clock in ns
    return (f"mkdir -p /mnt/s && mount -t virtiofs {TAG} /mnt/s && for i in $(seq {reads}); do "
            f"sync; echo 3 > /proc/sys/vm/drop_caches; s={now}; "
            f"dd if=/mnt/s/big.bin of=/dev/null bs=1M 2>/dev/null; b=$(stat -c %s /mnt/s/big.bin); e={now}; "
            "echo VFSBENCH run=$i bytes=$b ns=$((e-s)); done")


def run_one(vmm: str, size_mib: int, reads: int, timeout: float) -> list[float]:
    """MiB/s of each read inside one guest under ``vmm`` (pyvmm-pci, pyvmm-mmio, qemu)."""
    g = default_guest()
    if "virtiofs" not in g.modules:
        raise BenchError(f"the guest kit's initramfs has no virtiofs module ({g.modules})")
    work = Path(tempfile.mkdtemp(prefix="vfsbench-", dir="/tmp"))
    try:
        shared = work / "shared"
        shared.mkdir()
        with open(shared / "big.bin", "wb") as f:
            for _ in range(size_mib):
                f.write(os.urandom(1 << 20))
        with start_virtiofsd(str(shared), str(work / "vfs.sock")) as daemon:
            transport = "mmio" if vmm == "pyvmm-mmio" else "pci"
            append = f'{g.cmdline} quiet pyvmm_run="{guest_script(reads)}"'
            common = ["-kernel", str(g.kernel), "-initrd", str(g.initrd), "-append", append,
                      "-m", str(MEMORY >> 20), "-no-reboot",
                      *share_options([(daemon, TAG)], memory=MEMORY, transport=transport)]
            if vmm == "qemu":
                qemu = shutil.which("qemu-system-x86_64")
                if qemu is None:
                    raise BenchError("qemu-system-x86_64 is needed (apt-get install qemu-system-x86)")
                cmd = [qemu, "-accel", "tcg", "-nographic", "-nodefaults", "-serial", "stdio", *common]
            else:
                cmd = [sys.executable, "-m", "pyvmm", "run", "-accel", "tcg", *common]
            start = time.monotonic()
            try:
                proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                      timeout=timeout)
            except subprocess.TimeoutExpired:
                raise BenchError(f"{vmm}: no result within {timeout:g} s") from None
            wall = time.monotonic() - start
        found = _LINE.findall(proc.stdout)
        if len(found) != reads:
            tail = "\n".join(proc.stdout.replace("\r", "").splitlines()[-15:])
            raise BenchError(f"{vmm}: {len(found)} of {reads} result lines (exit {proc.returncode})\n{tail}\n"
                             f"{proc.stderr[-1500:]}")
        rates = []
        for _run, nbytes, ns in found:
            if int(nbytes) != size_mib << 20:
                raise BenchError(f"{vmm}: the guest read {nbytes} bytes, not {size_mib << 20}")
            rates.append(int(nbytes) / (1 << 20) / (int(ns) / 1e9))
        print(f"  {vmm}: reads {', '.join(f'{r:.0f}' for r in rates)} MiB/s (boot+run {wall:.1f} s)", flush=True)
        return rates
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=64, help="file size in MiB (default 64)")
    ap.add_argument("--reads", type=int, default=3, help="reads per guest, best counts (default 3)")
    ap.add_argument("--transport", choices=("pci", "mmio", "both"), default="pci")
    ap.add_argument("--vmm", choices=("pyvmm-pci", "pyvmm-mmio", "qemu"), action="append",
                    help="run only these (repeatable)")
    ap.add_argument("--timeout", type=float, default=600.0)
    args = ap.parse_args(argv)
    vmms = args.vmm or ([f"pyvmm-{t}" for t in (("pci", "mmio") if args.transport == "both" else
                                                 (args.transport,))] + ["qemu"])
    print(f"virtiofs sequential read, {args.size} MiB, best of {args.reads}; load average "
          f"{os.getloadavg()[0]:.1f}", flush=True)
    best: dict[str, float] = {}
    try:
        for vmm in vmms:
            best[vmm] = max(run_one(vmm, args.size, args.reads, args.timeout))
    except BenchError as e:
        print(f"virtiofs.py: error: {e}", file=sys.stderr)
        return 1
    print()
    print("| | " + " | ".join(best) + (" | " + " | ".join(f"{v}/qemu" for v in best if v != "qemu")
                                      if "qemu" in best else "") + " |")
    print("|---" * (1 + len(best) + (len(best) - 1 if "qemu" in best else 0)) + "|")
    cells = [f"{v:.0f}" for v in best.values()]
    if "qemu" in best:
        cells += [f"{best[v] / best['qemu']:.2f}" for v in best if v != "qemu"]
    print("| seq read MiB/s | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
