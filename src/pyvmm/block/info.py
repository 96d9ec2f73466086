"""The block graph as QEMU's QMP reports it: BlockInfo (``query-block``), BlockDeviceInfo
(``query-named-block-nodes``, ``query-block``'s ``inserted``) and BlockStats (``query-blockstats``),
with QEMU 7.2's field names.

pyvmm has no I/O throttling, so the ``bps``/``iops`` limits are 0 (none), as QEMU reports them
without throttling.
"""

from __future__ import annotations

import json
import os
from typing import Any

from pyvmm.block.base import BlockBackend
from pyvmm.block.graph import Backend, BlockGraph, Node
from pyvmm.block.iov import FileStats
from pyvmm.block.stats import IoStats


def _fd_of(image: BlockBackend | None) -> int:
    fd = getattr(image, "fd", -1)
    return fd if isinstance(fd, int) else -1


def _actual_size(path: str, fd: int = -1) -> int | None:
    """Bytes the file takes on the host (through an open fd when there is one: a -snapshot
    overlay has no name any more)."""
    try:
        return (os.fstat(fd) if fd >= 0 else os.stat(path)).st_blocks * 512
    except OSError:
        return None


def _file_length(path: str, fd: int = -1) -> int:
    own = fd < 0
    try:
        if own:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        return -(-os.lseek(fd, 0, os.SEEK_END) // 512) * 512  # QEMU's file length is in whole sectors
    except OSError:
        return 0
    finally:
        if own and fd >= 0:
            os.close(fd)


def image_info(image: BlockBackend, fmt: str, filename: str, shown: str | None = None) -> dict[str, Any]:
    """QEMU's ImageInfo for an open image (and, for qcow2, its backing chain); ``shown``: the
    name QEMU gives it, when not ``filename`` (see :func:`display_filename`)."""
    from pyvmm.block.qcow2 import Qcow2Image

    info: dict[str, Any] = {"virtual-size": image.size, "filename": shown or filename, "format": fmt,
                            "dirty-flag": False}
    actual = _actual_size(filename, _fd_of(image))
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
        if image.backing_name:  # what the header names, whatever the backing option chose
            info["backing-filename"] = image.backing_name
            name = image.backing_name
            info["full-backing-filename"] = name if os.path.isabs(name) else \
                os.path.join(os.path.dirname(os.path.abspath(filename)), name)
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


def _header_backing(node: Node) -> str | None | bool:
    """The full backing file name the node's qcow2 header gives, None if it names none, False if
    the header is not at hand."""
    from pyvmm.block.qcow2 import Qcow2Image

    image = node.image if node.image is not None else node.chain_image
    if not isinstance(image, Qcow2Image):
        return False
    name = image.backing_name
    if name is None:
        return None
    return name if os.path.isabs(name) else os.path.join(os.path.dirname(os.path.abspath(node.filename)), name)


def _backing_overridden(node: Node) -> bool:
    """The ``backing`` option chose something else than the header names (QEMU then describes
    the node by its options, a ``json:`` filename)."""
    if node.temporary:
        return True
    if node.driver != "qcow2" or not node.opts.backing_set:
        return False
    header = _header_backing(node)
    if header is False:
        return False
    if node.backing is None:
        return header is not None
    return display_filename(node.backing) != header


def _options(node: Node) -> dict[str, Any]:
    if node.driver == "file":
        return {"driver": "file", "filename": node.opts.filename}
    assert node.file is not None
    out: dict[str, Any] = {"driver": node.driver, "file": _options(node.file)}
    if _backing_overridden(node):
        out["backing"] = _options(node.backing) if node.backing is not None else None
    return out


def _needs_json(node: Node) -> bool:
    while node.driver != "file":
        if _backing_overridden(node):
            return True
        if node.backing is None:
            return False
        node = node.backing
    return False


def display_filename(node: Node) -> str:
    """The node's filename as QEMU shows it: the file's name, or ``json:{options}`` when the
    file name alone would open something else."""
    if node.driver != "file" and _needs_json(node):
        return "json:" + json.dumps(_options(node), sort_keys=True)
    return node.filename


def node_info(node: Node) -> dict[str, Any]:
    """QEMU's BlockDeviceInfo for one node."""
    image = node.image if node.image is not None else node.chain_image
    filename = node.filename
    shown = display_filename(node)
    if image is None:  # a child: its parent's stack covers it; describe the file itself
        above = next((p.image if p.image is not None else p.chain_image for p, role in node.parents
                      if role == "file"), None)
        fd = _fd_of(above)
        image_part: dict[str, Any] = {"virtual-size": _file_length(filename, fd), "filename": shown,
                                      "format": node.driver, "dirty-flag": False}
        actual = _actual_size(filename, fd)
        if actual is not None:
            image_part["actual-size"] = actual
        ro = above.read_only if above is not None else node.read_only  # a file is open as its format is
        chain: list[BlockBackend] = []
    else:
        fmt = "file" if node.driver == "file" else node.driver
        image_part = image_info(image, fmt, filename, shown)
        if node.driver == "file":
            image_part.pop("format-specific", None)
        ro = image.read_only
        chain = _chain(image) if node.driver == "qcow2" else []
    out: dict[str, Any] = {
        "file": shown, "node-name": node.name, "ro": ro, "drv": node.driver,
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
    out: dict[str, Any] = {"device": backend.name, "locked": False, "removable": backend.qdev is None,
                           "type": "unknown", "inserted": node_info(backend.root)}
    if backend.qdev is not None:  # a backend no device uses: QEMU calls it removable, with no io-status
        out["qdev"] = backend.qdev
        out["io-status"] = "ok"
    return out


def _file_stats(node: Node) -> FileStats | None:
    """The host-file counters of a file node: kept by the image open on it (its format's, or its
    own when a device uses the file node directly)."""
    holders = [node.image] + [p.image if p.image is not None else p.chain_image for p, role in node.parents
                              if role == "file"]
    return next((fs for img in holders if isinstance(fs := getattr(img, "file_stats", None), FileStats)), None)


def node_stats(node: Node) -> dict[str, Any]:
    """A node's BlockStats below the device's level: QEMU counts requests per BlockBackend, so a
    node reports only what its driver keeps: a file node its highest written offset and discards."""
    stats = IoStats(accounted=False)
    out: dict[str, Any] = {"node-name": node.name, "stats": stats.to_json()}
    if node.driver == "file":
        fs = _file_stats(node)
        out["stats"]["wr_highest_offset"] = fs.wr_highest_offset if fs is not None else 0
        out["driver-specific"] = {"driver": "file", "discard-nb-ok": fs.discard_nb_ok if fs else 0,
                                  "discard-nb-failed": 0, "discard-bytes-ok": fs.discard_bytes_ok if fs else 0}
    if node.file is not None:
        out["parent"] = node_stats(node.file)
    if node.backing is not None:
        out["backing"] = node_stats(node.backing)
    return out


def block_stats(backend: Backend) -> dict[str, Any]:
    """QEMU's BlockStats for a device's backend: the device's counters, its nodes' below.

    Requests are counted where the device meets its image (QEMU's BlockBackend level); the
    nodes below report what their drivers keep (:func:`node_stats`).
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
