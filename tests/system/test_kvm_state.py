"""KVM state save/restore and dirty logging on the real /dev/kvm (AcceleratorState of KvmAccelerator).

Each migration test runs a small purpose-built guest three ways: uninterrupted, and saved
mid-run from one VM (vCPUs paused: registers, MSRs, LAPIC, events, mp_state, the in-kernel
PIC/IOAPIC/PIT and the KVM clock, and a copy of RAM), then loaded into a fresh VM built by a
second accelerator, which carries on.  The output the guest writes to a port (its "serial
console") before the save plus what the second VM writes must be exactly the uninterrupted
run's: nothing lost, nothing repeated.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
from test_kvm_util import assemble, buses

from pyvmm.accel.base import AcceleratorState, CpuConfig, MachineContext
from pyvmm.accel.kvm import KvmAccelerator
from pyvmm.cpu_state import CR0_ET, CR0_NE, CR0_PE, CpuState, Segment
from pyvmm.errors import AccelError, KvmError
from pyvmm.kvm.ioctls import MpState
from pyvmm.kvm.vcpu_state import MSR_IA32_TSC, unpack_msrs
from pyvmm.memory import GuestMemory
from pyvmm.runstate import VmControl
from pyvmm.vmstate import VmStateError
from support.recording import RecordingDevice
from support.waiting import wait_until

ORG = 0x1000
PORT = 0x510


class Machine:
    """RAM, buses, one recording port (the guest's console) and a KVM accelerator."""

    def __init__(self, ncpus: int = 1) -> None:
        self.mem = GuestMemory(2 << 20)
        self.io_bus, self.mmio_bus = buses()
        self.control = VmControl()
        self.port = RecordingDevice()
        self.io_bus.register(PORT, 4, self.port, "test-port")
        self.ctx = MachineContext(self.mem, self.io_bus, self.mmio_bus, self.control, ncpus,
                                  CpuConfig.parse("host"))
        self.acc = KvmAccelerator()

    def values(self) -> list[int]:
        return [v for _, _, v in self.port.writes]

    def close(self) -> None:
        self.acc.close()
        self.mem.close()


@pytest.fixture
def machines() -> Iterator[list[Machine]]:
    made: list[Machine] = []
    yield made
    for m in made:
        m.close()


def host_honours_tsc_writes() -> bool:
    """Whether KVM here lets the host move a guest's TSC (not so where the guest TSC is the host's)."""
    from pyvmm.kvm.system import System

    with System() as kvm:
        vm = kvm.create_vm()
        try:
            vcpu = vm.create_vcpu(0)
            now = vcpu.get_msrs([MSR_IA32_TSC])[MSR_IA32_TSC]
            vcpu.set_msrs({MSR_IA32_TSC: now + (1 << 40)})  # far from "in sync", which KVM would keep
            return vcpu.get_msrs([MSR_IA32_TSC])[MSR_IA32_TSC] - now > 1 << 39
        finally:
            vm.close()


def flat32_state(rip: int) -> CpuState:
    data = Segment.flat32(0x10, code=False)
    return CpuState(regs={"rip": rip}, cs=Segment.flat32(0x08, code=True), ds=data, es=data, ss=data,
                    fs=data, gs=data, cr0=CR0_PE | CR0_ET | CR0_NE)


@dataclass
class Snapshot:
    ram: list[bytes]
    platform: dict[str, int | bytes]
    cpus: list[dict[str, int | bytes]]
    output: list[int]
    whole: dict[str, object] | None = None
    taken_at: float = field(default_factory=time.monotonic)


@dataclass
class Guest:
    """Code to place in RAM, how to boot it, and how many console values a whole run writes."""

    code: dict[int, bytes]
    boot: CpuState
    start_aps: bool = False
    ncpus: int = 1

    def machine(self, machines: list[Machine]) -> Machine:
        m = Machine(self.ncpus)
        machines.append(m)
        return m

    def boot_into(self, m: Machine) -> None:
        for addr, code in self.code.items():
            m.mem.write(addr, code)
        m.acc.setup(m.ctx)
        m.acc.set_boot_state(self.boot, self.start_aps)


def uninterrupted(guest: Guest, machines: list[Machine], total: int, timeout: float = 30) -> list[int]:
    m = guest.machine(machines)
    guest.boot_into(m)
    m.acc.start()
    assert wait_until(lambda: len(m.values()) >= total, timeout), f"reference run wrote only {m.values()}"
    m.acc.pause()
    return m.values()[:total]


def save(m: Machine, whole: bool = False) -> Snapshot:
    m.acc.pause()
    return Snapshot(ram=[bytes(r.mapping) for r in m.mem.regions], platform=m.acc.save_platform_state(),
                    cpus=[m.acc.save_cpu_state(i) for i in range(m.acc.ncpus)], output=m.values(),
                    whole=m.acc.save_state() if whole else None)


def restore(snap: Snapshot, guest: Guest, machines: list[Machine]) -> Machine:
    m = guest.machine(machines)
    m.acc.setup(m.ctx)
    for region, data in zip(m.mem.regions, snap.ram, strict=True):
        region.mapping[:] = data
    if snap.whole is not None:  # the one-section form the machine's stream uses
        m.acc.load_state(snap.whole)
        return m
    m.acc.load_platform_state(snap.platform)
    for i, st in enumerate(snap.cpus):
        m.acc.load_cpu_state(i, st)
    return m


def migrate_mid_run(guest: Guest, machines: list[Machine], before: int, total: int,
                    check: Callable[[Snapshot, Machine], None] | None = None,
                    timeout: float = 30, whole: bool = False) -> list[int]:
    """Run until ``before`` values, save, stop the source, load a fresh VM, run to ``total``."""
    src = guest.machine(machines)
    guest.boot_into(src)
    src.acc.start()
    assert wait_until(lambda: len(src.values()) >= before, timeout), f"source wrote only {src.values()}"
    snap = save(src, whole)
    src.acc.stop()
    assert src.values() == snap.output, "the source ran on after it was paused"
    time.sleep(0.2)  # time in flight: the guest must not see it
    dst = restore(snap, guest, machines)
    if check is not None:
        check(snap, dst)
    dst.acc.start()
    assert wait_until(lambda: len(snap.output) + len(dst.values()) >= total, timeout), \
        f"destination wrote only {dst.values()} after {snap.output}"
    dst.acc.pause()
    return (snap.output + dst.values())[:total]


# ---------------------------------------------------------------------------------------------
# guests
# ---------------------------------------------------------------------------------------------
COUNTER = f"""
    xor ebx, ebx
1:  mov dx, {PORT}
    mov eax, ebx
    out dx, eax
    mov ecx, 300
2:  dec ecx
    jnz 2b
    inc ebx
    jmp 1b
"""


def counter_guest() -> Guest:
    """Real mode: writes 0, 1, 2, ... with a delay loop between (the count lives in EBX)."""
    return Guest({ORG: assemble(COUNTER, ORG)}, CpuState(regs={"rip": ORG}))


def pit_guest() -> Guest:
    """Real mode: the in-kernel PIC (vectors 0x20..) and PIT channel 0 at ~1 kHz; the IRQ0 handler
    writes a tick count kept in RAM; the main loop halts with interrupts on."""
    code = assemble(f"""
        cli
        xor ax, ax
        mov ds, ax
        mov ss, ax
        mov sp, 0x7000
        mov word ptr [0x20 * 4], offset handler
        mov word ptr [0x20 * 4 + 2], 0
        mov dword ptr [0x600], 0
        mov al, 0x11
        out 0x20, al
        mov al, 0x20
        out 0x21, al
        mov al, 0x04
        out 0x21, al
        mov al, 0x01
        out 0x21, al
        mov al, 0xfe          # only IRQ0
        out 0x21, al
        mov al, 0x34          # channel 0, lo/hi, mode 2 (rate generator)
        out 0x43, al
        mov ax, 1193          # 1193182 Hz / 1193: about 1 kHz
        out 0x40, al
        mov al, ah
        out 0x40, al
        sti
    1:  hlt
        jmp 1b
    handler:
        push eax
        push edx
        inc dword ptr [0x600]
        mov eax, dword ptr [0x600]
        mov dx, {PORT}
        out dx, eax
        mov al, 0x20
        out 0x20, al
        pop edx
        pop eax
        iret
    """, ORG)
    return Guest({ORG: code}, CpuState(regs={"rip": ORG}))


def lapic_timer_guest() -> Guest:
    """Real mode, x2APIC (MSRs, so no MMIO above 1 MiB): LAPIC timer periodic on vector 0x40, the
    handler writes a tick count kept in RAM and EOIs through the x2APIC EOI MSR."""
    code = assemble(f"""
        cli
        xor ax, ax
        mov ds, ax
        mov ss, ax
        mov sp, 0x7000
        mov word ptr [0x40 * 4], offset handler
        mov word ptr [0x40 * 4 + 2], 0
        mov dword ptr [0x600], 0
        mov ecx, 0x1b         # IA32_APIC_BASE: x2APIC mode (EN | EXTD)
        rdmsr
        or eax, 0xc00
        wrmsr
        mov ecx, 0x80f        # spurious vector register: APIC software-enabled
        mov eax, 0x1ff
        xor edx, edx
        wrmsr
        mov ecx, 0x83e        # divide by 16
        mov eax, 3
        wrmsr
        mov ecx, 0x832        # LVT timer: periodic, vector 0x40
        mov eax, 0x20040
        wrmsr
        mov ecx, 0x838        # initial count
        mov eax, 100000
        wrmsr
        sti
    1:  hlt
        jmp 1b
    handler:
        push eax
        push ecx
        push edx
        inc dword ptr [0x600]
        mov eax, dword ptr [0x600]
        mov dx, {PORT}
        out dx, eax
        mov ecx, 0x80b        # EOI
        xor eax, eax
        xor edx, edx
        wrmsr
        pop edx
        pop ecx
        pop eax
        iret
    """, ORG)
    return Guest({ORG: code}, CpuState(regs={"rip": ORG}))


def smp_guest() -> Guest:
    """Two vCPUs: the BSP starts the AP with INIT/SIPI; each counts on its own, tagging values with
    its APIC id (bit 16), the AP a little slower so that it is mid-loop at any moment."""
    bsp = assemble(f"""
        mov dword ptr [0xfee00310], 0x01000000
        mov dword ptr [0xfee00300], 0x00004500
        mov dword ptr [0xfee00310], 0x01000000
        mov dword ptr [0xfee00300], 0x00004602
        xor ebx, ebx
    1:  mov dx, {PORT}
        mov eax, ebx
        out dx, eax
        mov ecx, 300
    2:  dec ecx
        jnz 2b
        inc ebx
        jmp 1b
    """, ORG, bits=32)
    ap = assemble(f"""
        mov ebx, 0x10000
    1:  mov dx, {PORT}
        mov eax, ebx
        out dx, eax
        mov ecx, 500
    2:  dec ecx
        jnz 2b
        inc ebx
        jmp 1b
    """, 0x2000)
    return Guest({ORG: bsp, 0x2000: ap}, flat32_state(ORG), ncpus=2)


def per_cpu(values: list[int]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {0: [], 1: []}
    for v in values:
        out[v >> 16].append(v & 0xFFFF)
    return out


# ---------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------
def test_accelerator_offers_the_state_protocol() -> None:
    assert isinstance(KvmAccelerator(), AcceleratorState)


def test_counter_guest_continues_after_restore_into_a_fresh_vm(machines: list[Machine]) -> None:
    guest = counter_guest()
    reference = uninterrupted(guest, machines, 200)
    assert reference == list(range(200))

    def check(snap: Snapshot, dst: Machine) -> None:
        # The restored vCPU holds exactly the saved state; its TSC did not jump by the 0.2 s in flight.
        again = dst.acc.save_cpu_state(0)
        for key in ("regs", "sregs", "lapic", "debugregs", "xcrs"):
            if key in snap.cpus[0]:
                assert again[key] == snap.cpus[0][key], key
        tsc_khz = int(snap.cpus[0].get("tsc_khz", 1_000_000))
        saved_tsc = unpack_msrs(bytes(snap.cpus[0]["msrs"]))[MSR_IA32_TSC]  # type: ignore[arg-type]
        loaded_tsc = unpack_msrs(bytes(again["msrs"]))[MSR_IA32_TSC]  # type: ignore[arg-type]
        if host_honours_tsc_writes():
            assert 0 <= loaded_tsc - saved_tsc < tsc_khz * 100, (saved_tsc, loaded_tsc)  # < 0.1 s
        else:  # e.g. kvm_pvm: the guest TSC is the host's; it ran on by the time in flight
            assert tsc_khz * 150 < loaded_tsc - saved_tsc < tsc_khz * 5000, (saved_tsc, loaded_tsc)
        assert 0 <= int(dst.acc.save_platform_state()["clock"]) - int(snap.platform["clock"]) < 100_000_000

    got = migrate_mid_run(guest, machines, before=60, total=200, check=check)
    assert got == reference


def test_pit_timer_guest_ticks_on_after_restore(machines: list[Machine]) -> None:
    guest = pit_guest()
    reference = uninterrupted(guest, machines, 150)
    assert reference == list(range(1, 151))

    def check(snap: Snapshot, dst: Machine) -> None:
        assert snap.cpus[0]["mp_state"] in (MpState.RUNNABLE, MpState.HALTED)
        pit = dst.acc.save_platform_state()["pit2"]
        assert isinstance(pit, bytes)
        assert int.from_bytes(pit[0:4], "little") == 1193 and pit[13] == 2  # channel 0 as programmed

    assert migrate_mid_run(guest, machines, before=40, total=150, check=check) == reference


def test_lapic_timer_guest_ticks_on_after_restore(machines: list[Machine]) -> None:
    guest = lapic_timer_guest()
    reference = uninterrupted(guest, machines, 100)
    assert reference == list(range(1, 101))
    assert migrate_mid_run(guest, machines, before=30, total=100) == reference


@pytest.mark.parametrize("whole", [False, True], ids=["per-part", "save_state"])
def test_smp_guest_both_vcpus_continue_after_restore(machines: list[Machine], whole: bool) -> None:
    guest = smp_guest()
    reference = per_cpu(uninterrupted(guest, machines, 300))
    assert reference[1], "the AP never ran"
    got = migrate_mid_run(guest, machines, before=120, total=400, whole=whole)
    runs = per_cpu(got)
    for cpu in (0, 1):
        assert runs[cpu] == list(range(len(runs[cpu]))), f"vCPU {cpu} lost or repeated values"
    assert len(runs[1]) > 30, "the AP did not run on after the restore"


def test_state_of_a_running_vcpu_is_refused(machines: list[Machine]) -> None:
    guest = counter_guest()
    m = guest.machine(machines)
    guest.boot_into(m)
    m.acc.start()
    assert wait_until(lambda: len(m.values()) >= 1)
    with pytest.raises(AccelError, match="pause the VM"):
        m.acc.save_cpu_state(0)
    with pytest.raises(AccelError, match="no vCPU 3"):
        m.acc.save_cpu_state(3)


def test_msrs_this_host_does_not_save_are_not_written(machines: list[Machine],
                                                     caplog: pytest.LogCaptureFixture) -> None:
    guest = counter_guest()
    m = guest.machine(machines)
    guest.boot_into(m)
    st = m.acc.save_cpu_state(0)
    msrs = unpack_msrs(bytes(st["msrs"]))  # type: ignore[arg-type]
    assert MSR_IA32_TSC in msrs and 0x174 in msrs  # SYSENTER_CS, from KVM_GET_MSR_INDEX_LIST
    extra = bytes(st["msrs"]) + struct.pack("<IQ", 0xC0DE0001, 1)  # type: ignore[arg-type]
    with caplog.at_level("WARNING", logger="pyvmm.kvm.vcpu_state"):
        m.acc.load_cpu_state(0, {**st, "msrs": extra})
    assert "refused to restore MSRs 0xc0de0001" in caplog.text


def test_tsc_frequency_of_another_host_is_scaled_or_warned_about(machines: list[Machine],
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    guest = counter_guest()
    m = guest.machine(machines)
    guest.boot_into(m)
    st = m.acc.save_cpu_state(0)
    here = int(st["tsc_khz"])
    other = here - 100_000  # 4 % slower: far outside KVM's 250 ppm tolerance
    with caplog.at_level("WARNING", logger="pyvmm.kvm.vcpu_state"):
        m.acc.load_cpu_state(0, {**st, "tsc_khz": other})
    feats = m.acc._features()
    if feats.tsc_control:  # scaled, as QEMU's kvm_arch_set_tsc_khz does
        assert m.acc.save_cpu_state(0)["tsc_khz"] == other
    else:  # loaded anyway, with a warning (QEMU: a mismatch does not abort a migration)
        assert f"ran at {other} kHz, this host's runs at {here} kHz" in caplog.text
        assert m.acc.save_cpu_state(0)["regs"] == st["regs"]


def test_bad_states_are_refused_before_anything_changes(machines: list[Machine]) -> None:
    guest = counter_guest()
    src = guest.machine(machines)
    guest.boot_into(src)
    good = src.acc.save_cpu_state(0)
    platform = src.acc.save_platform_state()
    before = src.acc.save_cpu_state(0)
    cases: list[tuple[dict[str, object], str]] = [
        ({**good, "version": 99}, "version 99 is not supported"),
        ({**good, "regs": b"\0" * 10}, "'regs' must be 144 bytes"),
        ({**good, "msrs": b"\0" * 7}, "whole number"),
        ({**good, "mp_state": 77}, "mp_state 77"),
        ({**good, "xsave": b"\0" * (1 << 20)}, "'xsave' must be"),
        ({k: v for k, v in good.items() if k != "regs"}, "'regs' is missing"),
        ({k: v for k, v in good.items() if k != "lapic"}, "no LAPIC"),
    ]
    for bad, message in cases:
        with pytest.raises(KvmError, match=message):
            src.acc.load_cpu_state(0, bad)
    assert src.acc.save_cpu_state(0)["regs"] == before["regs"]
    for bad_platform, message in (({**platform, "pit2": b"x"}, "'pit2' must be"),
                                  ({**platform, "clock": -1}, "clock -1"),
                                  ({**platform, "version": 0}, "version 0")):
        with pytest.raises(KvmError, match=message):
            src.acc.load_platform_state(bad_platform)


def test_dirty_log_reports_exactly_the_pages_the_guest_and_dma_wrote(machines: list[Machine]) -> None:
    pages = [0x10, 0x11, 0x40, 0x1FF]  # 0x1FF: the last page of the 2 MiB region
    stores = "\n".join(f"mov dword ptr [{p * 4096 + 8:#x}], {p:#x}" for p in pages)
    code = assemble(f"""
        {stores}
        mov dx, {PORT}
        mov eax, 1
        out dx, eax
    1:  in eax, dx
        test eax, eax
        jz 1b
        mov dword ptr [0x123456], 2
        mov dx, {PORT}
        mov eax, 2
        out dx, eax
    2:  jmp 2b
    """, ORG, bits=32)
    m = Machine()
    machines.append(m)
    m.mem.write(ORG, code)
    m.acc.setup(m.ctx)
    m.acc.set_boot_state(flat32_state(ORG), start_aps=False)
    with pytest.raises(AccelError, match="dirty logging is off"):
        m.acc.get_and_clear_dirty(0)
    m.acc.start_dirty_log()
    assert m.mem.dirty.active
    m.acc.start()
    assert wait_until(lambda: m.values() == [1])
    m.acc.pause()

    def dirty() -> set[int]:
        bm = m.acc.get_and_clear_dirty(0)
        assert len(bm) == (2 << 20) // 4096 // 8
        return {i for i in range(len(bm) * 8) if bm[i >> 3] >> (i & 7) & 1}

    assert dirty() == set(pages)
    assert dirty() == set(), "KVM_GET_DIRTY_LOG did not clear the log"
    m.mem.dirty.mark(0x30FFF, 2)  # device DMA straddling pages 0x30 and 0x31
    m.mem.dirty.mark(0x7FFF_0000, 0x20000)  # outside RAM: ignored
    assert dirty() == {0x30, 0x31}
    m.port.read_value = 1  # let the guest go on: one more store while the vCPU runs
    m.acc.resume()
    assert wait_until(lambda: m.values() == [1, 2])
    assert wait_until(lambda: 0x123 in dirty(), 2), "a store made while running was not logged"
    m.acc.stop_dirty_log()
    assert not m.mem.dirty.active
    with pytest.raises(AccelError, match="dirty logging is off"):
        m.acc.get_and_clear_dirty(0)


def test_whole_state_refuses_another_accelerator_or_vcpu_count(machines: list[Machine]) -> None:
    two = smp_guest()
    src = two.machine(machines)
    two.boot_into(src)
    state = src.acc.save_state()
    assert state["accel"] == "kvm" and len(state["vcpus"]) == 2  # type: ignore[arg-type]
    one = counter_guest()
    dst = one.machine(machines)
    one.boot_into(dst)
    before = dst.acc.save_state()
    for bad, message in (({**state, "accel": "tcg"}, "holds tcg vCPU state"),
                         (state, "the stream has 2 vCPUs; this machine has 1"),
                         ({**state, "version": 3}, "kvm state version 3"),
                         ({**state, "vcpus": "x"}, "vCPU list is missing or corrupt"),
                         ({**before, "vcpus": [{**before["vcpus"][0], "regs": b""}]},  # type: ignore[index]
                          "'regs' must be 144 bytes")):
        with pytest.raises(VmStateError, match=message):
            dst.acc.load_state(bad)
    after = dst.acc.save_state()
    assert after["vcpus"][0]["regs"] == before["vcpus"][0]["regs"]  # type: ignore[index]


def test_dirty_log_sync_gives_written_ranges_while_the_guest_runs(machines: list[Machine]) -> None:
    # 32-bit guest: keeps storing an increasing value into pages 0x100..0x103 (one store per page).
    code = assemble(f"""
        xor eax, eax
    1:  inc eax
        mov dword ptr [0x100000], eax
        mov dword ptr [0x101000], eax
        mov dword ptr [0x102800], eax
        mov dword ptr [0x103ffc], eax
        mov dx, {PORT}
        out dx, eax
        jmp 1b
    """, ORG, bits=32)
    m = Machine()
    machines.append(m)
    m.mem.write(ORG, code)
    m.acc.setup(m.ctx)
    m.acc.set_boot_state(flat32_state(ORG), start_aps=False)
    m.acc.start()
    assert wait_until(lambda: len(m.values()) >= 5)
    m.acc.dirty_log_start()  # while running, as pre-copy starts
    m.mem.dirty.mark(0x50000, 1)  # a device's DMA write
    for _ in range(3):
        seen = len(m.values())
        assert wait_until(lambda n=seen: len(m.values()) > n + 2)
        runs = m.acc.dirty_log_sync()
        assert (0x100000, 0x4000) in runs, runs
        assert all(0x100000 <= gpa and gpa + n <= 0x104000 or gpa == 0x50000 for gpa, n in runs), runs
    m.acc.pause()
    m.acc.dirty_log_sync()
    assert m.acc.dirty_log_sync() == []  # paused: nothing new
    m.acc.dirty_log_stop()


def test_dirty_logging_survives_a_reset(machines: list[Machine]) -> None:
    """reset() builds a new VM: its slots log dirty pages too while logging is on."""
    code = assemble(f"""
        mov dword ptr [0x150000], 1
        mov dx, {PORT}
        mov eax, 1
        out dx, eax
    1:  jmp 1b
    """, ORG, bits=32)
    m = Machine()
    machines.append(m)
    m.mem.write(ORG, code)
    m.acc.setup(m.ctx)
    m.acc.dirty_log_start()
    m.acc.reset()
    m.acc.set_boot_state(flat32_state(ORG), start_aps=False)
    m.acc.start()
    assert wait_until(lambda: m.values() == [1])
    assert (0x150000, 4096) in m.acc.dirty_log_sync()
    m.acc.dirty_log_stop()
    m.acc.reset()  # and without logging the new VM's slots have no log
    with pytest.raises(AccelError, match="dirty logging is off"):
        m.acc.get_and_clear_dirty(0)
