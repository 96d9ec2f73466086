"""ACPI tables and AML checked with ``iasl`` (Debian's acpica-tools, installed by scripts/bootstrap)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

#: An ACPI table's header: the AML of a DSDT or SSDT starts after it.
HEADER_LEN = 36


def find_iasl() -> str:
    """Path of ``iasl``; fails the test (never skips) when it is missing."""
    path = shutil.which("iasl")
    if path is None:
        pytest.fail("iasl not found: scripts/bootstrap installs acpica-tools", pytrace=False)
    return path


def compile_asl(tmp_path: Path, body: str) -> bytes:
    """Compile ``body`` inside an SSDT definition block; returns the AML after the table header."""
    src = tmp_path / "t.asl"
    src.write_text('DefinitionBlock ("t.aml", "SSDT", 2, "PYVMM ", "TEST", 1)\n{\n' + body + "\n}\n")
    return compile_dsl(tmp_path, src, "t")[HEADER_LEN:]


def compile_dsl(tmp_path: Path, src: Path, name: str = "re") -> bytes:
    """The whole table ``iasl`` compiles from the ASL file ``src`` (as ``tmp_path/name.aml``)."""
    out = subprocess.run([find_iasl(), "-p", str(tmp_path / name), str(src)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, f"iasl failed:\n{out.stdout}\n{out.stderr}"
    return (tmp_path / f"{name}.aml").read_bytes()


def iasl_disassemble(tmp_path: Path, name: str, blob: bytes) -> str:
    """Disassemble the table ``blob`` (as ``tmp_path/name.dsl``); fails on any error, warning or bad checksum."""
    path = tmp_path / f"{name}.dat"
    path.write_bytes(blob)
    out = subprocess.run([find_iasl(), "-d", str(path)], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    text = out.stdout + out.stderr
    assert out.returncode == 0, f"iasl -d {name} failed:\n{text}"
    for bad in ("Error", "Warning", "Incorrect checksum", "Invalid"):
        assert bad not in text, f"iasl -d {name} reports {bad!r}:\n{text}"
    dsl = (tmp_path / f"{name}.dsl").read_text()
    assert "Incorrect checksum" not in dsl
    return dsl
