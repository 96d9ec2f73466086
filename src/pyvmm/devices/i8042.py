"""The i8042 PS/2 keyboard controller with an attached AT keyboard (no mouse).

What it is for on a VM:

* **Reset.**  ``outb 0xfe, 0x64`` (pulse the output-port reset line) and a
  write of the output port with bit 0 clear are how Linux's ``reboot=k``
  and most bootloaders reset a PC; both post ``control.request_reset``.
* **Probe.**  Linux's i8042 and atkbd drivers talk to it at boot: controller
  self-test (0xAA -> 0x55), command byte read/write (0x20/0x60), interface
  tests, port enable/disable, the AUX loopback (0xD3) used to find a mouse
  port, and keyboard reset/identify/scancode-set commands.  There is no
  mouse: bytes sent to it (0xD4) are answered 0xFE, so psmouse gives up fast.
* **Ctrl-Alt-Del.**  :meth:`I8042.inject_ctrl_alt_del` types the three keys
  so a Linux guest runs its ctrl-alt-del action (reboot or power off).

Scancodes: the keyboard generates set 2 by default; with the controller's
translation bit (command byte bit 6) on, the guest sees set 1, exactly as
through a real 8042's translator.  With translation off the keyboard's
current set (1, 2 or 3, chosen by command 0xF0) is used.

Output buffer: the controller holds one byte (status OBF, plus AUX_OBF when
it came from the AUX side).  Bytes the controller itself produces (command
replies, 0xD2/0xD3 writes) queue ahead of device bytes and ignore the port
disable bits; keyboard/mouse bytes wait while their port is disabled.  IRQ1
and IRQ12 are levels: high while a byte from that side is in the output
buffer and that side's interrupt is enabled in the command byte.

Locking: vCPU threads (port access) and the loop or monitor thread
(``inject_*``) share the state, so every entry point takes ``self._lock``.
``control.request_reset`` only posts to a mailbox, so it is safe under it.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from enum import IntEnum
from typing import Any

from pyvmm.irq import IrqLine
from pyvmm.ratelimit import guest_log
from pyvmm.runstate import VmControl
from pyvmm.vmstate import VmStateError, fields

log = logging.getLogger(__name__)

DATA_PORT = 0x60
CMD_PORT = 0x64

#: Bytes a PS/2 device buffers before it drops (a keyboard's internal buffer).
QUEUE_LIMIT = 16


class Status(IntEnum):
    OBF = 0x01
    IBF = 0x02
    SYS = 0x04
    CMD = 0x08          # last write was to the command port
    UNLOCKED = 0x10     # keyboard inhibit switch off
    AUX_OBF = 0x20
    TIMEOUT = 0x40
    PARITY = 0x80


class Ctr(IntEnum):
    """Controller command byte ("RAM byte 0")."""

    KBD_INT = 0x01
    AUX_INT = 0x02
    SYS = 0x04
    KBD_DISABLE = 0x10
    AUX_DISABLE = 0x20
    XLATE = 0x40


class Cmd(IntEnum):
    READ_CTR = 0x20
    WRITE_CTR = 0x60
    AUX_DISABLE = 0xA7
    AUX_ENABLE = 0xA8
    AUX_TEST = 0xA9
    SELF_TEST = 0xAA
    KBD_TEST = 0xAB
    KBD_DISABLE = 0xAD
    KBD_ENABLE = 0xAE
    READ_INPUT = 0xC0
    READ_OUTPUT = 0xD0
    WRITE_OUTPUT = 0xD1
    WRITE_KBD_OBUF = 0xD2
    WRITE_AUX_OBUF = 0xD3
    WRITE_AUX = 0xD4
    A20_DISABLE = 0xDD
    A20_ENABLE = 0xDF
    READ_TEST_INPUTS = 0xE0
    PULSE_FIRST = 0xF0   # 0xF0-0xFF: pulse output port bits 3:0 low for those clear in the command


class KbdCmd(IntEnum):
    SET_LEDS = 0xED
    ECHO = 0xEE
    SCANCODE_SET = 0xF0
    IDENTIFY = 0xF2
    TYPEMATIC = 0xF3
    ENABLE = 0xF4
    DISABLE = 0xF5
    DEFAULTS = 0xF6
    RESEND = 0xFE
    RESET = 0xFF


class Reply(IntEnum):
    ACK = 0xFA
    RESEND = 0xFE
    SELF_TEST_OK = 0xAA
    ECHO = 0xEE
    CTRL_SELF_TEST_OK = 0x55


#: Output port bits.
OUT_RESET = 0x01   # 0 = hold the CPU in reset
OUT_A20 = 0x02
OUT_KBD_OBF = 0x10
OUT_AUX_OBF = 0x20

#: Key name -> (set 1 make, set 2 make, set 3 make).  A leading 0xE0 marks an extended key.
KEYS: dict[str, tuple[bytes, bytes, bytes]] = {
    "ctrl": (b"\x1d", b"\x14", b"\x11"),
    "alt": (b"\x38", b"\x11", b"\x19"),
    "kp_delete": (b"\x53", b"\x71", b"\x71"),
    "delete": (b"\xe0\x53", b"\xe0\x71", b"\x64"),
    "enter": (b"\x1c", b"\x5a", b"\x5a"),
}

#: QEMU's key names (QMP ``send-key`` qcodes) of the keys above.
QCODES: dict[str, str] = {"ctrl": "ctrl", "alt": "alt", "delete": "delete", "kp_decimal": "kp_delete", "ret": "enter"}

#: Scancode-set number as reported by command 0xF0 0x00 when translation is on.
_XLATED_SET_ID = {1: 0x43, 2: 0x41, 3: 0x3F}


def scancode(key: str, pressed: bool, scanset: int) -> bytes:
    """The bytes the guest sees for ``key`` in scancode set ``scanset`` (1 = translated)."""
    make = KEYS[key][scanset - 1]
    if pressed:
        return make
    if scanset == 1:
        return make[:-1] + bytes([make[-1] | 0x80])
    return make[:-1] + b"\xf0" + make[-1:]


class _Port:
    """One of the controller's two port ranges: the bus calls it with offset 0."""

    __slots__ = ("_read", "_write")

    def __init__(self, read: Callable[[], int], write: Callable[[int], None]) -> None:
        self._read = read
        self._write = write

    def io_read(self, offset: int, size: int) -> int:
        return self._read() if offset == 0 else 0xFF

    def io_write(self, offset: int, size: int, value: int) -> None:
        if offset == 0:
            self._write(value & 0xFF)


class I8042:
    """Keyboard controller + keyboard.  Register ``data_port`` at 0x60 and ``cmd_port`` at 0x64."""

    def __init__(self, control: VmControl, irq_kbd: IrqLine | None, irq_aux: IrqLine | None) -> None:
        self._control = control
        self._irq_kbd = irq_kbd
        self._irq_aux = irq_aux
        self._lock = threading.Lock()
        self._ctrl_q: deque[tuple[int, bool]] = deque()   # controller-made bytes: (byte, is_aux)
        self._kbd_q: deque[int] = deque()
        self._aux_q: deque[int] = deque()
        self.data_port = _Port(self._read_data, self._write_data)
        self.cmd_port = _Port(self._read_status, self._write_command)
        self._reset_state()

    def _reset_state(self) -> None:
        self._ctrl_q.clear()
        self._kbd_q.clear()
        self._aux_q.clear()
        # As firmware leaves it: both interrupts on, system flag set, translation on.
        self.ctr = Ctr.KBD_INT | Ctr.AUX_INT | Ctr.SYS | Ctr.XLATE
        self.status = Status.UNLOCKED | Status.SYS
        self.outport = OUT_RESET | OUT_A20
        self.obuf = 0
        self.obf = False
        self.obuf_aux = False
        self.pending_cmd: int | None = None   # controller command waiting for its data byte
        self._kbd_reset_state()
        self._irq_levels = (False, False)

    def _kbd_reset_state(self) -> None:
        self.kbd_scanning = True
        self.kbd_scanset = 2
        self.kbd_leds = 0
        self.kbd_pending: int | None = None   # keyboard command waiting for its argument

    def reset(self) -> None:
        with self._lock:
            self._reset_state()
            for line in (self._irq_kbd, self._irq_aux):
                if line is not None:
                    line.set_level(False)

    # -- VM state (pyvmm.vmstate) -----------------------------------------------------------
    vmstate_version = 1
    _STATE_FIELDS = ("ctr", "status", "outport", "obuf", "obf", "obuf_aux", "pending_cmd", "kbd_scanning",
                     "kbd_scanset", "kbd_leds", "kbd_pending", "_kbd_q", "_aux_q")

    def save_state(self) -> dict[str, Any]:
        with self._lock:
            st = fields.capture(self, self._STATE_FIELDS)
            st["ctrl_q"] = [[b, aux] for b, aux in self._ctrl_q]
            return st

    def load_state(self, state: dict[str, Any], version: int) -> None:
        ctrl = fields.need(state, "ctrl_q", list, "i8042")
        queue: deque[tuple[int, bool]] = deque()
        for item in ctrl:
            if (not isinstance(item, list) or len(item) != 2 or not isinstance(item[0], int)
                    or not isinstance(item[1], bool)):
                raise VmStateError("i8042: controller queue in the state is invalid")
            queue.append((item[0] & 0xFF, item[1]))
        with self._lock:
            fields.apply(self, self._STATE_FIELDS, state)
            self._ctrl_q = queue
            for q in (self._kbd_q, self._aux_q):
                if any(not isinstance(b, int) for b in q):
                    q.clear()
                    raise VmStateError("i8042: device queue in the state is invalid")
            self._irq_levels = (False, False)
            kbd = self.obf and not self.obuf_aux and bool(self.ctr & Ctr.KBD_INT)
            aux = self.obf and self.obuf_aux and bool(self.ctr & Ctr.AUX_INT)
            for line, level in ((self._irq_kbd, kbd), (self._irq_aux, aux)):
                if line is not None:
                    line.set_level(level)
            self._irq_levels = (kbd, aux)

    # -- output buffer and IRQs (lock held) --------------------------------------------------
    def _refill(self) -> None:
        if self.obf:
            return
        if self._ctrl_q:
            self.obuf, self.obuf_aux = self._ctrl_q.popleft()
        elif self._kbd_q and not (self.ctr & Ctr.KBD_DISABLE):
            self.obuf, self.obuf_aux = self._kbd_q.popleft(), False
        elif self._aux_q and not (self.ctr & Ctr.AUX_DISABLE):
            self.obuf, self.obuf_aux = self._aux_q.popleft(), True
        else:
            return
        self.obf = True

    def _update(self) -> None:
        self._refill()
        kbd = self.obf and not self.obuf_aux and bool(self.ctr & Ctr.KBD_INT)
        aux = self.obf and self.obuf_aux and bool(self.ctr & Ctr.AUX_INT)
        self._set_lines(kbd, aux)

    def _set_lines(self, kbd: bool, aux: bool) -> None:
        if (kbd, aux) != self._irq_levels:
            self._irq_levels = (kbd, aux)
            if self._irq_kbd is not None:
                self._irq_kbd.set_level(kbd)
            if self._irq_aux is not None:
                self._irq_aux.set_level(aux)

    def _ctrl_reply(self, byte: int, aux: bool = False) -> None:
        # Bounded like the device queues: a guest issuing commands without ever reading port 0x60
        # must not grow host memory.
        if len(self._ctrl_q) >= QUEUE_LIMIT:
            return
        self._ctrl_q.append((byte & 0xFF, aux))

    def _kbd_reply(self, *data: int) -> None:
        for b in data:
            if len(self._kbd_q) >= QUEUE_LIMIT:
                log.debug("i8042: keyboard queue full, byte %#x dropped", b)
                return
            self._kbd_q.append(b & 0xFF)

    def _aux_reply(self, byte: int) -> None:
        if len(self._aux_q) < QUEUE_LIMIT:
            self._aux_q.append(byte & 0xFF)

    @property
    def translating(self) -> bool:
        return bool(self.ctr & Ctr.XLATE)

    # -- ports (vCPU threads) ----------------------------------------------------------------
    def _read_status(self) -> int:
        with self._lock:
            self._update()
            value = self.status & ~(Status.OBF | Status.AUX_OBF | Status.IBF)
            if self.obf:
                value |= Status.OBF
                if self.obuf_aux:
                    value |= Status.AUX_OBF
            return value

    def _read_data(self) -> int:
        with self._lock:
            value = self.obuf  # with nothing new, a real 8042 returns the last byte again
            self.obf = False
            # Drop the lines before loading the next byte: ISA IRQ1/12 are edge-triggered at
            # the PIC/IOAPIC, and Linux takes one byte per interrupt, so each byte needs an edge.
            self._set_lines(False, False)
            self._update()
            return value

    def _write_command(self, cmd: int) -> None:
        with self._lock:
            self.status |= Status.CMD
            self.pending_cmd = None
            self._controller_command(cmd)
            self._update()

    def _write_data(self, value: int) -> None:
        with self._lock:
            self.status &= ~Status.CMD
            cmd, self.pending_cmd = self.pending_cmd, None
            if cmd is None:
                # Sending to the keyboard re-enables its port, as on real controllers.
                self.ctr &= ~Ctr.KBD_DISABLE
                self._keyboard_write(value)
            else:
                self._controller_data(cmd, value)
            self._update()

    # -- controller commands -----------------------------------------------------------------
    def _controller_command(self, cmd: int) -> None:
        if cmd == Cmd.READ_CTR:
            self._ctrl_reply(self.ctr)
        elif 0x21 <= cmd <= 0x3F:
            self._ctrl_reply(0)  # other controller RAM bytes: unused
        elif cmd == Cmd.WRITE_CTR or 0x61 <= cmd <= 0x7F or cmd in (
                Cmd.WRITE_OUTPUT, Cmd.WRITE_KBD_OBUF, Cmd.WRITE_AUX_OBUF, Cmd.WRITE_AUX):
            self.pending_cmd = cmd
        elif cmd == Cmd.AUX_DISABLE:
            self.ctr |= Ctr.AUX_DISABLE
        elif cmd == Cmd.AUX_ENABLE:
            self.ctr &= ~Ctr.AUX_DISABLE
        elif cmd in (Cmd.AUX_TEST, Cmd.KBD_TEST):
            self._ctrl_reply(0x00)  # interface OK
        elif cmd == Cmd.SELF_TEST:
            self.status |= Status.SYS
            self._ctrl_reply(Reply.CTRL_SELF_TEST_OK)
        elif cmd == Cmd.KBD_DISABLE:
            self.ctr |= Ctr.KBD_DISABLE
        elif cmd == Cmd.KBD_ENABLE:
            self.ctr &= ~Ctr.KBD_DISABLE
        elif cmd == Cmd.READ_INPUT:
            self._ctrl_reply(0x80)  # keyboard not inhibited
        elif cmd == Cmd.READ_OUTPUT:
            value = self.outport & ~(OUT_KBD_OBF | OUT_AUX_OBF)
            if self.obf:
                value |= OUT_AUX_OBF if self.obuf_aux else OUT_KBD_OBF
            self._ctrl_reply(value)
        elif cmd == Cmd.A20_DISABLE:
            self.outport &= ~OUT_A20
        elif cmd == Cmd.A20_ENABLE:
            self.outport |= OUT_A20
        elif cmd == Cmd.READ_TEST_INPUTS:
            self._ctrl_reply(0x00)
        elif cmd >= Cmd.PULSE_FIRST:
            if not (cmd & OUT_RESET):
                self._reset_line(f"i8042 reset (command {cmd:#x})")
        else:
            log.debug("i8042: unsupported controller command %#x ignored", cmd)

    def _controller_data(self, cmd: int, value: int) -> None:
        if cmd == Cmd.WRITE_CTR:
            self.ctr = value
            if value & Ctr.SYS:
                self.status |= Status.SYS
            else:
                self.status &= ~Status.SYS
        elif 0x61 <= cmd <= 0x7F:
            pass  # other RAM bytes: not kept
        elif cmd == Cmd.WRITE_OUTPUT:
            self.outport = value
            if not (value & OUT_RESET):
                self._reset_line("i8042 reset (output port write)")
        elif cmd == Cmd.WRITE_KBD_OBUF:
            self._ctrl_reply(value, aux=False)
        elif cmd == Cmd.WRITE_AUX_OBUF:
            self._ctrl_reply(value, aux=True)
        elif cmd == Cmd.WRITE_AUX:
            self.ctr &= ~Ctr.AUX_DISABLE
            self._aux_reply(Reply.RESEND)  # no mouse attached

    def _reset_line(self, reason: str) -> None:
        guest_log(log, logging.INFO, "%s", reason)
        self._control.request_reset("i8042 reset")

    # -- keyboard ----------------------------------------------------------------------------
    def _keyboard_write(self, value: int) -> None:
        pending, self.kbd_pending = self.kbd_pending, None
        if pending is not None:
            self._keyboard_argument(pending, value)
            return
        if value == KbdCmd.RESET:
            self._kbd_q.clear()
            self._kbd_reset_state()
            self._kbd_reply(Reply.ACK, Reply.SELF_TEST_OK)
        elif value == KbdCmd.IDENTIFY:
            self._kbd_reply(Reply.ACK, 0xAB, 0x41 if self.translating else 0x83)
        elif value == KbdCmd.ENABLE:
            self.kbd_scanning = True
            self._kbd_reply(Reply.ACK)
        elif value == KbdCmd.DISABLE:
            self.kbd_scanning = False
            self._kbd_reply(Reply.ACK)
        elif value == KbdCmd.DEFAULTS:
            self.kbd_scanset = 2
            self._kbd_reply(Reply.ACK)
        elif value in (KbdCmd.SET_LEDS, KbdCmd.SCANCODE_SET, KbdCmd.TYPEMATIC):
            self.kbd_pending = value
            self._kbd_reply(Reply.ACK)
        elif value == KbdCmd.ECHO:
            self._kbd_reply(Reply.ECHO)
        elif 0xF7 <= value <= 0xFE:
            self._kbd_reply(Reply.ACK)  # set-3 key type commands and resend: accepted
        else:
            self._kbd_reply(Reply.RESEND)

    def _keyboard_argument(self, cmd: int, value: int) -> None:
        if cmd == KbdCmd.SET_LEDS:
            self.kbd_leds = value & 0x07
            self._kbd_reply(Reply.ACK)
        elif cmd == KbdCmd.TYPEMATIC:
            self._kbd_reply(Reply.ACK)
        elif cmd == KbdCmd.SCANCODE_SET:
            if value == 0:
                s = self.kbd_scanset
                self._kbd_reply(Reply.ACK, _XLATED_SET_ID[s] if self.translating else s)
            elif value in (1, 2, 3):
                self.kbd_scanset = value
                self._kbd_reply(Reply.ACK)
            else:
                self._kbd_reply(Reply.RESEND)

    # -- key injection (any thread) ----------------------------------------------------------
    def _effective_set(self) -> int:
        # The translator turns set-2 codes into set-1; other sets pass through it mangled on
        # real hardware, which nobody uses, so only set 2 is translated.
        if self.translating and self.kbd_scanset == 2:
            return 1
        return self.kbd_scanset

    def inject_keys(self, events: list[tuple[str, bool]]) -> None:
        """Queue key presses/releases ``(key name, pressed)`` and raise IRQ1."""
        with self._lock:
            if not self.kbd_scanning:
                log.debug("i8042: keyboard scanning disabled, keys dropped")
                return
            s = self._effective_set()
            for key, pressed in events:
                self._kbd_reply(*scancode(key, pressed, s))
            self._update()

    def inject_ctrl_alt_del(self) -> None:
        """Press Ctrl, Alt, keypad Del, then release them (Linux maps it to its C-A-D action)."""
        self.inject_keys([("ctrl", True), ("alt", True), ("kp_delete", True),
                          ("ctrl", False), ("alt", False), ("kp_delete", False)])

    # -- introspection -----------------------------------------------------------------------
    @property
    def irq_levels(self) -> tuple[bool, bool]:
        return self._irq_levels
