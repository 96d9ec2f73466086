"""-blockdev's grammar (JSON and key=value), the block graph, -snapshot overlays, the QMP block
entries and their I/O counters.  The error texts are QEMU 7.2's, checked against qemu-system-x86_64
in tests/system/test_blockdev_qemu.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from pyvmm.block import BlockError, info
from pyvmm.block.blockdev import parse_blockdev
from pyvmm.block.graph import BlockGraph
from pyvmm.block.qcow2 import Qcow2Image
from pyvmm.block.qcow2_create import create_qcow2
from pyvmm.errors import ConfigError

QEMU_IMG = shutil.which("qemu-img")
STORAGE = '{"driver":"file","filename":"%s","node-name":"libvirt-1-storage","auto-read-only":true,"discard":"unmap"}'
FORMAT = '{"node-name":"libvirt-1-format","read-only":false,"driver":"%s","file":"libvirt-1-storage"}'


def _qemu_img(*args: str) -> str:
    assert QEMU_IMG, "qemu-img is missing (Debian package qemu-utils)"
    return subprocess.run([QEMU_IMG, *args], check=True, capture_output=True, text=True).stdout


def _qcow2(path, size: int = 8 << 20, backing: str | None = None, backing_fmt: str | None = None) -> str:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        create_qcow2(fd, size, backing, backing_fmt)
    finally:
        os.close(fd)
    return str(path)


def _raw(path, size: int = 4 << 20, fill: bytes = b"") -> str:
    with open(path, "wb") as f:
        f.write(fill)
        f.truncate(size)
    return str(path)


def _graph(*texts: str) -> BlockGraph:
    g = BlockGraph()
    for t in texts:
        g.add_blockdev(parse_blockdev(t))
    return g


# -- grammar -----------------------------------------------------------------------------------

def test_libvirt_json_lines_parse_to_a_file_and_a_format_node() -> None:
    (storage,) = parse_blockdev(STORAGE % "/x.qcow2")
    assert (storage.driver, storage.node_name, storage.filename) == ("file", "libvirt-1-storage", "/x.qcow2")
    assert storage.auto_read_only and storage.discard and not storage.read_only
    (fmt,) = parse_blockdev(FORMAT % "qcow2")
    assert (fmt.driver, fmt.file, fmt.read_only, fmt.backing_set) == ("qcow2", "libvirt-1-storage", False, False)


def test_key_value_form_with_an_inline_file_child_and_cache_options() -> None:
    child, top = parse_blockdev("driver=qcow2,node-name=top,file.driver=file,file.filename=/a,,b.img,"
                                "cache.no-flush=on,read-only=on,backing=")
    assert child.driver == "file" and child.filename == "/a,b.img" and child.node_name.startswith("#block")
    assert top.file == child.node_name and top.cache_no_flush and top.read_only
    assert top.backing_set and top.backing is None  # backing="" (like JSON null): no backing file


def test_keyval_booleans_are_qapis() -> None:
    for word, value in (("yes", True), ("true", True), ("y", True), ("no", False), ("off", False)):
        (node,) = parse_blockdev(f"driver=file,filename=/x,node-name=a,read-only={word}")
        assert node.read_only is value


def test_json_nested_file_and_backing_node_name() -> None:
    child, top = parse_blockdev('{"driver":"qcow2","node-name":"t","file":{"driver":"file","filename":"/o"},'
                                '"backing":"base","cache":{"no-flush":true}}')
    assert top.file == child.node_name and top.backing == "base" and top.cache_no_flush
    (none,) = parse_blockdev('{"driver":"qcow2","node-name":"t","file":"f","backing":null}')
    assert none.backing_set and none.backing is None


@pytest.mark.parametrize("text, message", [
    ("node-name=a,filename=/x", "Parameter 'driver' is missing"),
    ("driver=bogus,node-name=a", "Parameter 'driver' does not accept value 'bogus'"),
    ("driver=vmdk,node-name=a,file=f", "pyvmm cannot honour driver 'vmdk'"),
    ("driver=file,node-name=a", "Parameter 'filename' is missing"),
    ("driver=file,filename=/x", "'node-name' must be specified for the root node"),
    ("driver=file,filename=/x,node-name=1a", "Invalid node-name: '1a'"),
    ("driver=file,filename=/x,node-name=" + "a" * 32, "Node name too long"),
    ("driver=file,filename=/x,node-name=a,bogus=1", "Parameter 'bogus' is unexpected"),
    ("driver=file,filename=/x,node-name=a,discard=foo", "Parameter 'discard' does not accept value 'foo'"),
    ("driver=file,filename=/x,node-name=a,cache.direct=maybe", "Parameter 'cache.direct' expects 'on' or 'off'"),
    ("driver=file,filename=/x,node-name=a,cache.direct=on", "pyvmm cannot honour 'cache.direct=on'"),
    ("driver=file,filename=/x,node-name=a,read-only", "Expected '=' after parameter 'read-only'"),
    ("driver=file,filename=/x,node-name=a,aio=native", "pyvmm cannot honour 'aio=native'"),
    ("driver=qcow2,node-name=a", "Parameter 'file' is missing"),
    ("driver=qcow2,node-name=a,file=f,data-file=g", "pyvmm cannot honour 'data-file'"),
    ("driver=raw,node-name=a,file.driver=file", "Parameter 'file.filename' is missing"),
    ('{"driver":"file","filename":"/x","node-name":"a","read-only":"yes"}',
     "Invalid parameter type for 'read-only', expected: boolean"),
    ('{"driver":"file","filename":7,"node-name":"a"}', "Invalid parameter type for 'filename', expected: string"),
    ('{"driver":"file","filename":"/x","node-name":"a","node-name":"b"}', "duplicate key 'node-name'"),
])
def test_bad_options_get_one_line_with_qemus_wording(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_blockdev(text)
    assert str(e.value).startswith(f"-blockdev {text}: ")
    assert message in str(e.value)
    assert "\n" not in str(e.value)


# -- the graph -----------------------------------------------------------------------------------

def test_graph_errors(tmp_path) -> None:
    q = _qcow2(tmp_path / "d.qcow2")
    r = _raw(tmp_path / "d.raw")
    cases = [
        ((f"driver=file,filename={tmp_path}/nope,node-name=a",), f"Could not open '{tmp_path}/nope': No such file"),
        ((f"driver=file,filename={q},node-name=a", f"driver=file,filename={r},node-name=a"),
         "Duplicate nodes with node-name='a'"),
        (("driver=qcow2,file=zz,node-name=a",), "Cannot find device='zz' nor node-name='zz'"),
        ((f"driver=file,filename={r},node-name=a", "driver=qcow2,file=a,node-name=b"), "Image is not in qcow2 format"),
        ((f"driver=file,filename={q},node-name=a,read-only=on", "driver=qcow2,file=a,node-name=b"),
         "Block node is read-only"),
        ((f"driver=qcow2,file.driver=file,file.filename={q},node-name=b,backing=nope",),
         "Could not open backing file: Cannot find device='nope' nor node-name='nope'"),
        ((f"driver=file,filename={q},node-name=a", "driver=qcow2,file=a,node-name=b",
          "driver=qcow2,file=a,node-name=c"),
         "Permission conflict on node 'a': permissions 'write, resize' are both required by node 'b'"),
    ]
    for texts, message in cases:
        with pytest.raises(ConfigError) as e:
            _graph(*texts).close()
        assert str(e.value).startswith(f"-blockdev {texts[-1]}: ") and message in str(e.value), (texts, e.value)


def test_auto_read_only_falls_back_for_a_file_it_cannot_write(tmp_path, monkeypatch) -> None:
    r = _raw(tmp_path / "ro.raw")
    # The tests run as root, who may write any file: the graph is told this one is not writable.
    monkeypatch.setattr("pyvmm.block.graph.os.access", lambda path, mode: mode != os.W_OK)
    g = _graph(f"driver=file,filename={r},node-name=s,auto-read-only=on")
    assert g.nodes["s"].read_only
    with pytest.raises(ConfigError, match="Block node is read-only"):
        g.add_blockdev(parse_blockdev("driver=raw,file=s,node-name=f"))
    with pytest.raises(ConfigError, match=f"Could not open '{r}': Permission denied"):
        _graph(f"driver=file,filename={r},node-name=t")
    g.close()


def test_device_io_is_counted_and_reaches_the_image(tmp_path) -> None:
    q = _qcow2(tmp_path / "d.qcow2")
    g = _graph(STORAGE % q, FORMAT % "qcow2")
    b = g.attach("libvirt-1-format", read_only=False, share_rw=False, qdev="/machine/peripheral/d/virtio-backend")
    assert b.image is not None
    buf = bytearray(b"x" * 4096)
    b.image.writev([memoryview(buf)], 8192)
    out = bytearray(4096)
    b.image.readv([memoryview(out)], 8192)
    b.image.readv([memoryview(out)], 0)
    b.image.flush()
    assert out == bytes(4096)
    s = info.query_blockstats(g)[0]
    assert s["device"] == "" and s["node-name"] == "libvirt-1-format" and s["qdev"].startswith("/machine/peripheral/d")
    st = s["stats"]
    assert (st["wr_bytes"], st["wr_operations"], st["rd_bytes"], st["rd_operations"], st["flush_operations"]) == \
        (4096, 1, 8192, 2, 1)
    assert st["wr_highest_offset"] == 12288 and st["wr_total_time_ns"] > 0 and st["rd_total_time_ns"] > 0
    assert s["parent"]["node-name"] == "libvirt-1-storage" and s["parent"]["driver-specific"]["driver"] == "file"
    # the host file's highest written byte: the data cluster allocated at the end, past the metadata
    assert s["parent"]["stats"]["wr_highest_offset"] >= 4 * 65536 + 4096
    g.close()
    img = Qcow2Image(q, read_only=True)
    got = bytearray(4096)
    img.readv([memoryview(got)], 8192)
    img.close()
    assert got == buf
    assert "No errors were found" in _qemu_img("check", q)


def test_a_second_device_on_one_node_is_a_permission_conflict(tmp_path) -> None:
    g = _graph(STORAGE % _raw(tmp_path / "d.raw"), FORMAT % "raw")
    g.attach("libvirt-1-format", read_only=False, share_rw=False,
             qdev="/machine/peripheral-anon/device[0]/virtio-backend")
    with pytest.raises(ConfigError, match="Permission conflict on node 'libvirt-1-format': permissions 'write' are "
                                          "both required by block device '/machine/peripheral-anon/device.0."):
        g.attach("libvirt-1-format", read_only=False, share_rw=False, qdev="/machine/peripheral-anon/device[1]/x")
    with pytest.raises(ConfigError, match="Property 'virtio-blk-device.drive' can't find value 'zz'"):
        g.attach("zz", read_only=False, share_rw=False, qdev="q")
    g.close()


def test_discard_ignore_drops_guest_discards(tmp_path) -> None:
    r = _raw(tmp_path / "d.raw", fill=b"\xaa" * (1 << 20))
    g = _graph(f"driver=file,filename={r},node-name=s", "driver=raw,file=s,node-name=f")  # discard=ignore
    b = g.attach("f", read_only=False, share_rw=False, qdev="q")
    assert b.image is not None
    b.image.discard(0, 1 << 20)
    s = info.query_blockstats(g)[0]
    assert s["stats"]["unmap_operations"] == 1  # counted where the device asked, as in QEMU
    assert s["parent"]["driver-specific"]["discard-nb-ok"] == 0
    g.close()
    assert open(r, "rb").read(1 << 20) == b"\xaa" * (1 << 20)
    g = _graph(f"driver=file,filename={r},node-name=s", "driver=raw,file=s,node-name=f,discard=unmap")
    b = g.attach("f", read_only=False, share_rw=False, qdev="q")
    assert b.image is not None
    b.image.discard(0, 1 << 20)
    b.image.writev([memoryview(bytearray(512))], 3 << 20)
    s = info.query_blockstats(g)[0]
    assert s["parent"]["driver-specific"] == {"driver": "file", "discard-nb-ok": 1, "discard-nb-failed": 0,
                                              "discard-bytes-ok": 1 << 20}
    assert s["parent"]["stats"]["wr_highest_offset"] == (3 << 20) + 512
    g.close()
    assert open(r, "rb").read(1 << 20) == bytes(1 << 20)


def test_query_entries_have_qemus_fields(tmp_path) -> None:
    q = _qcow2(tmp_path / "d.qcow2", size=64 << 20)
    g = _graph(STORAGE % q, FORMAT % "qcow2")
    g.attach("libvirt-1-format", read_only=False, share_rw=False,
             qdev="/machine/peripheral/virtio-disk0/virtio-backend")
    (blk,) = info.query_block(g)
    assert set(blk) == {"device", "locked", "removable", "type", "io-status", "inserted", "qdev"}
    ins = blk["inserted"]
    assert ins["drv"] == "qcow2" and ins["node-name"] == "libvirt-1-format" and ins["ro"] is False
    assert ins["image"]["virtual-size"] == 64 << 20 and ins["image"]["cluster-size"] == 65536
    assert ins["image"]["format-specific"]["data"]["compat"] == "1.1"
    nodes = info.query_named_block_nodes(g)
    assert [n["node-name"] for n in nodes] == ["libvirt-1-format", "libvirt-1-storage"]
    assert nodes[1]["drv"] == "file" and nodes[1]["image"]["format"] == "file"
    json.dumps([blk, nodes, info.query_blockstats(g)])  # all plain JSON
    g.close()


# -- qcow2 creation and -snapshot -------------------------------------------------------------------

def test_created_qcow2_passes_qemu_img_check_and_names_its_backing(tmp_path) -> None:
    base = _raw(tmp_path / "base.raw", size=3 << 20)
    over = _qcow2(tmp_path / "over.qcow2", size=3 << 20, backing=base, backing_fmt="raw")
    data = json.loads(_qemu_img("info", "--output=json", over))
    assert data["virtual-size"] == 3 << 20 and data["backing-filename"] == base
    assert data["backing-filename-format"] == "raw" and data["format-specific"]["data"]["compat"] == "1.1"
    assert "No errors were found" in _qemu_img("check", over)
    big = _qcow2(tmp_path / "big.qcow2", size=1 << 40)
    assert "No errors were found" in _qemu_img("check", big)


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_snapshot_overlay_takes_the_writes_and_leaves_nothing_behind(tmp_path, monkeypatch, fmt: str) -> None:
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmpdir))
    image = _raw(tmp_path / "d.raw", fill=b"orig" * 1024) if fmt == "raw" else _qcow2(tmp_path / "d.qcow2")
    before = open(image, "rb").read()
    g = BlockGraph()
    g.add_drive("d0", image, fmt, read_only=False, locking="auto", serial="", snapshot=True, text=f"file={image}")
    assert os.listdir(tmpdir) == []  # the overlay is unlinked at once; its fd stays open
    b = g.attach("d0", read_only=False, share_rw=False, qdev="/machine/peripheral-anon/device[0]/virtio-backend")
    assert b.image is not None
    b.image.writev([memoryview(bytearray(b"new!" * 1024))], 0)
    got = bytearray(4096)
    b.image.readv([memoryview(got)], 0)
    assert got == b"new!" * 1024
    (blk,) = info.query_block(g)
    ins = blk["inserted"]
    assert blk["device"] == "d0" and ins["drv"] == "qcow2" and ins["backing_file"] == image
    assert ins["backing_file_depth"] == 1 and ins["cache"]["no-flush"] is True
    g.close()
    assert open(image, "rb").read() == before
    assert os.listdir(tmpdir) == []


def test_a_header_backing_chain_is_listed_as_nodes_and_keeps_its_names(tmp_path) -> None:
    base = _raw(tmp_path / "base.raw")
    mid = _qcow2(tmp_path / "mid.qcow2", size=4 << 20, backing=base, backing_fmt="raw")
    top = _qcow2(tmp_path / "top.qcow2", size=4 << 20, backing=mid, backing_fmt="qcow2")
    g = BlockGraph()
    g.add_drive("d0", top, "qcow2", read_only=False, locking="auto", serial="", snapshot=False, text=f"file={top}")
    names = [n["node-name"] for n in info.query_named_block_nodes(g)]
    assert len(names) == 6  # top's format and file nodes, then mid's and base's
    (blk,) = info.query_block(g)
    assert blk["removable"] is True and "io-status" not in blk and "qdev" not in blk  # no device yet, as QEMU
    g.attach("d0", read_only=False, share_rw=False, qdev="/machine/peripheral/vd0/virtio-backend")
    assert [n["node-name"] for n in info.query_named_block_nodes(g)] == names
    (blk,) = info.query_block(g)
    assert blk["removable"] is False and blk["io-status"] == "ok"
    ins = blk["inserted"]
    assert (ins["backing_file"], ins["backing_file_depth"]) == (mid, 2)
    assert ins["image"]["backing-image"]["backing-image"]["filename"] == base
    chain = info.query_blockstats(g)[0]["backing"]
    assert chain["parent"]["driver-specific"]["driver"] == "file" and "backing" in chain
    drvs = {n["node-name"]: (n["drv"], n["ro"]) for n in info.query_named_block_nodes(g)}
    assert sorted(drvs.values()) == [("file", False), ("file", True), ("file", True), ("qcow2", False),
                                     ("qcow2", True), ("raw", True)]
    g.close()


def test_failed_requests_are_counted_apart(tmp_path) -> None:
    g = _graph(f"driver=file,filename={_raw(tmp_path / 'd.raw')},node-name=s", "driver=raw,file=s,node-name=f")
    b = g.attach("f", read_only=True, share_rw=False, qdev="q")
    assert b.image is not None
    with pytest.raises(BlockError):
        b.image.writev([memoryview(bytearray(512))], 0)  # the image is read-only
    b.image.readv([memoryview(bytearray(512))], 0)
    st = info.query_blockstats(g)[0]["stats"]
    assert (st["failed_wr_operations"], st["wr_operations"], st["rd_operations"], st["wr_bytes"]) == (1, 0, 1, 0)
    assert st["idle_time_ns"] >= 0
    g.close()
