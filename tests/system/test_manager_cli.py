"""``pyvmm vm`` as a new user meets it: zero set-up defaults, virsh-grade listings and edits, pipes, refusals.

Every test runs the real CLI (``python -m pyvmm vm ...``) against a real pyvmmd; VMs that are started
boot the QMP test guest (tests/support/guests/qmp).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from test_manager_support import (  # noqa: F401 - fixtures
    ACCEL,
    Daemon,
    daemon,
    free_port,
    manager_guest,
    wait_state,
)


def vm(daemon, *args: str, timeout: float = 60, env: dict | None = None,  # noqa: F811
       **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYVMMD_SOCKET": str(daemon.socket), **(env or {})}
    if "stdout" not in kw:
        kw["capture_output"] = True
    return subprocess.run([sys.executable, "-m", "pyvmm", "vm", *args], text=True, env=env, timeout=timeout,
                          stdin=subprocess.DEVNULL, **kw)


def ok(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 0, f"status {r.returncode}\nstdout: {r.stdout}\nstderr: {r.stderr}"
    return r.stdout


def one_line_error(r: subprocess.CompletedProcess, text: str) -> None:
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert r.stderr.count("\n") == 1 and text in r.stderr and "Traceback" not in r.stderr, r.stderr


def define_guest(daemon, name: str, kernel: Path, *extra: str) -> None:  # noqa: F811
    ok(vm(daemon, "define", name, "--kernel", str(kernel), "-m", "64M", "--accel", ACCEL, *extra))


def test_define_without_kernel_uses_the_default_guest(daemon):  # noqa: F811
    from pyvmm.guestkit import default_guest

    guest = default_guest()
    ok(vm(daemon, "define", "zero"))
    d = json.loads(ok(vm(daemon, "dump", "zero")))
    assert d["kernel"] == str(guest.kernel) and d["initrd"] == str(guest.initrd)
    assert d["cmdline"] == guest.cmdline
    # pyvmm run's defaults: 512M, one vCPU, accelerator auto
    assert (d["memory_mib"], d["vcpus"], d["accel"]) == (512, 1, "auto")
    info = ok(vm(daemon, "info", "zero"))
    assert re.search(r"Max memory:\s+512 MiB", info) and re.search(r"Accelerator:\s+auto \(chosen when", info)


def test_define_checks_kernel_and_disk_formats(daemon, tmp_path, manager_guest):  # noqa: F811
    hostname = tmp_path / "hostname"
    hostname.write_text("box\n")
    one_line_error(vm(daemon, "define", "broken", "--kernel", str(hostname)),
                   f"kernel {hostname}: unrecognised image format")
    raw = tmp_path / "disk.img"
    raw.write_bytes(b"\0" * 65536)
    one_line_error(vm(daemon, "define", "d1", "--kernel", str(manager_guest), "--disk", f"{raw},format=qcow2"),
                   f"disks[0] {raw}: is a raw image, not qcow2 (give format=raw)")
    qcow = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(qcow), "1M"], check=True)
    one_line_error(vm(daemon, "define", "d2", "--kernel", str(manager_guest), "--disk", str(qcow)),
                   f"disks[0] {qcow}: is a qcow2 image, not raw (give format=qcow2)")
    one_line_error(vm(daemon, "define", "n1", "--nic", "bridge"), "--nic bridge: the type is user or tap")
    assert json.loads(ok(vm(daemon, "list", "--all", "--json"))) == []  # nothing was defined


def test_listings_dump_and_define_back(daemon, tmp_path, manager_guest):  # noqa: F811
    a, b = tmp_path / "a.img", tmp_path / "b.qcow2"
    a.write_bytes(b"\0" * 65536)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(b), "1M"], check=True)
    define_guest(daemon, "lst", manager_guest, "--disk", str(a), "--disk", f"{b},format=qcow2,readonly",
                 "--nic", "user,mac=52:54:00:12:34:56", "--nic", "user")
    blk = ok(vm(daemon, "domblklist", "lst")).splitlines()
    assert blk[0].split() == ["Target", "Source", "Format", "Read-only"]
    assert blk[2].split() == ["vda", str(a), "raw", "no"] and blk[3].split() == ["vdb", str(b), "qcow2", "yes"]
    nics = ok(vm(daemon, "domiflist", "lst")).splitlines()
    assert nics[0].split() == ["Interface", "Type", "Source", "Model", "MAC"]
    assert nics[2].split() == ["net0", "user", "-", "virtio-net", "52:54:00:12:34:56"]
    assert re.fullmatch(r"net1 user - virtio-net 52:54:00(:[0-9a-f]{2}){3}", " ".join(nics[3].split()))

    dumped = ok(vm(daemon, "dump", "lst"))
    (tmp_path / "lst.json").write_text(dumped)
    ok(vm(daemon, "undefine", "lst"))
    ok(vm(daemon, "define", "-f", str(tmp_path / "lst.json")))
    assert ok(vm(daemon, "dump", "lst")) == dumped  # the same VM again, uuid and MACs included


def test_json_anywhere_and_closed_stdout(daemon, manager_guest):  # noqa: F811
    define_guest(daemon, "js", manager_guest)
    before = json.loads(ok(vm(daemon, "--json", "list", "--all")))
    after = json.loads(ok(vm(daemon, "list", "--all", "--json")))
    assert before == after and [v["name"] for v in after] == ["js"]
    assert json.loads(ok(vm(daemon, "info", "js", "--json")))["vm"]["name"] == "js"

    # A reader that is gone before the output is written (`pyvmm vm info js | head -0`): no traceback.
    for args in (["info", "js"], ["--json", "list", "--all"], ["dump", "js"]):
        r, w = os.pipe()
        os.close(r)
        try:
            res = vm(daemon, *args, stdout=w, stderr=subprocess.PIPE)
        finally:
            os.close(w)
        assert res.returncode == 0 and res.stderr == "", (args, res.returncode, res.stderr)


def test_info_shows_the_accelerator_in_use_and_daemon_ids(daemon, manager_guest):  # noqa: F811
    define_guest(daemon, "inf", manager_guest)
    define_guest(daemon, "inf2", manager_guest)
    ok(vm(daemon, "start", "inf"))
    ok(vm(daemon, "start", "inf2"))
    info = ok(vm(daemon, "info", "inf"))
    reason = "requested with --accel kvm" if ACCEL == "kvm" else "requested with --accel tcg"
    assert re.search(rf"Accelerator:\s+{ACCEL} \({reason}\)", info), info
    with daemon.client() as c:
        pid = c.get("inf")["pid"]
    assert re.search(r"^Id:\s+1$", info, re.M) and re.search(rf"^PID:\s+{pid}$", info, re.M), info
    listing = ok(vm(daemon, "list")).splitlines()[2:]
    assert [ln.split() for ln in listing] == [["1", "inf", "running"], ["2", "inf2", "running"]]
    assert re.search(r"Used memory:\s+\d+ MiB", ok(vm(daemon, "info", "inf")))
    assert "accelerator: " in ok(vm(daemon, "log", "inf"))
    ok(vm(daemon, "destroy", "inf"))
    ok(vm(daemon, "destroy", "inf2"))
    assert re.search(r"^Id:\s+-$", ok(vm(daemon, "info", "inf")), re.M)
    events = ok(vm(daemon, "events", "inf"))
    assert re.search(r"state\s+running", events) and re.search(r"state\s+shutoff\s+destroyed", events), events


def test_edit_attach_and_detach_disk(daemon, tmp_path, manager_guest):  # noqa: F811
    disk = tmp_path / "extra.img"
    disk.write_bytes(b"\0" * 65536)
    define_guest(daemon, "ed", manager_guest)
    assert "VM ed updated" in ok(vm(daemon, "edit", "ed", "--memory", "96M", "--vcpus", "2"))
    d = json.loads(ok(vm(daemon, "dump", "ed")))
    assert (d["memory_mib"], d["vcpus"]) == (96, 2)

    # virsh edit: the JSON in $EDITOR
    editor = tmp_path / "editor.sh"
    editor.write_text("#!/bin/sh\nsed -i 's/\"vcpus\": 2/\"vcpus\": 3/' \"$1\"\n")
    editor.chmod(0o755)
    ok(vm(daemon, "edit", "ed", env={"EDITOR": str(editor)}))
    assert json.loads(ok(vm(daemon, "dump", "ed")))["vcpus"] == 3

    assert "attached to VM ed as vda" in ok(vm(daemon, "attach-disk", "ed", str(disk)))
    assert ok(vm(daemon, "domblklist", "ed")).splitlines()[2].split()[:2] == ["vda", str(disk)]
    one_line_error(vm(daemon, "attach-disk", "ed", str(disk)), "already has the disk")
    one_line_error(vm(daemon, "detach-disk", "ed", "vdz"), "VM ed has no disk vdz (its disks: vda")
    ok(vm(daemon, "detach-disk", "ed", "vda"))
    assert json.loads(ok(vm(daemon, "dump", "ed")))["disks"] == []

    ok(vm(daemon, "start", "ed"))
    one_line_error(vm(daemon, "edit", "ed", "--memory", "128M"), "cannot edit VM ed: it is running")
    one_line_error(vm(daemon, "attach-disk", "ed", str(disk)), "cannot edit VM ed: it is running")
    ok(vm(daemon, "destroy", "ed"))


def test_console_of_a_stopped_vm_says_so(daemon, manager_guest):  # noqa: F811
    define_guest(daemon, "off", manager_guest)
    t0 = time.monotonic()
    one_line_error(vm(daemon, "console", "off", timeout=20), "VM off is not running (it is shutoff)")
    assert time.monotonic() - t0 < 15


def test_shutdown_timeout_reports_and_destroys_only_with_force(daemon, manager_guest):  # noqa: F811
    define_guest(daemon, "stub", manager_guest)
    ok(vm(daemon, "start", "stub"))
    ok(vm(daemon, "suspend", "stub"))  # a paused guest cannot react to the power button
    t0 = time.monotonic()
    r = vm(daemon, "shutdown", "stub", "--timeout", "1.5")
    assert time.monotonic() - t0 >= 1.4
    one_line_error(r, "VM stub did not power off within 1.5s and is still in shutdown; use --force")
    with daemon.client() as c:
        assert c.get("stub")["state"] == "in shutdown"  # not destroyed
        time.sleep(1)
        assert c.get("stub")["pid"] is not None
    out = ok(vm(daemon, "shutdown", "stub", "--timeout", "1", "--force"))
    assert "did not power off within 1s: destroyed (now shutoff)" in out, out
    one_line_error(vm(daemon, "shutdown", "stub", "--force"), "--force needs --timeout")


def test_daemon_says_where_it_listens(tmp_path):
    d = Daemon(tmp_path / "state", tcp_port=free_port())
    d.start()
    try:
        log = d.log_text()
        assert f"pyvmmd: listening on unix:{d.socket}" in log
        assert f"pyvmmd: web UI: http://127.0.0.1:{d.tcp_port}/#token={d.token}\n" in log
        assert "pyvmmd: pyvmmd:" not in log
    finally:
        d.cleanup()


def test_send_key_ctrl_alt_delete(daemon, manager_guest):  # noqa: F811
    define_guest(daemon, "kg", manager_guest, "--append", "keys=1")  # the guest echoes keyboard bytes
    one_line_error(vm(daemon, "send-key", "kg", "ctrl", "alt", "delete"), "cannot send-key VM kg: it is shutoff")
    ok(vm(daemon, "start", "kg"))
    assert "sent ctrl-alt-delete" in ok(vm(daemon, "send-key", "kg", "ctrl", "alt", "delete"))
    with daemon.client() as c:
        def keys() -> list[str]:
            return re.findall(r"KEY 0x000000([0-9a-f]{2})", c.request("GET", "/vms/kg/console/scrollback")["text"])

        deadline = time.monotonic() + 20
        while len(keys()) < 8 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert keys() == ["1d", "38", "e0", "53", "e0", "d3", "b8", "9d"]
    one_line_error(vm(daemon, "send-key", "kg", "nosuch"), "Parameter 'data' does not accept value 'nosuch'")
    assert re.search(r"key\s+running", ok(vm(daemon, "events", "kg")))
    ok(vm(daemon, "destroy", "kg"))
