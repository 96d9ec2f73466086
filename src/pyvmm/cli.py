"""The ``pyvmm`` command line.

``pyvmm run`` starts one VM in this process, like ``qemu-system-x86_64
-kernel ...``.  QEMU's single-dash spellings (``-kernel``, ``-m``, ``-smp``,
``-serial``, ``-no-reboot``, ``-nographic``, ``-device``...) are accepted too.
Every :class:`~pyvmm.errors.PyvmmError` becomes one line on stderr and a
non-zero exit status.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from pyvmm import __version__
from pyvmm.config import CpuConfig, DeviceSpec, MachineConfig, SmpConfig, parse_chardev_option
from pyvmm.devices.virtio.options import parse_drive
from pyvmm.errors import ConfigError, PyvmmError
from pyvmm.memory import parse_size
from pyvmm.net.options import parse_netdev
from pyvmm.runstate import VmControl

log = logging.getLogger("pyvmm")

EXIT_ERROR = 1


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line naming the problem."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(message)


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kernel", "-kernel", metavar="FILE",
                   help="bzImage, vmlinux (ELF/PVH), multiboot image or boot sector; "
                        "default: the guest kit's stock Linux")
    p.add_argument("--initrd", "-initrd", metavar="FILE",
                   help="initramfs, or multiboot modules as 'mod1 args,mod2'")
    p.add_argument("--append", "-append", metavar="CMDLINE", default=None, help="kernel command line")
    p.add_argument("--memory", "-m", metavar="SIZE", default="512M", help="RAM size, e.g. 256M or 2G (default 512M)")
    p.add_argument("--smp", "-smp", metavar="N", default="1", help="number of vCPUs")
    p.add_argument("--accel", "-accel", default="auto", metavar="kvm|tcg|auto",
                   help="CPU accelerator (default: auto, which probes /dev/kvm)")
    p.add_argument("--cpu", "-cpu", default="host", metavar="MODEL[,+feat,-feat]", help="CPU model and features")
    p.add_argument("--serial", "-serial", default="stdio", metavar="SPEC",
                   help="COM1 back-end: stdio, file:PATH, unix:PATH[,server=on,wait=off], pty, null")
    p.add_argument("--no-reboot", "-no-reboot", action="store_true", help="exit instead of rebooting")
    p.add_argument("--nographic", "-nographic", action="store_true", help="accepted for QEMU compatibility")
    p.add_argument("--device", "-device", action="append", default=[], metavar="DRIVER[,prop=value]",
                   help="add a device, e.g. isa-debug-exit,iobase=0xf4,iosize=0x04")
    p.add_argument("--drive", "-drive", action="append", default=[],
                   metavar="file=PATH[,format=raw|qcow2][,readonly=on][,if=virtio][,serial=ID]",
                   help="add a virtio-blk disk (virtio-mmio)")
    p.add_argument("--chardev", "-chardev", action="append", default=[], metavar="BACKEND,id=ID[,path=P,...]",
                   help="a named character back-end for devices: socket,id=c0,path=P,server=on,wait=off | "
                        "file,id=c0,path=P | stdio | pty | null; used as --device virtio-console,chardev=c0")
    p.add_argument("--netdev", "-netdev", action="append", default=[],
                   metavar="user,id=ID | tap,id=ID[,ifname=TAP]",
                   help="a host network back-end for --device virtio-net-pci,netdev=ID[,mac=MAC]")
    p.add_argument("--mem-path", "-mem-path", metavar="PATH", help="back guest RAM with a file or hugetlbfs")
    p.add_argument("--qmp", "-qmp", action="append", default=[], metavar="unix:PATH,server=on,wait=off",
                   help="serve the QEMU Machine Protocol")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    p.add_argument("-q", "--quiet", action="store_true", help="only errors on stderr")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pyvmm", description="A hackable virtual machine monitor in Python.",
                     allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"pyvmm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    run = sub.add_parser("run", help="boot one VM in this process", allow_abbrev=False)
    _add_run_options(run)
    from pyvmm.manager.cli import add_vm_parser

    add_vm_parser(sub)
    return parser


def _parse_int(text: str, what: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise ConfigError(f"{what} {text!r}: not a number") from None


def config_from_args(args: argparse.Namespace) -> MachineConfig:
    cfg = MachineConfig(
        kernel=args.kernel,
        initrd=args.initrd,
        append=args.append or "",
        memory=parse_size(args.memory),
        topology=SmpConfig.parse(args.smp),
        accel=args.accel,
        cpu=CpuConfig.parse(args.cpu),
        serial=args.serial,
        no_reboot=args.no_reboot,
        devices=[DeviceSpec.parse(d) for d in args.device],
        drives=[parse_drive(d) for d in args.drive],
        netdevs=[parse_netdev(n) for n in args.netdev],
        chardevs=dict(parse_chardev_option(c) for c in args.chardev),
        mem_path=args.mem_path,
        qmp=list(args.qmp),
    )
    cfg.validate()
    return cfg


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.ERROR if quiet else (logging.INFO if verbose == 0 else logging.DEBUG)
    logging.basicConfig(level=level, format="pyvmm: %(message)s" if verbose < 2 else
                        "%(relativeCreated)8.0f %(threadName)s %(name)s: %(message)s", stream=sys.stderr)


def _exit_on_signals(control: VmControl) -> None:
    """SIGTERM/SIGHUP end the VM as QEMU does: a clean shutdown (terminal restored, SHUTDOWN event), status 0."""

    def on_signal(signum: int, _frame: object) -> None:
        log.warning("terminating on signal %d", signum)
        control.request_exit(0, "host-signal")

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)


def cmd_run(args: argparse.Namespace) -> int:
    from pyvmm.accel import select

    cfg = config_from_args(args)
    if cfg.kernel is None:
        from pyvmm.guestkit import default_guest

        guest = default_guest()
        cfg.kernel = str(guest.kernel)
        cfg.initrd = cfg.initrd or str(guest.initrd)
        if args.append is None:
            cfg.append = guest.cmdline
    if not os.path.exists(cfg.kernel):
        raise ConfigError(f"kernel {cfg.kernel}: no such file")
    if not os.path.isfile(cfg.kernel):
        raise ConfigError(f"kernel {cfg.kernel}: not a regular file")
    choice = select.choose(cfg.accel)
    log.info("accelerator: %s (%s)", choice.name, choice.reason)

    from pyvmm.machine.pc import PcMachine

    control = VmControl()
    _exit_on_signals(control)  # before the machine: its stdio back-end then leaves these signals to us
    machine = PcMachine(cfg, accel_name=choice.name, accel_reason=choice.reason, control=control)
    result = machine.run()
    if result.status:
        log.info("exit status %d: %s", result.status, result.reason)
    else:
        log.debug("guest stopped: %s", result.reason)
    return result.status


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        _setup_logging(getattr(args, "verbose", 0), getattr(args, "quiet", False))
        if args.command == "run":
            return cmd_run(args)
        if args.command == "vm":
            from pyvmm.manager.cli import cmd_vm

            return cmd_vm(args)
        raise ConfigError(f"unknown command {args.command}")
    except PyvmmError as e:
        print(f"pyvmm: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("pyvmm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
