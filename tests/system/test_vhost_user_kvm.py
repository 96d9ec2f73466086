"""vhost-user on real KVM: guest kicks reach the back end by ioeventfd and its calls reach the guest
by irqfd (an MSI route), with no exit to pyvmm on either side.

The purpose-built guest of test_pci_kvm.py (protected mode, MSI-X vector 0 -> LAPIC vector 0x41)
drives a vhost-user-fs-pci device instead of virtio-rng: it posts one device-writable buffer on
queue 0 and waits for the MSI.  The back end (tests/support/vhost_backend.py) runs that queue
from the memfd it was given: random bytes, the used ring, the call eventfd.
"""

from __future__ import annotations

import re

import test_pci_kvm as rng_test

from conftest import guest_build, run_pyvmm_kvm
from support.vhost_backend import RingBackend


def _build(tmp_path):
    src = tmp_path / "vhost_msix.c"
    src.write_text(rng_test.GUEST_C.replace("0x10441af4u", "0x105a1af4u"))  # virtio-fs: 0x1040 + 26
    b = guest_build
    work = tmp_path / "obj"
    work.mkdir()
    objs = [work / "entry.o", work / "lib.o", work / "main.o", work / "stubs.o"]
    b._cc(b.SRC / "mb_entry.S", objs[0], b.CFLAGS_32)
    b._cc(b.SRC / "guestlib.c", objs[1], b.CFLAGS_32)
    b._cc(src, objs[2], b.CFLAGS_32)
    b._cc(b.SRC / "irq_stubs.S", objs[3], b.CFLAGS_32)
    out = tmp_path / "vhost_msix.elf"
    b._link(objs, b.LD_DIR / "multiboot.ld", out, "elf_i386")
    return out


def test_kick_by_ioeventfd_and_call_by_irqfd(kvm, tmp_path):
    guest = _build(tmp_path)
    sock = tmp_path / "vu.sock"
    backend = RingBackend(str(sock))
    try:
        r = run_pyvmm_kvm("-v", "-v", "--kernel", guest, "--serial", "stdio", "-m", "64M",
                          "-object", "memory-backend-memfd,id=mem,size=64M,share=on", "-machine", "memory-backend=mem",
                          "-chardev", f"socket,id=vu,path={sock}", "-device", "vhost-user-fs-pci,chardev=vu,tag=t",
                          timeout=120)
    finally:
        backend.close()
    vals = dict(re.findall(r"^(\w+)=(\S+)$", r.serial, re.M))
    assert backend.error == "", backend.error
    assert vals.get("used_idx") == "1" and vals.get("used_len") == "64", r.describe()
    assert int(vals["nonzero"]) > 32, r.describe()  # the back end wrote the buffer through the memfd
    assert vals["msis"] != "0" and vals["unexpected"] == "0", r.describe()
    assert int(vals["isr"], 16) == 0, r.describe()  # pyvmm relayed nothing: a relayed call sets the ISR bit
    assert backend.kicks >= 1 and backend.served == 1
    assert "queue 0 calls reach the guest by irqfd" in r.stderr, r.stderr[-3000:]
    assert "notify ioeventfds at" in r.stderr, r.stderr[-3000:]
    assert r.returncode == ((0x21 << 1) | 1), r.describe()
