"""Snapshot, restore, clone and migrate of managed VMs, through a real pyvmmd, its API and ``pyvmm vm``.

The VMs run the QMP test guest (tests/support/guests/qmp: ``tick N`` ten times a second) on KVM,
with a raw disk and a user-mode NIC, so a snapshot has a disk to save and a clone a MAC to change.
A restored VM continues: its first tick is the one after the last tick before the snapshot (not
``tick 1``, which a fresh boot would print).  Most daemons run with ``--no-sandbox``; the sandboxed
tests run the default (every VM process under the seccomp sandbox, which may open no file or socket
for its state): the daemon opens the state file or the connection itself and passes it over QMP.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_manager_support import (  # noqa: F401 - fixtures
    Daemon,
    guest_definition,
    manager_guest,
    wait_for,
    wait_state,
)

TICK = re.compile(r"tick (\d+)")


class UnsandboxedDaemon(Daemon):
    def command(self) -> list[str]:
        return [*super().command(), "--no-sandbox"]


@pytest.fixture
def mgr(tmp_path: Path):
    d = UnsandboxedDaemon(tmp_path / "state")
    d.start()
    try:
        yield d
    finally:
        d.cleanup()


def ticks(c, name: str) -> list[int]:
    text = c.request("GET", f"/vms/{name}/console/scrollback")["text"]
    return [int(t) for t in TICK.findall(text)]


def wait_ticks(c, name: str, n: int, timeout: float = 30.0) -> list[int]:
    return wait_for(lambda: (t := ticks(c, name)) and len(t) >= n and t, timeout, f"{n} ticks from {name}",
                    lambda: str(ticks(c, name)))


def cli(daemon: Daemon, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYVMMD_SOCKET": str(daemon.socket)}
    return subprocess.run([sys.executable, "-m", "pyvmm", "vm", *args], text=True, env=env, timeout=timeout,
                          stdin=subprocess.DEVNULL, capture_output=True)


def ok(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 0, f"status {r.returncode}\nstdout: {r.stdout}\nstderr: {r.stderr}"
    return r.stdout


def define_guest(c, name: str, kernel: Path, tmp_path: Path) -> dict:
    disk = tmp_path / f"{name}.raw"
    with open(disk, "wb") as f:
        f.write(b"pyvmm-disk-" + name.encode())
        f.truncate(1 << 20)
    return c.define(guest_definition(name, kernel, disks=[{"path": str(disk), "format": "raw"}],
                                     networks=[{"type": "user"}]))


def assert_continues(before: list[int], after: list[int]) -> None:
    """The restored VM's ticks go on from the snapshot's (a new boot would start at 1)."""
    assert after, "no ticks after the restore"
    assert after[0] > 1 and after[0] >= before[-1], (before[-3:], after[:5])
    assert after == list(range(after[0], after[0] + len(after))), after[:20]


def test_snapshot_and_restore_through_the_api(mgr: Daemon, manager_guest: Path, tmp_path: Path) -> None:  # noqa: F811
    snap = tmp_path / "snap"
    with mgr.client() as c:
        define_guest(c, "web", manager_guest, tmp_path)
        c.action("web", "start")
        wait_ticks(c, "web", 5)
        res = c.request("POST", "/vms/web/snapshot", json={"dir": str(snap)})
        before = ticks(c, "web")
        assert res["vm"]["state"] == "running", res
        assert sorted(p.name for p in snap.iterdir()) == ["disk0.raw", "snapshot.json", "vm.state"]
        meta = json.loads((snap / "snapshot.json").read_text())
        assert meta["definition"]["name"] == "web" and meta["running"] is True
        assert (snap / "disk0.raw").read_bytes()[:14] == b"pyvmm-disk-web"
        # the source keeps running after the snapshot
        wait_for(lambda: ticks(c, "web")[-1] > before[-1] + 3, 20, "web to go on ticking")
        # a directory that is not empty is refused, and the VM is untouched
        with pytest.raises(Exception, match="not empty"):
            c.request("POST", "/vms/web/snapshot", json={"dir": str(snap)})
        assert c.get("web")["state"] == "running"

        vm = c.request("POST", "/restore", json={"dir": str(snap), "name": "web2"})
        assert vm["name"] == "web2" and vm["state"] == "running", vm
        assert vm["uuid"] != c.get("web")["uuid"]  # the original still exists: a new identity
        disk = vm["definition"]["disks"][0]
        assert disk["format"] == "qcow2" and disk["path"].startswith(str(mgr.state_dir / "disks")), disk
        info = subprocess.run(["qemu-img", "info", "-U", "--output=json", disk["path"]], capture_output=True,
                              text=True, check=True)
        assert json.loads(info.stdout)["backing-filename"] == str((snap / "disk0.raw").resolve())
        after = wait_ticks(c, "web2", 5)
        # the snapshot's state file is mapped, so the restored VM continues where the snapshot was taken
        snap_tick = max(t for t in before)
        assert_continues([min(snap_tick, after[0])], after)
        assert after[0] <= snap_tick + 2, (snap_tick, after[:5])
        # a restore that names an existing VM is refused in one line, leaving nothing behind
        with pytest.raises(Exception, match="already exists"):
            c.request("POST", "/restore", json={"dir": str(snap), "name": "web2"})
        with pytest.raises(Exception, match="not a pyvmm snapshot directory"):
            c.request("POST", "/restore", json={"dir": str(tmp_path)})
        assert sorted(v["name"] for v in c.list()) == ["web", "web2"]
        # a truncated state file: the restore fails in one line and leaves no VM and no overlay behind
        bad = tmp_path / "bad"
        bad.mkdir()
        for f in snap.iterdir():
            (bad / f.name).write_bytes(f.read_bytes())
        with open(bad / "vm.state", "r+b") as f:
            f.truncate(200)
        overlays = sorted(p for p in (mgr.state_dir / "disks").rglob("*.qcow2"))
        with pytest.raises(Exception, match=f"restore of {bad} failed") as err:
            c.request("POST", "/restore", json={"dir": str(bad), "name": "web3"})
        assert "\n" not in str(err.value) and "Traceback" not in str(err.value), err.value
        assert sorted(v["name"] for v in c.list()) == ["web", "web2"]
        assert sorted(p for p in (mgr.state_dir / "disks").rglob("*.qcow2")) == overlays


def test_snapshot_restore_and_clone_through_the_cli(mgr: Daemon, manager_guest: Path, tmp_path: Path) -> None:  # noqa: F811
    snap = tmp_path / "cli-snap"
    with mgr.client() as c:
        define_guest(c, "base", manager_guest, tmp_path)
        c.action("base", "start")
        wait_ticks(c, "base", 5)
        out = ok(cli(mgr, "snapshot", "base", str(snap)))
        assert f"VM base: snapshot in {snap}" in out and "now running" in out, out
        snap_tick = ticks(c, "base")[-1]
        ok(cli(mgr, "destroy", "base"))
        out = ok(cli(mgr, "restore", str(snap)))
        assert out.strip() == f"VM base restored from {snap} (now running)", out
        vm = c.get("base")
        assert vm["state"] == "running"
        after = wait_ticks(c, "base", 3)
        assert 1 < after[0] <= snap_tick + 2, (snap_tick, after[:5])

        out = ok(cli(mgr, "clone", "base", "--count", "2"))
        assert out.count("cloned from base") == 2, out
        clones = [c.get("base-clone1"), c.get("base-clone2")]
        base = c.get("base")
        assert base["state"] == "running"
        for cl in clones:
            assert cl["state"] == "running", cl
        ids = {v["uuid"] for v in (base, *clones)}
        macs = {v["definition"]["networks"][0]["mac"] for v in (base, *clones)}
        disks = {v["definition"]["disks"][0]["path"] for v in (base, *clones)}
        pids = {v["pid"] for v in (base, *clones)}
        assert len(ids) == len(macs) == len(disks) == len(pids) == 3, (ids, macs, disks, pids)
        # both clones continue from the clone snapshot and run side by side
        t1, t2 = wait_ticks(c, "base-clone1", 5), wait_ticks(c, "base-clone2", 5)
        assert t1[0] > 1 and t2[0] > 1 and abs(t1[0] - t2[0]) <= 1, (t1[:3], t2[:3])
        # ...and independently: pausing one does not stop the other
        c.action("base-clone1", "suspend")
        paused_at = ticks(c, "base-clone1")[-1]
        running_at = ticks(c, "base-clone2")[-1]
        wait_for(lambda: ticks(c, "base-clone2")[-1] >= running_at + 10, 20, "clone2 to go on")
        assert ticks(c, "base-clone1")[-1] <= paused_at + 1
        # they share one memory file (mapped copy-on-write), not one copy each
        maps = [Path(f"/proc/{cl['pid']}/maps").read_text() for cl in clones]
        shared = {line.split()[-1] for line in maps[0].splitlines() if line.endswith("/vm.state")}
        assert shared and all(next(iter(shared)) in m for m in maps), shared
        c.action("base-clone1", "resume")
        wait_for(lambda: ticks(c, "base-clone1")[-1] > paused_at + 3, 20, "clone1 to resume")


def test_a_paused_vm_is_saved_and_restored_paused(mgr: Daemon, manager_guest: Path,  # noqa: F811
                                                   tmp_path: Path) -> None:
    with mgr.client() as c:
        c.define(guest_definition("p", manager_guest))
        c.action("p", "start")
        wait_ticks(c, "p", 3)
        c.action("p", "suspend")
        time.sleep(0.3)
        last = ticks(c, "p")[-1]
        res = c.request("POST", "/vms/p/snapshot", json={"dir": str(tmp_path / "ps")})
        assert res["vm"]["state"] == "paused", res
        vm = c.request("POST", "/restore", json={"dir": str(tmp_path / "ps"), "name": "p2"})
        assert vm["state"] == "paused", vm
        time.sleep(0.5)
        assert ticks(c, "p2") == [] and ticks(c, "p")[-1] == last
        c.action("p2", "resume")
        after = wait_ticks(c, "p2", 3)
        assert after[0] in (last, last + 1), (last, after[:5])


def seccomp_mode(pid: int) -> str:
    status = Path(f"/proc/{pid}/status").read_text()
    return next(line.split()[1] for line in status.splitlines() if line.startswith("Seccomp:"))


@pytest.fixture
def sandboxed(tmp_path: Path):
    """A daemon with its default: every VM process under ``-sandbox on``."""
    d = Daemon(tmp_path / "sandboxed")
    d.start()
    try:
        yield d
    finally:
        d.cleanup()


def test_sandboxed_vm_is_snapshotted_restored_and_cloned(sandboxed: Daemon, manager_guest: Path,  # noqa: F811
                                                           tmp_path: Path) -> None:
    """The daemon opens the state file and passes it (QMP getfd, migrate fd:NAME): the VM process, which
    may open no file for writing under its seccomp filter, writes its mapped-ram state to it."""
    snap = tmp_path / "sb-snap"
    with sandboxed.client() as c:
        define_guest(c, "sb", manager_guest, tmp_path)
        c.action("sb", "start")
        pid = c.get("sb")["pid"]
        assert seccomp_mode(pid) == "2", "the VM process is not under the seccomp sandbox"
        wait_ticks(c, "sb", 5)
        out = ok(cli(sandboxed, "snapshot", "sb", str(snap)))
        assert f"VM sb: snapshot in {snap}" in out and "now running" in out, out
        snap_tick = ticks(c, "sb")[-1]
        assert sorted(p.name for p in snap.iterdir()) == ["disk0.raw", "snapshot.json", "vm.state"]
        assert (snap / "vm.state").stat().st_size > 0 and (snap / "vm.state").stat().st_mode & 0o777 == 0o600
        # the same process, still sandboxed, runs on; it holds no descriptor of the state file any more
        vm = c.get("sb")
        assert vm["state"] == "running" and vm["pid"] == pid and seccomp_mode(pid) == "2", vm
        wait_for(lambda: ticks(c, "sb")[-1] > snap_tick + 3, 20, "sb to go on ticking")
        held = [os.readlink(f) for f in Path(f"/proc/{pid}/fd").iterdir()]
        assert str(snap / "vm.state") not in held, held

        ok(cli(sandboxed, "destroy", "sb"))
        out = ok(cli(sandboxed, "restore", str(snap)))
        assert out.strip() == f"VM sb restored from {snap} (now running)", out
        restored = c.get("sb")
        assert restored["state"] == "running" and seccomp_mode(restored["pid"]) == "2", restored
        after = wait_ticks(c, "sb", 3)
        assert 1 < after[0] <= snap_tick + 2, (snap_tick, after[:5])
        assert_continues([min(snap_tick, after[0])], after)

        # a clone of the restored (sandboxed) VM: snapshot and restore again, side by side
        out = ok(cli(sandboxed, "clone", "sb", "--count", "2"))
        assert out.count("cloned from sb") == 2, out
        clones = [c.get("sb-clone1"), c.get("sb-clone2")]
        for cl in clones:
            assert cl["state"] == "running" and seccomp_mode(cl["pid"]) == "2", cl
        t1, t2 = wait_ticks(c, "sb-clone1", 5), wait_ticks(c, "sb-clone2", 5)
        assert t1[0] > 1 and t2[0] > 1 and abs(t1[0] - t2[0]) <= 1, (t1[:3], t2[:3])
        assert c.get("sb")["state"] == "running"
        assert len({cl["pid"] for cl in clones} | {c.get("sb")["pid"]}) == 3


def test_migrate_between_two_daemons(tmp_path: Path, manager_guest: Path) -> None:  # noqa: F811
    # the source runs its VMs sandboxed (the default): the daemon connects and passes the socket (getfd)
    src, dst = Daemon(tmp_path / "src"), UnsandboxedDaemon(tmp_path / "dst")
    src.start()
    dst.start()
    try:
        with src.client() as s, dst.client() as d:
            vm = define_guest(s, "mover", manager_guest, tmp_path)
            s.action("mover", "start")
            assert seccomp_mode(s.get("mover")["pid"]) == "2"
            wait_ticks(s, "mover", 5)
            t0 = time.monotonic()
            out = ok(cli(src, "migrate", "mover", "--to", f"unix:{dst.socket}"))
            assert "migrated to unix:" in out and "(there: running)" in out, out
            last_src = ticks(s, "mover")[-1]
            there = d.get("mover")
            assert there["state"] == "running" and there["uuid"] == vm["uuid"], there
            assert there["definition"]["networks"][0]["mac"] == vm["definition"]["networks"][0]["mac"]
            after = wait_ticks(d, "mover", 5)
            assert_continues([last_src], after)
            assert after[0] <= last_src + 2, (last_src, after[:5])
            here = s.get("mover")
            assert here["state"] == "shutoff" and here["reason"].startswith("migrated to"), here
            assert time.monotonic() - t0 < 60
            # and back again, undefining it on the way out
            ok(cli(dst, "migrate", "mover", "--to", f"unix:{src.socket}", "--undefine-source"))
            wait_state(s, "mover", "running")
            assert [v["name"] for v in d.list()] == []
            # a destination that is not there: one line, and the VM keeps running here
            r = cli(src, "migrate", "mover", "--to", f"unix:{tmp_path / 'nobody.sock'}")
            assert r.returncode == 1 and "cannot reach pyvmmd" in r.stderr and r.stderr.count("\n") == 1, r.stderr
            assert s.get("mover")["state"] == "running"
    finally:
        src.cleanup()
        dst.cleanup()


SRC_ADDR, DST_ADDR = "10.0.19.1", "10.0.19.2"


class HostDaemon(Daemon):
    """A daemon inside a network namespace (a "host"), listening on TCP at its address with a token; its VMs
    run sandboxed (the default), so the source daemon makes the stream's TCP connection for its VM."""

    def __init__(self, state_dir: Path, ns: str, addr: str, port: int) -> None:
        super().__init__(state_dir)
        self.ns, self.addr, self.port = ns, addr, port
        self.token = "host-token-0123456789abcdef"

    def command(self) -> list[str]:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        (self.state_dir / "token").write_text(self.token + "\n")
        (self.state_dir / "token").chmod(0o600)
        from support.netns import in_ns

        return in_ns(self.ns, *super().command(), "--listen", f"{self.addr}:{self.port}")


def test_migrate_between_two_hosts_over_tcp(tmp_path: Path, manager_guest: Path) -> None:  # noqa: F811
    """Two daemons in two network namespaces joined by a veth pair: the API call and the migration
    stream both cross the link (the destination's URL and token, the VM's stream to its address)."""
    from support.netns import netns

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True)

    with netns("mgr-src") as a, netns("mgr-dst") as b:
        ip("-n", a, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", b)
        for ns, addr in ((a, SRC_ADDR), (b, DST_ADDR)):
            ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
            ip("-n", ns, "link", "set", "eth0", "up")
        src = HostDaemon(tmp_path / "src", a, SRC_ADDR, 8080)
        dst = HostDaemon(tmp_path / "dst", b, DST_ADDR, 8080)
        src.start()
        dst.start()
        try:
            with src.client() as s, dst.client() as d:
                disk = tmp_path / "shared.raw"
                disk.write_bytes(b"\0" * 65536)
                vm = s.define(guest_definition("hop", manager_guest, disks=[{"path": str(disk)}]))
                s.action("hop", "start")
                assert seccomp_mode(s.get("hop")["pid"]) == "2"
                wait_ticks(s, "hop", 5)
                r = cli(src, "--json", "migrate", "hop", "--to", f"http://{DST_ADDR}:8080", "--to-token", dst.token)
                res = json.loads(ok(r))
                assert res["vm"]["state"] == "shutoff" and res["destination_vm"]["state"] == "running", res
                assert isinstance(res["downtime_ms"], int), res
                last_src = ticks(s, "hop")[-1]
                there = d.get("hop")
                assert there["uuid"] == vm["uuid"] and there["state"] == "running"
                after = wait_ticks(d, "hop", 5)
                assert_continues([last_src], after)
                assert after[0] <= last_src + 2, (last_src, after[:5])
                # a wrong token at the destination: one line, and the VM stays where it is
                d_vm = d.get("hop")
                r = cli(dst, "migrate", "hop", "--to", f"http://{SRC_ADDR}:8080", "--to-token", "wrong")
                assert r.returncode == 1 and "401" in r.stderr and r.stderr.count("\n") == 1, r.stderr
                assert d.get("hop")["pid"] == d_vm["pid"] and d.get("hop")["state"] == "running"
        finally:
            src.cleanup()
            dst.cleanup()
