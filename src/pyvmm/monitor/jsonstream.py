"""Split a QMP byte stream into JSON messages, surviving any garbage.

QMP has no framing: a message ends where its top-level JSON value ends
(clients usually add a newline, but need not).  So, like QEMU's JSON
streamer, we scan bytes and track string state and bracket nesting; when the
outermost ``{...}`` closes, the bytes are handed to :func:`json.loads`.

A client is untrusted, so the splitter never raises and never grows without
bound.  :meth:`JsonStream.feed` returns parsed values (:class:`Message`) and
:class:`ParseError` s in stream order, and after an error it
resynchronises:

* bytes JSON never allows (control characters outside strings, raw control
  characters inside strings, 0xFE/0xFF), a closing bracket that does not
  match, or nesting deeper than :data:`MAX_NESTING` end the current message
  with an error, and scanning restarts at the next byte (so a client can
  always reset the parser by sending a newline inside a string, or 0xFF);
* a message longer than :data:`MAX_MESSAGE` bytes is answered with one error
  and the rest of it is discarded up to the next newline.
"""

from __future__ import annotations

import enum
import json
import re
from dataclasses import dataclass

#: Largest message accepted (bytes); QMP commands are small.
MAX_MESSAGE = 1 << 20
#: Deepest bracket nesting accepted (json.loads recurses once per level).
MAX_NESTING = 256

_WS = frozenset(b" \t\r\n")
_OPEN = {ord("{"): ord("}"), ord("["): ord("]")}
_CLOSE = frozenset(b"}]")
#: Bytes that end a top-level scalar token (true, 123, garbage...).
_DELIM = frozenset(b" \t\r\n{}[]\",:")
_BAD = frozenset(range(0x20)) - _WS | {0xFE, 0xFF}
#: Bytes that need attention inside a string / inside a container (the rest is copied in bulk).
_STRING_STOP = re.compile(rb'["\\\x00-\x1f\xfe\xff]')
_VALUE_STOP = re.compile(rb'["{}\[\]\x00-\x08\x0b\x0c\x0e-\x1f\xfe\xff]')


@dataclass(frozen=True)
class ParseError:
    """A malformed message; ``desc`` is the QMP error text."""

    desc: str


@dataclass(frozen=True)
class Message:
    """A complete, well-formed JSON value (not necessarily an object)."""

    value: object


class _State(enum.IntEnum):
    TOP = 0        # between messages
    VALUE = 1      # inside {...} or [...]
    STRING = 2     # inside "..." (at any depth)
    ESCAPE = 3     # after a backslash inside a string
    SCALAR = 4     # a top-level token that is not an object, array or string
    DISCARD = 5    # dropping an oversized message up to the next newline


def _reject_constant(name: str) -> float:
    raise ValueError(f"invalid keyword '{name}'")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def _loads(text: str) -> object:
    """Strict JSON: no NaN/Infinity (Python's extension), whose echo (e.g. in "id") would not be JSON."""
    return json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)


def _stray(text: str) -> ParseError:
    return ParseError(f"JSON parse error, stray {text!r}")


def _char(byte: int) -> str:
    return chr(byte) if byte < 0x80 else "\ufffd"


class JsonStream:
    """Incremental splitter: :meth:`feed` bytes, get complete messages and parse errors in order."""

    def __init__(self, max_message: int = MAX_MESSAGE, max_nesting: int = MAX_NESTING) -> None:
        self.max_message = max_message
        self.max_nesting = max_nesting
        self._buf = bytearray()
        self._state = _State.TOP
        self._stack: list[int] = []   # expected closing bytes, innermost last
        self._string_return = _State.TOP
        self._out: list[Message | ParseError] = []

    def _reset(self) -> None:
        self._buf.clear()
        self._stack.clear()
        self._state = _State.TOP

    def feed(self, data: bytes) -> list[Message | ParseError]:
        """Consume ``data``; return the messages and errors it completed, in stream order.

        Runs of ordinary bytes inside strings and containers are found with a
        regular expression and copied in one go, so large messages cost little
        Python per byte; everything else goes through :meth:`_step`.  The
        result never depends on how the stream is cut into chunks.
        """
        out = self._out = []
        limit = self.max_message
        n = len(data)
        pos = 0
        while pos < n:
            state = self._state
            if state == _State.DISCARD:
                nl = data.find(b"\n", pos)
                if nl < 0:
                    break
                self._state = _State.TOP
                pos = nl + 1
                continue
            if state == _State.STRING or state == _State.VALUE:
                m = (_STRING_STOP if state == _State.STRING else _VALUE_STOP).search(data, pos)
                end = m.start() if m else n
                room = limit - len(self._buf)
                if end - pos > room:   # the byte at pos + room is the one too many
                    self._overflow()
                    pos += room + 1
                    continue
                self._buf += data[pos:end]
                pos = end
                if m is None:
                    break
            self._step(data[pos])
            pos += 1
            if len(self._buf) > limit:
                self._overflow()
        return out

    def _overflow(self) -> None:
        self._reset()
        self._state = _State.DISCARD
        self._out.append(ParseError(f"JSON parse error, message exceeds {self.max_message} bytes"))

    def _step(self, byte: int) -> None:  # one state machine, kept in one place
        state = self._state
        if state == _State.DISCARD:
            if byte == 0x0A:
                self._state = _State.TOP
        elif state == _State.STRING:
            if byte == 0x22:  # closing quote
                self._buf.append(byte)
                self._state = self._string_return
                if self._state == _State.TOP:
                    self._finish()
            elif byte < 0x20 or byte >= 0xFE:
                text = self._buf.decode("utf-8", "replace") + _char(byte)
                self._reset()
                self._out.append(_stray(text))
            else:
                self._buf.append(byte)
                if byte == 0x5C:  # backslash
                    self._state = _State.ESCAPE
        elif state == _State.ESCAPE:
            if byte < 0x20 or byte >= 0xFE:
                self._reset()
                self._out.append(ParseError("JSON parse error, invalid escape sequence in string"))
            else:
                self._buf.append(byte)
                self._state = _State.STRING
        elif state == _State.SCALAR:
            if byte in _DELIM or byte in _BAD:
                self._finish_scalar()
                self._step(byte)   # the delimiter may start something new
            else:
                self._buf.append(byte)
        elif byte in _BAD:
            self._reset()
            self._out.append(_stray(_char(byte)))
        elif state == _State.TOP:
            if byte in _WS:
                return
            if byte in _CLOSE:
                self._out.append(ParseError("JSON parse error, expecting value"))
                return
            self._buf.append(byte)
            if byte in _OPEN:
                self._stack.append(_OPEN[byte])
                self._state = _State.VALUE
            elif byte == 0x22:
                self._string_return = _State.TOP
                self._state = _State.STRING
            else:
                self._state = _State.SCALAR
        else:  # _State.VALUE
            self._buf.append(byte)
            if byte == 0x22:
                self._string_return = _State.VALUE
                self._state = _State.STRING
            elif byte in _OPEN:
                if len(self._stack) >= self.max_nesting:
                    self._reset()
                    self._out.append(ParseError("JSON parse error, nesting too deep"))
                else:
                    self._stack.append(_OPEN[byte])
            elif byte in _CLOSE:
                if byte != self._stack[-1]:
                    self._reset()
                    self._out.append(ParseError("JSON parse error, expecting value"))
                else:
                    self._stack.pop()
                    if not self._stack:
                        self._finish()

    def _finish(self) -> None:
        """A complete top-level value (object, array or string) is in the buffer."""
        raw = bytes(self._buf)
        self._reset()
        try:
            self._out.append(Message(_loads(raw.decode("utf-8"))))
        except UnicodeDecodeError:
            self._out.append(ParseError("JSON parse error, invalid UTF-8 sequence"))
        except RecursionError:
            self._out.append(ParseError("JSON parse error, nesting too deep"))
        except ValueError as e:
            msg = getattr(e, "msg", str(e))
            self._out.append(ParseError(f"JSON parse error, {msg[:1].lower()}{msg[1:]}"))

    def _finish_scalar(self) -> None:
        """A top-level token ended: valid JSON (a number, true...) or an invalid keyword."""
        token = self._buf.decode("utf-8", "replace")
        self._reset()
        try:
            self._out.append(Message(_loads(token)))
        except (ValueError, RecursionError):
            self._out.append(ParseError(f"JSON parse error, invalid keyword {token!r}"))
