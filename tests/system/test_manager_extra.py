"""The manager's dependencies are an extra: ``pyvmm run`` works without them, ``pyvmm vm`` and
``pyvmmd`` say in one line what to install.

The child processes hide the extra's packages with an import hook, as if only
the base package were installed.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

from conftest import debug_exit_status
from pyvmm.manager.extra import MANAGER_MODULES

ROOT = Path(__file__).resolve().parents[2]
# Every top-level package the manager extra brings (and what they pull in).
HIDDEN = ("fastapi", "uvicorn", "pydantic", "pydantic_core", "websockets", "httpx", "httpcore", "qemu",
          "starlette", "anyio")

BLOCKER = f"""
import sys
class _Hide:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {HIDDEN!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None
sys.meta_path.insert(0, _Hide())
"""


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCKER + code], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=120)


def test_extra_lists_the_modules_the_manager_checks_for() -> None:
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["manager"]
    names = {req.split("=")[0].split(">")[0].split("<")[0].strip().lower() for req in extra}
    assert names == {m.lower() for m in MANAGER_MODULES}
    base = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert not {req.split("=")[0].split(">")[0].strip().lower() for req in base} & names


def test_run_works_without_the_manager_extra(guests) -> None:
    r = _run("from pyvmm.cli import main; "
             "sys.exit(main(['run', '--accel', 'tcg', '--device', 'isa-debug-exit,iobase=0xf4,iosize=0x04', "
             f"'--kernel', {str(guests['realmode_hello'])!r}]))")
    assert r.returncode == debug_exit_status(0x2A), r.stderr
    assert r.stdout == "Hello from real mode\n", r.stderr
    loaded = _run("import pyvmm.cli, pyvmm.machine.pc; print(sorted(m for m in sys.modules "
                  f"if m.split('.')[0] in {HIDDEN!r}))")
    assert loaded.returncode == 0 and loaded.stdout.strip() == "[]", loaded.stderr


def test_vm_without_the_extra_is_one_line() -> None:
    r = _run("from pyvmm.cli import main; sys.exit(main(['vm', 'list']))")
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("pyvmm: error: pyvmm vm needs the manager's dependencies"), lines[0]
    assert "pip install 'pyvmm[manager]'" in lines[0] and "fastapi" in lines[0], lines[0]


def test_pyvmmd_without_the_extra_is_one_line() -> None:
    r = _run("from pyvmm.manager.extra import pyvmmd_main; sys.exit(pyvmmd_main())")
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pyvmmd: error: pyvmmd needs"), r.stderr


def test_pyvmmd_script_is_the_checked_entry_point() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["pyvmmd"] == "pyvmm.manager.extra:pyvmmd_main"
    r = subprocess.run([str(Path(sys.executable).parent / "pyvmmd"), "--help"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and "usage: pyvmmd" in r.stdout, r.stderr
