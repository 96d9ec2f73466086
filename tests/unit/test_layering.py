"""The house's layering, read from the source: each layer imports only the layers below it.

Every ``import`` and ``from ... import`` in ``src/pyvmm`` counts, including those inside
functions and under ``TYPE_CHECKING``: a lazy import is still a dependency.  The rules
are the ones docs/architecture.md draws:

* the bottom floor (errors, config, memory, buses, ...) imports only itself;
* the x86 platform floor imports only the bottom floor;
* the device registry (qdev) imports neither devices, accelerators, boot loaders nor the builder;
* devices know nothing of accelerators, the KVM ABI, boot loaders or the builder;
* accelerators know nothing of devices or the builder;
* boot loaders know nothing of devices, accelerators or the builder.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
PKG = SRC / "pyvmm"

BOTTOM = ("pyvmm.errors", "pyvmm.runstate", "pyvmm.cpu_state", "pyvmm.irq", "pyvmm.capabilities",
          "pyvmm.config", "pyvmm.qemuopts", "pyvmm.memory", "pyvmm.bus", "pyvmm.loop", "pyvmm.ratelimit",
          "pyvmm.unixsock")
ABOVE_DEVICES = ("pyvmm.accel", "pyvmm.kvm", "pyvmm.boot", "pyvmm.machine", "pyvmm.cli", "pyvmm.manager",
                 "pyvmm.guestkit")

#: (package whose modules are checked, prefixes they may import or None, prefixes they must not import)
RULES: list[tuple[str, tuple[str, ...] | None, tuple[str, ...]]] = [
    *[(m, BOTTOM, ()) for m in BOTTOM],
    ("pyvmm.x86", BOTTOM + ("pyvmm.x86",), ()),
    ("pyvmm.qga", BOTTOM + ("pyvmm.qga",), ()),  # a protocol client: knows no machine or device
    # The public API drives a VMM process; it never reaches into a machine, device or accelerator.
    ("pyvmm.sdk", None, ("pyvmm.devices", "pyvmm.accel", "pyvmm.kvm", "pyvmm.machine", "pyvmm.cli")),
    ("pyvmm.vmstate", BOTTOM + ("pyvmm.vmstate",), ()),
    ("pyvmm.qdev", None, ("pyvmm.devices",) + ABOVE_DEVICES),
    ("pyvmm.devices", None, ABOVE_DEVICES),
    ("pyvmm.accel", None, ("pyvmm.devices", "pyvmm.machine", "pyvmm.cli", "pyvmm.manager", "pyvmm.boot")),
    ("pyvmm.boot", None, ("pyvmm.devices", "pyvmm.accel", "pyvmm.kvm", "pyvmm.machine", "pyvmm.cli",
                          "pyvmm.manager")),
]


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, root: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every pyvmm import in one file."""
    tree = ast.parse(path.read_text(), str(path))
    mod = _module_name(path, root)
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # `from pyvmm.x86 import layout` depends on pyvmm.x86.layout
            found += [(node.lineno, f"{mod}.{a.name}") for a in node.names]
    return [(line, name) for line, name in found if name == "pyvmm" or name.startswith("pyvmm.")]


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def violations(pkg: Path = PKG) -> list[str]:
    root = pkg.parent
    bad = []
    for path in sorted(pkg.rglob("*.py")):
        mod = _module_name(path, root)
        for scope, allowed, forbidden in RULES:
            if not _under(mod, scope):
                continue
            for line, name in _imports(path, root):
                if allowed is not None and not any(_under(name, a) for a in allowed):
                    bad.append(f"{path.relative_to(root)}:{line}: {mod} imports {name} (only {', '.join(allowed)})")
                hit = next((f for f in forbidden if _under(name, f)), None)
                if hit is not None and not _under(mod, hit):
                    bad.append(f"{path.relative_to(root)}:{line}: {mod} imports {name} ({scope} must not use {hit})")
    return bad


def test_every_layer_imports_only_layers_below_it() -> None:
    assert violations() == []


@pytest.mark.parametrize("where, text, expected", [
    ("devices/fake_dev.py", "from pyvmm.accel.kvm import KvmAccelerator\n", "pyvmm.devices must not use pyvmm.accel"),
    ("devices/fake_dev.py", "def f():\n    from pyvmm.machine import pc\n", "must not use pyvmm.machine"),
    ("x86/fake_floor.py", "from pyvmm.devices import serial\n", "only pyvmm.errors"),
    ("x86/fake_floor.py", "from ..devices import serial\n", "only pyvmm.errors"),
    ("accel/fake_accel.py", "import pyvmm.devices.irqchip\n", "pyvmm.accel must not use pyvmm.devices"),
    ("memory.py", "from pyvmm.x86 import layout\n", "only pyvmm.errors"),
])
def test_the_check_catches_an_upward_import(tmp_path: Path, where: str, text: str, expected: str) -> None:
    """The rules are not vacuous: a planted upward import in a copy of the tree is reported."""
    import shutil

    copy = tmp_path / "src" / "pyvmm"
    shutil.copytree(PKG, copy, ignore=shutil.ignore_patterns("__pycache__", "*.so", "vendor"))
    target = copy / where
    target.write_text(text + (target.read_text() if target.exists() else ""))
    found = violations(copy)
    assert any(expected in v for v in found), found
