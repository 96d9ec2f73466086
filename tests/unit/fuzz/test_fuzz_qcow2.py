"""Fuzz target: qcow2 headers and tables, opened from mutated images and then used as a disk.

Seed images come from ``qemu-img create``/``qemu-io`` (v3 with 64 KiB clusters, v2 with 512-byte
clusters, v3 with 4 KiB clusters on a raw backing file), each with data written so that L2 tables
and refcount blocks exist.  Hypothesis mutates them: header fields set to edge values (version,
cluster bits, size, L1/refcount table offsets and sizes, feature bits, refcount order, header
length, backing file name: missing, the image itself, a directory), L1/L2/refcount table entries
pointed at metadata, unaligned places, past the end of the file or 2**56, flags flipped, header
extensions, random bytes.  The image is opened (read-write or read-only) and then read, written,
discarded, zeroed and flushed at random offsets.

Asserted: opening and every request either work or raise :class:`BlockError` (pyvmm's one-line
error); no other exception, no allocation that grows with the values in the image (the target runs
under an address-space limit); nothing is written outside the image (its backing file and the
other files are unchanged; the image grows only by what the requests allocate).
"""

from __future__ import annotations

import hashlib
import os
import resource
import shutil
import struct
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import strategies as st

from pyvmm.block import BlockError
from pyvmm.block.qcow2 import Qcow2Image

FIELDS = {  # header field -> (offset, struct format)
    "version": (4, ">I"), "backing_offset": (8, ">Q"), "backing_len": (16, ">I"), "cluster_bits": (20, ">I"),
    "size": (24, ">Q"), "crypt": (32, ">I"), "l1_size": (36, ">I"), "l1_offset": (40, ">Q"),
    "rt_offset": (48, ">Q"), "rt_clusters": (56, ">I"), "nb_snapshots": (60, ">I"), "snap_offset": (64, ">Q"),
    "incompat": (72, ">Q"), "compat": (80, ">Q"), "autoclear": (88, ">Q"), "refcount_order": (96, ">I"),
    "header_len": (100, ">I"),
}
OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00
SEEDS = ("v3-64k", "v2-512", "v3-4k-backing")


def _run(*cmd: str) -> None:
    exe = shutil.which(cmd[0])
    if exe is None:
        pytest.fail(f"{cmd[0]} is missing: apt-get install qemu-utils", pytrace=False)
    r = subprocess.run([exe, *cmd[1:]], capture_output=True, text=True)
    assert r.returncode == 0, f"{' '.join(cmd)}: {r.stderr or r.stdout}"


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    d = tmp_path_factory.mktemp("qcow2-seeds")
    out = {}
    for name, opts, size, writes in (
            ("v3-64k", "cluster_size=65536", "4M", ["write -P 0xab 0 64k", "write -P 0xcd 1M 4k",
                                                     "write -z 2M 64k"]),
            ("v2-512", "compat=0.10,cluster_size=512", "1M", ["write -P 0x11 0 4k", "write -P 0x22 300k 1k",
                                                               "write -P 0x33 900k 512"]),
            ("v3-4k-backing", "cluster_size=4096,backing_file=base.raw,backing_fmt=raw", "1M",
             ["write -P 0x44 4k 8k", "write -P 0x55 512k 4k"])):
        if "backing" in name:
            (d / "base.raw").write_bytes(bytes(range(256)) * 4096)
        path = d / f"{name}.qcow2"
        _run("qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, str(path), size)
        for w in writes:
            _run("qemu-io", "-f", "qcow2", "-c", w, str(path))
        out[name] = path.read_bytes()
    return out


def _header(image: bytes) -> dict[str, int]:
    return {k: struct.unpack_from(fmt, image, off)[0] for k, (off, fmt) in FIELDS.items()}


interesting_u64 = st.sampled_from([0, 1, 8, 0x200, 0x1000, 0x10000, 0x20000, 0x30000, 0x40000, 0x50000, 0xFFFF_FFFF,
                                   1 << 40, 1 << 55, OFFSET_MASK, (1 << 63), (1 << 64) - 1])
field_value = st.one_of(interesting_u64, st.integers(0, 70), st.integers(0, (1 << 64) - 1))
_flags = st.sampled_from([1 << 63, 1 << 63, 0, 1 << 62, 1, (1 << 63) | 1])
#: A table entry: a cluster of the file (metadata or data), one past its end, far past it, or anything.
entry_value = st.one_of(
    st.builds(lambda c, flags: (c << 9) | flags, st.integers(0, 4096), _flags),
    st.builds(lambda c, flags: (c << 16) | flags, st.integers(0, 64), _flags),
    st.builds(lambda c, flags: c | flags, st.sampled_from([1 << 40, 1 << 48, 0x00FF_FFFF_FFFF_0000, 1 << 30]), _flags),
    interesting_u64, st.integers(0, (1 << 64) - 1))

_field = st.tuples(st.just("field"), st.sampled_from(sorted(FIELDS)), field_value)
_table = st.tuples(st.just("table"), st.sampled_from(["l1", "l2", "l2", "rt", "refblock"]),
                   st.sampled_from([0, 0, 1, 2, 3]) | st.integers(0, 40), entry_value)
_backing = st.tuples(st.just("backing"), st.sampled_from(["missing", "self", "dir", "long", "nul", "other-qcow2"]))
_ext = st.tuples(st.just("ext"), st.sampled_from([0xE2792ACA, 0x44415441, 0x6803F857, 0x12345678]),
                 st.sampled_from([0, 4, 8, 100, 0xFFFF_FFFF]), st.binary(max_size=16))
_bytes = st.tuples(st.just("bytes"), st.integers(0, 0x60000), st.binary(min_size=1, max_size=16))
_MUTATIONS = {"field": _field, "table": _table, "backing": _backing, "ext": _ext, "bytes": _bytes}
#: Table entries are mutated most often: a header field mutation mostly just makes the open fail.
mutation_st = st.sampled_from(["table"] * 4 + ["field"] * 2 + ["backing", "ext", "bytes"]).flatmap(_MUTATIONS.get)
#: (request, where, length): ``where`` is a byte offset, or ("cluster", n, delta) for guest cluster
#: n of the image (the clusters the mutated L2 entries describe) plus delta bytes.
op_st = st.tuples(st.sampled_from(["read", "read", "write", "write", "discard", "zeroes", "zeroes-unmap", "flush"]),
                  st.sampled_from(["cluster"] * 3 + ["byte", "edge", "far"]).flatmap(lambda k: {
                      "cluster": st.tuples(st.just("cluster"), st.sampled_from([0, 0, 1, 2, 3]) | st.integers(0, 40),
                                           st.sampled_from([0, 0, 512, 4096])),
                      "byte": st.integers(0, 4 << 20),
                      "edge": st.sampled_from([0, 512, 0x10000, 1 << 20, (4 << 20) - 512]),
                      "far": st.integers(0, 1 << 60)}[k]),
                  st.one_of(st.integers(0, 0x30000), st.sampled_from([512, 4096, 0x10000])))


def _put(buf: bytearray, off: int, data: bytes) -> None:
    if off + len(data) > len(buf):
        buf.extend(bytes(off + len(data) - len(buf)))
    buf[off:off + len(data)] = data


def mutate(image: bytes, mutations, directory: Path) -> bytes:
    buf = bytearray(image)
    h = _header(image)
    cs = 1 << h["cluster_bits"]
    for m in mutations:
        kind = m[0]
        if kind == "field":
            off, fmt = FIELDS[m[1]]
            _put(buf, off, struct.pack(fmt, m[2] & ((1 << (8 * struct.calcsize(fmt))) - 1)))
        elif kind == "table":
            _, table, index, value = m
            if table == "l1":
                base = h["l1_offset"] + 8 * (index % max(h["l1_size"], 1))
            elif table == "rt":
                base = h["rt_offset"] + 8 * (index % (h["rt_clusters"] * cs // 8))
            elif table == "l2":
                l1 = struct.unpack_from(">Q", image, h["l1_offset"])[0] & OFFSET_MASK
                base = (l1 or 3 * cs) + 8 * (index % (cs // 8))
            else:
                rb = struct.unpack_from(">Q", image, h["rt_offset"])[0] & OFFSET_MASK
                base = (rb or 2 * cs) + 2 * (index % (cs // 2))
                _put(buf, base, struct.pack(">H", value & 0xFFFF))
                continue
            _put(buf, base, struct.pack(">Q", value))
        elif kind == "backing":
            name = {"missing": b"no-such-file", "self": b"image.qcow2", "dir": b".", "long": b"x" * 1100,
                    "nul": b"base\0raw", "other-qcow2": b"other.qcow2"}[m[1]]
            off = 0x180 if cs > 0x200 else 0x100
            _put(buf, off, name)
            _put(buf, 8, struct.pack(">QI", off, len(name)))
        elif kind == "ext":
            _, etype, elen, data = m
            start = h["header_len"] if h["version"] == 3 else 72
            _put(buf, start, struct.pack(">II", etype, elen) + data)
        else:
            _put(buf, m[1], m[2])
    return bytes(buf)


@contextmanager
def address_space_limit(extra: int) -> Iterator[None]:
    """Cap this process's address space at its current size plus ``extra`` bytes, so that an
    allocation sized by a value in the image fails with MemoryError instead of exhausting the host."""
    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (vm + extra, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _digest(path: Path) -> str:
    if path.is_dir():
        return "dir"
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_case(sc, seeds: dict[str, bytes], d: Path) -> None:
    seed, mutations, read_only, ops = sc
    for p in d.iterdir():
        if p.is_dir():
            p.rmdir()
        else:
            p.unlink()
    image = d / "image.qcow2"
    (d / "base.raw").write_bytes(bytes(range(256)) * 4096)
    (d / "other.qcow2").write_bytes(seeds["v2-512"])
    (d / "sub").mkdir()
    data = mutate(seeds[seed], mutations, d)
    image.write_bytes(data)
    others = {p.name: _digest(p) for p in d.iterdir() if p != image}
    cluster_bits = struct.unpack_from(">I", data, 20)[0]
    cs = 1 << min(cluster_bits, 21)
    img = None
    with address_space_limit(768 << 20):
        try:
            img = Qcow2Image(str(image), read_only=read_only, locking="off")
        except BlockError:
            pass
        if img is not None:
            try:
                for kind, where, length in ops:
                    offset = where[1] * cs + where[2] if isinstance(where, tuple) else where
                    offset -= offset % 512
                    length -= length % 512
                    try:
                        if kind == "read":
                            img.readv([memoryview(bytearray(length))], offset)
                        elif kind == "write":
                            img.writev([memoryview(bytes([0x5E]) * length)], offset)
                        elif kind == "discard":
                            img.discard(offset, length)
                        elif kind == "zeroes":
                            img.write_zeroes(offset, length, False)
                        elif kind == "zeroes-unmap":
                            img.write_zeroes(offset, length, True)
                        else:
                            img.flush()
                    except BlockError:
                        pass
            finally:
                img.close()
    assert {p.name: _digest(p) for p in d.iterdir() if p != image} == others, "a file other than the image changed"
    writes = sum(1 for k, _, _ in ops if k != "read")
    allowance = len(data) + (writes + 1) * (8 * cs + 4 * (0x30000 + cs)) + (1 << 20)
    size = os.stat(image).st_size
    assert size <= allowance, f"the image grew to {size} bytes (from {len(data)}): written outside the file?"
    if read_only:
        assert image.read_bytes() == data, "a read-only open changed the image"


def test_fuzz_qcow2_images(fuzz, seeds, tmp_path: Path) -> None:
    scenario = st.tuples(st.sampled_from(SEEDS), st.lists(mutation_st, min_size=1, max_size=4), st.booleans(),
                         st.lists(op_st, min_size=1, max_size=12))
    fuzz.run("qcow2-images", scenario, lambda sc: run_case(sc, seeds, tmp_path))
