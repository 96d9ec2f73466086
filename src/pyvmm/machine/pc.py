"""The PC machine: the one place that assembles a VM from a :class:`MachineConfig`.

Order of assembly (mirrors QEMU's ``pc_init1`` in spirit):

1. guest RAM (:mod:`pyvmm.memory`) and the two buses;
2. the accelerator, which maps RAM and provides interrupt controllers, in the
   kernel (KVM), or asks this builder for userspace ones (tcg); its
   capabilities (ioeventfd, irqfd, MSI, DMA observer) go to the devices;
3. legacy devices on the port bus, wired to interrupt lines; then, through the device
   registry (:mod:`pyvmm.qdev`, :mod:`.pc_devices`), the serial port, disks and ``-device``s;
4. firmware tables (E820, MP table, ACPI, fw_cfg) and the kernel, written into RAM;
5. vCPU threads, then the main thread waits on the life-cycle mailbox.

A reset (triple fault, i8042, ACPI) stops the vCPUs, resets devices and
accelerator state, reloads the kernel and starts again, or, with
``--no-reboot``, ends the run as QEMU does.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

from pyvmm.accel import select
from pyvmm.accel.base import Accelerator, MachineContext
from pyvmm.block.graph import BlockGraph
from pyvmm.boot import BootResult, load_kernel
from pyvmm.bus import Bus, BusError
from pyvmm.config import MachineConfig
from pyvmm.devices.acpi_pm import AcpiPm
from pyvmm.devices.fw_cfg import FwCfg, FwCfgKey, encode_e820
from pyvmm.devices.i8042 import I8042
from pyvmm.devices.irqchip import UserspaceIrqchip
from pyvmm.devices.pci.board import PciBoard
from pyvmm.devices.port80 import Port80
from pyvmm.devices.rtc import Rtc
from pyvmm.devices.virtio.board import VirtioMmioBoard
from pyvmm.errors import ConfigError
from pyvmm.irq import CpuInterruptController, IrqRouter
from pyvmm.loop import MainLoop
from pyvmm.machine.pc_devices import PcDevices
from pyvmm.machine.pc_migration import PcMigration
from pyvmm.machine.result import RunResult
from pyvmm.monitor import ChardevInfo, CpuInfo, create_monitor
from pyvmm.monitor.events import ShutdownCause, cause_of
from pyvmm.ratelimit import guest_log
from pyvmm.runstate import PanicAction, Request, RequestKind, RunState, VmControl
from pyvmm.sandbox import SandboxConfig
from pyvmm.sandbox import prepare as prepare_sandbox
from pyvmm.threadnames import name_vcpu_threads
from pyvmm.x86 import layout
from pyvmm.x86.acpi import build_acpi, device_nodes
from pyvmm.x86.e820 import build_e820
from pyvmm.x86.mptable import write_mptable
from pyvmm.x86.pm_block import PM_SIZE
from pyvmm.x86.topology import CpuTopology

log = logging.getLogger(__name__)


#: How long QMP system_reset waits, at most, for the main thread to carry the reset out.
RESET_WAIT = 10.0


class PcMachine:
    """A PC built from a config.  ``run()`` returns the process exit status."""

    def __init__(self, config: MachineConfig, *, accel_name: str, accel_reason: str = "",
                 control: VmControl | None = None, sandbox: SandboxConfig | None = None) -> None:
        config.validate()
        self.config = config
        #: ``-smp``: the vCPUs' APIC ids, for CPUID (in the accelerator), the irqchip, MADT and MP table.
        self.topology = CpuTopology.from_smp(config.topology)
        self.sandbox = sandbox or SandboxConfig()  # -sandbox: installed in run(), once set up
        self.accel_name = accel_name
        self.accel_reason = accel_reason
        self.control = control or VmControl()
        self.control.panic_action = config.panic_action
        self.memory = layout.pc_memory(config.memory, config.mem_path, config.memory_backend)
        if config.mem_prealloc or (config.memory_backend is not None and config.memory_backend.prealloc):
            self.memory.preallocate()  # -mem-prealloc, or a memory back-end's prealloc=on
        self.io_bus = Bus("io")
        self.mmio_bus = Bus("mmio")
        self._install_plugin_tracers()
        self.irq = IrqRouter()
        self.loop = MainLoop()
        self.accel: Accelerator = select.create(accel_name)
        self.devices: list[object] = []
        self.irqchip: UserspaceIrqchip | None = None  # interrupt controllers in userspace (tcg)
        self.boot: BootResult | None = None
        self._state_lock = threading.Lock()
        self.state = RunState.PRELAUNCH
        self.state_listeners: list[Callable[[RunState, str], None]] = []
        self.reset_listeners: list[Callable[[str], None]] = []  # callback(reason), at each machine reset
        self.last_request: Request | None = None  # the life-cycle request being handled (for listeners)
        self._resets_cond = threading.Condition()  # system_reset waits for the main thread's reset
        self._resets_handled = 0
        self._after_panic: list[Request] = []  # guest requests held back while paused by a guest panic
        self._build()
        self._deferred_start = False  # after -incoming of a stopped guest: vCPUs start at 'cont'
        self.migration = PcMigration(self)  # migrate, -incoming (machine/pc_migration.py)
        self.monitor = create_monitor(self, config.qmp)  # --qmp (QMP); started in run()

    # -- assembly -----------------------------------------------------------------------------
    def _build(self) -> None:
        cfg = self.config
        ctx = MachineContext(self.memory, self.io_bus, self.mmio_bus, self.control, cfg.smp, cfg.cpu,
                             irqchip_factory=self._userspace_irqchip, topology=self.topology)
        self.irq.attach(self.accel.setup(ctx))
        caps = self.accel.capabilities()
        msi = caps.msi or (self.irqchip.deliver_msi if self.irqchip is not None else None)

        self.i8042 = I8042(self.control, irq_kbd=self.irq.line(layout.KBD_GSI), irq_aux=self.irq.line(layout.AUX_GSI))
        self._add_io(layout.I8042_DATA_PORT, 1, self.i8042.data_port, "i8042-data")
        self._add_io(layout.I8042_CMD_PORT, 1, self.i8042.cmd_port, "i8042-cmd")
        self.devices.append(self.i8042)

        self.rtc = Rtc(below_4g=self.memory.below_4g, above_4g=self.memory.above_4g, ncpus=cfg.smp,
                       irq=self.irq.line(layout.RTC_GSI), loop=self.loop, clock=cfg.rtc_clock())  # -rtc base=
        self._add_io(layout.RTC_PORT, 2, self.rtc, "rtc")
        self._add_io(layout.POST_PORT, 1, Port80(), "port80")

        self.fw_cfg = FwCfg(memory=self.memory)
        self.fw_cfg.dma_hook = caps.dma_written  # tcg: DMA drops stale translated code
        self._add_io(layout.FW_CFG_PORT, self.fw_cfg.io_size, self.fw_cfg, "fw_cfg")

        self.acpi_pm = AcpiPm(self.control, self.irq.line(layout.SCI_GSI))
        self._add_io(layout.ACPI_PM_PORT, PM_SIZE, self.acpi_pm, "acpi-pm")

        # The two virtio transports' boards: virtio-mmio windows and the PCI host bridge (0xcf8/0xcfc).
        # MSI-X only if the interrupt controllers take MSIs (KVM: KVM_SIGNAL_MSI; tcg: the APIC bus).
        self.virtio = VirtioMmioBoard(self.memory, self.mmio_bus, self.irq.line)
        self.devices.append(self.virtio)
        self.pci = PciBoard(self.memory, self.mmio_bus, self.io_bus, self.irq.line, lambda: self.virtio.loop,
                            msi_sender=msi)
        self.devices.append(self.pci)

        # Everything users can name goes through the device registry (pyvmm.qdev): the -serial
        # port, -drive if=virtio disks, then each -device in order.
        self.qdev = PcDevices(cfg, memory=self.memory, control=self.control, main_loop=self.loop,
                              irq_line=self.irq.line, add_io=self._add_io, virtio=self.virtio, pci=self.pci)
        # -serial none with a -device isa-serial (libvirt's way): that device is COM1, as on QEMU.
        user_serial = cfg.serial == "none" and any(spec.driver == "isa-serial" for spec in cfg.devices)
        self.serial = None if user_serial else self.qdev.add_serial(cfg.serial).obj
        self.qdev.add_drives()
        for spec in cfg.devices:
            try:
                self.qdev.add_user_device(spec)
            except BusError as e:  # e.g. two devices on one port
                raise ConfigError(f"-device {spec.text or spec.driver}: {e}") from None
        self.qdev.check_unused()
        self.virtio.attach_capabilities(caps)  # once: the accelerator keeps them across its resets
        self.pci.attach_capabilities(caps)
        for driver, dev in (("i8042", self.i8042), ("mc146818rtc", self.rtc), ("fw_cfg_io", self.fw_cfg),
                            ("PIIX4_PM", self.acpi_pm)):
            self.qdev.manager.add_builtin(driver, dev)  # so the device tree lists every device

        self.e820 = build_e820(self.memory, reserved=[(layout.IOAPIC_ADDR, 0x1000), (layout.LAPIC_ADDR, 0x1000)])
        fw = self.fw_cfg
        fw.add_u64(FwCfgKey.RAM_SIZE, self.memory.ram_size)
        fw.add_u16(FwCfgKey.NB_CPUS, cfg.smp)
        fw.add_u16(FwCfgKey.MAX_CPUS, self.topology.apic_id_limit)  # as QEMU: one past the highest APIC id
        fw.set_cmdline(cfg.append)
        fw.add_file("etc/e820", encode_e820([(e.addr, e.size, int(e.type)) for e in self.e820]))

    def _userspace_irqchip(self, ncpus: int, lapic_bus_hz: int) -> CpuInterruptController:
        """The accelerator's ``irqchip_factory``: PIC pair, PIT, I/O APIC and LAPICs, on the buses."""
        chip = UserspaceIrqchip(ncpus, lapic_bus_hz, apic_ids=self.topology.apic_ids,
                                ioapic_id=self.topology.apic_id_limit)
        chip.register(self.io_bus, self.mmio_bus)
        self.irqchip = chip
        return chip

    def _add_io(self, base: int, size: int, device: object, name: str) -> None:
        self.io_bus.register(base, size, device, name)  # type: ignore[arg-type]
        if device not in self.devices:
            self.devices.append(device)

    # -- firmware and kernel -----------------------------------------------------------------
    def _load_firmware_and_kernel(self) -> None:
        cfg = self.config
        if not cfg.kernel:
            raise ConfigError("no kernel given: use --kernel FILE")
        topo = self.topology
        write_mptable(self.memory, cfg.smp, apic_ids=topo.apic_ids, ioapic_id=topo.apic_id_limit)
        self.pci.firmware_setup()  # BARs assigned and decoding on, as a BIOS leaves them
        rsdp = build_acpi(self.memory, ncpus=cfg.smp, pm_base=layout.ACPI_PM_PORT, devices=self.virtio.acpi_devices(),
                          pci=self.pci.acpi(), device_aml=device_nodes(self.devices), apic_ids=topo.apic_ids,
                          hotplug_apic_ids=topo.hotplug_apic_ids, ioapic_id=topo.apic_id_limit,
                          ) if cfg.acpi else None  # -no-acpi
        # The first load is reported; a reload on every guest reset is not (a guest in a reset
        # loop would otherwise write two lines per reset to the log, without limit).
        reload = self.boot is not None
        boot_log = logging.getLogger("pyvmm.boot")
        saved = boot_log.level
        if reload:
            boot_log.setLevel(logging.WARNING)
        try:
            self.boot = load_kernel(cfg.kernel, self.memory, cmdline=cfg.append, initrd=cfg.initrd, e820=self.e820,
                                    acpi_rsdp=rsdp)
        finally:
            boot_log.setLevel(saved)
        log.log(logging.DEBUG if reload else logging.INFO, "loaded %s kernel %s (entry %#x)", self.boot.kind,
                cfg.kernel, self.boot.entry)

    # -- life cycle ---------------------------------------------------------------------------
    def _set_state(self, state: RunState, reason: str = "") -> None:
        with self._state_lock:
            self.state = state
        for cb in list(self.state_listeners):
            cb(state, reason)

    def _power_on(self, start: bool = True, notify: bool = True) -> None:
        self._load_firmware_and_kernel()
        assert self.boot is not None
        self.accel.set_boot_state(self.boot.cpu, start_aps=False)
        if not start:  # -S, or a reset while stopped: vCPU threads exist but stay parked until QMP 'cont'
            self.accel.pause()
            self._start_vcpus()
            if notify:
                self._set_state(RunState.PRELAUNCH)
            return
        self._start_vcpus()
        self._set_state(RunState.RUNNING)

    def _start_vcpus(self) -> None:
        self.accel.start()
        if self.config.debug_threads:  # -name debug-threads=on
            name_vcpu_threads(self.accel.vcpu_thread_ids(), self.accel_name)

    def _reset(self, reason: str) -> None:
        guest_log(log, logging.INFO, "machine reset: %s", reason)
        self._after_panic = []
        for cb in list(self.reset_listeners):
            cb(reason)
        self.accel.stop()
        for dev in self.devices:
            reset = getattr(dev, "reset", None)
            if reset is not None:
                reset()
        self.accel.reset()
        self._power_on(start=self.state not in (RunState.PAUSED, RunState.GUEST_PANICKED, RunState.SHUTDOWN))

    def pause(self) -> None:
        if self.state is RunState.RUNNING:
            self.accel.pause()
            self._set_state(RunState.PAUSED)

    def _incoming(self) -> None:
        """-incoming: load the stream, then run (or wait for 'cont', as QEMU after a stopped source or -S)."""
        start = self.migration.run_incoming()
        if self.state is not RunState.INMIGRATE:
            return
        if start:
            self.accel.start()
            self._set_state(RunState.RUNNING)
        else:
            self._deferred_start = True
            self._set_state(RunState.PAUSED)

    def resume(self) -> None:
        if self._deferred_start and self.state is RunState.PAUSED:
            self._deferred_start = False
            self.accel.start()
            self._set_state(RunState.RUNNING)
        elif self.state is RunState.POSTMIGRATE:  # QEMU lets 'cont' run the source again
            self.accel.resume()
            self._set_state(RunState.RUNNING)
        elif self.state in (RunState.PAUSED, RunState.GUEST_PANICKED):  # QEMU's cont leaves guest-panicked too
            self.accel.resume()
            self._set_state(RunState.RUNNING)
            held, self._after_panic = self._after_panic, []
            for req in held:
                self.control.post(req)
        elif self.state is RunState.PRELAUNCH and self.boot is not None:  # -S, or reset while stopped
            self._start_vcpus()
            self.accel.resume()
            self._set_state(RunState.RUNNING)

    def _install_plugin_tracers(self) -> None:
        """A plug-in's ``trace`` (PYVMM_PLUGINS) sees every port-I/O and MMIO access."""
        from pyvmm.plugins import plugin_tracers

        tracers = plugin_tracers()
        if not tracers:
            return

        def trace(bus: str, kind: str, addr: int, size: int, value: int) -> None:
            for t in tracers:
                t(bus, kind, addr, size, value)  # type: ignore[operator]
        self.io_bus.set_tracer(trace)
        self.mmio_bus.set_tracer(trace)

    def run(self) -> RunResult:
        self.loop.start_thread()
        try:
            load_sandbox = prepare_sandbox(self.sandbox)
            incoming = self.config.incoming is not None
            if not incoming:
                # The machine is complete (kernel loaded, vCPU threads created and parked) before the
                # monitor answers, as QEMU's is: query-cpus-fast under -S gives the real vCPU threads.
                self._power_on(start=False, notify=False)
            self._start_monitor()  # listening: the sandbox allows no new listeners
            if incoming:
                self.migration.prepare_incoming()  # -incoming unix:/tcp: listens now, for the same reason
            load_sandbox()
            if not incoming:
                self._set_state(RunState.PRELAUNCH)
            if self.monitor is not None:
                self.monitor.wait_for_clients()
            if incoming:
                self._incoming()
            elif not self.config.start_paused:  # -S: wait in prelaunch for QMP 'cont'
                self.resume()
            while True:
                req = self.control.wait()
                if req is None:
                    continue
                result = self._handle(req)
                if result is not None:
                    return result
        finally:
            self.shutdown()

    def _handle(self, req: Request) -> RunResult | None:
        self.last_request = req
        if req.kind is RequestKind.RESET:
            try:
                if self.config.no_reboot:
                    if self.config.no_shutdown:
                        return self._stay_shut_down(req.reason)
                    self._set_state(RunState.SHUTDOWN, req.reason)
                    return RunResult(0, f"{req.reason} (--no-reboot)")
                self._reset(req.reason)
                return None
            finally:
                with self._resets_cond:
                    self._resets_handled += 1
                    self._resets_cond.notify_all()
        if req.kind is RequestKind.POWEROFF:
            if self.config.no_shutdown:
                return self._stay_shut_down(req.reason)
            self._set_state(RunState.SHUTDOWN, req.reason)
            return RunResult(0, req.reason)
        if req.kind is RequestKind.EXIT:
            self._set_state(RunState.SHUTDOWN, req.reason)
            return RunResult(req.status, req.reason)
        if req.kind is RequestKind.PANIC:  # the GUEST_PANICKED report went out when the device posted this
            if self.control.panic_action is PanicAction.PAUSE:
                if self.state is RunState.RUNNING:
                    self.accel.pause()
                    # QEMU stops the reporting vCPU at its write; ours may have run on a little (Linux
                    # with panic=-1 asks for a reboot right after its report).  What it asked for
                    # meanwhile waits for 'cont', so the VM stays stopped in guest-panicked.
                    self._after_panic = self.control.take_guest_requests()
                    self._set_state(RunState.GUEST_PANICKED, req.reason)
                return None
            self._set_state(RunState.SHUTDOWN, req.reason)  # shutdown / exit-failure: a guest-panic SHUTDOWN
            return RunResult(req.status, "guest panicked")
        self._set_state(RunState.INTERNAL_ERROR, req.reason)
        return RunResult(req.status or 1, req.reason)

    def _stay_shut_down(self, reason: str) -> RunResult | None:
        """-no-shutdown: the guest powered off; vCPUs stop, the process stays (QMP system_reset + cont)."""
        if self.state is not RunState.SHUTDOWN:
            self.accel.pause()
            log.info("guest powered off (%s); -no-shutdown: waiting for system_reset or quit", reason)
            self._set_state(RunState.SHUTDOWN, reason)
        return None

    def shutdown(self) -> None:
        """Stop vCPUs and back-ends; safe to call more than once."""
        try:
            self.accel.stop()
        finally:
            if self.monitor is not None:
                self.monitor.close()  # after the SHUTDOWN event went out
            self.loop.stop()
            for dev in self.qdev.manager.tree if getattr(self, "qdev", None) is not None else ():
                if dev.driver == "isa-serial":
                    dev.obj.close()  # type: ignore[attr-defined]
            if getattr(self, "pci", None) is not None:
                self.pci.close()
            if getattr(self, "virtio", None) is not None:
                self.virtio.close()
            if getattr(self, "qdev", None) is not None:
                self.qdev.block.close()

    # -- QMP monitor: pyvmm.monitor.MachineControl ----------------------------------------------
    def _start_monitor(self) -> None:
        if self.monitor is None:
            return
        self.state_listeners.append(self._monitor_on_state)
        self.reset_listeners.append(self.monitor.on_reset)
        self.control.panic_listeners.append(self.monitor.on_guest_panic)
        self.monitor.start()

    def _monitor_on_state(self, state: RunState, reason: str) -> None:
        assert self.monitor is not None
        req = self.last_request
        if state is RunState.SHUTDOWN and req is not None and req.kind is RequestKind.RESET:
            reason = cause_of(reason, ShutdownCause.GUEST_RESET).value  # a reset under --no-reboot
        self.monitor.on_state(state, reason)

    def status(self) -> RunState:
        return self.state

    def system_reset(self) -> None:
        """Reset, and return once the main thread has done it: QEMU runs QMP commands on the thread
        that carries out resets, so a ``cont`` right after ``system_reset`` (libvirt's reboot of a
        guest that powered off under -no-shutdown) finds the machine reset."""
        with self._resets_cond:
            before = self._resets_handled
            self.control.request_reset("host-qmp-system-reset")
            self._resets_cond.wait_for(lambda: self._resets_handled != before, timeout=RESET_WAIT)

    def system_powerdown(self) -> None:
        self.acpi_pm.press_power_button()

    def quit(self) -> None:
        self.control.request_exit(0, "host-qmp-quit")

    def cpus(self) -> list[CpuInfo]:
        tids = self.accel.vcpu_thread_ids()
        out = []
        for i in range(self.config.smp):
            socket, _die, core, thread = self.topology.ids(i)
            out.append(CpuInfo(index=i, thread_id=(tids[i] if i < len(tids) else None) or os.getpid(),
                               socket_id=socket, core_id=core, thread_in_core=thread))
        return out

    def cpu_dump(self, index: int) -> str:
        return self.accel.cpu_dump(index)

    def chardevs(self) -> list[ChardevInfo]:
        return [ChardevInfo(label, filename) for label, filename in self.qdev.chardev_filenames()]

    def accelerator(self) -> str:
        """The accelerator the vCPUs run on (QMP query-kvm)."""
        return self.accel_name

    def qom_devices(self) -> list[tuple[str, str, list[tuple[str, str]]]]:
        """(QOM path, driver, [(property, QOM type)]) of every device, for QMP qom-list."""
        out = []
        for dev in self.qdev.manager.tree:
            props = [(p.name, p.type.qemu_type) for p in dev.type.props] if dev.type is not None else []
            out.append((dev.path, dev.driver, props))
        return out

    def guest_name(self) -> str | None:
        return self.config.name  # -name

    def guest_uuid(self) -> str | None:
        return self.config.uuid  # -uuid

    def key_names(self) -> frozenset[str]:
        from pyvmm.devices.i8042 import QCODES

        return frozenset(QCODES)

    def block_graph(self) -> BlockGraph:
        return self.qdev.block

    def send_keys(self, qcodes: list[str]) -> None:
        from pyvmm.devices.i8042 import QCODES

        keys = [QCODES[q] for q in qcodes]
        self.i8042.inject_keys([(k, True) for k in keys] + [(k, False) for k in reversed(keys)])


__all__ = ["PcMachine", "RunResult", "layout"]
