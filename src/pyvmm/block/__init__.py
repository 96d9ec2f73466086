"""Disk image back-ends for block devices: raw files and qcow2 (v2/v3) with a backing file.

Use :func:`open_image` to open a file in a given format; every back-end
implements :class:`~pyvmm.block.base.BlockBackend`.
"""

from pyvmm.block.base import BlockBackend, BlockError, open_image

__all__ = ["BlockBackend", "BlockError", "open_image"]
