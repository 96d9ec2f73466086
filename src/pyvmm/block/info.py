"""The block graph as QEMU's QMP reports it: BlockInfo (``query-block``), BlockDeviceInfo
(``query-named-block-nodes``, ``query-block``'s ``inserted``) and BlockStats (``query-blockstats``),
with QEMU 7.2's field names.

pyvmm has no I/O throttling, so the ``bps``/``iops`` limits are 0 (none), as QEMU reports them
without throttling.  The backing chain a qcow2 header names (no ``backing`` option) is described
through ``backing_file``/``backing-image``, not listed as nodes of its own.
"""

from __future__ import annotations

import os
from typing import Any

from pyvmm.block.base import BlockBackend
from pyvmm.block.graph import Backend, BlockGraph, Node
from pyvmm.block.stats import IoStats


def _actual_size(path: str) -> int | None:
    try:
        return os.stat(path).st_blocks * 512
    except OSError:
        return None


def _file_length(path: str) -> int:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return 0
    try:
        return -(-os.lseek(fd, 0, os.SEEK_END) // 512) * 512  # QEMU's file length is in whole sectors
    finally:
        os.close(fd)


def image_info(image: BlockBackend, fmt: str, filename: str) -> dict[str, Any]:
    """QEMU's ImageInfo for an open image (and, for qcow2, its backing chain)."""
    from pyvmm.block.qcow2 import Qcow2Image

    info: dict[str, Any] = {"virtual-size": image.size, "filename": filename, "format": fmt, "dirty-flag": False}
    actual = _actual_size(filename)
    if actual is not None:
        info["actual-size"] = actual
    if isinstance(image, Qcow2Image):
        info["cluster-size"] = image.cluster_size
        if image.version >= 3:
            data: dict[str, Any] = {"compat": "1.1", "compression-type": "zlib",
                                    "lazy-refcounts": bool(image.compat & 1),
                                    "refcount-bits": 1 << image.refcount_order,
                                    "corrupt": bool(image.incompat & 2), "extended-l2": False}
        else:
            data = {"compat": "0.10", "compression-type": "zlib", "refcount-bits": 16}
        info["format-specific"] = {"type": "qcow2", "data": data}
        if image.backing_name and not image._backing_override:
            info["backing-filename"] = image.backing_name
            full = image.backing.path if image.backing is not None else image.backing_name
            info["full-backing-filename"] = full
            if image.backing_format:
                info["backing-filename-format"] = image.backing_format
        if image.backing is not None:
            info["backing-image"] = image_info(image.backing, _format_of(image.backing), image.backing.path)
    return info


def _format_of(image: BlockBackend) -> str:
    from pyvmm.block.qcow2 import Qcow2Image

    return "qcow2" if isinstance(image, Qcow2Image) else "raw"


def _chain(image: BlockBackend | None) -> list[BlockBackend]:
    out = []
    while image is not None:
        image = getattr(image, "backing", None)
        if image is not None:
            out.append(image)
    return out


def node_info(node: Node) -> dict[str, Any]:
    """QEMU's BlockDeviceInfo for one node."""
    image = node.image
    filename = node.filename
    if image is None:  # a child: its parent's stack covers it; describe the file itself
        image_part: dict[str, Any] = {"virtual-size": _file_length(filename), "filename": filename,
                                      "format": node.driver, "dirty-flag": False}
        actual = _actual_size(filename)
        if actual is not None:
            image_part["actual-size"] = actual
        ro = node.read_only
        chain: list[BlockBackend] = []
    else:
        fmt = "file" if node.driver == "file" else node.driver
        image_part = image_info(image, fmt, filename)
        if node.driver == "file":
            image_part.pop("format-specific", None)
        ro = image.read_only
        chain = _chain(image) if node.driver == "qcow2" else []
    out: dict[str, Any] = {
        "file": filename, "node-name": node.name, "ro": ro, "drv": node.driver,
        "encrypted": False, "detect_zeroes": "off",
        "bps": 0, "bps_rd": 0, "bps_wr": 0, "iops": 0, "iops_rd": 0, "iops_wr": 0,
        "write_threshold": 0,
        "cache": {"writeback": True, "direct": node.opts.cache_direct, "no-flush": node.opts.cache_no_flush},
        "backing_file_depth": len(chain),
        "image": image_part,
    }
    if chain:
        out["backing_file"] = chain[0].path
    return out


def block_info(backend: Backend) -> dict[str, Any]:
    """QEMU's BlockInfo (one ``query-block`` entry)."""
    out: dict[str, Any] = {"device": backend.name, "locked": False, "removable": False, "type": "unknown",
                           "io-status": "ok", "inserted": node_info(backend.root)}
    if backend.qdev is not None:
        out["qdev"] = backend.qdev
    return out


def node_stats(node: Node) -> dict[str, Any]:
    out: dict[str, Any] = {"node-name": node.name, "stats": IoStats(accounted=False).to_json()}
    if node.driver == "file":
        out["driver-specific"] = {"driver": "file", "discard-nb-ok": 0, "discard-nb-failed": 0,
                                  "discard-bytes-ok": 0}
    if node.file is not None:
        out["parent"] = node_stats(node.file)
    if node.backing is not None:
        out["backing"] = node_stats(node.backing)
    return out


def block_stats(backend: Backend) -> dict[str, Any]:
    """QEMU's BlockStats for a device's backend: the device's counters, its nodes' below.

    pyvmm counts I/O where the device meets its image (QEMU's BlockBackend level); the node
    levels below it report zero counters, with the structure QEMU gives.
    """
    stats = backend.image.stats if backend.image is not None else IoStats()
    out: dict[str, Any] = {"device": backend.name, "node-name": backend.root.name, "stats": stats.to_json()}
    if backend.qdev is not None:
        out["qdev"] = backend.qdev
    root = backend.root
    if root.file is not None:
        out["parent"] = node_stats(root.file)
    if root.backing is not None:
        out["backing"] = node_stats(root.backing)
    return out


def query_block(graph: BlockGraph) -> list[dict[str, Any]]:
    return [block_info(b) for b in _listed(graph)]


def query_blockstats(graph: BlockGraph) -> list[dict[str, Any]]:
    return [block_stats(b) for b in _listed(graph)]


def query_named_block_nodes(graph: BlockGraph, flat: bool = False) -> list[dict[str, Any]]:
    """Every node, newest first, as QEMU lists them."""
    out = []
    for node in reversed(list(graph.nodes.values())):
        info = node_info(node)
        if flat:
            info["image"].pop("backing-image", None)
        out.append(info)
    return out


def _listed(graph: BlockGraph) -> list[Backend]:
    """Backends QEMU lists: named ones, and anonymous ones a device uses."""
    return [b for b in graph.backends if b.name or b.qdev is not None]
