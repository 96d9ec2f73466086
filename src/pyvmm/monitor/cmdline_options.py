"""``query-command-line-options``: the QemuOpts options pyvmm's command line reads, and their keys.

Generated from the option syntaxes ``pyvmm run`` parses with (:mod:`pyvmm.cli`), under the
names QEMU gives the option lists (``-smp`` is ``smp-opts``, ``-boot`` is ``boot-opts``, ``-m``
is ``memory``).  An option whose keys depend on a type (``-device``, ``-object``, ``-netdev``,
``-blockdev``) has an empty parameter list, as in QEMU.  A key listed here is one pyvmm parses;
some values are still refused with a message (e.g. ``usb=on``).
"""

from __future__ import annotations

from typing import Any

#: QEMU's QemuOptsList name -> pyvmm's option name, for lists whose names differ.
_LIST_NAMES = {"smp": "smp-opts", "boot": "boot-opts", "m": "memory"}
_BOOLEAN_KEYS = frozenset({"debug-threads", "timestamp", "guest-name", "strict", "menu", "server", "wait",
                           "usb", "dump-guest-core", "hpet", "graphics", "pit", "sata", "mem-lock", "cpu-pm"})


def command_line_options() -> list[dict[str, Any]]:
    from pyvmm import cli

    out = []
    for syntax in cli.qemuopts_syntaxes():
        keys = syntax.keys or ()
        params = [{"name": k, "type": "boolean" if k in _BOOLEAN_KEYS else "string"} for k in keys]
        out.append({"option": _LIST_NAMES.get(syntax.name, syntax.name), "parameters": params})
    return out
