"""``-smp`` topology as a Linux guest sees it, under pyvmm (tcg) and under QEMU (tcg).

The same kernel, initramfs and ``-smp`` go to both; the guest prints, per CPU, what
Linux derived from the APIC ids (MADT) and the CPUID topology leaves (1, 4, 0xB, 0x1F):
``/sys/devices/system/cpu/cpu*/topology`` and the topology lines of ``/proc/cpuinfo``.
QEMU runs its Skylake-Client model, the Intel CPU unicorn's model also is, so that Linux
takes the same (Intel) topology path in both.  The outputs must be identical.

Sparse APIC ids (3 cores per package take 2 bits) and ``maxcpus`` above ``cpus`` are
checked under pyvmm alone, against the encoding: QEMU 7.2's TCG with this guest stalls
(RCU stall on the CPU with APIC id 4, no shell within minutes) whenever the ids are
sparse, with or without ``thread=single``, while the dense topologies boot in seconds.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading

import pytest

from pyvmm.guestkit import default_guest

SCRIPT = ("for c in /sys/devices/system/cpu/cpu[0-9]*; do t=$c/topology; "
          "echo T $(basename $c) pkg=$(cat $t/physical_package_id) die=$(cat $t/die_id) "
          "core=$(cat $t/core_id) thr=$(cat $t/thread_siblings_list) pkgcpus=$(cat $t/core_siblings_list); done; "
          "grep -E 'vendor_id|physical id|siblings|core id|cpu cores|apicid' /proc/cpuinfo "
          "| tr -d '\\t' | sed 's/^/C /'; "
          "echo P possible=$(cat /sys/devices/system/cpu/possible) present=$(cat /sys/devices/system/cpu/present)")
TIMEOUT = 240


def _report(stdout: str) -> list[str]:
    return [line.rstrip() for line in stdout.splitlines() if line[:2] in ("T ", "C ", "P ")]


def _boot(which: str, smp: str, out: dict[str, subprocess.CompletedProcess[str]]) -> None:
    g = default_guest()
    append = f'{g.cmdline} quiet pyvmm_run="{SCRIPT}"'
    if which == "qemu":
        qemu = shutil.which("qemu-system-x86_64")
        assert qemu, "qemu-system-x86_64 is needed: apt-get install qemu-system-x86"
        cmd = [qemu, "-accel", "tcg", "-cpu", "Skylake-Client", "-m", "512", "-nographic", "-no-reboot",
               "-nodefaults", "-serial", "stdio", "-smp", smp]
    else:
        cmd = [sys.executable, "-m", "pyvmm", "run", "--accel", "tcg", "-m", "512M", "--smp", smp]
    cmd += ["-kernel", str(g.kernel), "-initrd", str(g.initrd), "-append", append]
    out[which] = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=TIMEOUT)


def _check(r: subprocess.CompletedProcess[str]) -> list[str]:
    assert "pyvmm-guest: exit status 0" in r.stdout, f"{r.args}\n{r.stdout[-3000:]}\n{r.stderr[-2000:]}"
    return _report(r.stdout)


@pytest.mark.slow
@pytest.mark.parametrize("smp", [
    "4,sockets=2,cores=2,threads=1",
    "4,sockets=1,cores=2,threads=2",
    "4,sockets=1,dies=2,cores=2,threads=1",   # leaf 0x1F with a die level
])
def test_guest_sees_the_same_topology_as_under_qemu(smp: str) -> None:
    out: dict[str, subprocess.CompletedProcess[str]] = {}
    threads = [threading.Thread(target=_boot, args=(w, smp, out)) for w in ("qemu", "pyvmm")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(out) == {"qemu", "pyvmm"}, "a boot raised (see the thread's traceback above)"
    ours, theirs = _check(out["pyvmm"]), _check(out["qemu"])
    ncpus = int(smp.split(",")[0])
    assert sum(line.startswith("T ") for line in theirs) == ncpus, theirs
    assert ours == theirs


@pytest.mark.slow
def test_sparse_apic_ids_and_maxcpus_above_cpus() -> None:
    # 2 packages of 3 cores: the core number takes 2 bits, so package 1 starts at APIC id 4.
    # 4 CPUs present of 6: the MADT's not-enabled entries make CPUs 4 and 5 possible.
    out: dict[str, subprocess.CompletedProcess[str]] = {}
    _boot("pyvmm", "4,sockets=2,cores=3,maxcpus=6", out)
    report = _check(out["pyvmm"])
    assert "P possible=0-5 present=0-3" in report, report
    assert [line for line in report if line.startswith("C apicid")] == [f"C apicid: {a}" for a in (0, 1, 2, 4)]
    assert [line for line in report if line.startswith("T ")] == [
        "T cpu0 pkg=0 die=0 core=0 thr=0 pkgcpus=0-2",
        "T cpu1 pkg=0 die=0 core=1 thr=1 pkgcpus=0-2",
        "T cpu2 pkg=0 die=0 core=2 thr=2 pkgcpus=0-2",
        "T cpu3 pkg=1 die=0 core=0 thr=3 pkgcpus=3",
    ], report
    assert "C cpu cores: 1" in report and "C cpu cores: 3" in report, report
