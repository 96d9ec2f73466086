"""Build hook: compiles pyvmm's two C helpers (cffi) when the package is installed.

Everything else about the package is in pyproject.toml; setuptools reads
``cffi_modules`` only from setup(), hence this file.
"""

from setuptools import setup

setup(cffi_modules=[
    "src/pyvmm/accel/tcg/pvtcg_build.py:ffibuilder",
    "src/pyvmm/kvm/kvmrun_build.py:ffibuilder",
])
