"""-blockdev, -device virtio-blk-pci,drive=NODE, the QMP block queries and -snapshot: pyvmm and
qemu-system-x86_64 with the same options on the same kind of image, in the same test.

* libvirt's disk: the two -blockdev JSON nodes and its -device line.  query-block and
  query-named-block-nodes agree on the fields pyvmm claims; the guest sees vda in PCI slot 2;
  after guest reads, writes and an fsync, query-blockstats' counters have moved by at least
  what the guest did, on both.
* -snapshot and -drive ...,snapshot=on: the guest writes its disk and reads its writes back, the
  image is byte-identical afterwards and no temporary file is left behind, on both.
* Bad -blockdev/-device input: the same error line from both (after the program name).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from support.guestconsole import SocketConsole
from support.vmms import vmm_command

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "support" / "guests" / "qmp"))

from harness import Client, HarnessError  # noqa: E402

pytestmark = pytest.mark.slow
KINDS = ("qemu", "pyvmm")
READY = "pyvmm-guest: shell ready"
STORAGE = '{"driver":"file","filename":"%s","node-name":"libvirt-1-storage","auto-read-only":true,"discard":"unmap"}'
FORMAT = '{"node-name":"libvirt-1-format","read-only":false,"driver":"qcow2","file":"libvirt-1-storage"}'
DEVICE = "virtio-blk-pci,drive=libvirt-1-format,bus=pci.0,addr=0x2,id=virtio-disk0,bootindex=1"


def _qemu_img(*args: str) -> None:
    tool = shutil.which("qemu-img")
    assert tool, "qemu-img is missing (Debian package qemu-utils)"
    subprocess.run([tool, *args], check=True, capture_output=True)


def _command(kind: str, linux, tmp: Path, *args: str) -> list[str]:
    common = ["-kernel", str(linux.kernel), "-initrd", str(linux.initrd), "-append", linux.cmdline, "-m", "256",
              "-accel", "tcg", "-display", "none", "-nodefaults", "-no-user-config",
              "-serial", f"unix:{tmp / 'serial.sock'},server=on,wait=off",
              "-qmp", f"unix:{tmp / 'qmp.sock'},server=on,wait=off", *args]
    return [*vmm_command(kind), *common]


class Vm:
    """One VMM with a serial console and a QMP socket in ``tmp``."""

    def __init__(self, kind: str, linux, tmp: Path, *args: str) -> None:
        tmp.mkdir(exist_ok=True)
        self.kind = kind
        self.tmp = tmp
        self.log = tmp / "stderr.txt"
        env = {**os.environ, "TMPDIR": str(tmp / "tmpdir")}
        (tmp / "tmpdir").mkdir(exist_ok=True)
        with open(self.log, "wb") as f:
            self.proc = subprocess.Popen(_command(kind, linux, tmp, *args), stdin=subprocess.DEVNULL, stdout=f,
                                         stderr=f, env=env)
        deadline = time.monotonic() + 60
        while not ((tmp / "serial.sock").exists() and (tmp / "qmp.sock").exists()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise HarnessError(f"{kind} did not start: {self.log.read_text(errors='replace')}")
            time.sleep(0.05)
        self.console = SocketConsole(tmp / "serial.sock", name=f"{kind}'s console")

    def shell(self, command: str, marker: str, timeout: float = 180) -> str:
        """Run ``command`` in the guest's shell; what the console shows up to ``MARKER=STATUS``
        (the echoed command line holds ``MARKER=$?``, which the digit tells apart)."""
        start = len(self.console.text)
        self.console.send(f"{command}; echo {marker}=$?\n")
        rx = re.compile(rf"{marker}=\d")
        deadline = time.monotonic() + timeout
        while not rx.search(self.console.text, start):
            if time.monotonic() > deadline:
                raise AssertionError(self.fail(f"no {marker}= status within {timeout}s"))
            time.sleep(0.1)
        return self.console.text[start:]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.console.close()

    def fail(self, what: str) -> str:
        return (f"{self.kind}: {what}\nconsole tail:\n{self.console.text[-1500:]}\nstderr:\n"
                f"{self.log.read_text(errors='replace')[-1500:]}")


async def _qmp(vm: Vm, commands: list[str]) -> list[Any]:
    c = Client()
    await c.connect(vm.tmp / "qmp.sock")
    try:
        return [await c.execute(cmd) for cmd in commands]
    finally:
        await c.close()


def _claimed_block(entry: dict[str, Any]) -> dict[str, Any]:
    """The query-block fields pyvmm claims to report as QEMU does (the image's own path aside)."""
    ins = entry["inserted"]
    image = ins["image"]
    return {"device": entry["device"], "qdev": entry.get("qdev"), "type": entry["type"],
            "locked": entry["locked"], "removable": entry["removable"], "io-status": entry["io-status"],
            "inserted": {k: ins[k] for k in ("drv", "node-name", "ro", "encrypted", "detect_zeroes", "cache",
                                             "backing_file_depth", "bps", "iops", "write_threshold")},
            "image": {k: image.get(k) for k in ("virtual-size", "format", "cluster-size", "dirty-flag",
                                                "format-specific")}}


def _claimed_node(node: dict[str, Any]) -> tuple:
    return (node["node-name"], node["drv"], node["ro"], node["cache"]["no-flush"], node["image"]["format"],
            node["image"]["virtual-size"])


GUEST_IO = ("ls -d /sys/bus/pci/devices/0000:00:02.0/virtio*/block/vda && "
            "dd if=/dev/vda of=/dev/null bs=64k count=32 iflag=direct 2>/dev/null && "
            "dd if=/dev/urandom of=/dev/vda bs=64k count=16 oflag=direct conv=fsync 2>/dev/null")


def test_libvirt_disk_query_block_and_blockstats_agree_with_qemu(tmp_path: Path, linux) -> None:
    seen: dict[str, dict[str, Any]] = {}
    for kind in KINDS:
        image = tmp_path / f"{kind}.qcow2"
        _qemu_img("create", "-q", "-f", "qcow2", str(image), "32M")
        vm = Vm(kind, linux, tmp_path / kind, "-blockdev", STORAGE % image, "-blockdev", FORMAT, "-device", DEVICE)
        try:
            block, nodes, stats0 = asyncio.run(_qmp(vm, ["query-block", "query-named-block-nodes",
                                                         "query-blockstats"]))
            vm.console.wait_for(READY, 240)
            out = vm.shell(GUEST_IO, "IO")
            assert "IO=0" in out, vm.fail("the guest's I/O on vda in slot 2 failed")
            (stats1,) = asyncio.run(_qmp(vm, ["query-blockstats"]))
        finally:
            vm.close()
        assert len(block) == 1 and block[0]["inserted"]["file"] == str(image), block
        assert block[0]["inserted"]["image"]["filename"] == str(image)
        seen[kind] = {"block": _claimed_block(block[0]), "nodes": sorted(_claimed_node(n) for n in nodes),
                      "stats0": stats0, "stats1": stats1}
    assert seen["pyvmm"]["block"] == seen["qemu"]["block"]
    assert seen["pyvmm"]["nodes"] == seen["qemu"]["nodes"]
    for kind in KINDS:
        before, after = seen[kind]["stats0"][0], seen[kind]["stats1"][0]
        assert (after["device"], after["node-name"], after["qdev"]) == \
            ("", "libvirt-1-format", "/machine/peripheral/virtio-disk0/virtio-backend"), after
        assert after["parent"]["node-name"] == "libvirt-1-storage"
        assert set(after["stats"]) >= set(before["stats"]) - {"idle_time_ns"}, kind
        b, a = before["stats"], after["stats"]
        assert a["rd_bytes"] - b["rd_bytes"] >= 32 * 65536, (kind, a)
        assert a["wr_bytes"] - b["wr_bytes"] >= 16 * 65536, (kind, a)
        assert a["rd_operations"] > b["rd_operations"] and a["wr_operations"] > b["wr_operations"], (kind, a)
        assert a["flush_operations"] > b["flush_operations"], (kind, a)
        assert a["wr_highest_offset"] >= 16 * 65536 and a["wr_total_time_ns"] > 0 and a["rd_total_time_ns"] > 0
        # the host file's highest written byte (libvirt's "allocation"): past the guest's 1 MiB of data
        assert after["parent"]["stats"]["wr_highest_offset"] > 16 * 65536, (kind, after["parent"])
    assert set(seen["pyvmm"]["stats1"][0]["stats"]) == set(seen["qemu"]["stats1"][0]["stats"])


THROWAWAY_IO = ("dd if=/dev/urandom of=/tmp/new bs=64k count=16 2>/dev/null && "
                "dd if=/tmp/new of=/dev/vda bs=64k oflag=direct conv=fsync 2>/dev/null && "
                "dd if=/dev/vda bs=64k count=16 iflag=direct 2>/dev/null | cmp - /tmp/new && echo READBACK-SAME")


@pytest.mark.parametrize("how", ["-snapshot", "snapshot=on"])
def test_snapshot_never_writes_the_image(tmp_path: Path, linux, how: str) -> None:
    original = os.urandom(4 << 20)
    for kind in KINDS:
        image = tmp_path / f"{kind}.raw"
        image.write_bytes(original)
        drive = f"file={image},format=raw,if=none,id=d0" + (",snapshot=on" if how == "snapshot=on" else "")
        extra = ["-snapshot"] if how == "-snapshot" else []
        vm = Vm(kind, linux, tmp_path / kind, *extra, "-drive", drive, "-device", "virtio-blk-pci,drive=d0")
        try:
            (block,) = asyncio.run(_qmp(vm, ["query-block"]))
            vm.console.wait_for(READY, 240)
            out = vm.shell(THROWAWAY_IO, "IO")
            assert "READBACK-SAME" in out, vm.fail("the guest did not read back what it wrote")
            vm.console.send("sync; poweroff -f\n")
            assert vm.proc.wait(120) == 0, vm.fail("the VMM did not exit cleanly")
        finally:
            vm.close()
        ins = block[0]["inserted"]
        assert (block[0]["device"], ins["drv"], ins["ro"], ins["backing_file"], ins["backing_file_depth"]) == \
            ("d0", "qcow2", False, str(image), 1), (kind, block)
        assert ins["cache"] == {"writeback": True, "direct": False, "no-flush": True}, (kind, ins)
        assert hashlib.sha256(image.read_bytes()).digest() == hashlib.sha256(original).digest(), \
            f"{kind} wrote the image under {how}"
        assert os.listdir(tmp_path / kind / "tmpdir") == [], f"{kind} left its overlay behind"


ERRORS = [
    ["-blockdev", "driver=file,filename={d}/nope,node-name=a"],
    ["-blockdev", "driver=file,node-name=a"],
    ["-blockdev", "driver=file,filename={raw}"],
    ["-blockdev", "driver=bogus,node-name=a"],
    ["-blockdev", "driver=file,filename={raw},node-name=1a"],
    ["-blockdev", "driver=file,filename={raw},node-name=a,bogus=1"],
    ["-blockdev", "driver=file,filename={raw},node-name=a,discard=foo"],
    ["-blockdev", "driver=file,filename={raw},node-name=a,cache.direct=maybe"],
    ["-blockdev", "driver=file,filename={raw},node-name=a,read-only"],
    ["-blockdev", '{{"driver":"file","filename":"{raw}","node-name":"a","read-only":"yes"}}'],
    ["-blockdev", "driver=qcow2,file=zz,node-name=a"],
    ["-blockdev", "driver=file,filename={raw},node-name=a", "-blockdev", "driver=file,filename={raw},node-name=a"],
    ["-blockdev", "driver=file,filename={raw},node-name=a", "-blockdev", "driver=qcow2,file=a,node-name=b"],
    ["-blockdev", "driver=file,filename={qcow2},node-name=a,read-only=on", "-blockdev",
     "driver=qcow2,file=a,node-name=b"],
    ["-blockdev", "driver=qcow2,file.driver=file,file.filename={qcow2},node-name=b,backing=nope"],
    ["-blockdev", "driver=file,filename={qcow2},node-name=a", "-blockdev", "driver=qcow2,file=a,node-name=b",
     "-blockdev", "driver=qcow2,file=a,node-name=c"],
    ["-blockdev", "driver=file,filename={raw},node-name=a", "-device", "virtio-blk-pci,drive=zz"],
    ["-blockdev", "driver=file,filename={raw},node-name=a", "-device", "virtio-blk-pci,drive=a,bus=pci.1"],
    ["-blockdev", "driver=file,filename={raw},node-name=a", "-blockdev", "driver=raw,file=a,node-name=b",
     "-device", "virtio-blk-pci,drive=b", "-device", "virtio-blk-pci,drive=b"],
    ["-blockdev", "driver=file,filename={raw},node-name=d0", "-drive", "file={qcow2},format=qcow2,if=none,id=d0"],
    ["-blockdev", "driver=file,filename={raw},node-name=a", "-blockdev", "driver=file,filename={qcow2},node-name=b",
     "-device", "virtio-blk-pci,drive=a,bootindex=1", "-device", "virtio-blk-pci,drive=b,bootindex=1"],
    ["-drive", "file={raw},format=raw,if=none,id=d0", "-device", "virtio-blk-pci,drive=d0",
     "-device", "virtio-blk-pci,drive=d0"],
]


def test_bad_block_options_give_qemus_error_line(tmp_path: Path) -> None:
    raw, qcow2 = tmp_path / "d.raw", tmp_path / "d.qcow2"
    raw.write_bytes(bytes(1 << 20))
    _qemu_img("create", "-q", "-f", "qcow2", str(qcow2), "1M")
    for case in ERRORS:
        args = [a.format(d=tmp_path, raw=raw, qcow2=qcow2) for a in case]
        lines = {}
        for kind in KINDS:
            r = subprocess.run([*vmm_command(kind), "-S", "-display", "none", "-nodefaults", "-accel", "tcg",
                                "-m", "256", *args], capture_output=True, text=True, timeout=60,
                               stdin=subprocess.DEVNULL)
            assert r.returncode == 1, (kind, args, r.stderr)
            errors = [ln for ln in r.stderr.splitlines() if ln.startswith(("qemu-system-x86_64: ", "pyvmm: error: "))]
            assert len(errors) == 1, (kind, args, r.stderr)
            lines[kind] = errors[0].split(": ", 2 if kind == "pyvmm" else 1)[-1]
        assert lines["pyvmm"] == lines["qemu"], args


def test_query_named_block_nodes_json_is_plain(tmp_path: Path) -> None:
    """The entries round-trip through JSON unchanged (no Python-only values leak into QMP)."""
    from pyvmm.block import info
    from pyvmm.block.blockdev import parse_blockdev
    from pyvmm.block.graph import BlockGraph

    image = tmp_path / "d.qcow2"
    _qemu_img("create", "-q", "-f", "qcow2", str(image), "1M")
    g = BlockGraph()
    g.add_blockdev(parse_blockdev(STORAGE % image))
    g.add_blockdev(parse_blockdev(FORMAT))
    nodes = info.query_named_block_nodes(g)
    assert json.loads(json.dumps(nodes)) == nodes
    g.close()


LOCK_CASES = {
    "libvirt-disk": lambda img, raw: ["-blockdev", STORAGE % img, "-blockdev", FORMAT, "-device", DEVICE],
    "nodes-without-device": lambda img, raw: ["-blockdev", STORAGE % img, "-blockdev", FORMAT],
    "read-only-nodes": lambda img, raw: ["-blockdev", (STORAGE % img).replace('"auto-read-only":true',
                                                                              '"read-only":true'),
                                         "-blockdev", FORMAT.replace('"read-only":false', '"read-only":true'),
                                         "-device", DEVICE],
    "raw-share-rw": lambda img, raw: ["-blockdev", f"driver=file,filename={raw},node-name=s", "-blockdev",
                                      "driver=raw,file=s,node-name=f", "-device", "virtio-blk-pci,drive=f,share-rw=on"],
    "snapshot-on": lambda img, raw: ["-drive", f"file={raw},format=raw,if=none,id=d0,snapshot=on",
                                     "-device", "virtio-blk-pci,drive=d0"],
}


@pytest.mark.parametrize("case", sorted(LOCK_CASES))
def test_nodes_lock_their_images_as_qemu_does(tmp_path: Path, linux, case: str) -> None:
    """The lock bytes (QEMU's permission protocol, read from /proc/locks) each VMM holds on the
    images, once it answers QMP with the machine built (-S)."""
    from support.locks import locked_bytes

    seen = {}
    for kind in KINDS:
        img, raw = tmp_path / f"{kind}.qcow2", tmp_path / f"{kind}.raw"
        _qemu_img("create", "-q", "-f", "qcow2", str(img), "1M")
        raw.write_bytes(bytes(1 << 20))
        vm = Vm(kind, linux, tmp_path / kind, "-S", *LOCK_CASES[case](img, raw))
        try:
            (status,) = asyncio.run(_qmp(vm, ["query-status"]))
            assert status["status"] == "prelaunch", vm.fail(str(status))
            seen[kind] = (sorted(locked_bytes(img)), sorted(locked_bytes(raw)))
        finally:
            vm.close()
    assert seen["pyvmm"] == seen["qemu"]


def _normalized(value: Any, names: dict[str, str]) -> Any:
    """``value`` with generated node names (``#blockNNN``, random in QEMU) numbered by first
    appearance, -snapshot's temporary file names made one, and the idle time (a clock reading)
    dropped."""
    if isinstance(value, dict):
        return {k: _normalized(v, names) for k, v in value.items() if k != "idle_time_ns"}
    if isinstance(value, list):
        return [_normalized(v, names) for v in value]
    if isinstance(value, str) and value.startswith("#block"):
        return names.setdefault(value, f"#generated{len(names)}")
    if isinstance(value, str):
        return re.sub(r'[^"\s]*/vl\.\w+', "TMPDIR/vl.XXXXXX", value)
    return value


GRAPHS = {
    "explicit-backing-chain": lambda d: [
        "-blockdev", f"driver=file,filename={d}/base.raw,node-name=bs,read-only=on",
        "-blockdev", "driver=raw,file=bs,node-name=bf,read-only=on",
        "-blockdev", f'{{"driver":"file","filename":"{d}/top.qcow2","node-name":"ts","auto-read-only":true}}',
        "-blockdev", '{"driver":"qcow2","file":"ts","node-name":"tf","backing":"bf","cache":{"no-flush":true}}',
        "-device", "virtio-blk-pci,drive=tf,id=disk1,addr=0x5"],
    "drive-with-header-chain": lambda d: [
        "-drive", f"file={d}/top.qcow2,format=qcow2,if=none,id=d0", "-device", "virtio-blk-pci,drive=d0,id=vd0",
        "-drive", f"file={d}/other.qcow2,if=none,id=d1,readonly=on"],
    "snapshot-on": lambda d: [
        "-drive", f"file={d}/top.qcow2,format=qcow2,if=none,id=d0,snapshot=on", "-device", "virtio-blk-pci,drive=d0",
        "-drive", f"file={d}/base.raw,format=raw,if=none,id=d1,readonly=on,snapshot=on"],
    "backing-null-and-inline-file": lambda d: [
        "-blockdev", f"driver=qcow2,node-name=q,backing=,file.driver=file,file.filename={d}/top.qcow2",
        "-device", "virtio-blk-pci,drive=q,id=disk2,bootindex=1"],
}


@pytest.mark.parametrize("graph", sorted(GRAPHS))
def test_block_queries_match_qemus_answers(tmp_path: Path, linux, graph: str) -> None:
    """query-block, query-named-block-nodes and query-blockstats, whole, on the same images (both
    VMMs start paused, so nothing is written): equal but for the generated node names."""
    (tmp_path / "base.raw").write_bytes(os.urandom(1 << 16) + bytes((4 << 20) - (1 << 16)))
    _qemu_img("create", "-q", "-f", "qcow2", "-b", str(tmp_path / "base.raw"), "-F", "raw",
              str(tmp_path / "top.qcow2"))
    _qemu_img("create", "-q", "-f", "qcow2", str(tmp_path / "other.qcow2"), "2M")
    answers = {}
    for kind in KINDS:
        vm = Vm(kind, linux, tmp_path / kind, "-S", *GRAPHS[graph](tmp_path))
        try:
            answers[kind] = _normalized(asyncio.run(_qmp(vm, ["query-block", "query-named-block-nodes",
                                                              "query-blockstats"])), {})
        finally:
            vm.close()
    for what, pv, qe in zip(("query-block", "query-named-block-nodes", "query-blockstats"), answers["pyvmm"],
                            answers["qemu"], strict=True):
        assert pv == qe, f"{what}:\npyvmm {json.dumps(pv, sort_keys=True)}\nqemu  {json.dumps(qe, sort_keys=True)}"
