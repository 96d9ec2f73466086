"""A 16550A UART, as Linux's 8250 driver and polling firmware expect it.

The model is address-agnostic (COM1 is 0x3f8/IRQ4, COM2 0x2f8/IRQ3, ...) and
knows nothing about the accelerator: it sees register offsets 0-7, one
:class:`IrqLine` and a :class:`CharBackend`.

Behaviour that guests depend on:

* Transmission is instantaneous: a byte written to THR goes straight to the
  back-end (or, in MCR loopback mode, into our own receive FIFO), so LSR
  always shows THRE|TEMT.  The THR-empty interrupt follows the 16550 rules
  the 8250 driver probes for: it becomes pending when ETBEI goes 0->1 while
  THR is empty and after every THR write; it is cleared by reading IIR while
  it is the reported source, by writing THR, or by clearing ETBEI.
* Receive uses a 16-byte FIFO (1-byte holding register with FIFOs off).
  With FIFOs on, data at or above the trigger level reports "data available"
  (IIR 0x4); data below it reports "character timeout" (IIR 0xC) at once
  -- the simple, always-safe form of the timeout: the driver drains on
  either, and polling guests only look at LSR.DR.
* ``IIR`` bits 7:6 read 11 when FIFOs are enabled (the 8250 autoconfig
  checks them to call us a 16550A); bits 5:4 read 0 so we are not mistaken
  for a 16750 or a National SuperIO part.
* MCR loopback maps DTR->DSR, RTS->CTS, OUT1->RI, OUT2->DCD in MSR (the
  driver's probe writes MCR=0x1A and expects MSR&0xF0 == 0x90).  Outside
  loopback the modem lines read as present (DCD|DSR|CTS).
* The IRQ line is a level: high while any enabled condition is pending.

Locking: vCPU threads (register access) and the main-loop thread
(``can_receive``/``receive`` from the back-end) both touch the state, so
every entry point takes ``self._lock``.  The back-end is written *outside*
the lock so a slow back-end never makes the loop thread wait for the UART,
and ``accept_input`` is likewise called without the lock.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from enum import IntEnum
from typing import Any

from pyvmm.chardev.base import CharBackend
from pyvmm.errors import ConfigError
from pyvmm.irq import IrqLine
from pyvmm.qdev import BusKind, DeviceContext, DeviceProps, DeviceType, Prop, PropType
from pyvmm.vmstate import VmStateError, fields
from pyvmm.x86 import layout

log = logging.getLogger(__name__)

COM1_IRQ = 4
COM2_IRQ = 3
SERIAL_IO_SIZE = 8

FIFO_SIZE = 16

#: Pre-built one-byte strings so the transmit path allocates nothing.
_BYTE = tuple(bytes([i]) for i in range(256))


class Reg(IntEnum):
    """Register offsets (DLAB=0 meanings; with DLAB=1 offsets 0/1 are DLL/DLM)."""

    RBR_THR = 0
    IER = 1
    IIR_FCR = 2
    LCR = 3
    MCR = 4
    LSR = 5
    MSR = 6
    SCR = 7


class Ier(IntEnum):
    ERBFI = 0x01   # received data available
    ETBEI = 0x02   # transmitter holding register empty
    ELSI = 0x04    # receiver line status
    EDSSI = 0x08   # modem status


class Iir(IntEnum):
    NO_INT = 0x01
    MSI = 0x00
    THRI = 0x02
    RDI = 0x04
    RLSI = 0x06
    CTI = 0x0C
    FIFO_BITS = 0xC0


class Fcr(IntEnum):
    ENABLE = 0x01
    CLEAR_RX = 0x02
    CLEAR_TX = 0x04
    TRIGGER_MASK = 0xC0


class Lcr(IntEnum):
    DLAB = 0x80


class Mcr(IntEnum):
    DTR = 0x01
    RTS = 0x02
    OUT1 = 0x04
    OUT2 = 0x08
    LOOP = 0x10
    MASK = 0x1F


class Lsr(IntEnum):
    DR = 0x01
    OE = 0x02
    PE = 0x04
    FE = 0x08
    BI = 0x10
    THRE = 0x20
    TEMT = 0x40
    FIFO_ERR = 0x80
    ERRORS = 0x1E


class Msr(IntEnum):
    DCTS = 0x01
    DDSR = 0x02
    TERI = 0x04
    DDCD = 0x08
    CTS = 0x10
    DSR = 0x20
    RI = 0x40
    DCD = 0x80
    DELTAS = 0x0F


# Plain-int copies for the register hot paths: enum member access and arithmetic cost ~10x
# more than int operations, and every guest UART access goes through here.
_FCR_CLEAR_RX = int(Fcr.CLEAR_RX)
_FCR_ENABLE = int(Fcr.ENABLE)
_FCR_TRIGGER_MASK = int(Fcr.TRIGGER_MASK)
_IER_EDSSI = int(Ier.EDSSI)
_IER_ELSI = int(Ier.ELSI)
_IER_ERBFI = int(Ier.ERBFI)
_IER_ETBEI = int(Ier.ETBEI)
_IIR_CTI = int(Iir.CTI)
_IIR_FIFO_BITS = int(Iir.FIFO_BITS)
_IIR_MSI = int(Iir.MSI)
_IIR_NO_INT = int(Iir.NO_INT)
_IIR_RDI = int(Iir.RDI)
_IIR_RLSI = int(Iir.RLSI)
_IIR_THRI = int(Iir.THRI)
_LCR_DLAB = int(Lcr.DLAB)
_LSR_DR = int(Lsr.DR)
_LSR_OE = int(Lsr.OE)
_LSR_TEMT = int(Lsr.TEMT)
_LSR_THRE = int(Lsr.THRE)
_MCR_LOOP = int(Mcr.LOOP)
_MCR_MASK = int(Mcr.MASK)
_MSR_CTS = int(Msr.CTS)
_MSR_DCD = int(Msr.DCD)
_MSR_DCTS = int(Msr.DCTS)
_MSR_DDCD = int(Msr.DDCD)
_MSR_DDSR = int(Msr.DDSR)
_MSR_DELTAS = int(Msr.DELTAS)
_MSR_DSR = int(Msr.DSR)
_MSR_RI = int(Msr.RI)
_MSR_TERI = int(Msr.TERI)
_R_IER = int(Reg.IER)
_R_IIR_FCR = int(Reg.IIR_FCR)
_R_LCR = int(Reg.LCR)
_R_LSR = int(Reg.LSR)
_R_MCR = int(Reg.MCR)
_R_MSR = int(Reg.MSR)
_R_RBR_THR = int(Reg.RBR_THR)
_R_SCR = int(Reg.SCR)
_LSR_IDLE = _LSR_THRE | _LSR_TEMT  # transmission is instantaneous: always empty

#: RX trigger level for FCR bits 7:6.
_TRIGGER = (1, 4, 8, 14)


def _msr_from_mcr(mcr: int) -> int:
    """Modem-status bits seen in loopback mode for modem-control bits ``mcr``."""
    msr = 0
    if mcr & Mcr.DTR:
        msr |= Msr.DSR
    if mcr & Mcr.RTS:
        msr |= Msr.CTS
    if mcr & Mcr.OUT1:
        msr |= Msr.RI
    if mcr & Mcr.OUT2:
        msr |= Msr.DCD
    return msr


class Serial:
    """One 16550A UART: ``io_read``/``io_write`` at offsets 0-7, input via ``receive``."""

    def __init__(self, irq: IrqLine | None, backend: CharBackend | None, name: str = "serial0") -> None:
        self.name = name
        self._irq = irq
        self._backend = backend
        self._lock = threading.Lock()
        self._rx: deque[int] = deque()
        self._reset_state()
        if backend is not None:
            backend.attach(self)

    def _reset_state(self) -> None:
        self._rx.clear()
        self.ier = 0
        self.lcr = 0
        self.mcr: int = Mcr.OUT2
        self.lsr_errors = 0       # OE/PE/FE/BI, cleared by reading LSR
        self.msr = _MSR_DCD | _MSR_DSR | _MSR_CTS
        self.scr = 0
        self.dll = 0x0C           # 9600 baud
        self.dlm = 0
        self.fifo_enabled = False
        self.trigger = 1
        self.thr_pending = False  # THR-empty interrupt latched
        self._level = False

    def close(self) -> None:
        """Close the back-end (the machine's shutdown)."""
        if self._backend is not None:
            self._backend.close()

    def reset(self) -> None:
        """Machine reset: back to power-on register values, FIFOs empty, IRQ low."""
        with self._lock:
            self._reset_state()
            if self._irq is not None:
                self._irq.set_level(False)
        if self._backend is not None:
            self._backend.accept_input()

    # -- VM state (pyvmm.vmstate) -----------------------------------------------------------
    vmstate_version = 1
    _STATE_FIELDS = ("ier", "lcr", "mcr", "lsr_errors", "msr", "scr", "dll", "dlm", "fifo_enabled", "trigger",
                     "thr_pending", "_rx")

    def save_state(self) -> dict[str, Any]:
        """Registers and the receive FIFO (the back-end is the destination's own)."""
        with self._lock:
            return fields.capture(self, self._STATE_FIELDS)

    def load_state(self, state: dict[str, Any], version: int) -> None:
        with self._lock:
            fields.apply(self, self._STATE_FIELDS, state)
            if len(self._rx) > FIFO_SIZE or any(not isinstance(b, int) or not 0 <= b <= 0xFF for b in self._rx):
                self._rx.clear()
                raise VmStateError("serial: receive FIFO in the state is invalid")
            self._update_irq()
            if self._irq is not None:
                self._irq.set_level(self._level)

    # -- interrupt logic (lock held) ---------------------------------------------------------
    def _rx_capacity(self) -> int:
        return FIFO_SIZE if self.fifo_enabled else 1

    def _pending_iir(self) -> int:
        """The highest-priority pending, enabled interrupt, as IIR bits 3:0."""
        ier = self.ier
        if ier & _IER_ELSI and self.lsr_errors:
            return _IIR_RLSI
        if ier & _IER_ERBFI and self._rx:
            if self.fifo_enabled and len(self._rx) < self.trigger:
                return _IIR_CTI
            return _IIR_RDI
        if ier & _IER_ETBEI and self.thr_pending:
            return _IIR_THRI
        if ier & _IER_EDSSI and self.msr & _MSR_DELTAS:
            return _IIR_MSI
        return _IIR_NO_INT

    def _update_irq(self) -> None:
        level = self._pending_iir() != _IIR_NO_INT
        if level != self._level:
            self._level = level
            if self._irq is not None:
                self._irq.set_level(level)

    def _set_msr_lines(self, lines: int) -> None:
        """Change the modem-status lines (bits 7:4), latching the delta bits."""
        old = self.msr
        changed = (old ^ lines) & 0xF0
        deltas = old & _MSR_DELTAS
        if changed & _MSR_CTS:
            deltas |= _MSR_DCTS
        if changed & _MSR_DSR:
            deltas |= _MSR_DDSR
        if changed & _MSR_DCD:
            deltas |= _MSR_DDCD
        if (old & _MSR_RI) and not (lines & _MSR_RI):  # trailing edge of ring indicator
            deltas |= _MSR_TERI
        self.msr = (lines & 0xF0) | deltas

    def _push_rx(self, byte: int) -> None:
        if len(self._rx) >= self._rx_capacity():
            self.lsr_errors |= _LSR_OE
            return
        self._rx.append(byte)

    # -- register access (vCPU threads) ------------------------------------------------------
    def io_read(self, offset: int, size: int) -> int:
        if size == 1:
            return self._read_reg(offset)
        value = 0
        for i in range(size):
            value |= self._read_reg(offset + i) << (8 * i)
        return value

    def io_write(self, offset: int, size: int, value: int) -> None:
        if size == 1:
            self._write_reg(offset, value & 0xFF)
            return
        for i in range(size):
            self._write_reg(offset + i, (value >> (8 * i)) & 0xFF)

    def _read_reg(self, offset: int) -> int:
        drained = False
        with self._lock:
            if offset == _R_RBR_THR:
                if self.lcr & _LCR_DLAB:
                    return self.dll
                if self._rx:
                    value = self._rx.popleft()
                    drained = True
                else:
                    value = 0
                self._update_irq()
            elif offset == _R_IER:
                value = self.dlm if self.lcr & _LCR_DLAB else self.ier
            elif offset == _R_IIR_FCR:
                iir = self._pending_iir()
                if iir == _IIR_THRI:
                    self.thr_pending = False  # reading IIR acknowledges THR-empty
                    self._update_irq()
                value = iir | (_IIR_FIFO_BITS if self.fifo_enabled else 0)
            elif offset == _R_LCR:
                value = self.lcr
            elif offset == _R_MCR:
                value = self.mcr
            elif offset == _R_LSR:
                value = _LSR_IDLE | self.lsr_errors
                if self._rx:
                    value |= _LSR_DR
                if self.lsr_errors:
                    self.lsr_errors = 0
                    self._update_irq()
            elif offset == _R_MSR:
                value = self.msr
                if value & _MSR_DELTAS:
                    self.msr &= ~_MSR_DELTAS & 0xFF
                    self._update_irq()
            elif offset == _R_SCR:
                value = self.scr
            else:
                value = 0xFF
        if drained and self._backend is not None:
            self._backend.accept_input()
        return value

    def _write_reg(self, offset: int, value: int) -> None:
        out = -1
        with self._lock:
            if offset == _R_RBR_THR:
                if self.lcr & _LCR_DLAB:
                    self.dll = value
                    return
                if self.mcr & _MCR_LOOP:
                    self._push_rx(value)
                else:
                    out = value
                # The byte leaves at once: THR is empty again, so THRE re-asserts.
                self.thr_pending = True
                self._update_irq()
            elif offset == _R_IER:
                if self.lcr & _LCR_DLAB:
                    self.dlm = value
                    return
                old = self.ier
                self.ier = value & 0x0F
                if (self.ier & _IER_ETBEI) and not (old & _IER_ETBEI):
                    self.thr_pending = True  # THR is always empty here
                elif not (self.ier & _IER_ETBEI):
                    self.thr_pending = False
                self._update_irq()
            elif offset == _R_IIR_FCR:
                self._write_fcr(value)
            elif offset == _R_LCR:
                self.lcr = value
            elif offset == _R_MCR:
                self._write_mcr(value)
            elif offset == _R_LSR:
                pass  # factory test register; ignored
            elif offset == _R_MSR:
                pass
            elif offset == _R_SCR:
                self.scr = value
        if out >= 0 and self._backend is not None:
            self._backend.write(_BYTE[out])

    def _write_fcr(self, value: int) -> None:
        enable = bool(value & _FCR_ENABLE)
        drained = False
        if enable != self.fifo_enabled:
            # Changing the FIFO mode clears both FIFOs on a 16550A.
            drained = bool(self._rx)
            self._rx.clear()
            self.fifo_enabled = enable
        if enable:
            if value & _FCR_CLEAR_RX:
                drained = drained or bool(self._rx)
                self._rx.clear()
            self.trigger = _TRIGGER[(value & _FCR_TRIGGER_MASK) >> 6]
        else:
            self.trigger = 1
        self._update_irq()
        if drained and self._backend is not None:
            # Called with the lock held: accept_input only schedules work on the loop thread.
            self._backend.accept_input()

    def _write_mcr(self, value: int) -> None:
        old = self.mcr
        self.mcr = value & _MCR_MASK
        if self.mcr & _MCR_LOOP:
            self._set_msr_lines(_msr_from_mcr(self.mcr))
        elif old & _MCR_LOOP:
            self._set_msr_lines(_MSR_DCD | _MSR_DSR | _MSR_CTS)
        self._update_irq()
        if (old & _MCR_LOOP) and not (self.mcr & _MCR_LOOP) and self._backend is not None:
            self._backend.accept_input()  # external input is connected again

    # -- input from the back-end (loop thread) -----------------------------------------------
    def can_receive(self) -> int:
        with self._lock:
            if self.mcr & _MCR_LOOP:
                return 0  # in loopback the external input is disconnected
            return self._rx_capacity() - len(self._rx)

    def receive(self, data: bytes) -> None:
        with self._lock:
            if self.mcr & _MCR_LOOP:
                return
            for b in data:
                self._push_rx(b)
            self._update_irq()

    # -- introspection (tests, monitor) ------------------------------------------------------
    @property
    def irq_level(self) -> bool:
        return self._level

    def rx_count(self) -> int:
        with self._lock:
            return len(self._rx)


# -- its registry entry (pyvmm.qdev): QEMU's isa-serial --------------------------------------------
#: COM1-COM4: (port, GSI) by index, as the PC and QEMU place them.
COM_PORTS = ((layout.COM1_PORT, layout.COM1_GSI), (layout.COM2_PORT, layout.COM2_GSI),
             (layout.COM3_PORT, layout.COM1_GSI), (layout.COM4_PORT, layout.COM2_GSI))


def _create(ctx: DeviceContext, props: DeviceProps) -> Serial:
    index = props.get("index")
    if index is None:
        index = ctx.count("isa-serial")
    if index >= len(COM_PORTS):
        raise ConfigError(f"Max. supported number of ISA serial ports is {len(COM_PORTS)}.")
    port, gsi = COM_PORTS[index]
    iobase = props.get("iobase")
    irq = props.get("irq")
    if irq is not None and irq >= 16:
        raise ConfigError("Maximum value for \"irq\" is: 15")
    chardev = props.get_str("chardev")
    backend = ctx.chardev(chardev) if chardev is not None else None
    name = props.name(f"serial{index}")
    dev = Serial(ctx.irq_line(gsi if irq is None else irq), backend, name=name)
    try:
        ctx.add_io(port if iobase is None else iobase, SERIAL_IO_SIZE, dev, name)
    except Exception:
        dev.close()
        raise
    return dev


DEVICE_TYPES = [DeviceType(
    "isa-serial", BusKind.ISA, _create,
    (Prop("index", PropType.UINT32), Prop("iobase", PropType.UINT32), Prop("irq", PropType.UINT32),
     Prop("chardev", PropType.STR, None, "ID of a chardev to use as a backend")),
    "16550A UART (COM1-COM4)")]
