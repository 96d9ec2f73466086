"""Memory back-ends: -object memory-backend-{ram,memfd,file}, -machine memory-backend=, -numa node,memdev=.

The options end up in MachineConfig; GuestMemory then maps RAM from the back-end, and a memfd
with share=on is visible to anyone who maps the same file (what a vhost-user back-end does).
"""

from __future__ import annotations

import json
import mmap
import os

import pytest

from pyvmm.cli import configure, parse_run_args
from pyvmm.errors import ConfigError, PyvmmError
from pyvmm.memory import GuestMemory, RamBackend
from pyvmm.x86 import layout


def cfg(*argv: str):
    return configure(parse_run_args(list(argv)))[0]


MEMFD = "memory-backend-memfd,id=mem,size=64M,share=on"


@pytest.mark.parametrize("extra", [["-machine", "memory-backend=mem"], ["-numa", "node,memdev=mem"],
                                   ["-machine", "pc,memory-backend=mem", "-m", "64M"],
                                   ["-numa", "node,nodeid=0,memdev=mem", "-m", "64"]])
def test_machine_ram_comes_from_the_backend(extra):
    c = cfg("-object", MEMFD, *extra)
    assert c.memory == 64 << 20
    assert c.memory_backend == RamBackend("mem", "memfd", 64 << 20, share=True)


def test_json_object_and_file_backend(tmp_path):
    obj = json.dumps({"qom-type": "memory-backend-file", "id": "m1", "size": 16 << 20, "mem-path": str(tmp_path),
                      "share": True})
    c = cfg("-object", obj, "-machine", "memory-backend=m1")
    assert c.memory_backend == RamBackend("m1", "file", 16 << 20, share=True, mem_path=str(tmp_path))


def test_an_unused_backend_is_accepted():
    assert cfg("-object", MEMFD).memory_backend is None


@pytest.mark.parametrize("argv,msg", [
    (["-object", "memory-backend-memfd,id=mem"], "-object memory-backend-memfd,id=mem: Parameter 'size' is missing"),
    (["-object", "memory-backend-memfd,id=mem,size=64M,bogus=1"], "Invalid parameter 'bogus'"),
    (["-object", "memory-backend-file,id=mem,size=64M"], "Parameter 'mem-path' is missing"),
    (["-object", "memory-backend-memfd,size=64M"], "Parameter 'id' is missing"),
    (["-object", MEMFD, "-machine", "memory-backend=mem", "-m", "128M"],
     "Machine memory size does not match the size of the memory backend"),
    (["-object", MEMFD, "-machine", "memory-backend=nope"], "Memory backend 'nope' not found"),
    (["-machine", "memory-backend=mem"], "Memory backend 'mem' not found"),
    (["-object", MEMFD, "-numa", "node,memdev=mem", "-m", "128M"],
     r"total memory for NUMA nodes \(0x4000000\) should equal RAM size \(0x8000000\)"),
    (["-numa", "node,memdev=nope"], "-numa node,memdev=nope: memdev=nope is ambiguous"),
    (["-object", MEMFD, "-numa", "node,memdev=mem", "-machine", "memory-backend=mem"],
     "'-machine memory-backend' and '-numa memdev' properties are mutually exclusive"),
    (["-object", MEMFD, "-object", MEMFD], "Duplicate ID 'mem' for object"),
    (["-object", MEMFD, "-numa", "node,memdev=mem", "-numa", "node,memdev=mem"],
     "memory backend mem can't be used multiple times"),
    (["-numa", "node,mem=64M"], "Parameter -numa node,mem is not supported"),
    (["-numa", "bogus"], "-numa bogus: Parameter 'type' does not accept value 'bogus'"),
    (["-object", MEMFD, "-numa", "node,memdev=mem,bogus=1"], "Invalid parameter 'bogus'"),
    (["-object", "rng-random,id=r"], "-object rng-random,id=r: pyvmm cannot honour -object rng-random"),
    (["-object", "memory-backend-memfd,id=mem,size=64M,hugetlb=on"], "pyvmm cannot honour hugetlb=on"),
    (["-object", "memory-backend-memfd,id=mem,size=0"], "can't create backend with size 0"),
    (["-object", MEMFD, "-machine", "memory-backend=mem", "-mem-path", "/tmp"], "-mem-path: cannot be used"),
])
def test_errors_follow_qemu(argv, msg):
    with pytest.raises(ConfigError, match=msg):
        cfg(*argv)


def test_memfd_backend_is_shared_with_another_mapping():
    mem = layout.pc_memory(64 << 20, backend=RamBackend("mem", "memfd", 64 << 20, share=True))
    try:
        assert mem.shareable
        region = mem.regions[0]
        assert region.fd >= 0 and region.fd_offset == 0
        other = mmap.mmap(region.fd, 4096, flags=mmap.MAP_SHARED, offset=0x1000)
        mem.write(0x1000, b"from the guest")
        assert other[:14] == b"from the guest"
        other[:4] = b"back"
        assert mem.read(0x1000, 4) == b"back"
        other.close()
    finally:
        mem.close()


def test_private_backends_are_not_shareable(tmp_path):
    for backend in (RamBackend("m", "memfd", 8 << 20), RamBackend("m", "ram", 8 << 20, share=True),
                    RamBackend("m", "file", 8 << 20, mem_path=str(tmp_path / "ram"))):
        mem = GuestMemory(8 << 20, backend=backend)
        try:
            assert not mem.shareable
            mem.write_u32(0x100, 0xDEADBEEF)
            assert mem.read_u32(0x100) == 0xDEADBEEF
        finally:
            mem.close()
    assert os.path.getsize(tmp_path / "ram") == 8 << 20


def test_file_backend_shared_and_split_across_the_hole(tmp_path):
    path = tmp_path / "ram"
    size = 8 << 20
    mem = GuestMemory(size, split=(4 << 20, 16 << 20), backend=RamBackend("m", "file", size, True, str(path)))
    try:
        assert [(r.gpa, r.size, r.fd_offset) for r in mem.regions] == [(0, 4 << 20, 0), (16 << 20, 4 << 20, 4 << 20)]
        mem.write(16 << 20, b"high")
        with open(path, "rb") as f:
            f.seek(4 << 20)
            assert f.read(4) == b"high"
    finally:
        mem.close()


def test_size_mismatch_is_refused():
    with pytest.raises(PyvmmError, match="does not match"):
        GuestMemory(8 << 20, backend=RamBackend("m", "memfd", 16 << 20))
