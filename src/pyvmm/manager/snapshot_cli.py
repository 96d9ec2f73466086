"""``pyvmm vm snapshot|restore|clone|migrate``: the CLI side of pyvmm.manager.snapshots."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote


def add_state_commands(cmd: Callable[..., argparse.ArgumentParser]) -> None:
    s = cmd("snapshot", "save a VM's state, memory and disks in a new directory (the VM continues)")
    s.add_argument("dir", type=Path, help="a new or empty directory")
    r = cmd("restore", "define and start a VM from a snapshot directory", vm_name=False)
    r.add_argument("dir", type=Path)
    r.add_argument("--name", dest="new_name", help="the restored VM's name (default: the snapshot's)")
    c = cmd("clone", "start COUNT copies of a running VM (NAME-cloneN), sharing its memory copy-on-write")
    c.add_argument("--count", type=int, default=1)
    m = cmd("migrate", "move a running VM to another pyvmmd")
    m.add_argument("--to", required=True, help="the destination daemon: http(s)://HOST:PORT or unix:SOCKET")
    m.add_argument("--to-token", default=os.environ.get("PYVMM_TO_TOKEN"),
                   help="the destination's token (default: $PYVMM_TO_TOKEN)")
    m.add_argument("--address", help="the destination's address for the migration stream (default: the URL's "
                   "host)")
    m.add_argument("--undefine-source", action="store_true", help="undefine the VM here once it runs there")


def _seg(name: str) -> str:
    return quote(name, safe="")


def run_state_command(c: Any, args: argparse.Namespace, print_json: Callable[[Any], None]) -> None:
    cmd = args.vm_command
    if cmd == "snapshot":
        res = c.request("POST", f"/vms/{_seg(args.name)}/snapshot", json={"dir": str(args.dir.absolute())})
        print_json(res) if args.json else print(
            f"VM {args.name}: snapshot in {res['dir']} (paused {res['seconds'] * 1000:.0f} ms; now "
            f"{res['vm']['state']})")
    elif cmd == "restore":
        body: dict[str, Any] = {"dir": str(args.dir.absolute())}
        if args.new_name:
            body["name"] = args.new_name
        vm = c.request("POST", "/restore", json=body)
        print_json(vm) if args.json else print(f"VM {vm['name']} restored from {args.dir} (now {vm['state']})")
    elif cmd == "clone":
        res = c.request("POST", f"/vms/{_seg(args.name)}/clone", json={"count": args.count})
        if args.json:
            print_json(res)
        else:
            for vm in res["clones"]:
                print(f"VM {vm['name']} cloned from {args.name} ({vm['uuid']}, now {vm['state']})")
    elif cmd == "migrate":
        body = {"to": args.to, "undefine_source": args.undefine_source}
        if args.to_token:
            body["token"] = args.to_token
        if args.address:
            body["address"] = args.address
        res = c.request("POST", f"/vms/{_seg(args.name)}/migrate", json=body)
        downtime = f", downtime {res['downtime_ms']} ms" if res.get("downtime_ms") is not None else ""
        print_json(res) if args.json else print(f"VM {args.name}: {res['message']} in {res['seconds']:.1f}s"
                                                f"{downtime} (there: {res['destination_vm'].get('state')})")
