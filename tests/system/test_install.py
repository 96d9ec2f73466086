"""A non-editable install carries both C helpers compiled, and runs them without a compiler.

The wheel is built the way ``pip install .`` builds it; its contents are then
imported in a child process whose PATH holds no compiler.  A missing or stale
extension must stop the accelerator with one line that says to reinstall.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXTENSIONS = ("pyvmm/accel/tcg/_pvtcg", "pyvmm/kvm/_kvmrun")

# Imports both helpers from the unpacked wheel and prints where they came from.
PROBE = """
import shutil, sys
assert shutil.which("gcc") is None and shutil.which("cc") is None, "a compiler is on PATH"
import pyvmm
from pyvmm.kvm import fastrun
from pyvmm.accel.tcg import native
call = fastrun.run_call()
nat = native.native()
print(pyvmm.__file__)
print(call.compiled, nat.ffi.string(nat.lib.pv_build_hash()).decode())
"""


@pytest.fixture(scope="module")
def unpacked(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(ROOT)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    wheels = list(out.glob("pyvmm-*.whl"))
    assert len(wheels) == 1, wheels
    site = out / "site"
    with zipfile.ZipFile(wheels[0]) as z:
        z.extractall(site)
    return site


def _run_without_compiler(site: Path, code: str) -> subprocess.CompletedProcess:
    # Only the interpreter's own directory: pyvmm's dependencies come from its site-packages,
    # pyvmm itself from the unpacked wheel (PYTHONPATH is searched first).
    env = {"PATH": str(Path(sys.executable).parent), "PYTHONPATH": str(site), "HOME": os.environ.get("HOME", "/")}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=site, timeout=60)


def test_wheel_holds_both_compiled_helpers(unpacked: Path) -> None:
    for ext in EXTENSIONS:
        found = list(unpacked.glob(ext + "*.so"))
        assert len(found) == 1, f"{ext}: {found}"


def test_helpers_load_without_a_compiler(unpacked: Path) -> None:
    assert shutil.which("gcc", path=str(Path(sys.executable).parent)) is None
    r = _run_without_compiler(unpacked, PROBE)
    assert r.returncode == 0, r.stderr
    where, result = r.stdout.splitlines()
    assert Path(where).is_relative_to(unpacked)
    compiled, digest = result.split()
    assert compiled == "True"
    from pyvmm.accel.tcg import pvtcg_build
    assert digest == pvtcg_build.source_hash()


@pytest.mark.parametrize("ext, error", [("pyvmm/accel/tcg/_pvtcg", "AccelError"), ("pyvmm/kvm/_kvmrun", "KvmError")])
def test_missing_helper_says_reinstall(unpacked: Path, tmp_path: Path, ext: str, error: str) -> None:
    site = tmp_path / "site"
    shutil.copytree(unpacked, site)
    for so in site.glob(ext + "*.so"):
        so.unlink()
    r = _run_without_compiler(site, PROBE)
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"pyvmm.errors.{error}: "), r.stderr
    assert "is missing" in last and "reinstall pyvmm" in last, last


def test_stale_tcg_helper_is_refused(unpacked: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    shutil.copytree(unpacked, site)
    header = site / "pyvmm/accel/tcg/pvtcg.h"
    header.write_text(header.read_text() + "\n/* edited after the build */\n")
    r = _run_without_compiler(site, PROBE)
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert "built from other sources" in last and "reinstall pyvmm" in last, last


def test_cli_reports_a_missing_helper_in_one_line(unpacked: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    shutil.copytree(unpacked, site)
    for so in site.glob("pyvmm/accel/tcg/_pvtcg*.so"):
        so.unlink()
    kernel = tmp_path / "boot.bin"
    kernel.write_bytes(b"\xf4" * 512)   # never reached: the accelerator is refused first
    r = _run_without_compiler(site, "import sys; from pyvmm.cli import main; "
                              f"sys.exit(main(['run', '--accel', 'tcg', '-kernel', '{kernel}']))")
    assert r.returncode != 0
    errors = [line for line in r.stderr.splitlines() if "error" in line.lower() or "Traceback" in line]
    assert len(errors) == 1, r.stderr
    assert errors[0].startswith("pyvmm: error: ") and "reinstall pyvmm" in errors[0], r.stderr
