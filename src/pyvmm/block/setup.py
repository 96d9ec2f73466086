"""Building the machine's block graph from its options: every ``-blockdev``, then every ``-drive``
(QEMU's order), so a ``-drive`` never names a node that does not exist yet."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from pyvmm.block.blockdev import NodeOptions
from pyvmm.block.graph import BlockGraph


def build_block_graph(blockdevs: Iterable[NodeOptions], drives: Mapping[str, Any]) -> BlockGraph:
    """``drives``: -drive specs by backend id (``file``, ``format``, ``readonly``, ``locking``,
    ``serial``, ``snapshot``, ``text``, as :class:`pyvmm.devices.virtio.options.DriveSpec` has)."""
    graph = BlockGraph()
    try:
        for node in blockdevs:
            graph.add_blockdev([node])
        for ident, d in drives.items():
            graph.add_drive(ident, d.file, d.format, read_only=d.readonly, locking=d.locking, serial=d.serial,
                            snapshot=d.snapshot, text=d.text or f"file={d.file}")
    except BaseException:
        graph.close()
        raise
    return graph
