"""Kernel loaders for ``-kernel``: Linux bzImage, ELF vmlinux/PVH, multiboot v1, raw boot sectors."""

from pyvmm.boot.common import BootResult
from pyvmm.boot.detect import detect_format, load_kernel

__all__ = ["BootResult", "detect_format", "load_kernel"]
