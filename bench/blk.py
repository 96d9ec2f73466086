"""Block I/O inside a guest: pyvmm against ``qemu-system-x86_64 -accel tcg``, same guest, same run.

A small static program (``bench/guest/blkbench.c``, built with ``gcc -static``
at run time) is added to the guest kit's initramfs and run by the guest's
/init through the kernel parameter ``pyvmm_run="/blkbench /dev/vda ..."``.  It
opens the virtio disk with O_DIRECT and measures, with the guest's own
CLOCK_MONOTONIC:

* sequential write and read in 1 MiB requests (MiB/s; the read checks every
  4 KiB stamp the write left, so lost or misplaced data fails the run),
* 4 KiB random reads and random writes over the same region (IOPS).

Each VMM boots the same kernel, initramfs and command line with a fresh raw
image (``--image-size``, default 64 MiB) of its own.  Runs alternate between
the VMMs; with ``--runs N`` the best value of each metric over N boots is
reported.  The table shows both VMMs, the ratio pyvmm/QEMU (above 1: pyvmm is
faster; for the time rows, above 1: pyvmm is slower), the virtio transport each
guest found its disk on (read from sysfs inside the guest, not assumed, and
checked against the one asked for), and host-measured boot time, wall time and
the VMM's CPU time.  pyvmm's disk is ``--drive`` (virtio-mmio, the CLI's
default) unless ``--transport pci`` (``--device virtio-blk-pci``, the transport
QEMU's ``if=virtio`` gives) or ``both``.  As a sanity check the guest's clock is
compared with the host's over the timed phases: an emulated CPU whose clock
drifts would make in-guest numbers meaningless, so a warning is printed.

Any failure (a VMM exits non-zero, the guest program reports an error, no
result line, a timeout) ends the benchmark with status 1 and one line saying
what failed, followed by the tail of that VMM's console output.

Usage: python bench/blk.py [--runs N] [--size MIB] [--seconds S] [--transport mmio|pci|both]
                           [--vmm pyvmm,qemu] [--keep]
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import logging
import os
import re
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("bench.blk")

GUEST_SOURCE = Path(__file__).resolve().parent / "guest" / "blkbench.c"
GUEST_PATH = "blkbench"  # inside the initramfs, at the root
QEMU = "qemu-system-x86_64"

#: Metrics of the result line, with the label used in the table (all: bigger is better).
METRICS: tuple[tuple[str, str], ...] = (
    ("seq_write_mibs", "seq write MiB/s"),
    ("seq_read_mibs", "seq read MiB/s"),
    ("rand_read_iops", "4K rand read IOPS"),
    ("rand_write_iops", "4K rand write IOPS"),
)
PHASES = ("seq_write", "seq_read", "rand_read", "rand_write")

_RESULT = re.compile(r"^BLKBENCH (.*)$", re.M)
_ENV = re.compile(r"^BLKBENCH-ENV (.*)$", re.M)
_ERROR = re.compile(r"^BLKBENCH-ERROR (.*)$", re.M)
_PHASE = re.compile(r"^BLKBENCH-PHASE (\w+) (begin|end) t=([0-9.]+)$")
POWEROFF_GRACE_S = 60.0  # after "exit status N" the guest only syncs and powers off

_EXIT = re.compile(r"^pyvmm-guest: exit status (\d+)$", re.M)


class BenchError(Exception):
    """The benchmark cannot produce a number; the message is one line saying why."""


# -- the guest program -----------------------------------------------------------------------------
def build_guest_program(out_dir: Path, source: Path = GUEST_SOURCE) -> Path:
    """Compile the guest program as a static x86-64 executable (no shared libraries in the initramfs)."""
    gcc = shutil.which("gcc")
    if gcc is None:
        raise BenchError("gcc is needed to build the guest program (apt-get install gcc libc6-dev)")
    exe = out_dir / "blkbench"
    proc = subprocess.run([gcc, "-static", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(exe), str(source)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        first = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise BenchError(f"gcc -static {source.name} failed (static libc.a from libc6-dev?): {first}")
    return exe


def build_initrd(base: Path, program: Path, out: Path) -> Path:
    """``base`` followed by a second cpio archive holding ``/blkbench``.

    The kernel unpacks concatenated initramfs archives one after the other
    (Documentation/driver-api/early-userspace/buffer-format.rst), so the
    guest kit's cached image is reused unchanged and no API change is needed.
    """
    from pyvmm.guestkit.cpio import CpioWriter

    extra = io.BytesIO()
    with CpioWriter(extra) as w:
        w.add_file(GUEST_PATH, program.read_bytes(), mode=0o755)
    blob = base.read_bytes()
    blob += b"\0" * (-len(blob) % 4)  # the next archive header must be 4-byte aligned
    out.write_bytes(blob + extra.getvalue())
    return out


def guest_command(device: str, size_mib: int, seconds: int) -> str:
    return f"/{GUEST_PATH} {device} {size_mib} {seconds}"


# -- parsing the guest's output --------------------------------------------------------------------
@dataclass(frozen=True)
class BlkResult:
    """The ``BLKBENCH ...`` line: everything measured inside the guest."""

    mode: str
    size_mib: int
    seq_write_mibs: float
    seq_read_mibs: float
    rand_read_iops: float
    rand_write_iops: float
    fields: dict[str, str] = field(default_factory=dict, compare=False)

    @classmethod
    def parse(cls, text: str) -> BlkResult:
        """Parse the last ``BLKBENCH key=value ...`` line of ``text`` (CRs ignored)."""
        text = text.replace("\r", "")
        found = _RESULT.findall(text)
        if not found:
            err = _ERROR.findall(text)
            raise BenchError(f"guest program failed: {err[-1]}" if err else "no BLKBENCH result line")
        kv: dict[str, str] = {}
        for item in found[-1].split():
            key, sep, value = item.partition("=")
            if not sep:
                raise BenchError(f"malformed BLKBENCH item {item!r}")
            kv[key] = value
        try:
            res = cls(mode=kv["mode"], size_mib=int(kv["size_mib"]),
                      **{m: float(kv[m]) for m, _ in METRICS}, fields=kv)
        except (KeyError, ValueError) as e:
            raise BenchError(f"malformed BLKBENCH line ({e}): {found[-1]}") from None
        if res.mode not in ("direct", "sync"):
            raise BenchError(f"unknown I/O mode {res.mode!r}")
        if min(getattr(res, m) for m, _ in METRICS) <= 0:
            raise BenchError(f"non-positive measurement: {found[-1]}")
        return res


def parse_env(text: str) -> dict[str, str]:
    m = _ENV.findall(text.replace("\r", ""))
    return dict(item.partition("=")[::2] for item in m[-1].split()) if m else {}


def transport_of(sysfs: str) -> str:
    """Name the virtio transport from the device's sysfs path inside the guest."""
    if "/pci" in sysfs:
        return "virtio-pci"
    if "LNRO0005" in sysfs or "virtio-mmio" in sysfs or "virtio_mmio" in sysfs:
        return "virtio-mmio"
    return f"unknown ({sysfs or 'no sysfs path'})"


# -- running one VMM -------------------------------------------------------------------------------
@dataclass
class Outcome:
    """One boot of one VMM: the guest's numbers plus what the host saw."""

    vmm: str
    result: BlkResult
    transport: str
    clocksource: str
    boot_s: float  # host seconds from start until the guest program printed its first line
    wall_s: float  # host seconds from start until the VMM exited
    cpu_s: float  # host CPU seconds (user + system, all threads) the VMM process used
    clock_ratio: float  # guest seconds / host seconds over the timed phases


@dataclass
class Line:
    t: float
    text: str


def run_vmm(name: str, cmd: list[str], timeout: float, log_path: Path, expect_transport: str | None = None) -> Outcome:
    """Run one VMM to completion, timestamping every console line as it arrives.

    ``expect_transport`` (e.g. "virtio-pci"): fail unless the guest found its disk there.
    """
    log.info("%s: %s", name, shlex.join(cmd))
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)  # the VMM is our only child while it runs
    t0 = time.monotonic()
    with open(log_path.with_suffix(".stderr"), "w+b") as err_file:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err_file)
        assert proc.stdout is not None
        timed_out, finished = threading.Event(), threading.Event()
        deadline = [t0 + timeout]  # shortened once the guest reports its exit status

        def watchdog() -> None:
            while not finished.wait(0.5):
                if time.monotonic() > deadline[0]:
                    timed_out.set()
                    proc.kill()
                    return

        dog = threading.Thread(target=watchdog, name="blk-watchdog", daemon=True)
        dog.start()
        lines: list[Line] = []
        try:
            for raw in proc.stdout:
                line = Line(time.monotonic() - t0, raw.decode(errors="replace").rstrip("\r\n"))
                lines.append(line)
                if line.text.startswith("pyvmm-guest: exit status"):
                    deadline[0] = min(deadline[0], time.monotonic() + POWEROFF_GRACE_S)
            rc = proc.wait()
        finally:
            finished.set()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            dog.join()
        wall = time.monotonic() - t0
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
        err_file.seek(0)
        stderr = err_file.read().decode(errors="replace")
    text = "\n".join(ln.text.replace("\r", "") for ln in lines)
    log_path.write_text(text + "\n")

    def failed(why: str) -> BenchError:
        unloaded = [ln[len("init: failed to load "):] for ln in text.splitlines()
                    if ln.startswith("init: failed to load ")]
        if unloaded:
            why += f"; the guest's /init could not load {len(unloaded)} module(s), first {unloaded[0]}"
        tail = "\n".join((text + "\n" + stderr).strip().splitlines()[-25:])
        return BenchError(f"{name}: {why} (console log {log_path})\n--- last output ---\n{tail}")

    if timed_out.is_set():
        if _EXIT.search(text):
            raise failed(f"the VMM did not exit within {POWEROFF_GRACE_S:.0f} s of the guest's poweroff; killed")
        raise failed(f"no result within {timeout:.0f} s; killed")
    clock_problem = check_guest_clock(lines)
    if clock_problem:
        raise failed(clock_problem)
    try:
        result = BlkResult.parse(text)
    except BenchError as e:
        raise failed(str(e)) from None
    status = _EXIT.findall(text)
    if not status or status[-1] != "0":
        raise failed(f"guest command exit status {status[-1] if status else 'not reported'}")
    if rc != 0:
        raise failed(f"VMM exited with status {rc}")
    env = parse_env(text)
    transport = transport_of(env.get("sysfs", ""))
    if expect_transport is not None and transport != expect_transport:
        raise failed(f"the guest's disk is on {transport}, expected {expect_transport}")
    boot = next((ln.t for ln in lines if ln.text.startswith("BLKBENCH-ENV")), wall)
    return Outcome(name, result, transport, env.get("clocksource", "?"), boot, wall, cpu, clock_ratio(lines))


def phase_marks(lines: list[Line]) -> list[tuple[str, str, float, float]]:
    """(phase, begin|end, host seconds, guest seconds) of every BLKBENCH-PHASE line."""
    out = []
    for ln in lines:
        m = _PHASE.match(ln.text.replace("\r", ""))
        if m:
            out.append((m.group(1), m.group(2), ln.t, float(m.group(3))))
    return out


def clock_ratio(lines: list[Line]) -> float:
    """Guest time / host time between the first and the last phase line (1.0: the guest clock is right)."""
    marks = phase_marks(lines)
    if len(marks) < 2 or marks[-1][2] <= marks[0][2]:
        return float("nan")
    return (marks[-1][3] - marks[0][3]) / (marks[-1][2] - marks[0][2])


#: A phase's guest duration may differ from what the host saw by serial latency and scheduling,
#: but not by more than this factor plus this many seconds: beyond that the guest clock jumped.
CLOCK_FACTOR = 2.0
CLOCK_SLACK_S = 1.0


def check_guest_clock(lines: list[Line]) -> str | None:
    """Why the guest clock cannot be trusted for this run, or None.

    In-guest rates divide by guest time; a clock that jumps (e.g. an emulated
    TSC that once returns a wrong value) would silently turn into absurd rates.
    """
    marks = phase_marks(lines)
    begins = {name: (host, guest) for name, what, host, guest in marks if what == "begin"}
    for name, what, host, guest in marks:
        if what != "end" or name not in begins:
            continue
        host_d, guest_d = host - begins[name][0], guest - begins[name][1]
        if guest_d < 0 or guest_d > CLOCK_FACTOR * host_d + CLOCK_SLACK_S or \
                host_d > CLOCK_FACTOR * guest_d + CLOCK_SLACK_S:
            return (f"guest clock jumped: phase {name} took {guest_d:.3f} s by the guest clock "
                    f"but {host_d:.3f} s by the host's")
    return None


# -- command lines ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Setup:
    kernel: Path
    initrd: Path
    append: str
    memory_mib: int
    pyvmm_accel: str


def pyvmm_command(s: Setup, image: Path, transport: str = "mmio") -> list[str]:
    """pyvmm's command line; ``transport`` "mmio" is ``--drive`` (the CLI default), "pci" virtio-blk-pci."""
    cmd = [sys.executable, "-m", "pyvmm", "run", "--accel", s.pyvmm_accel, "--kernel", str(s.kernel),
           "--initrd", str(s.initrd), "--append", s.append, "-m", f"{s.memory_mib}M", "--no-reboot",
           "--serial", "stdio", "-q"]
    if transport == "pci":
        return cmd + ["--device", f"virtio-blk-pci,file={image},format=raw"]
    return cmd + ["--drive", f"file={image},format=raw,if=virtio"]


def qemu_command(s: Setup, image: Path) -> list[str]:
    return [QEMU, "-accel", "tcg", "-m", str(s.memory_mib), "-nographic", "-no-reboot", "-kernel", str(s.kernel),
            "-initrd", str(s.initrd), "-append", s.append, "-drive", f"file={image},format=raw,if=virtio"]


def fresh_image(path: Path, size_mib: int) -> Path:
    """A fully written (not sparse) raw image, so neither VMM pays for host block allocation."""
    chunk = bytes(1 << 20)
    with open(path, "wb") as f:
        for _ in range(size_mib):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    return path


# -- report ----------------------------------------------------------------------------------------
def best(outcomes: list[Outcome], stat: str = "best") -> dict[str, float]:
    """Each metric over the runs: the best (max throughput, min times) or the median."""
    def pick(values: list[float], higher_is_better: bool) -> float:
        if stat == "median":
            return statistics.median(values)
        return max(values) if higher_is_better else min(values)

    out = {m: pick([getattr(o.result, m) for o in outcomes], True) for m, _ in METRICS}
    for key in ("boot_s", "wall_s", "cpu_s"):
        out[key] = pick([getattr(o, key) for o in outcomes], False)
    return out


def format_table(by_vmm: dict[str, list[Outcome]], stat: str = "best") -> str:
    """One column per VMM configuration, then pyvmm/QEMU ratios when QEMU ran too."""
    names = list(by_vmm)
    bests = {n: best(by_vmm[n], stat) for n in names}
    heads = [f"{n} ({by_vmm[n][0].transport})" for n in names]
    ratios = [n for n in names if n.startswith("pyvmm")] if "qemu" in names else []
    width = max(18, *(len(h) for h in heads))
    rows = [f"{'':24}" + "".join(f"{h:>{width + 2}}" for h in heads)
            + "".join(f"{n + '/qemu':>{max(14, len(n) + 7)}}" for n in ratios)]
    labels = [*METRICS, ("boot_s", "guest ready s (host)"), ("wall_s", "boot+run wall s"),
              ("cpu_s", "VMM CPU s (host)")]
    for key, label in labels:
        row = f"{label:24}" + "".join(f"{bests[n][key]:>{width + 2},.2f}" for n in names)
        for n in ratios:
            row += f"{bests[n][key] / bests['qemu'][key]:>{max(14, len(n) + 7)}.3f}"
        rows.append(row)
    return "\n".join(rows)


# -- main ------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=1, help="boots per VMM, interleaved (default 1)")
    ap.add_argument("--stat", choices=("best", "median"), default="best",
                    help="how the table combines the runs (default best)")
    ap.add_argument("--size", type=int, default=32, metavar="MIB",
                    help="region the guest reads and writes, from offset 0 (default 32)")
    ap.add_argument("--image-size", type=int, default=64, metavar="MIB", help="raw image size (default 64)")
    ap.add_argument("--seconds", type=int, default=3, help="duration of each random-I/O phase (default 3)")
    ap.add_argument("--transport", choices=("mmio", "pci", "both"), default="mmio",
                    help="pyvmm's disk: mmio = --drive (virtio-mmio, the CLI default), "
                         "pci = --device virtio-blk-pci (as QEMU's if=virtio), both = one pyvmm boot of each")
    ap.add_argument("--vmm", default="pyvmm,qemu", help="comma-separated subset of pyvmm,qemu (default both)")
    ap.add_argument("--pyvmm-accel", default="tcg", help="pyvmm's accelerator (default tcg, as QEMU here)")
    ap.add_argument("--memory", type=int, default=512, metavar="MIB", help="guest RAM (default 512)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds allowed per boot (default 900)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (images, initrd, console logs)")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="blk.py: %(message)s")
    vmms = [v.strip() for v in args.vmm.split(",") if v.strip()]
    if not vmms or set(vmms) - {"pyvmm", "qemu"}:
        ap.error("--vmm takes pyvmm, qemu or both")
    if args.size < 1 or args.image_size < args.size or args.runs < 1 or args.seconds < 1:
        ap.error("need --runs >= 1, --seconds >= 1 and 1 <= --size <= --image-size")
    if "qemu" in vmms and shutil.which(QEMU) is None:
        print(f"blk.py: error: {QEMU} not found (apt-get install qemu-system-x86)", file=sys.stderr)
        return 1

    workdir = Path(tempfile.mkdtemp(prefix="pyvmm-bench-blk-"))
    try:
        return _run(args, vmms, workdir)
    except BenchError as e:
        print(f"blk.py: error: {e}", file=sys.stderr)
        if not args.keep:
            print("blk.py: (the work directory is removed; rerun with --keep to inspect the logs)", file=sys.stderr)
        return 1
    finally:
        if args.keep:
            print(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def _run(args: argparse.Namespace, vmms: list[str], workdir: Path) -> int:
    from pyvmm.guestkit import GuestKitError, default_guest

    try:
        guest = default_guest()
    except GuestKitError as e:
        raise BenchError(f"guest kit: {e}") from None
    program = build_guest_program(workdir)
    initrd = build_initrd(guest.initrd, program, workdir / "initrd.cpio")
    # "quiet": kernel messages through an emulated UART cost an exit per byte in either VMM.
    cmd_text = guest_command("/dev/vda", args.size, args.seconds)
    append = guest.with_cmdline("quiet", f'pyvmm_run="{cmd_text}"').cmdline
    setup = Setup(guest.kernel, initrd, append, args.memory, args.pyvmm_accel)
    builders = {"qemu": qemu_command}
    expected = {"qemu": "virtio-pci"}  # QEMU's if=virtio on the pc machine
    if "pyvmm" in vmms:
        transports = ("mmio", "pci") if args.transport == "both" else (args.transport,)
        for t in transports:
            name = "pyvmm" if len(transports) == 1 else f"pyvmm-{t}"
            builders[name] = lambda s, image, t=t: pyvmm_command(s, image, t)
            expected[name] = f"virtio-{t}"
    configs = [n for n in builders if n.startswith("pyvmm")] + (["qemu"] if "qemu" in vmms else [])
    by_vmm: dict[str, list[Outcome]] = {v: [] for v in configs}
    print(f"kernel {guest.kernel.name} ({guest.kernel_info.release if guest.kernel_info else '?'}), "
          f"append: {append}")
    pyvmm_env = " ".join(f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("PYVMM_"))
    if pyvmm_env:
        print(f"pyvmm environment: {pyvmm_env}")
    print(f"guest program: {cmd_text} (region {args.size} MiB of a {args.image_size} MiB raw image, "
          f"1 MiB sequential requests, 4 KiB random for {args.seconds} s each)")
    for run in range(1, args.runs + 1):
        for vmm in configs:
            image = fresh_image(workdir / f"{vmm}-{run}.raw", args.image_size)
            cmd = builders[vmm](setup, image)
            o = run_vmm(f"{vmm} run {run}", cmd, args.timeout, workdir / f"{vmm}-{run}.log", expected[vmm])
            if not args.keep:
                image.unlink()
            o = dataclasses.replace(o, vmm=vmm)
            by_vmm[vmm].append(o)
            r = o.result
            print(f"  {vmm:10} run {run}: seq write {r.seq_write_mibs:8.2f} MiB/s  seq read {r.seq_read_mibs:8.2f} "
                  f"MiB/s  rand read {r.rand_read_iops:8.1f} IOPS  rand write {r.rand_write_iops:8.1f} IOPS  "
                  f"[{o.transport}, {r.mode}, clock {o.clocksource}, guest/host clock {o.clock_ratio:.3f}, "
                  f"wall {o.wall_s:.1f} s, CPU {o.cpu_s:.1f} s]", flush=True)
    print()
    accels = ", ".join(f"{v} {args.pyvmm_accel if v == 'pyvmm' else 'tcg'}" for v in vmms)
    print(f"{args.stat} of {args.runs} run(s); accelerator: {accels}; "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    print(format_table(by_vmm, args.stat))
    if "qemu" in configs and len(configs) > 1:
        print("ratio > 1: pyvmm is faster (throughput rows) or slower (time rows) than QEMU.")
    for vmm, outs in by_vmm.items():
        for o in outs:
            if not 0.8 <= o.clock_ratio <= 1.25:
                print(f"warning: {vmm}: the guest clock ran at {o.clock_ratio:.2f}x host time during the "
                      f"measurement; in-guest rates are off by that factor")
    return 0


if __name__ == "__main__":
    sys.exit(main())
