"""SMP on the tcg accelerator: vCPUs as unicorn engines taking turns (accel/tcg/turns.py).

* a hand-assembled pair of CPUs: the BSP starts the AP with INIT/SIPI, then rewrites code
  the AP keeps running; the AP must pick the new code up (code protection shared between
  engines, pvtcg.c "several engines") -- and, with the sharing switched off, it does not;
  the BSP's `pause` loop gives its turn to the waiting AP (pause-loop exiting);
* the SMP test guest from ``tests/support/guests`` (the one the KVM tests run): APs start, restart
  after a triple fault, IPIs wake halted CPUs, a triple fault on an AP resets the machine,
  and every CPU hammers devices at once;
* the stock Debian kernel with ``-smp 2``: both CPUs online, a process pinned to CPU 1
  runs there, and parallel work on both CPUs computes the same checksums as one CPU.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from qemu.qmp import QMPClient
from test_guests_tcg import run_tcg
from test_tcg_cpu import _map_apic_window

from conftest import debug_exit_status, run_pyvmm
from pyvmm.guestkit import default_guest
from support.guestconsole import SocketConsole, wait_for_file
from support.tcg_guestlib import CODE_ADDR, Harness, assemble

SMP_MPTABLE_OK = 0x10
SMP_REBOOTED = 0x20
SMP_MODE_OK = 0x40

AP_TRAMPOLINE = 0x8000          # SIPI vector 0x08
AP_FUNC = 0x9000                # the code the BSP rewrites, on its own page
AP_REPORT = 0x7000              # where the AP stores what the function returned


def _cross_cpu_code_write(shared: bool) -> tuple[list[int], dict[str, int]]:
    bsp = r"""
    .code64
        movabs $0xfee00000, %rbx
        movl $0x01000000, 0x310(%rbx)   # ICR high: APIC id 1
        movl $0x00004500, 0x300(%rbx)   # INIT
        movl $0x01000000, 0x310(%rbx)
        movl $0x00004608, 0x300(%rbx)   # Startup IPI, vector 0x08: real mode at 0x8000
        mov $200000000, %ecx
    1:  cmpw $1, 0x7000                 # the AP ran the old function
        je 2f
        pause
        dec %ecx
        jnz 1b
    2:  movzwl 0x7000, %eax
        out %eax, $0xe0
        movl $0xc30002b8, 0x9000        # rewrite it: mov $2, %ax; ret
        mov $3000000, %ecx              # (the AP gets many turns meanwhile)
    3:  cmpw $2, 0x7000
        je 4f
        pause
        dec %ecx
        jnz 3b
    4:  movzwl 0x7000, %eax
        out %eax, $0xe0
        out %eax, $0xe4
    5:  hlt
        jmp 5b
    """
    ap = r"""
    .code16
    1:  call 0x1000                     # AP_FUNC, relative to CS base 0x8000
        movw %ax, 0x7000
        jmp 1b
    """
    h = Harness(ncpus=2)
    code, _ = assemble(bsp, CODE_ADDR)
    h.load(code)
    h.load(assemble(ap, 0)[0], AP_TRAMPOLINE)     # linked at IP 0: CS base is 0x8000
    h.load(bytes.fromhex("b80100c3"), AP_FUNC)      # mov $1, %ax; ret
    st = h.long_mode_state()        # (writes the page tables)
    _map_apic_window(h)
    lib = h.accel.vcpus[0].nat.lib
    lib.pv_set_engines_shared(1 if shared else 0)
    try:
        return h.run(st, timeout=60), h.accel.vcpus[0].stats
    finally:
        lib.pv_set_engines_shared(1)


def test_code_written_by_one_cpu_reaches_code_another_cpu_translated() -> None:
    vals, bsp = _cross_cpu_code_write(shared=True)
    assert vals == [1, 2]
    # the BSP waits with `pause` while the AP waits for its turn: it gives the turn up there
    assert bsp["pause_yields"] > 0, bsp
    # without the shared protection the AP keeps running its stale translation
    assert _cross_cpu_code_write(shared=False)[0] == [1, 1]


def _smp(guests, ncpus: int, append: str = ""):
    return run_tcg("--smp", str(ncpus), "--kernel", guests["smp"], *(["--append", append] if append else []),
                   timeout=120)


@pytest.mark.parametrize("ncpus", [2, 4])
def test_smp_guest_aps_start(guests, ncpus):
    r = _smp(guests, ncpus)
    mask = (1 << ncpus) - 1
    assert r.returncode == debug_exit_status(SMP_MPTABLE_OK | mask), r.describe()
    for apic_id in range(1, ncpus):
        assert f"AP apic_id={apic_id} up" in r.serial, r.describe()


def test_smp_guest_aps_restart_after_a_triple_fault(guests):
    r = _smp(guests, 4, "reboot=1")
    assert r.returncode == debug_exit_status(SMP_REBOOTED | SMP_MPTABLE_OK | 0xF), r.describe()
    assert "boot=1\n" in r.serial and "boot=2\n" in r.serial


def test_smp_guest_triple_fault_on_an_ap_resets_the_machine(guests):
    r = _smp(guests, 2, "reboot=1 apfault=1")
    assert r.returncode == debug_exit_status(SMP_REBOOTED | SMP_MPTABLE_OK | 0x3), r.describe()
    assert "AP 1 triple faults now" in r.serial and "boot=2\n" in r.serial


@pytest.mark.parametrize("mode", ["ipi=1", "stress=800"])
def test_smp_guest_ipis_and_concurrent_device_access(guests, mode):
    r = _smp(guests, 4, mode)
    assert r.returncode == debug_exit_status(SMP_MODE_OK | SMP_MPTABLE_OK | 0xF), r.describe()


@pytest.mark.slow
def test_linux_boots_with_two_cpus_and_uses_both() -> None:
    g = default_guest()
    script = ("echo online=$(cat /sys/devices/system/cpu/online) && "
              "echo pinned=$(taskset -c 1 cut -d' ' -f39 /proc/self/stat) && "
              "dd if=/dev/urandom of=/tmp/data bs=64k count=64 2>/dev/null && sha256sum /tmp/data > /tmp/one && "
              "(taskset -c 0 sha256sum /tmp/data > /tmp/s0 & taskset -c 1 sha256sum /tmp/data > /tmp/s1 & wait) && "
              "cmp /tmp/one /tmp/s0 && cmp /tmp/one /tmp/s1 && echo same=yes")
    assert '"' not in script        # the kernel's parser keeps only double quotes special
    r = run_pyvmm("--accel", "tcg", "--smp", "2", "-m", "512M", "--kernel", g.kernel, "--initrd", g.initrd,
                  "--append", f'{g.cmdline} quiet pyvmm_run="{script}"', timeout=300)
    out = r.serial
    assert "pyvmm-guest: exit status 0" in out, r.describe()
    assert "online=0-1" in out, r.describe()
    assert re.search(r"^pinned=1$", out, re.M), r.describe()
    assert "same=yes" in out, r.describe()


@pytest.mark.slow
def test_linux_two_cpus_under_qmp_stop_cont_and_reset(tmp_path) -> None:
    """QMP on an SMP tcg machine: one host thread per vCPU in query-cpus-fast, stop/cont, and a
    system_reset after which both CPUs come up again."""
    g = default_guest().with_cmdline("quiet")
    serial, qmp = tmp_path / "serial.sock", tmp_path / "qmp.sock"
    log = tmp_path / "stderr.txt"
    with open(log, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", "pyvmm", "run", "--accel", "tcg", "--smp", "2", "-m", "512M",
                                 "--kernel", str(g.kernel), "--initrd", str(g.initrd), "--append", g.cmdline,
                                 "--serial", f"unix:{serial},server=on,wait=off",
                                 "--qmp", f"unix:{qmp},server=on,wait=off"],
                                stdin=subprocess.DEVNULL, stdout=f, stderr=f)
    try:
        wait_for_file(qmp, 60)
        console = SocketConsole(Path(serial))

        async def body() -> None:
            c = QMPClient("smp-test")
            await c.connect(str(qmp))
            console.wait_for("shell ready", 240)
            cpus = await c.execute("query-cpus-fast")
            tids = [cpu["thread-id"] for cpu in cpus]
            assert len(tids) == 2 and len(set(tids)) == 2, cpus
            assert all(os.path.exists(f"/proc/{proc.pid}/task/{t}") for t in tids), cpus
            await c.execute("stop")
            assert (await c.execute("query-status"))["status"] == "paused"
            await c.execute("cont")
            console.send("echo cpus-$(cat /sys/devices/system/cpu/online)-online\n")
            console.wait_for("cpus-0-1-online", 60)
            start = time.monotonic()
            await c.execute("system_reset")
            while console.text.count("shell ready") < 2:
                assert time.monotonic() - start < 240, console.text[-2000:]
                await asyncio.sleep(0.2)
            console.send("echo again-$(cat /sys/devices/system/cpu/online)-online\n")
            console.wait_for("again-0-1-online", 60)
            await c.execute("quit")
            await c.disconnect()

        try:
            asyncio.run(body())
        except AssertionError as e:
            raise AssertionError(f"{e}\nstderr tail:\n{log.read_text(errors='replace')[-2000:]}") from None
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
