"""VM state: the versioned, self-describing stream that save/restore and migration write and read.

* :mod:`.codec`: plain data (None, bool, int, float, str, bytes, list, dict) to bytes and back,
  bounded and without code execution (no pickle: a stream may come from the network);
* :mod:`.stream`: the stream's records (header, one section per device, RAM, end), each checked;
* :mod:`.fields`: helpers devices use to save and load their attributes as plain data;
* :mod:`.ram`: guest RAM as records, zero pages sent compactly, and the passes of pre-copy.

Devices implement :class:`Stateful` (``vmstate_version``, ``save_state()``, ``load_state()``);
the machine walks its device tree and writes one section per device.  Nothing here knows
about accelerators or devices.
"""

from __future__ import annotations

from pyvmm.vmstate.protocol import Stateful, VmStateError

__all__ = ["Stateful", "VmStateError"]
