"""An exit tracer: count the guest's port-I/O and MMIO accesses, with their values, while it runs a command.

The VMM process loads this file as a plug-in (``VM(plugins=[__file__])``) and calls ``trace``
for every access that reaches a device (:meth:`pyvmm.bus.Bus.set_tracer`); the plug-in keeps
counts per (bus, address) and the last value, and writes them to ``$EXIT_TRACE_OUT`` as JSON
when the VMM exits.  The script then prints the busiest addresses: the serial port's data
register (0x3f8) for the command's console output, the virtio-pci notify registers for the agent.

Run: ``.venv/bin/python examples/exit_tracer.py``
"""

from __future__ import annotations

import atexit
import collections
import json
import os
import sys
import tempfile
import threading

_counts: collections.Counter[tuple[str, str, int]] = collections.Counter()
_last: dict[tuple[str, str, int], int] = {}
_lock = threading.Lock()


def trace(bus: str, kind: str, address: int, size: int, value: int) -> None:
    """Called in the VMM process for each access (several vCPU threads may call at once)."""
    key = (bus, kind, address)
    with _lock:
        _counts[key] += 1
        _last[key] = value


def _dump() -> None:
    out = os.environ.get("EXIT_TRACE_OUT")
    if out:
        with _lock:
            rows = [{"bus": b, "kind": k, "address": a, "count": n, "last": _last[(b, k, a)]}
                    for (b, k, a), n in _counts.most_common()]
        with open(out, "w") as f:
            json.dump(rows, f)


if os.environ.get("PYVMM_PLUGINS"):  # loaded by the VMM as a plug-in
    atexit.register(_dump)


def main() -> int:
    from pyvmm import VM

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "trace.json")
        os.environ["EXIT_TRACE_OUT"] = out
        with VM(memory="256M", plugins=[__file__]) as vm:
            vm.exec(["sh", "-c", "echo hello > /dev/ttyS0"], timeout=60)
        rows = json.load(open(out))
    print(f"{sum(r['count'] for r in rows)} accesses at {len(rows)} addresses; the busiest:")
    for r in rows[:8]:
        print(f"  {r['bus']:4} {r['kind']:5} {r['address']:#010x}  x{r['count']:<7} last value {r['last']:#x}")
    serial = [r for r in rows if r["bus"] == "io" and r["kind"] == "write" and r["address"] == 0x3F8]
    assert serial and serial[0]["count"] >= len("hello\n"), "no writes to the serial port were traced"
    return 0


if __name__ == "__main__":
    sys.exit(main())
