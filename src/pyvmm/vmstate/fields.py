"""Saving a device's attributes as plain data, and loading them back into the same types.

``capture(obj, names)`` reads each attribute and turns it into plain data (deques and tuples
into lists, bytearrays into bytes, enums into ints); ``apply(obj, names, state)`` checks that
every name is there with a value of the right kind and sets the attribute back in the type it
has now (a deque stays a deque, a bytearray of the same length stays one).  Devices list
their fields once and call both from ``save_state``/``load_state``.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Iterable
from typing import Any

from pyvmm.vmstate.protocol import VmStateError


def plain(value: Any) -> Any:
    if value is None or isinstance(value, (bool, str, bytes, float)):
        return value
    if isinstance(value, enum.Enum):
        return plain(value.value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, (list, tuple, deque)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {plain(k): plain(v) for k, v in value.items()}
    raise VmStateError(f"cannot save a value of type {type(value).__name__}")


def capture(obj: object, names: Iterable[str]) -> dict[str, Any]:
    return {n: plain(getattr(obj, n)) for n in names}


def like(current: Any, value: Any, what: str) -> Any:
    """``value`` (plain data) in the type ``current`` has; VmStateError if it cannot be."""
    def bad() -> VmStateError:
        return VmStateError(f"state field {what}: expected {type(current).__name__}, got {type(value).__name__}")

    if isinstance(current, bool):
        if not isinstance(value, bool):
            raise bad()
        return value
    if isinstance(current, (int, enum.Enum)) and not isinstance(current, bool):
        if not isinstance(value, int) or isinstance(value, bool):
            raise bad()
        return value
    if isinstance(current, float):
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise bad()
        return float(value)
    if isinstance(current, str):
        if not isinstance(value, str):
            raise bad()
        return value
    if isinstance(current, bytearray):
        if not isinstance(value, bytes):
            raise bad()
        return bytearray(value)
    if isinstance(current, bytes):
        if not isinstance(value, bytes):
            raise bad()
        return value
    if isinstance(current, deque):
        if not isinstance(value, list):
            raise bad()
        return deque(value, maxlen=current.maxlen)
    if isinstance(current, tuple):
        if not isinstance(value, list):
            raise bad()
        return tuple(value)
    if isinstance(current, list):
        if not isinstance(value, list):
            raise bad()
        return list(value)
    if isinstance(current, dict):
        if not isinstance(value, dict):
            raise bad()
        return dict(value)
    if current is None:  # an optional field that is unset now: None or an int
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise bad()
        return value
    raise bad()


def apply(obj: object, names: Iterable[str], state: dict[str, Any], *, optional: Iterable[str] = ()) -> None:
    """Set each attribute from ``state`` (all checked first, so a bad field changes nothing)."""
    if not isinstance(state, dict):
        raise VmStateError(f"state of {type(obj).__name__} is not a map")
    opt = set(optional)
    values = {}
    for n in names:
        if n not in state:
            if n in opt:
                continue
            raise VmStateError(f"state of {type(obj).__name__} lacks field {n!r}")
        values[n] = like(getattr(obj, n), state[n], f"{type(obj).__name__}.{n}")
    for n, v in values.items():
        setattr(obj, n, v)


def need(state: dict[str, Any], key: str, kind: type | tuple[type, ...], what: str) -> Any:
    """``state[key]``, checked to be of ``kind``."""
    if not isinstance(state, dict) or key not in state:
        raise VmStateError(f"state of {what} lacks field {key!r}")
    v = state[key]
    if not isinstance(v, kind) or (isinstance(v, bool) and kind is int):
        raise VmStateError(f"state field {what}.{key} has the wrong type")
    return v
