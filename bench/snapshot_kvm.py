#!/usr/bin/env python3
"""KVM save, restore and live migration: pyvmm against QEMU, same guest, same QMP commands.

Stock Linux cannot run on every KVM host (where ring-0 code is emulated it is far too slow), so
the guest is the purpose-built ``migrate_smp`` (tests/support/guests): -smp 2, PIT through the
I/O APIC, LAPIC timer, the AP rewriting 64 KiB of RAM all along.  For each RAM size (default
256M and 2G) and each VMM (``pyvmm run -accel kvm`` and ``qemu-system-x86_64 -accel kvm``):

* **save**: ``stop``, then ``migrate exec:cat > FILE``; the time from ``migrate`` until
  ``query-migrate`` says completed, and the file's size;
* **restore**: a new process with ``-incoming "exec:cat FILE"``: the time from starting it until
  its QMP socket answers (process start-up: for pyvmm mostly the Python interpreter and imports),
  from then until the stream is loaded (``query-status`` paused), and from the start until it
  runs after ``cont``;
* **live**: ``migrate unix:SOCK`` of the running guest to a waiting ``-incoming unix:SOCK``;
  ``total-time`` and ``downtime`` from ``query-migrate``, the same ``downtime-limit`` for both.

Both get ``max-bandwidth`` 10 GiB/s.  Ratios are pyvmm/QEMU: above 1 pyvmm is slower.  The
restored guest's serial output must go on ("tick" lines), else the run fails.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from qemu.qmp import ConnectError
from qemu.qmp.legacy import QEMUMonitorProtocol

ROOT = Path(__file__).resolve().parents[1]
BANDWIDTH = 10 << 30
APPEND = "ticks=1000000 dirty=64"


class Vm:
    def __init__(self, kind: str, kernel: Path, workdir: Path, name: str, mem: str, *extra: str) -> None:
        self.name = name
        self.serial = workdir / f"{name}.serial"
        self.qmp_path = workdir / f"{name}.qmp"
        self.log_path = workdir / f"{name}.log"
        args = ["-smp", "2", "-m", mem, "-kernel", str(kernel), "-append", APPEND, "-serial", f"file:{self.serial}",
                "-qmp", f"unix:{self.qmp_path},server=on,wait=off", *extra]
        if kind == "pyvmm":
            cmd = [sys.executable, "-m", "pyvmm", "run", "-accel", "kvm", *args]
        else:
            cmd = ["qemu-system-x86_64", "-accel", "kvm", "-display", "none", "-nodefaults", "-no-user-config", *args]
        self.log = open(self.log_path, "wb")
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"snapshot_kvm.py: error: {kind} did not start: {self.tail()}")
            if self.qmp_path.exists():
                self.qmp = QEMUMonitorProtocol(str(self.qmp_path))
                try:
                    self.qmp.connect()
                    self.qmp_up = time.monotonic()
                    break
                except (ConnectError, OSError):
                    pass
            time.sleep(0.002)

    def tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-800:] if self.log_path.exists() else ""

    def cmd(self, name: str, **args: Any) -> Any:
        r = self.qmp.cmd_raw(name, args or None)
        if "error" in r:
            raise SystemExit(f"snapshot_kvm.py: error: {self.name}: {name}: {r['error'].get('desc')}")
        return r["return"]

    def text(self) -> str:
        return self.serial.read_text(errors="replace") if self.serial.exists() else ""

    def wait_text(self, needle: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"snapshot_kvm.py: error: {self.name}: no {needle!r} within {timeout}s: "
                                 f"{self.text()[-300:]} {self.tail()}")
            time.sleep(0.01)

    def wait_status(self, status: str, timeout: float = 120) -> float:
        deadline = time.monotonic() + timeout
        while self.cmd("query-status")["status"] != status:
            if time.monotonic() > deadline:
                raise SystemExit(f"snapshot_kvm.py: error: {self.name}: not {status} within {timeout}s")
            time.sleep(0.001)
        return time.monotonic()

    def wait_migration(self, timeout: float = 300) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            info = self.cmd("query-migrate")
            if info.get("status") in ("completed", "failed", "cancelled"):
                if info["status"] != "completed":
                    raise SystemExit(f"snapshot_kvm.py: error: {self.name}: migration {info}")
                return info  # type: ignore[no-any-return]
            if time.monotonic() > deadline:
                raise SystemExit(f"snapshot_kvm.py: error: {self.name}: migration not done: {info}")
            time.sleep(0.001)

    def close(self) -> None:
        try:
            self.qmp.close()
        except OSError:
            pass
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self.log.close()


def ticks(text: str) -> int:
    return text.count("\ntick ")


def measure(kind: str, kernel: Path, mem: str, work: Path) -> dict[str, float]:
    out: dict[str, float] = {}
    state = work / f"{kind}-{mem}.state"
    src = Vm(kind, kernel, work, f"{kind}-{mem}-src", mem)
    try:
        src.wait_text("tick 2 ", 120)
        src.cmd("migrate-set-parameters", **{"max-bandwidth": BANDWIDTH})
        src.cmd("stop")
        t0 = time.monotonic()
        src.cmd("migrate", uri=f"exec:cat > {state}")
        src.wait_migration()
        out["save ms"] = 1000 * (time.monotonic() - t0)
        out["state MiB"] = state.stat().st_size / (1 << 20)
        before = ticks(src.text())
    finally:
        src.close()
    dst = Vm(kind, kernel, work, f"{kind}-{mem}-restore", mem, "-incoming", f"exec:cat {state}")
    try:
        loaded = dst.wait_status("paused")
        out["restore: process to QMP ms"] = 1000 * (dst.qmp_up - dst.t0)
        out["restore: QMP to loaded ms"] = 1000 * (loaded - dst.qmp_up)
        t1 = time.monotonic()
        dst.cmd("cont")
        out["restore: start to running ms"] = 1000 * (dst.wait_status("running") - dst.t0)
        out["cont ms"] = 1000 * (time.monotonic() - t1)
        dst.wait_text("tick ", 30)
        deadline = time.monotonic() + 30
        while ticks(dst.text()) < 1:
            if time.monotonic() > deadline:
                raise SystemExit(f"snapshot_kvm.py: error: {kind}: the restored guest did not go on "
                                 f"(after {before} ticks)")
            time.sleep(0.01)
    finally:
        dst.close()
    sock = work / f"{kind}-{mem}.sock"
    dst = Vm(kind, kernel, work, f"{kind}-{mem}-dst", mem, "-incoming", f"unix:{sock}")
    src = Vm(kind, kernel, work, f"{kind}-{mem}-live", mem)
    try:
        src.wait_text("tick 2 ", 120)
        src.cmd("migrate-set-parameters", **{"max-bandwidth": BANDWIDTH, "downtime-limit": 300})
        src.cmd("migrate", uri=f"unix:{sock}")
        info = src.wait_migration()
        out["live: total ms"] = float(info.get("total-time", 0))
        out["live: downtime ms"] = float(info.get("downtime", 0))
        dst.wait_status("running", 30)
    finally:
        src.close()
        dst.close()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mem", nargs="+", default=["256M", "2G"])
    ap.add_argument("--vmm", choices=["pyvmm", "qemu", "both"], default="both")
    args = ap.parse_args(argv)
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        print("snapshot_kvm.py: error: /dev/kvm is not usable", file=sys.stderr)
        return 1
    kinds = ["pyvmm", "qemu"] if args.vmm == "both" else [args.vmm]
    if "qemu" in kinds and shutil.which("qemu-system-x86_64") is None:
        print("snapshot_kvm.py: error: qemu-system-x86_64 is missing", file=sys.stderr)
        return 1
    sys.path.insert(0, str(ROOT / "tests" / "support" / "guests"))
    from build import build_guest  # type: ignore[import-not-found]

    print(f"load average {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory(prefix="snapshot-kvm-") as d:
        work = Path(d)
        kernel = build_guest("migrate_smp", work / "guest")
        for mem in args.mem:
            results = {k: measure(k, kernel, mem, work) for k in kinds}
            rows = list(next(iter(results.values())))
            print(f"\n-m {mem}, -smp 2, migrate_smp guest on KVM")
            print(f"| | {' | '.join(kinds)} |{' pyvmm/qemu |' if len(kinds) == 2 else ''}")
            print(f"|---|{'---|' * (len(kinds) + (len(kinds) == 2))}")
            for row in rows:
                vals = [results[k][row] for k in kinds]
                ratio = f" {vals[0] / vals[1]:.2f} |" if len(kinds) == 2 and vals[1] else (
                    " - |" if len(kinds) == 2 else "")
                print(f"| {row} | {' | '.join(f'{v:.1f}' for v in vals)} |{ratio}")
            for f in work.glob("*.state"):
                f.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
