#!/usr/bin/env python3
"""Save, restore and live migration: pyvmm against QEMU, same guest, same QMP commands.

For each RAM size (default 256M and 2G) and each VMM (pyvmm ``-accel tcg`` and
``qemu-system-x86_64 -accel tcg``), the guest kit's stock Linux boots to its shell, then:

* **save**: ``stop``, then ``migrate exec:cat > FILE``; the time from ``migrate`` until
  ``query-migrate`` says completed, and the file's size;
* **restore**: a new process with ``-incoming "exec:cat FILE"``; the time from starting it
  until the stream is loaded (``query-status`` paused), and until it runs after ``cont``
  (the first guest instruction); "QMP up to loaded" leaves out the process start and the
  machine build (from the moment QMP answers);
* **mapped restore** (pyvmm only: QEMU 7.2 has neither ``file:`` nor ``mapped-ram``): the same
  with the ``mapped-ram`` capability and ``file:FILE``; the restore maps RAM lazily;
* **live**: a fresh guest running a memory-dirtying loop migrates with ``migrate
  tcp:127.0.0.1:PORT`` to a waiting ``-incoming tcp:...``; ``total-time`` and ``downtime``
  from ``query-migrate``, with the same ``downtime-limit`` for both.

Both VMMs get ``migrate-set-parameters max-bandwidth`` 10 GiB/s (QEMU's default of 128 MiB/s
would measure the throttle).  Ratios are pyvmm/QEMU: above 1 pyvmm is slower.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from qemu.qmp import ConnectError
from qemu.qmp.legacy import QEMUMonitorProtocol

READY = b"pyvmm-guest: shell ready"
DIRTIER = b"(while :; do dd if=/dev/urandom of=/dirt bs=64k count=64 conv=notrunc 2>/dev/null; done) &\n"
BANDWIDTH = 10 << 30


class Vm:
    def __init__(self, kind: str, workdir: Path, name: str, args: list[str]) -> None:
        self.serial = workdir / f"{name}.serial"
        self.qmp_path = workdir / f"{name}.qmp"
        common = ["-serial", f"unix:{self.serial},server=on,wait=off", "-qmp",
                  f"unix:{self.qmp_path},server=on,wait=off", *args]
        if kind == "pyvmm":
            cmd = [sys.executable, "-m", "pyvmm", "run", "-accel", "tcg", *common]
        else:
            cmd = ["qemu-system-x86_64", "-accel", "tcg", "-display", "none", "-nodefaults", "-no-user-config",
                   *common]
        self.log = open(workdir / f"{name}.log", "wb")
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + 60
        while not (self.serial.exists() and self.qmp_path.exists()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"snapshot.py: error: {kind} did not start: "
                                 f"{(workdir / f'{name}.log').read_text(errors='replace')[-800:]}")
            time.sleep(0.005)
        while True:  # bound (the file exists) is not yet listening
            self.qmp = QEMUMonitorProtocol(str(self.qmp_path))
            try:
                self.qmp.connect()
                self.t_qmp = time.monotonic()
                break
            except (ConnectError, OSError):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"snapshot.py: error: {kind}: no QMP") from None
                time.sleep(0.01)
        while True:
            self.con = socket.socket(socket.AF_UNIX)
            try:
                self.con.connect(str(self.serial))
                break
            except OSError:
                self.con.close()
                if time.monotonic() > deadline:
                    raise SystemExit(f"snapshot.py: error: {kind}: no serial console") from None
                time.sleep(0.01)
        self.con.settimeout(0.2)
        self.out = b""

    def cmd(self, name: str, **args: Any) -> Any:
        r = self.qmp.cmd_raw(name, args or None)
        if "error" in r:
            raise SystemExit(f"snapshot.py: error: {name}: {r['error']['desc']}")
        return r["return"]

    def wait_console(self, needle: bytes, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.out:
            if time.monotonic() > deadline:
                raise SystemExit(f"snapshot.py: error: no {needle!r} on the console: {self.out[-500:]!r}")
            try:
                self.out += self.con.recv(65536)
            except TimeoutError:
                pass

    def wait_status(self, want: str, timeout: float = 300) -> float:
        deadline = time.monotonic() + timeout
        while self.cmd("query-status")["status"] != want:
            if time.monotonic() > deadline:
                raise SystemExit(f"snapshot.py: error: status never became {want}")
            time.sleep(0.002)
        return time.monotonic()

    def wait_migration(self, timeout: float = 600) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while (info := self.cmd("query-migrate")).get("status") not in ("completed", "failed", "cancelled"):
            if time.monotonic() > deadline:
                raise SystemExit(f"snapshot.py: error: migration still {info}")
            time.sleep(0.002)
        if info["status"] != "completed":
            raise SystemExit(f"snapshot.py: error: migration {info}")
        return dict(info)

    def close(self) -> None:
        try:
            self.qmp.close()
        except Exception:
            pass
        self.con.close()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.log.close()


def measure(kind: str, size: str, guest, workdir: Path, downtime_limit: int) -> dict[str, float]:
    args = ["-kernel", str(guest.kernel), "-initrd", str(guest.initrd), "-append", guest.cmdline, "-m", size]
    state = workdir / f"{kind}-{size}.state"
    out: dict[str, float] = {}
    vm = Vm(kind, workdir, f"{kind}-{size}-src", args)
    try:
        vm.wait_console(READY, 600)
        vm.cmd("migrate-set-parameters", **{"max-bandwidth": BANDWIDTH})
        vm.cmd("stop")
        t = time.monotonic()
        vm.cmd("migrate", uri=f"exec:cat > {state}")
        vm.wait_migration()
        out["save s"] = time.monotonic() - t
        out["state file MiB"] = state.stat().st_size / (1 << 20)
    finally:
        vm.close()
    dst = Vm(kind, workdir, f"{kind}-{size}-dst", [*args, "-incoming", f"exec:cat {state}"])
    try:
        loaded = dst.wait_status("paused")
        out["restore: loaded s"] = loaded - dst.t0
        out["restore: QMP up to loaded s"] = loaded - dst.t_qmp
        dst.cmd("cont")
        out["restore: running s"] = dst.wait_status("running") - dst.t0
    finally:
        dst.close()
    state.unlink()
    if kind == "pyvmm":  # instant restore: mapped-ram to file:, RAM mapped lazily (QEMU 7.2 has neither)
        vm = Vm(kind, workdir, f"{kind}-{size}-msrc", args)
        try:
            vm.wait_console(READY, 600)
            vm.cmd("stop")
            vm.cmd("migrate-set-capabilities", capabilities=[{"capability": "mapped-ram", "state": True}])
            t = time.monotonic()
            vm.cmd("migrate", uri=f"file:{state}")
            vm.wait_migration()
            out["mapped save s"] = time.monotonic() - t
        finally:
            vm.close()
        dst = Vm(kind, workdir, f"{kind}-{size}-mdst", [*args, "-incoming", f"file:{state}"])
        try:
            loaded = dst.wait_status("paused")
            out["mapped restore: loaded s"] = loaded - dst.t0
            out["mapped restore: QMP up to loaded s"] = loaded - dst.t_qmp
            dst.cmd("cont")
            out["mapped restore: running s"] = dst.wait_status("running") - dst.t0
        finally:
            dst.close()
        state.unlink()
    else:
        out.update({"mapped save s": 0.0, "mapped restore: loaded s": 0.0, "mapped restore: QMP up to loaded s": 0.0,
                    "mapped restore: running s": 0.0})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    src = Vm(kind, workdir, f"{kind}-{size}-live", args)
    dst = Vm(kind, workdir, f"{kind}-{size}-livedst", [*args, "-incoming", f"tcp:127.0.0.1:{port}"])
    try:
        src.wait_console(READY, 600)
        src.con.sendall(DIRTIER)
        time.sleep(2)
        src.cmd("migrate-set-parameters", **{"max-bandwidth": BANDWIDTH, "downtime-limit": downtime_limit})
        src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
        info = src.wait_migration()
        out["live: total ms"] = info["total-time"]
        out["live: downtime ms"] = info.get("downtime", -1)
        out["live: passes"] = info.get("ram", {}).get("dirty-sync-count", 0)
        dst.wait_status("running")
    finally:
        dst.close()
        src.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="256M,2G")
    ap.add_argument("--vmm", choices=("both", "pyvmm", "qemu"), default="both")
    ap.add_argument("--downtime-limit", type=int, default=300, help="ms, for both VMMs (QEMU's default)")
    a = ap.parse_args()
    if a.vmm != "pyvmm" and not shutil.which("qemu-system-x86_64"):
        print("snapshot.py: error: qemu-system-x86_64 is missing", file=sys.stderr)
        return 1
    from pyvmm.guestkit import default_guest

    guest = default_guest().with_cmdline("quiet")
    kinds = ["pyvmm", "qemu"] if a.vmm == "both" else [a.vmm]
    print(f"load average {os.getloadavg()[0]:.2f}; downtime-limit {a.downtime_limit} ms; "
          f"max-bandwidth {BANDWIDTH >> 30} GiB/s")
    with tempfile.TemporaryDirectory(prefix="pyvmm-snapbench-") as tmp:
        for size in a.sizes.split(","):
            results = {k: measure(k, size, guest, Path(tmp), a.downtime_limit) for k in kinds}
            print(f"\n-m {size}")
            rows = list(next(iter(results.values())))
            print(f"| | {' | '.join(kinds)} |{' pyvmm/qemu |' if len(kinds) == 2 else ''}")
            print(f"|---|{'---|' * (len(kinds) + (len(kinds) == 2))}")
            for row in rows:
                vals = [results[k][row] for k in kinds]
                ratio = f" {vals[0] / vals[1]:.2f} |" if len(kinds) == 2 and vals[1] > 0 else (
                    " - |" if len(kinds) == 2 else "")
                print(f"| {row} | {' | '.join(f'{v:,.3f}' if v < 100 else f'{v:,.0f}' for v in vals)} |{ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
