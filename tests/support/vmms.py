"""The two VMMs the comparison tests run: pyvmm and the reference, qemu-system-x86_64."""

from __future__ import annotations

import os
import shutil
import sys

import pytest

QEMU = "qemu-system-x86_64"

#: ``python -m pyvmm run``, spelled so that QEMU options follow it.
PYVMM = [sys.executable, "-m", "pyvmm", "run"]


def qemu_binary() -> str:
    """The path of qemu-system-x86_64; a test failure (never a skip) when it is not installed."""
    qemu = shutil.which(QEMU)
    if qemu is None:
        pytest.fail(f"{QEMU} not found: install the qemu-system-x86 package", pytrace=False)
    return qemu


def vmm_command(kind: str) -> list[str]:
    """The command line, up to its options, of ``kind`` ("pyvmm" or "qemu")."""
    if kind != "pyvmm":
        return [qemu_binary()]
    # PYVMM_TEST_SANDBOX=1: pyvmm runs under -sandbox on (see conftest.run_pyvmm)
    return [*PYVMM, "-sandbox", "on"] if os.environ.get("PYVMM_TEST_SANDBOX") == "1" else list(PYVMM)
