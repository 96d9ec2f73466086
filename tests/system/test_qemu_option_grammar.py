"""QEMU's option grammar: every spelling in a table goes through pyvmm and qemu-system-x86_64.

Both VMMs get the same command line: ``-S -display none -nodefaults -qmp unix:SOCK,server=on,
wait=off``, a small multiboot guest (``-kernel``, not for ``-machine none``), ``-accel tcg``
unless the spelling chooses an accelerator, then the spelling.  A VMM *accepts* a spelling when
it serves QMP and answers ``query-status`` (so everything after option parsing, machine
creation included, went through); it *refuses* it when it exits non-zero first.  Then it gets
``quit``.  Both must do what the table says.  A refusal from pyvmm must be one line,
``pyvmm: error: ...``, naming the option.

A second, short table lists the spellings QEMU honours and pyvmm refuses on purpose because it
cannot honour them (no VNC, no BIOS splash, no memory hot-plug...): there QEMU must accept and
pyvmm must refuse with one line naming the option.

All rows run in parallel from one module fixture; each row is its own test.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from support.vmms import PYVMM, qemu_binary

ACCEPT, REFUSE = "accept", "refuse"
TIMEOUT = 30.0  # per VMM, generous: the rows run in parallel on a shared machine
WORKERS = 4

JSON_RNG = '{"driver":"virtio-rng-pci","id":"r0"}'


@dataclass(frozen=True)
class Row:
    args: tuple[str, ...]
    expect: str
    names: str = ""  # what pyvmm's error line must name; default: the first argument

    @property
    def id(self) -> str:
        return " ".join(self.args)[:70] or "(none)"

    @property
    def needle(self) -> str:
        return self.names or self.args[0]


def A(*args: str) -> Row:  # noqa: N802 - table shorthand
    return Row(args, ACCEPT)


def R(*args: str, names: str = "") -> Row:  # noqa: N802
    return Row(args, REFUSE, names)


TABLE: list[Row] = [
    # -- option names: exact, one dash or two, no prefixes ----------------------------------------
    A("-m", "16M"), A("--m", "16M"), A("-machine", "pc"), A("--machine", "pc"),
    A("-M", "pc"), A("-smp", "2"), A("--smp", "2"),
    R("-machin", "pc"), R("-mach", "pc"), R("-ma", "pc"), R("-no-acp"), R("-nodefault"), R("-dis", "none"),
    R("-smp2"), R("-bogus"), R("--bogus"), R("-machine"), R("-name"), R("-pidfile"),
    R("disk-none.img"),  # QEMU: a positional is -hda; the file does not exist
    # -- -m ---------------------------------------------------------------------------------------
    A("-m", "size=16M"), A("-m", "64"), A("-m", "16M", "-m", "size=32M"), A("-m", "size=1G"),
    R("-m", "sise=16M"), R("-m", "16M=x"), R("-m", "16X"), R("-m", "2G,slots=0"),
    # -- -machine ---------------------------------------------------------------------------------
    A("-machine", "type=pc"), A("-machine", "pc,accel=tcg"), A("-machine", "none"),
    A("-machine", "pc,usb=off,dump-guest-core=off"), A("-machine", "pc,acpi=off"),
    A("-machine", "pc,hpet=off,vmport=off,smm=off,graphics=off,sata=off"),
    R("-machine", "pc,bogus=1"), R("-machine", "bogus"), R("-machine", '{"type":"pc"}'),
    R("-machine", "none", "-device", "virtio-rng-pci", names="-device"),
    # -- -smp -------------------------------------------------------------------------------------
    A("-smp", "cpus=2"), A("-smp", "2,sockets=2"), A("-smp", "sockets=2,cores=2"),
    A("-smp", "8,sockets=2,cores=2"), A("-smp", "2,maxcpus=4"), A("-smp", "4,dies=2"), A("-smp", "threads=2"),
    R("-smp", "4,sockets=2,cores=3"), R("-smp", "2,sockets=2,cores=2"), R("-smp", "2,maxcpus=1"),
    R("-smp", "2,clusters=2"), R("-smp", "2,bogus=1"), R("-smp", "300"), R("-smp", "two"),
    R("-machine", "none", "-smp", "2", names="-smp"),
    # -- -accel, -enable-kvm ----------------------------------------------------------------------
    A("-accel", "tcg"), A("-accel", "accel=tcg"), A("-accel", "tcg,thread=single"), A("-accel", "kvm"),
    A("-enable-kvm"), A("-accel", "kvm", "-accel", "tcg"), A("-machine", "pc,accel=kvm:tcg"),
    R("-accel", "bogus"), R("-accel", "tcg,bogus=1"),
    # -- -name, -uuid, -display, -msg ---------------------------------------------------------------
    A("-name", "foo"), A("-name", "guest=foo"), A("-name", "foo,,bar"), A("-name", "guest=vm1,process=pyvmm-vm1"),
    A("-name", "foo,debug-threads=off"), A("-name", "foo,debug-threads=on"),
    A("-object", "secret,id=s0,data=pw"),
    A("-object", '{"qom-type":"secret","id":"s0","data":"cHc=","format":"base64"}'),
    R("-object", "secret,id=s0"), R("-object", "secret,id=s0,data=pw,format=hex"),
    A("-overcommit", "mem-lock=off"), A("-overcommit", "mem-lock=off,cpu-pm=off"), R("-overcommit", "bogus=on"),
    A("-global", "PIIX4_PM.disable_s3=1"), A("-global", "PIIX4_PM.disable_s4=1"), A("-no-hpet"), A("-no-shutdown"),
    R("-name", "foo,bogus=1"), R("-name", ",bad"),
    A("-uuid", "12345678-1234-1234-1234-123456789abc"), A("-uuid", "12345678-1234-1234-1234-123456789ABC"),
    R("-uuid", "nope"), R("-uuid", "12345678123412341234123456789abc"),
    A("-display", "none"), R("-display", "bogus"),
    A("-msg", "timestamp=on"), A("-msg", "timestamp=off,guest-name=on"), A("-msg", "timestamp=yes"),
    A("-msg", "timestamp=y"), A("-msg", "timestamp"), A("-msg", "notimestamp"),
    R("-msg", "timestamp=1"), R("-msg", "bogus=on"),
    # -- flags --------------------------------------------------------------------------------------
    A("-no-user-config"), A("-nodefaults"), A("-S"), A("-no-acpi"), A("-no-reboot"), A("-nographic"),
    A("-daemonize"), A("-pidfile", "vmm.pid"), A("-monitor", "none"),
    R("-pidfile", "nodir/vmm.pid"),
    # -- -boot, -rtc --------------------------------------------------------------------------------
    A("-boot", "order=c"), A("-boot", "c"), A("-boot", "cdn"), A("-boot", "once=d"), A("-boot", "menu=on"),
    A("-boot", "menu=y"), A("-boot", "order=cd,once=d,menu=off,strict=on"),
    R("-boot", "order=x"), R("-boot", "bogus=1"), R("-boot", "menu=1"), R("-boot", "order=cc"),
    A("-rtc", "base=utc"), A("-rtc", "base=localtime"), A("-rtc", "base=2006-06-17"),
    A("-rtc", "base=2006-06-17T16:01:21"), A("-rtc", "base=utc,clock=host"), A("-rtc", "base=localtime,driftfix=none"),
    R("-rtc", "base=bogus"), R("-rtc", "bogus=1"), R("-rtc", "utc"),
    # -- -device: QemuOpts and JSON ----------------------------------------------------------------
    A("-device", "virtio-rng-pci"), A("-device", "virtio-rng-pci,id=r0"), A("-device", JSON_RNG),
    A("-device", "isa-debug-exit,iobase=0xf4,iosize=4"), A("-device", '{"driver":"isa-debug-exit","iobase":244}'),
    A("-device", '{"driver":"virtio-rng-pci","id":3}'),  # QEMU 7.2 leaves it anonymous
    A("-device", "virtio-rng-pci", "-device", "virtio-rng-pci"),
    R("-device", "virtio-rng-pci,bogus=1"), R("-device", '{"driver":"virtio-rng-pci","id":"r0","bogus":1}'),
    R("-device", '{"driver":"virtio-rng-pci",'), R("-device", ' {"driver":"virtio-rng-pci"}'),
    R("-device", "virtio-rng-pci,id=1bad"), R("-device", "virtio-rng-pci,id=3"),
    R("-device", "virtio-rng-pci,id=r0", "-device", "virtio-rng-pci,id=r0"),
    R("-device", "isa-debug-exit,iobase=yes"), R("-device", '{"driver":"isa-debug-exit","iobase":"0xf4"}'),
    R("-device", "virtio-blk-pci,drive=nope"), R("-device", "frobnicator"),
    A("-device", "pvpanic"), A("-device", "pvpanic,ioport=0x506,events=1"), R("-device", "pvpanic,iobase=0x505"),
    R("-device", "pvpanic", "-device", "pvpanic"),
    # virtio-serial: the bus device, then ports on it (QEMU's rules for port numbers and names)
    A("-device", "virtio-serial-pci", "-device", "virtserialport,name=org.qemu.guest_agent.0"),
    A("-device", "virtio-serial", "-chardev", "null,id=c0", "-device", "virtconsole,chardev=c0"),
    A("-device", "virtio-serial-pci,id=vs0", "-device", "virtserialport,bus=vs0.0,nr=3,name=a"),
    R("-device", "virtserialport,name=a"), R("-device", "virtio-serial-pci,max_ports=600"),
    R("-device", "virtio-serial-pci", "-device", "virtserialport,nr=0,name=a"),
    R("-device", "virtio-serial-pci", "-device", "virtserialport,name=a", "-device", "virtserialport,name=a"),
    R("-device", "virtio-serial-pci", "-device", "virtserialport,bus=nosuch.0"),
    # typed properties from the device registry, as QEMU's qdev reads them
    A("-netdev", "user,id=n0", "-device", '{"driver":"virtio-net-pci","netdev":"n0","addr":40}'),
    A("-device", '{"driver":"virtio-rng-pci","addr":"06.0"}'), A("-device", "virtio-rng-pci,addr=1f"),
    R("-device", "virtio-rng-pci,addr=zz"), R("-device", "virtio-rng-pci,addr=20"),
    A("-device", '{"driver":"pvpanic","ioport":1286,"events":1}'), R("-device", "pvpanic,ioport=70000"),
    R("-device", "pvpanic,events=256"), R("-device", '{"driver":"pvpanic","events":"1"}'),
    R("-device", "isa-debug-exit,iobase=0x1ffffffff"),
    A("-device", "isa-serial,chardev=c0", "-chardev", "null,id=c0"), R("-device", "isa-serial,chardev=nope"),
    R("-device", "isa-serial,index=4"), R("-device", "isa-serial,irq=16"),
    A("-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56"),
    R("-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0,mac=52:54:00:12", names="-device"),
    R("-netdev", "user,id=n0", "-device", '{"driver":"virtio-net-pci","netdev":"n0","mrg_rxbuf":"on"}',
      names="-device"),
    A("-drive", "file=a,,b.img,format=raw,if=none,id=d0", "-device", "virtio-blk-pci,drive=d0,serial=abc"),
    R("-device", "virtio-blk-pci,drive=nope,serial=abc"),
    # -- -action ----------------------------------------------------------------------------------
    A("-action", "panic=pause"), A("-action", "panic=none,reboot=shutdown"), A("-action", "shutdown=poweroff"),
    A("-action", "panic=pause", "-action", "panic=exit-failure"),
    R("-action", "panic=explode"), R("-action", "colour=red"), R("-action", "reboot=bogus"),
    # -- ,, in paths, -drive, -chardev, -mon, -netdev, -audiodev, -object, -blockdev, -serial ----------
    A("-drive", "file=a,,b.img,format=raw,if=none,id=d0"),
    A("-drive", "file=a,,b.img,format=raw,if=none,id=d0", "-device", "virtio-blk-pci,drive=d0"),
    R("-drive", "file=a,b.img,format=raw,if=none,id=d0"),
    R("-drive", "file=no,,such.img,format=raw,if=none,id=d0"),
    A("-chardev", "null,id=c0"), A("-chardev", "socket,id=m0,path=m,,0.sock,server=on,wait=off",
                                   "-mon", "chardev=m0,mode=control"),
    R("-chardev", '{"backend":"null","id":"c0"}'), R("-mon", "chardev=x"),
    A("-netdev", "user,id=n0"), A("-netdev", '{"type":"user","id":"n0"}'),
    A("-audiodev", "none,id=a0"), A("-audiodev", '{"driver":"none","id":"a0"}'),
    R("-audiodev", "none"), R("-audiodev", "bogus,id=a0"),
    R("-object", "bogus-type,id=x"), R("-object", '{"qom-type":"rng-random"}'),
    R("-blockdev", '{"driver":"null-co"}'),
    A("-blockdev", "driver=file,filename=a,,b.img,node-name=n0"),
    A("-blockdev", '{"driver":"file","filename":"a,b.img","node-name":"n0","auto-read-only":true,"discard":"unmap"}',
      "-blockdev", '{"driver":"raw","file":"n0","node-name":"f0","read-only":false}',
      "-device", "virtio-blk-pci,drive=f0,bus=pci.0,addr=0x4,id=disk0,bootindex=1"),
    A("-blockdev", "driver=raw,node-name=f0,file.driver=file,file.filename=a,,b.img,cache.no-flush=on"),
    R("-blockdev", "driver=file,filename=a,b.img,node-name=n0"),
    R("-blockdev", "driver=file,filename=no,,such.img,node-name=n0"),
    R("-blockdev", "driver=file,filename=a,,b.img"),
    R("-blockdev", "driver=file,filename=a,,b.img,node-name=n0", "-device", "virtio-blk-pci,drive=f0",
      names="-device"),
    A("-drive", "file=a,,b.img,format=raw,if=none,id=d0,snapshot=on", "-device", "virtio-blk-pci,drive=d0"),
    A("-snapshot", "-drive", "file=a,,b.img,format=raw,if=none,id=d0", "-device", "virtio-blk-pci,drive=d0"),
    # -- memory back-ends: -object memory-backend-*, -machine memory-backend=, -numa node,memdev= ---------
    A("-object", "memory-backend-memfd,id=mem,size=32M,share=on", "-machine", "memory-backend=mem"),
    A("-object", "memory-backend-memfd,id=mem,size=32M,share=on", "-m", "32M", "-machine", "pc,memory-backend=mem"),
    A("-object", "memory-backend-ram,id=mem,size=32M", "-m", "32M", "-numa", "node,memdev=mem"),
    A("-object", "memory-backend-file,id=mem,size=32M,mem-path=ram.img,share=on", "-machine", "memory-backend=mem"),
    A("-object", "memory-backend-file,id=mem,size=32M,mem-path=.,share=on", "-m", "32M", "-numa", "node,memdev=mem"),
    A("-object", '{"qom-type":"memory-backend-memfd","id":"mem","size":33554432,"share":true}',
      "-machine", "memory-backend=mem"),
    A("-object", "memory-backend-memfd,id=mem,size=32M"),
    R("-object", "memory-backend-memfd,id=mem"), R("-object", "memory-backend-memfd,id=mem,size=32M,bogus=1"),
    R("-object", "memory-backend-file,id=mem,size=32M"),
    R("-object", "memory-backend-memfd,id=mem,size=32M", "-machine", "memory-backend=mem", "-m", "64M",
      names="memory"),
    R("-object", "memory-backend-memfd,id=mem,size=32M", "-machine", "memory-backend=nope", names="nope"),
    R("-machine", "memory-backend=mem", names="mem"),
    R("-object", "memory-backend-memfd,id=mem,size=32M", "-numa", "node,memdev=mem", "-m", "64M", names="NUMA"),
    R("-numa", "node,memdev=nope"), R("-numa", "bogus"), R("-numa", "node,mem=32M"),
    R("-object", "memory-backend-memfd,id=mem,size=32M", "-numa", "node,memdev=mem",
      "-machine", "memory-backend=mem", names="mutually exclusive"),
    R("-object", "memory-backend-memfd,id=mem,size=32M", "-object", "memory-backend-memfd,id=mem,size=32M"),
    A("-serial", "null"), A("-serial", "none"), R("-serial", "bogus"),
    A("-append", "console=ttyS0 x=1"),
    # -- -sandbox (seccomp): sub-options are checked only when it is on --------------------------
    A("-sandbox", "on"), A("-sandbox", "off"), A("-sandbox", "enable=on"), A("-sandbox", "yes"),
    A("-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"),
    A("-sandbox", "on,obsolete=allow"), A("-sandbox", "on,elevateprivileges=children"),
    A("-sandbox", "on,spawn=allow,resourcecontrol=allow,elevateprivileges=allow"),
    A("-sandbox", "off,spawn=maybe"), A("-sandbox", "enable=on,id=sb0"), A("-sandbox", "on", "-sandbox", "off"),
    A("-sandbox", "on,obsolete=allow,obsolete=deny"),
    R("-sandbox"), R("-sandbox", "bogus"), R("-sandbox", "on,spawn=maybe"), R("-sandbox", "on,obsolete=maybe"),
    R("-sandbox", "on,elevateprivileges=maybe"), R("-sandbox", "on,resourcecontrol=children"),
    R("-sandbox", "on,foo=bar"), R("-sandbox", "on", "-sandbox", "bogus"),
]

#: QEMU honours these; pyvmm cannot, and says so in one line naming the option.
PYVMM_CANNOT: list[Row] = [
    R("-machine", "q35"), R("-machine", "pc,hpet=on"), R("-m", "2G,maxmem=4G,slots=2"),
    R("-accel", "tcg,thread=multi"), R("-boot", "splash-time=5"), R("-overcommit", "mem-lock=on"),
    R("-rtc", "driftfix=slew"), R("-monitor", "null"),
    R("-chardev", "null,id=c0", "-mon", "chardev=c0", names="-mon"),
    R("-chardev", "null,id=c0", "-mon", "chardev=c0,mode=control", names="-mon"),
    R("-serial", "null", "-serial", "null", names="-serial"),
    R("-object", '{"qom-type":"rng-random","id":"rng0","filename":"/dev/urandom"}'),
    R("-blockdev", '{"driver":"null-co","node-name":"n0"}'),
    R("-smp", "255"),  # QEMU's pc takes 255 vCPUs; pyvmm's APIC ids stop at 253
    R("-smp", "0"),  # QEMU 7.2: deprecated, "considered invalid", still accepted
]


#: pyvmm extensions QEMU refuses, kept because pyvmm accepted them before it read QEMU's grammar.
PYVMM_EXTENSIONS: list[Row] = [A("-m", "128MB")]


# -- the harness -----------------------------------------------------------------------------------

@dataclass
class Outcome:
    result: str  # accept / refuse / timeout
    status: str | None  # query-status's status when accepted
    returncode: int | None
    stderr: str

    def describe(self, who: str, cmd: list[str]) -> str:
        return (f"{who}: {self.result} (exit {self.returncode}, status {self.status})\n"
                f"  command: {' '.join(cmd)}\n  stderr: {self.stderr.strip()[-1500:]}")


def _qmp(path: str, deadline: float) -> str:
    """Greeting, qmp_capabilities, query-status, quit; returns the status."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(max(0.5, deadline - time.monotonic()))
        s.connect(path)
        f = s.makefile("rwb")
        greeting = json.loads(f.readline())
        assert "QMP" in greeting, greeting

        def execute(cmd: str) -> dict:
            f.write(json.dumps({"execute": cmd}).encode() + b"\n")
            f.flush()
            while True:
                line = f.readline()
                if not line:
                    raise ConnectionError(f"QMP closed before answering {cmd}")
                msg = json.loads(line)
                if "return" in msg or "error" in msg:
                    return msg

        execute("qmp_capabilities")
        status = execute("query-status")["return"]["status"]
        with contextlib.suppress(OSError, ConnectionError):
            execute("quit")  # QEMU drops a quit whose client is gone before the answer
        return status


def _kill_daemon(pidfile: Path) -> None:
    with contextlib.suppress(OSError, ValueError):
        pid = int(pidfile.read_text().split()[0])
        time.sleep(0.5)
        os.kill(pid, signal.SIGKILL)


def _machine_none(args: list[str]) -> bool:
    return any(a in ("-machine", "--machine", "-M") and b.split(",")[0] in ("none", "type=none")
               for a, b in zip(args, args[1:], strict=False))


def run_vmm(prefix: list[str], row_args: tuple[str, ...], kernel: Path) -> tuple[Outcome, list[str]]:
    work = Path(tempfile.mkdtemp(prefix="qopt-", dir="/tmp"))  # short: unix socket paths
    try:
        (work / "a,b.img").write_bytes(bytes(1 << 20))
        sock = work / "qmp.sock"
        args = list(row_args)
        base = ["-S", "-display", "none", "-nodefaults", "-qmp", f"unix:{sock},server=on,wait=off"]
        if not any(a in ("-accel", "-enable-kvm") or "accel=" in a for a in args):
            base += ["-accel", "tcg"]
        if not _machine_none(args):
            base += ["-kernel", str(kernel)]
        if "-daemonize" in args and "-pidfile" not in args:
            base += ["-pidfile", str(work / "daemon.pid")]
        cmd = [*prefix, *base, *args]
        errpath = work / "stderr"
        with open(errpath, "wb") as err:
            proc = subprocess.Popen(cmd, cwd=work, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + TIMEOUT
        result, status = "timeout", None
        try:
            while time.monotonic() < deadline:
                rc = proc.poll()
                if sock.exists():
                    try:
                        status = _qmp(str(sock), deadline)
                        result = ACCEPT
                        break
                    except (OSError, ValueError, KeyError):
                        pass  # not serving yet, or gone: look again
                if rc is not None and rc != 0:
                    result = REFUSE
                    break
                if rc == 0 and not sock.exists():
                    time.sleep(0.2)
                    if not sock.exists():
                        result = "exited 0 without serving QMP"
                        break
                time.sleep(0.02)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if "-daemonize" in args:
                _kill_daemon(work / "daemon.pid")
        return Outcome(result, status, proc.returncode, errpath.read_text(errors="replace")), cmd
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="module")
def outcomes(guests) -> dict[tuple[str, ...], dict[str, tuple[Outcome, list[str]]]]:
    qemu = qemu_binary()
    kernel = guests["multiboot_info"]
    rows = list(dict.fromkeys(r.args for r in TABLE + PYVMM_CANNOT + PYVMM_EXTENSIONS))
    jobs = [(args, who, prefix) for args in rows for who, prefix in (("pyvmm", PYVMM), ("qemu", [qemu]))]
    results: dict[tuple[str, ...], dict[str, tuple[Outcome, list[str]]]] = {args: {} for args in rows}
    with ThreadPoolExecutor(WORKERS) as pool:
        futures = {pool.submit(run_vmm, prefix, args, kernel): (args, who) for args, who, prefix in jobs}
        for fut, (args, who) in futures.items():
            results[args][who] = fut.result()
    return results


def _check_pyvmm_refusal(row: Row, out: Outcome, cmd: list[str]) -> None:
    assert "Traceback" not in out.stderr, out.describe("pyvmm", cmd)
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("pyvmm: error: ")]
    assert len(errors) == 1, out.describe("pyvmm", cmd)
    assert out.returncode == 1, out.describe("pyvmm", cmd)
    assert row.needle in errors[0], f"{row.needle!r} not named in: {errors[0]}"


@pytest.mark.parametrize("row", TABLE, ids=[r.id for r in TABLE])
def test_pyvmm_and_qemu_agree(outcomes, row: Row):
    (pv, pv_cmd), (qe, qe_cmd) = outcomes[row.args]["pyvmm"], outcomes[row.args]["qemu"]
    assert qe.result == row.expect, "QEMU does not do what the table says:\n" + qe.describe("qemu", qe_cmd)
    assert pv.result == qe.result, (f"pyvmm and QEMU differ on {' '.join(row.args)!r}:\n"
                                    f"{pv.describe('pyvmm', pv_cmd)}\n{qe.describe('qemu', qe_cmd)}")
    if row.expect == ACCEPT:
        assert pv.status == qe.status == "prelaunch", f"-S: {pv.status} / {qe.status}"
    else:
        _check_pyvmm_refusal(row, pv, pv_cmd)


@pytest.mark.parametrize("row", PYVMM_CANNOT, ids=[r.id for r in PYVMM_CANNOT])
def test_pyvmm_refuses_what_it_cannot_honour(outcomes, row: Row):
    (pv, pv_cmd), (qe, qe_cmd) = outcomes[row.args]["pyvmm"], outcomes[row.args]["qemu"]
    assert qe.result == ACCEPT, "QEMU should honour this:\n" + qe.describe("qemu", qe_cmd)
    assert pv.result == REFUSE, pv.describe("pyvmm", pv_cmd)
    _check_pyvmm_refusal(row, pv, pv_cmd)


@pytest.mark.parametrize("row", PYVMM_EXTENSIONS, ids=[r.id for r in PYVMM_EXTENSIONS])
def test_pyvmm_extensions(outcomes, row: Row):
    (pv, pv_cmd), (qe, qe_cmd) = outcomes[row.args]["pyvmm"], outcomes[row.args]["qemu"]
    assert qe.result == REFUSE, "QEMU accepts this now: move it to TABLE\n" + qe.describe("qemu", qe_cmd)
    assert pv.result == ACCEPT, pv.describe("pyvmm", pv_cmd)


def test_table_covers_every_option_in_the_brief():
    spelled = {a for r in TABLE + PYVMM_CANNOT for a in r.args if a.startswith("-")}
    wanted = {"-machine", "-name", "-uuid", "-display", "-msg", "-no-user-config", "-nodefaults", "-enable-kvm",
              "-accel", "-smp", "-boot", "-rtc", "-no-acpi", "-S", "-daemonize", "-pidfile", "-m", "-device",
              "-object", "-blockdev", "-netdev", "-audiodev", "-mon", "-drive", "-chardev", "-numa"}
    assert wanted <= spelled, wanted - spelled
