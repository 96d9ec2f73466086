"""``pyvmm vm ...``: virsh-style commands that talk to pyvmmd.

Output is a table (or ``key: value`` lines for ``info``); ``--json`` prints
the daemon's JSON instead, for scripts.  The daemon is found at ``--socket``,
``$PYVMMD_SOCKET`` or the default state directory; ``--url`` with
``--token`` (or ``$PYVMM_TOKEN``) reaches a TCP listener instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from pyvmm.errors import ConfigError
from pyvmm.memory import parse_size

ACTIONS = ("start", "shutdown", "destroy", "suspend", "resume", "reboot")


def add_vm_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``vm`` and its subcommands on the main parser's subparsers."""
    vm = sub.add_parser("vm", help="manage VMs through the pyvmmd daemon", allow_abbrev=False)
    vm.add_argument("--socket", type=Path, default=None, help="pyvmmd's unix socket (default: $PYVMMD_SOCKET "
                    "or the daemon's default)")
    vm.add_argument("--url", default=os.environ.get("PYVMM_URL"), help="reach pyvmmd over TCP instead, "
                    "e.g. https://host:8443")
    vm.add_argument("--token", default=os.environ.get("PYVMM_TOKEN"), help="token for --url")
    vm.add_argument("--json", action="store_true", help="print JSON instead of tables")
    cmds = vm.add_subparsers(dest="vm_command", metavar="SUBCOMMAND")

    d = cmds.add_parser("define", help="define a VM (from options or a JSON file)")
    d.add_argument("name", nargs="?")
    d.add_argument("--file", "-f", type=Path, help="JSON definition (options given too override it)")
    d.add_argument("--kernel")
    d.add_argument("--initrd")
    d.add_argument("--append", "--cmdline", dest="cmdline")
    d.add_argument("--memory", "-m", help="RAM, e.g. 128M or 1G")
    d.add_argument("--vcpus", "--smp", type=int)
    d.add_argument("--accel", choices=("auto", "kvm", "tcg"))
    d.add_argument("--disk", action="append", default=[], metavar="PATH[,format=raw|qcow2][,readonly]")
    d.add_argument("--autostart", action="store_true", default=None)

    cmds.add_parser("undefine", help="remove a shut-off VM's definition").add_argument("name")
    ls = cmds.add_parser("list", help="list VMs (running ones; --all for every defined VM)")
    ls.add_argument("--all", action="store_true")
    for op in ACTIONS:
        p = cmds.add_parser(op, help=f"{op} a VM")
        p.add_argument("name")
        if op == "shutdown":
            p.add_argument("--timeout", type=float, default=0.0, help="destroy after this many seconds")
            p.add_argument("--wait", action="store_true", help="return once the VM is shut off")
        if op == "start":
            p.add_argument("--console", action="store_true", help="attach the console once started")
    cmds.add_parser("console", help="attach the serial console (Ctrl-] detaches)").add_argument("name")
    cmds.add_parser("info", help="show a VM's definition, state and resource use").add_argument("name")


def _client(args: argparse.Namespace):
    from pyvmm.manager.client import Client
    from pyvmm.manager.paths import default_socket

    if args.url:
        return Client(url=args.url, token=args.token)
    return Client(socket_path=args.socket or default_socket())


def parse_disk(text: str) -> dict[str, Any]:
    parts = text.split(",")
    disk: dict[str, Any] = {"path": os.path.abspath(parts[0])}
    for p in parts[1:]:
        if p == "readonly":
            disk["readonly"] = True
        elif p.startswith("format="):
            disk["format"] = p[7:]
        else:
            raise ConfigError(f"--disk {text}: unknown option {p!r}")
    return disk


def definition_from_args(args: argparse.Namespace) -> dict[str, Any]:
    d: dict[str, Any] = json.loads(args.file.read_text()) if args.file else {}
    if args.name:
        d["name"] = args.name
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
    if args.autostart is not None:
        d["autostart"] = args.autostart
    if "name" not in d:
        raise ConfigError("define: a VM name is required")
    return d


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = [" " + "   ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip(),
             "-" * (sum(widths) + 3 * (len(widths) - 1) + 2)]
    lines += [" " + "   ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True))


def _info_lines(vm: dict, stats: dict) -> list[tuple[str, str]]:
    d = vm["definition"]
    rows = [("Name", vm["name"]), ("UUID", vm["uuid"]), ("State", vm["state"]),
            ("Reason", vm.get("reason") or "-"), ("PID", str(vm.get("pid") or "-")),
            ("CPU(s)", str(d["vcpus"])), ("Memory", f"{d['memory_mib']} MiB"), ("Accelerator", d["accel"]),
            ("Kernel", d["kernel"]), ("Initrd", d.get("initrd") or "-"), ("Command line", d.get("cmdline") or "-"),
            ("Disks", ", ".join(x["path"] for x in d.get("disks", [])) or "-"),
            ("Autostart", "enable" if d.get("autostart") else "disable")]
    cur = stats.get("current")
    if cur:
        rows += [("CPU time", f"{cur['cpu_time_s']:.2f}s"), ("CPU use", f"{cur['cpu_percent']:.1f}%"),
                 ("RSS", f"{cur['rss_bytes'] >> 10} KiB")]
    return rows


def cmd_vm(args: argparse.Namespace) -> int:
    from pyvmm.manager.extra import require_manager

    require_manager("pyvmm vm")
    from pyvmm.manager.client import attach_console

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise
    if args.vm_command is None:
        raise ConfigError("vm: a subcommand is needed (define, undefine, list, start, shutdown, destroy, "
                          "suspend, resume, reboot, console, info)")
    c = _client(args)
    try:
        cmd = args.vm_command
        if cmd == "list":
            vms = [v for v in c.list() if args.all or v["state"] != "shutoff"]
            if args.json:
                _print_json(vms)
            else:
                print(table([[str(v.get("pid") or "-"), v["name"], v["state"]] for v in vms],
                            ["Id", "Name", "State"]))
        elif cmd == "define":
            vm = c.define(definition_from_args(args))
            _print_json(vm) if args.json else print(f"VM {vm['name']} defined ({vm['uuid']})")
        elif cmd == "undefine":
            c.undefine(args.name)
            _print_json({"ok": True}) if args.json else print(f"VM {args.name} has been undefined")
        elif cmd in ACTIONS:
            params = {"timeout": args.timeout} if cmd == "shutdown" and args.timeout else {}
            res = c.action(args.name, cmd, **params)
            if cmd == "shutdown" and args.wait:
                res["vm"] = _wait_state(c, args.name, ("shutoff", "crashed"), args.timeout or 300)
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
                rows = _info_lines(vm, st)
                w = max(len(k) for k, _ in rows) + 1
                print("\n".join(f"{(k + ':').ljust(w)} {v}" for k, v in rows))
    finally:
        c.close()
    return 0


def _console(c, name: str, attach) -> int:
    c.get(name)  # a clear "no VM named" error before opening the WebSocket
    ws = c.open_console(name)
    print(f"Connected to VM {name}\r\nEscape character is ^] (Ctrl + ])\r", file=sys.stderr)
    return attach(ws)


def _wait_state(c, name: str, states: tuple[str, ...], timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        vm = c.get(name)
        if vm["state"] in states or time.monotonic() > deadline:
            return vm
        time.sleep(0.2)
