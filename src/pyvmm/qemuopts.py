"""QEMU's option-argument grammar, one parser for every option.

Two syntaxes, as QEMU 7.2 reads them (``util/qemu-option.c``, ``qobject/json-parser.c``):

* **QemuOpts**: ``key=value[,key=value...]``.  An option may have an *implied first key*:
  ``-m 16M`` is ``-m size=16M``, ``-smp 2`` is ``-smp cpus=2``, ``-device virtio-rng-pci,...``
  is ``-device driver=virtio-rng-pci,...``.  ``,,`` stands for a literal comma inside a value
  (file names).  A bare ``flag`` means ``flag=on`` and ``noflag`` means ``flag=off`` (QEMU
  accepts these with a deprecation warning; so do we).  Values stay strings: the consumer
  types them (:func:`parse_bool`, :func:`parse_int`, :func:`parse_size`).
* **JSON**: an argument that starts with ``{`` is a JSON object, for the options whose
  :attr:`OptionSyntax.json` is set (``-device``, ``-object``, ``-blockdev``, ``-netdev``,
  ``-audiodev``).  JSON values keep their types (int, bool, float, nested objects).

Every error is a :class:`~pyvmm.errors.ConfigError` whose text starts with the option and
its argument, as QEMU's do: ``-m sise=16M: Invalid parameter 'sise'``.

This module is on the bottom floor: it imports only :mod:`pyvmm.errors`.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pyvmm.errors import ConfigError

log = logging.getLogger("pyvmm")

#: A property value: a string from QemuOpts, or whatever JSON gave.
Value = Any

_TRUE = ("on", "yes", "true", "y")
_FALSE = ("off", "no", "false", "n")
#: QEMU's id_wellformed(): a letter, then letters, digits, '-', '.', '_'.
_ID_RE = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*\Z")
_SIZE_SUFFIX = {"": 0, "B": 0, "K": 10, "M": 20, "G": 30, "T": 40, "P": 50, "E": 60}


@dataclass(frozen=True)
class OptionSyntax:
    """How one option's argument is read.

    ``implied``: the key a leading ``value`` (no ``=``) belongs to.  ``keys``: the keys the
    option knows (QEMU's ``QemuOptDesc`` list); None lets any key through (``-device``, whose
    properties depend on the driver).  ``json``: a ``{...}`` argument is JSON.
    """

    name: str
    implied: str | None = None
    keys: tuple[str, ...] | None = None
    json: bool = False


@dataclass
class Opts:
    """One parsed option argument: ``-NAME TEXT`` as an ordered key -> value mapping.

    A key given twice keeps its last value (QEMU's ``qemu_opt_get`` returns the last one).
    """

    option: str
    text: str
    values: dict[str, Value] = field(default_factory=dict)
    from_json: bool = False
    help: bool = False  # ``help`` or ``?`` was given: the caller lists what is available

    # -- errors ------------------------------------------------------------------------------
    def error(self, message: str) -> ConfigError:
        """A ConfigError naming this option and its argument, as QEMU's messages do."""
        return ConfigError(f"-{self.option} {self.text}: {message}")

    # -- access ------------------------------------------------------------------------------
    def __contains__(self, key: str) -> bool:
        return key in self.values

    def get(self, key: str, default: Value = None) -> Value:
        return self.values.get(key, default)

    def pop(self, key: str, default: Value = None) -> Value:
        return self.values.pop(key, default)

    def get_str(self, key: str, default: str | None = None) -> str | None:
        """A string value; a JSON non-string is refused as QEMU's visitor refuses it."""
        if key not in self.values:
            return default
        value = self.values[key]
        if not isinstance(value, str):
            raise self.error(f"Invalid parameter type for '{key}', expected: string")
        return value

    def get_bool(self, key: str, default: bool = False) -> bool:
        if key not in self.values:
            return default
        return parse_bool(self.values[key], key, self)

    def get_int(self, key: str, default: int | None = None) -> int | None:
        if key not in self.values:
            return default
        return parse_int(self.values[key], key, self)

    def get_size(self, key: str, default: int | None = None, *, default_suffix: str = "") -> int | None:
        if key not in self.values:
            return default
        return parse_size(self.values[key], key, self, default_suffix=default_suffix)

    def check_keys(self, allowed: Iterable[str]) -> None:
        """Refuse any key not in ``allowed`` with QEMU's "Invalid parameter" message."""
        known = set(allowed)
        for key in self.values:
            if key not in known:
                raise self.error(f"Invalid parameter '{key}'")

    def check_id(self, key: str = "id") -> str | None:
        """The ``id`` value, checked to be a QEMU identifier; None when absent."""
        if key not in self.values:
            return None
        value = self.values[key]
        if not isinstance(value, str) or not _ID_RE.match(value):
            raise self.error(f"Parameter '{key}' expects an identifier (a letter, then letters, "
                             "digits, '-', '.', '_')")
        return value


# -- QemuOpts ------------------------------------------------------------------------------------

def _value(text: str, pos: int) -> tuple[str, int]:
    """A value from ``pos`` up to the next single comma, with ``,,`` read as ``,``."""
    out: list[str] = []
    while pos < len(text):
        c = text[pos]
        if c == ",":
            if text.startswith(",,", pos):
                out.append(",")
                pos += 2
                continue
            break
        out.append(c)
        pos += 1
    return "".join(out), pos


def split_escaped(text: str) -> list[str]:
    """``text`` split at single commas, ``,,`` read as a literal comma (QEMU's legacy chardev syntax)."""
    parts, pos = [], 0
    while True:
        value, pos = _value(text, pos)
        parts.append(value)
        if pos >= len(text):
            return parts
        pos += 1


def escape(value: str) -> str:
    """``value`` with each comma doubled, to stand inside a comma-separated option argument."""
    return value.replace(",", ",,")


def split_opts(text: str, implied: str | None = None) -> list[tuple[str, str, bool]]:
    """QemuOpts tokens of ``text`` as (key, value, was_flag) in order.

    The first element is ``implied=element`` when ``implied`` is given and that element has
    no ``=`` before its first comma; other elements without ``=`` are flags (``x`` -> x=on,
    ``nox`` -> x=off).  A key runs to the first ``=`` or ``,``; a value to the next single
    comma, ``,,`` being a literal comma.
    """
    tokens: list[tuple[str, str, bool]] = []
    pos, first = 0, True
    while pos < len(text):
        end = pos
        while end < len(text) and text[end] not in "=,":
            end += 1
        if end >= len(text) or text[end] != "=":
            if first and implied is not None:
                value, pos = _value(text, pos)
                tokens.append((implied, value, False))
            else:
                name = text[pos:end]
                pos = end
                if name.startswith("no") and name not in ("help", "?"):
                    tokens.append((name[2:], "off", True))
                else:
                    tokens.append((name, "on", True))
        else:
            name = text[pos:end]
            value, pos = _value(text, end + 1)
            tokens.append((name, value, False))
        first = False
        if pos < len(text):
            pos += 1  # the separating comma
    return tokens


def parse(syntax: OptionSyntax, text: str) -> Opts:
    """Parse one argument of option ``syntax.name``; raises a one-line ConfigError."""
    if syntax.json and text.startswith("{"):
        return Opts(syntax.name, text, parse_json(syntax.name, text), from_json=True)
    opts = Opts(syntax.name, text)
    for key, value, flag in split_opts(text, syntax.implied):
        if flag and key in ("help", "?"):
            opts.help = True
            continue
        if flag:
            spelled = key if value == "on" else f"no{key}"
            log.warning("-%s %s: short-form boolean option '%s' is deprecated, use %s=%s",
                        syntax.name, text, spelled, key, value)
        opts.values.pop(key, None)  # keep insertion order of the last occurrence
        opts.values[key] = value
    if syntax.implied is not None and opts.values.get(syntax.implied) in ("help", "?"):
        opts.help = True
    if syntax.keys is not None and not opts.help:
        opts.check_keys(syntax.keys)
    return opts


def parse_json(option: str, text: str) -> dict[str, Value]:
    """A JSON object argument; duplicate keys and non-objects are refused."""

    def no_duplicates(pairs: list[tuple[str, Value]]) -> dict[str, Value]:
        out: dict[str, Value] = {}
        for k, v in pairs:
            if k in out:
                raise ConfigError(f"-{option} {text}: JSON parse error, duplicate key '{k}'")
            out[k] = v
        return out

    try:
        value = json.loads(text, object_pairs_hook=no_duplicates)
    except json.JSONDecodeError as e:
        raise ConfigError(f"-{option} {text}: JSON parse error, {e.msg} at character {e.pos}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"-{option} {text}: JSON must be an object")
    return value


# -- typing values ----------------------------------------------------------------------------

def _where(key: str, opts: Opts | None) -> str:
    return f"-{opts.option} {opts.text}: " if opts is not None else ""


def parse_bool(value: Value, key: str, opts: Opts | None = None) -> bool:
    """on/yes/true/y and off/no/false/n (QEMU's ``qapi_bool_parse``); JSON booleans as they are."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        if value in _TRUE:
            return True
        if value in _FALSE:
            return False
    raise ConfigError(f"{_where(key, opts)}Parameter '{key}' expects 'on' or 'off'")


def parse_int(value: Value, key: str, opts: Opts | None = None) -> int:
    """A decimal, 0x hex or 0 octal integer (``strtoll`` base 0); JSON integers as they are."""
    if isinstance(value, bool):
        raise ConfigError(f"{_where(key, opts)}Parameter '{key}' expects integer")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        t = value.strip()
        try:
            if re.fullmatch(r"[+-]?0[0-7]+", t):
                return int(t, 8)  # strtoll base 0: a leading 0 is octal
            return int(t, 0)
        except ValueError:
            pass
    raise ConfigError(f"{_where(key, opts)}Parameter '{key}' expects integer")


def parse_size(value: Value, key: str, opts: Opts | None = None, *, default_suffix: str = "") -> int:
    """A size with an optional K/M/G/T/P/E suffix (powers of 1024), as QEMU's ``qemu_strtosz``.

    ``default_suffix`` is the unit of a bare number (``-m 512`` means MiB: ``"M"``).
    """
    where = _where(key, opts)
    bad = f"{where}Parameter '{key}' expects a size (a number with an optional K, M, G, T, P or E suffix)"
    if isinstance(value, bool):
        raise ConfigError(bad)
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(bad)
        return value
    if not isinstance(value, str):
        raise ConfigError(bad)
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([BKMGTPEbkmgtpe]?)", value)
    if not m:
        raise ConfigError(bad)
    suffix = m.group(2).upper() or default_suffix.upper()
    number = m.group(1)
    shift = _SIZE_SUFFIX[suffix]
    if "." in number:
        if not m.group(2):
            raise ConfigError(bad)  # QEMU: a fraction needs an explicit suffix
        result = float(number) * (1 << shift)
        if result != int(result):
            raise ConfigError(f"{where}Parameter '{key}': {value} is not a whole number of bytes")
        size = int(result)
    else:
        size = int(number) << shift
    if size >= 1 << 64:
        raise ConfigError(f"{where}Parameter '{key}': {value} is too large (at most 2^64 - 1)")
    return size


def format_opts(values: Mapping[str, Value]) -> str:
    """``key=value,...`` with commas in values escaped as ``,,``; the inverse of :func:`parse`."""
    parts = []
    for k, v in values.items():
        if isinstance(v, bool):
            v = "on" if v else "off"
        parts.append(f"{k}={str(v).replace(',', ',,')}")
    return ",".join(parts)


__all__ = ["OptionSyntax", "Opts", "Value", "escape", "format_opts", "parse", "parse_bool", "parse_int", "parse_json",
           "parse_size", "split_escaped", "split_opts"]
