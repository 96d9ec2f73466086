"""``pyvmm vm ...``: virsh-style commands that talk to pyvmmd.

Output is a table (or ``key: value`` lines for ``info``); ``--json``, anywhere
on the command line, prints the daemon's JSON instead, for scripts.  The
daemon is found at ``--socket``, ``$PYVMMD_SOCKET`` or the default state
directory; ``--url`` with ``--token`` (or ``$PYVMM_TOKEN``) reaches a TCP
listener instead.  A closed stdout (``pyvmm vm list | head -1``) ends the
command quietly.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pyvmm.errors import ConfigError, PyvmmError
from pyvmm.memory import parse_size

ACTIONS = ("start", "shutdown", "destroy", "suspend", "resume", "reboot")
SUBCOMMANDS = ("define", "undefine", "dump", "edit", "attach-disk", "detach-disk", "list", *ACTIONS, "console",
               "info", "domblklist", "domiflist", "events", "log", "send-key", "snapshot", "restore", "clone",
               "migrate")
#: States in which a VM has a process (and so a console worth attaching to).
ACTIVE = ("starting", "running", "paused", "in shutdown")


def _definition_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--file", "-f", type=Path, help="JSON definition, as 'vm dump' prints it (options given too "
                   "override it)")
    p.add_argument("--kernel", help="kernel image (default: the guest kit's default guest, as pyvmm run)")
    p.add_argument("--initrd")
    p.add_argument("--append", "--cmdline", dest="cmdline")
    p.add_argument("--memory", "-m", help="RAM, e.g. 512M or 1G; a plain number is MiB (default 512M)")
    p.add_argument("--vcpus", "--smp", type=int, help="number of vCPUs (default 1)")
    p.add_argument("--accel", choices=("auto", "kvm", "tcg"), help="accelerator (default auto)")
    p.add_argument("--disk", action="append", default=[], metavar="PATH[,format=raw|qcow2][,readonly]",
                   help="a virtio disk (repeat for more)")
    p.add_argument("--nic", "--network", action="append", default=[], dest="nic",
                   metavar="user|tap[,tap=IFNAME][,mac=MAC]", help="a virtio-net NIC (repeat for more)")
    p.add_argument("--autostart", action=argparse.BooleanOptionalAction, default=None,
                   help="start the VM when the daemon starts")


def add_vm_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``vm`` and its subcommands on the main parser's subparsers."""
    vm = sub.add_parser("vm", help="manage VMs through the pyvmmd daemon", allow_abbrev=False)
    vm.add_argument("--socket", type=Path, default=None, help="pyvmmd's unix socket (default: $PYVMMD_SOCKET "
                    "or the daemon's default)")
    vm.add_argument("--url", default=os.environ.get("PYVMM_URL"), help="reach pyvmmd over TCP instead, "
                    "e.g. https://host:8443")
    vm.add_argument("--token", default=os.environ.get("PYVMM_TOKEN"), help="token for --url")
    vm.add_argument("--json", action="store_true", help="print JSON instead of tables")
    # --json after the subcommand too: SUPPRESS keeps a subcommand from resetting the flag given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print JSON instead of tables")
    cmds = vm.add_subparsers(dest="vm_command", metavar="SUBCOMMAND", parser_class=type(vm))

    def cmd(name: str, help: str, *, vm_name: bool = True) -> argparse.ArgumentParser:
        p = cmds.add_parser(name, help=help, parents=[common], allow_abbrev=False)
        if vm_name:
            p.add_argument("name")
        return p

    d = cmd("define", "define a VM (from options or a JSON file)", vm_name=False)
    d.add_argument("name", nargs="?")
    _definition_options(d)
    e = cmd("edit", "change a shut-off VM's definition (options, or $EDITOR on its JSON without them)")
    e.add_argument("--name", dest="new_name", help="rename the VM")
    _definition_options(e)
    cmd("dump", "print a VM's definition as JSON (define -f takes it back)")
    a = cmd("attach-disk", "add a disk to a shut-off VM")
    a.add_argument("path")
    a.add_argument("--format", choices=("raw", "qcow2"), default="raw")
    a.add_argument("--readonly", action="store_true")
    cmd("detach-disk", "remove a disk from a shut-off VM").add_argument("target", help="vda, vdb... or the path")
    cmd("undefine", "remove a shut-off VM's definition")
    cmd("list", "list VMs (running ones; --all for every defined VM)", vm_name=False).add_argument(
        "--all", action="store_true")
    for op in ACTIONS:
        p = cmd(op, f"{op} a VM")
        if op == "shutdown":
            p.add_argument("--timeout", type=float, default=0.0, help="wait this many seconds for the guest to "
                           "power off (implies --wait); it stays running unless --force is given too")
            p.add_argument("--wait", action="store_true", help="return once the VM is shut off")
            p.add_argument("--force", action="store_true", help="destroy the VM if the timeout passes")
        if op == "start":
            p.add_argument("--console", action="store_true", help="attach the console once started")
    cmd("console", "attach the serial console (Ctrl-] detaches)")
    cmd("info", "show a VM's state, accelerator, resources and definition (virsh dominfo)")
    cmd("domblklist", "list a VM's disks")
    cmd("domiflist", "list a VM's network interfaces")
    cmd("events", "show a VM's recent events (state changes, resets, edits)")
    cmd("log", "show the end of the VM process's log")
    k = cmd("send-key", "press keys together on the VM's keyboard, e.g. send-key web ctrl alt delete")
    k.add_argument("keys", nargs="+", help="QEMU key names (qcodes): ctrl alt delete, ret, a...")
    from pyvmm.manager.snapshot_cli import add_state_commands

    add_state_commands(cmd)


def _client(args: argparse.Namespace):
    from pyvmm.manager.client import Client
    from pyvmm.manager.paths import default_socket

    if args.url:
        return Client(url=args.url, token=args.token)
    return Client(socket_path=args.socket or default_socket())


def parse_disk(text: str) -> dict[str, Any]:
    parts = text.split(",")
    if not parts[0]:
        raise ConfigError(f"--disk {text}: a path is needed")
    disk: dict[str, Any] = {"path": os.path.abspath(parts[0])}
    for p in parts[1:]:
        if p == "readonly":
            disk["readonly"] = True
        elif p.startswith("format="):
            disk["format"] = p[7:]
        else:
            raise ConfigError(f"--disk {text}: unknown option {p!r}")
    return disk


def parse_nic(text: str) -> dict[str, Any]:
    kind, *opts = text.split(",")
    if kind not in ("user", "tap"):
        raise ConfigError(f"--nic {text}: the type is user or tap, not {kind!r}")
    nic: dict[str, Any] = {"type": kind}
    for o in opts:
        key, sep, value = o.partition("=")
        if not sep or key not in ("mac", "tap") or (key == "tap" and kind != "tap"):
            raise ConfigError(f"--nic {text}: unknown option {o!r} (mac=MAC, and tap=IFNAME for type tap)")
        nic[key] = value
    return nic


def apply_options(d: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """``d`` with the definition options given on the command line applied."""
    if args.kernel:
        d["kernel"] = os.path.abspath(args.kernel)
    if args.initrd:
        d["initrd"] = os.path.abspath(args.initrd)
    if args.cmdline is not None:
        d["cmdline"] = args.cmdline
    if args.memory:
        size = parse_size(args.memory)  # a plain number is MiB, as for pyvmm run
        if size % (1 << 20):
            raise ConfigError(f"--memory {args.memory}: must be a whole number of MiB")
        d["memory_mib"] = size >> 20
    if args.vcpus is not None:
        d["vcpus"] = args.vcpus
    if args.accel:
        d["accel"] = args.accel
    if args.disk:
        d["disks"] = [parse_disk(x) for x in args.disk]
    if args.nic:
        d["networks"] = [parse_nic(x) for x in args.nic]
    if args.autostart is not None:
        d["autostart"] = args.autostart
    return d


def _read_definition_file(path: Path) -> dict[str, Any]:
    try:
        d = json.loads(path.read_text())
    except OSError as e:
        raise ConfigError(f"--file {path}: {e.strerror}") from None
    except ValueError as e:
        raise ConfigError(f"--file {path}: not JSON: {e}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"--file {path}: must hold a JSON object")
    return d


def definition_from_args(args: argparse.Namespace) -> dict[str, Any]:
    d = _read_definition_file(args.file) if args.file else {}
    if args.name:
        d["name"] = args.name
    apply_options(d, args)
    if "name" not in d:
        raise ConfigError("define: a VM name is required")
    return d


def _edit_in_editor(d: dict[str, Any]) -> dict[str, Any]:
    """virsh edit: the definition in $VISUAL/$EDITOR (default vi); unchanged text changes nothing."""
    editor = os.environ.get("VISUAL") or os.environ.get("EDITOR") or "vi"
    text = json.dumps(d, indent=2, sort_keys=True) + "\n"
    with tempfile.NamedTemporaryFile("w", suffix=".json", prefix=f"pyvmm-{d['name']}-", delete=False) as f:
        f.write(text)
    try:
        if subprocess.run([*shlex.split(editor), f.name]).returncode != 0:
            raise ConfigError(f"edit: the editor {editor!r} failed; nothing changed")
        return _read_definition_file(Path(f.name))
    finally:
        os.unlink(f.name)


def disk_target(index: int) -> str:
    """virtio disk names as the guest sees them: vda, vdb, ..."""
    return "vd" + "abcdefghijklmnopqrstuvwxyz"[index]


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = [" " + "   ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip(),
             "-" * (sum(widths) + 3 * (len(widths) - 1) + 2)]
    lines += [" " + "   ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True))


def _mib(n: int) -> str:
    return f"{n} MiB"


def info_lines(vm: dict, stats: dict) -> list[tuple[str, str]]:
    """virsh dominfo's lines, plus the accelerator in use and the boot files."""
    d = vm["definition"]
    cur = stats.get("current")
    if vm.get("accelerator"):
        accel = vm["accelerator"] + (f" ({vm['accelerator_reason']})" if vm.get("accelerator_reason") else "")
    else:
        accel = f"{d['accel']} (chosen when it starts)" if d["accel"] == "auto" else d["accel"]
    reason = vm.get("reason") if vm.get("reason") not in ("", vm["state"]) else "-"
    rows = [("Id", str(vm["id"]) if vm.get("id") is not None else "-"), ("Name", vm["name"]),
            ("UUID", vm["uuid"]), ("State", vm["state"]), ("Reason", reason),
            ("CPU(s)", str(d["vcpus"])),
            ("CPU time", f"{cur['cpu_time_s']:.1f}s" if cur else "-"),
            ("CPU use", f"{cur['cpu_percent']:.1f}%" if cur else "-"),
            ("Max memory", _mib(d["memory_mib"])),
            ("Used memory", f"{cur['rss_bytes'] >> 20} MiB (RSS of the VM process)" if cur else "-"),
            ("Accelerator", accel), ("PID", str(vm.get("pid") or "-")),
            ("Persistent", "yes"), ("Autostart", "enable" if d.get("autostart") else "disable"),
            ("Kernel", d["kernel"]), ("Initrd", d.get("initrd") or "-"), ("Command line", d.get("cmdline") or "-"),
            ("Disks", str(len(d.get("disks", [])))), ("NICs", str(len(d.get("networks", []))))]
    return rows


def blk_rows(d: dict) -> list[list[str]]:
    return [[disk_target(i), x["path"], x.get("format", "raw"), "yes" if x.get("readonly") else "no"]
            for i, x in enumerate(d.get("disks", []))]


def if_rows(d: dict) -> list[list[str]]:
    return [[f"net{i}", n.get("type", "user"), n.get("tap") or "-", n.get("model", "virtio-net"), n.get("mac") or "-"]
            for i, n in enumerate(d.get("networks", []))]


def cmd_vm(args: argparse.Namespace) -> int:
    """Run one ``pyvmm vm`` subcommand; a reader closing stdout early ends it quietly (status 0)."""
    try:
        return _cmd_vm(args)
    except BrokenPipeError:
        # Nothing more can be written; point stdout at /dev/null so the interpreter's final flush is quiet too.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 0


def _cmd_vm(args: argparse.Namespace) -> int:
    from pyvmm.manager.extra import require_manager

    require_manager("pyvmm vm")
    import logging

    from pyvmm.manager.client import attach_console

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise
    if args.vm_command is None:
        raise ConfigError(f"vm: a subcommand is needed ({', '.join(SUBCOMMANDS)})")
    c = _client(args)
    try:
        cmd = args.vm_command
        if cmd == "list":
            vms = [v for v in c.list() if args.all or v["state"] != "shutoff"]
            if args.json:
                _print_json(vms)
            else:
                print(table([[str(v["id"]) if v.get("id") is not None else "-", v["name"], v["state"]]
                             for v in vms], ["Id", "Name", "State"]))
        elif cmd == "define":
            vm = c.define(definition_from_args(args))
            _print_json(vm) if args.json else print(f"VM {vm['name']} defined ({vm['uuid']})")
        elif cmd == "dump":
            _print_json(c.definition(args.name))
        elif cmd in ("edit", "attach-disk", "detach-disk"):
            vm = c.update(args.name, _edited(c, args))
            _print_json(vm) if args.json else print(_edit_message(args, vm))
        elif cmd == "undefine":
            c.undefine(args.name)
            _print_json({"ok": True}) if args.json else print(f"VM {args.name} has been undefined")
        elif cmd == "shutdown":
            return _shutdown(c, args)
        elif cmd in ACTIONS:
            res = c.action(args.name, cmd)
            _print_json(res) if args.json else print(f"VM {args.name}: {res['message']} "
                                                     f"(now {res['vm']['state']})")
            if cmd == "start" and args.console:
                return _console(c, args.name, attach_console)
        elif cmd == "console":
            return _console(c, args.name, attach_console)
        elif cmd == "info":
            vm, st = c.get(args.name), c.stats(args.name)
            if args.json:
                _print_json({"vm": vm, "stats": st.get("current")})
            else:
                rows = info_lines(vm, st)
                w = max(len(k) for k, _ in rows) + 1
                print("\n".join(f"{(k + ':').ljust(w)} {v}" for k, v in rows))
        elif cmd == "domblklist":
            d = c.definition(args.name)
            _print_json(d["disks"]) if args.json else print(table(blk_rows(d), ["Target", "Source", "Format",
                                                                                   "Read-only"]))
        elif cmd == "domiflist":
            d = c.definition(args.name)
            _print_json(d["networks"]) if args.json else print(table(if_rows(d), ["Interface", "Type", "Source",
                                                                                     "Model", "MAC"]))
        elif cmd == "events":
            evs = c.events(args.name)
            if args.json:
                _print_json(evs)
            else:
                print(table([[time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["timestamp"])), e["name"],
                              e["state"], e.get("reason") or "-"] for e in evs], ["Time", "Event", "State", "Reason"]))
        elif cmd == "log":
            lg = c.log(args.name)
            _print_json(lg) if args.json else sys.stdout.write(lg["text"])
        elif cmd in ("snapshot", "restore", "clone", "migrate"):
            from pyvmm.manager.snapshot_cli import run_state_command

            run_state_command(c, args, _print_json)
        elif cmd == "send-key":
            res = c.send_key(args.name, args.keys)
            _print_json(res) if args.json else print(f"VM {args.name}: {res['message']}")
        sys.stdout.flush()  # inside the try: a closed pipe is reported here, not at exit
    finally:
        c.close()
    return 0


def _edited(c, args: argparse.Namespace) -> dict[str, Any]:
    d = c.definition(args.name)
    if args.vm_command == "attach-disk":
        path = os.path.abspath(args.path)
        if any(x["path"] == path for x in d["disks"]):
            raise PyvmmError(f"VM {args.name} already has the disk {path}")
        d["disks"].append({"path": path, "format": args.format, "readonly": args.readonly})
        return d
    if args.vm_command == "detach-disk":
        keep = [x for i, x in enumerate(d["disks"])
                if args.target not in (disk_target(i), x["path"], os.path.abspath(args.target))]
        if len(keep) == len(d["disks"]):
            have = ", ".join(f"{disk_target(i)} {x['path']}" for i, x in enumerate(d["disks"])) or "none"
            raise PyvmmError(f"VM {args.name} has no disk {args.target} (its disks: {have})")
        d["disks"] = keep
        return d
    given = [args.file, args.kernel, args.initrd, args.cmdline, args.memory, args.vcpus, args.accel,
             args.disk or None, args.nic or None, args.autostart, args.new_name]
    if all(x is None for x in given):
        return _edit_in_editor(d)
    if args.file:
        d = {**_read_definition_file(args.file), "uuid": d["uuid"]}
    if args.new_name:
        d["name"] = args.new_name
    return apply_options(d, args)


def _edit_message(args: argparse.Namespace, vm: dict) -> str:
    if args.vm_command == "attach-disk":
        return f"Disk {os.path.abspath(args.path)} attached to VM {vm['name']} " \
               f"as {disk_target(len(vm['definition']['disks']) - 1)}"
    if args.vm_command == "detach-disk":
        return f"Disk {args.target} detached from VM {vm['name']}"
    return f"VM {vm['name']} updated"


def _shutdown(c, args: argparse.Namespace) -> int:
    """Press the power button; with --timeout wait that long, and destroy only with --force."""
    if args.force and not args.timeout:
        raise ConfigError("shutdown --force needs --timeout SECONDS (destroy is the command for at once)")
    params = {"timeout": args.timeout} if args.force else {}  # the daemon destroys then, even without us
    res = c.action(args.name, "shutdown", **params)
    wait = args.wait or args.timeout > 0
    if wait:
        limit = args.timeout + 10 if args.force else (args.timeout or None)
        res["vm"] = _wait_state(c, args.name, ("shutoff", "crashed"), limit)
    state = res["vm"]["state"]
    if wait and state not in ("shutoff", "crashed"):
        msg = (f"VM {args.name} did not power off within {args.timeout:g}s and is still {state}; "
               f"use --force to destroy it after the timeout, or 'pyvmm vm destroy {args.name}'")
        if args.json:
            _print_json({**res, "ok": False, "message": msg})
        raise PyvmmError(msg)
    if args.json:
        _print_json(res)
    elif wait and res["vm"].get("reason") == "destroyed":
        print(f"VM {args.name}: did not power off within {args.timeout:g}s: destroyed (now {state})")
    else:
        print(f"VM {args.name}: {res['message']} (now {state})")
    return 0


def _console(c, name: str, attach) -> int:
    vm = c.get(name)  # a clear "no VM named" error before opening the WebSocket
    if vm["state"] not in ACTIVE:
        raise PyvmmError(f"VM {name} is not running (it is {vm['state']}); "
                         f"start it with 'pyvmm vm start {name} --console'")
    ws = c.open_console(name)
    print(f"Connected to VM {name}\r\nEscape character is ^] (Ctrl + ])\r", file=sys.stderr)
    return attach(ws)


def _wait_state(c, name: str, states: tuple[str, ...], timeout: float | None) -> dict:
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        vm = c.get(name)
        if vm["state"] in states or (deadline is not None and time.monotonic() > deadline):
            return vm
        time.sleep(0.2)
