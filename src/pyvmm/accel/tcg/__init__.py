"""The ``tcg`` accelerator (unicorn), with a userspace irqchip."""

from pyvmm.accel.tcg.accel import TcgAccelerator

__all__ = ["TcgAccelerator"]
