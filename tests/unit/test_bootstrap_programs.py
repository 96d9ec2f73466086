"""scripts/bootstrap installs every program that pyvmm, its tests and its benchmarks run.

The programs are read from the code (src/, tests/, bench/) with ``ast``:

* the first word of a command list given to ``subprocess.run``/``Popen``/...,
  ``asyncio.create_subprocess_exec`` or ``os.exec*``;
* the argument of ``shutil.which``, also through a loop over a literal (or a
  module-level tuple) and through a helper whose parameter it looks up
  (``_tool("qemu-img")``);
* module-level names bound to a program (``QEMU = "qemu-system-x86_64"``) used
  in those places, and absolute paths such as ``/bin/busybox``.

Each program must be in :data:`PROGRAMS`, which names the Debian package that
provides it, and bootstrap must install that package.  A new program in the
code fails the first test until it is mapped; a package dropped from bootstrap
fails the second.
"""

from __future__ import annotations

import ast
import re
import tomllib
from collections.abc import Iterator
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BOOTSTRAP = ROOT / "scripts" / "bootstrap"

#: The package is part of every Debian system (essential or the apt tooling bootstrap itself uses).
BASE = "(base system)"
#: The program is a Python package's script, installed by pip from the test extra.
PIP = "(pip)"

#: program -> the Debian package that provides it.
PROGRAMS: dict[str, str] = {
    "gcc": "gcc",
    "as": "binutils",
    "ld": "binutils",
    "nm": "binutils",
    "objcopy": "binutils",
    "readelf": "binutils",
    "qemu-system-x86_64": "qemu-system-x86",
    "virtiofsd": "qemu-system-common",
    "qemu-img": "qemu-utils",
    "qemu-io": "qemu-utils",
    "busybox": "busybox-static",
    "iasl": "acpica-tools",
    "cpio": "cpio",
    "lz4": "lz4",
    "zstd": "zstd",
    "mkfs.ext4": "e2fsprogs",
    "debugfs": "e2fsprogs",
    "e2fsck": "e2fsprogs",
    "chromium": "chromium",
    "openssl": "openssl",
    "npm": "npm",
    "passt": "passt",
    "ip": "iproute2",
    "qemu-ga": "qemu-guest-agent",
    "ldd": BASE,             # libc-bin (essential)
    "mount": BASE,           # mount (essential)
    "umount": BASE,          # mount (essential)
    "unshare": BASE,         # util-linux (essential)
    "nsenter": BASE,         # util-linux (essential)
    "cp": BASE,              # coreutils
    "truncate": BASE,        # coreutils
    "true": BASE,            # coreutils
    "sh": BASE,              # dash
    "/bin/sh": BASE,         # dash: QEMU's exec: migration URIs run /bin/sh -c CMD
    "python3": BASE,         # the interpreter bootstrap runs under
    "dpkg-deb": BASE,        # dpkg
    "apt-get": BASE,
    "apt-cache": BASE,
    "schemathesis": PIP,
    "libvirtd": "libvirt-daemon",
    "virtlogd": "libvirt-daemon",
    "virsh": "libvirt-clients",
    "virt-install": "virtinst",
}

_SUBPROCESS_CALLS = {"run", "Popen", "check_output", "check_call", "call", "create_subprocess_exec",
                     "execv", "execvp", "execvpe", "execl", "execlp", "spawnvp"}
_PROGRAM_PATH = re.compile(r"^/(?:usr/)?s?bin/([A-Za-z0-9][A-Za-z0-9._+-]*)$")


def _func_name(call: ast.Call) -> tuple[str | None, str | None]:
    """(module or object name, function name) of a call, as far as they are plain names."""
    f = call.func
    if isinstance(f, ast.Attribute):
        return (f.value.id if isinstance(f.value, ast.Name) else None), f.attr
    if isinstance(f, ast.Name):
        return None, f.id
    return None, None


class _FileScan:
    def __init__(self, tree: ast.Module) -> None:
        self.tree = tree
        self.strings: dict[str, str] = {}           # module-level NAME = "string"
        self.sequences: dict[str, list[str]] = {}   # module-level NAME = ("a", "b")
        self.from_subprocess: set[str] = set()      # names imported from subprocess
        for node in tree.body:
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                self._bind(node.targets[0].id, node.value)
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
                self._bind(node.target.id, node.value)
            elif isinstance(node, ast.ImportFrom) and node.module == "subprocess":
                self.from_subprocess |= {a.asname or a.name for a in node.names}

    def _bind(self, name: str, value: ast.expr) -> None:
        if isinstance(value, ast.Constant) and isinstance(value.value, str):
            self.strings[name] = value.value
        elif isinstance(value, (ast.Tuple, ast.List)):
            items = [self.string(e) for e in value.elts]
            if items and all(items):
                self.sequences[name] = [i for i in items if i]

    def string(self, node: ast.expr) -> str | None:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return node.value
        if isinstance(node, ast.Name):
            return self.strings.get(node.id)
        return None

    def literal_items(self, node: ast.expr) -> list[str]:
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return [s for s in (self.string(e) for e in node.elts) if s]
        if isinstance(node, ast.Name):
            return self.sequences.get(node.id, [])
        return []

    def _is_subprocess_call(self, call: ast.Call) -> bool:
        owner, name = _func_name(call)
        if name not in _SUBPROCESS_CALLS:
            return False
        return owner in ("subprocess", "asyncio", "os") or (owner is None and name in self.from_subprocess)

    def programs(self) -> Iterator[str]:
        which_wrappers = self._which_wrappers()
        for node in ast.walk(self.tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                m = _PROGRAM_PATH.match(node.value)
                if m:
                    yield m.group(1)
            if not isinstance(node, ast.Call) or not node.args:
                continue
            first = node.args[0]
            owner, name = _func_name(node)
            if self._is_subprocess_call(node):
                if isinstance(first, (ast.List, ast.Tuple)) and first.elts:
                    prog = self.string(first.elts[0])
                    if prog:
                        yield prog
                elif owner in ("asyncio", "os"):
                    prog = self.string(first)
                    if prog:
                        yield prog
            elif name == "which" or name in which_wrappers:
                prog = self.string(first)
                if prog:
                    yield prog
        yield from self._which_loops()

    def _which_wrappers(self) -> set[str]:
        """Functions whose first parameter is looked up with ``which``."""
        out = set()
        for node in ast.walk(self.tree):
            if isinstance(node, ast.FunctionDef) and node.args.args:
                param = node.args.args[0].arg
                for call in ast.walk(node):
                    if (isinstance(call, ast.Call) and _func_name(call)[1] == "which" and call.args
                            and isinstance(call.args[0], ast.Name) and call.args[0].id == param):
                        out.add(node.name)
        return out

    def _which_loops(self) -> Iterator[str]:
        """``for tool in ("gcc", "ld"): which(tool)`` and the comprehension form."""
        for node in ast.walk(self.tree):
            loops: list[tuple[ast.expr, ast.expr, ast.AST]] = []
            if isinstance(node, ast.For):
                loops.append((node.target, node.iter, node))
            elif isinstance(node, (ast.ListComp, ast.SetComp, ast.GeneratorExp)):
                loops += [(g.target, g.iter, node) for g in node.generators]
            for target, it, body in loops:
                if not isinstance(target, ast.Name):
                    continue
                for call in ast.walk(body):
                    if (isinstance(call, ast.Call) and _func_name(call)[1] == "which" and call.args
                            and isinstance(call.args[0], ast.Name) and call.args[0].id == target.id):
                        yield from self.literal_items(it)


@cache
def programs_in_code() -> dict[str, set[str]]:
    """program -> the files that run it."""
    found: dict[str, set[str]] = {}
    for top in ("src", "tests", "bench"):
        for path in sorted((ROOT / top).rglob("*.py")):
            scan = _FileScan(ast.parse(path.read_text(), str(path)))
            for prog in scan.programs():
                found.setdefault(prog, set()).add(str(path.relative_to(ROOT)))
    return found


def bootstrap_packages(text: str) -> set[str]:
    """The Debian packages bootstrap installs (its ``need_pkgs+=(...)`` lines)."""
    return {p for group in re.findall(r"need_pkgs\+=\(([^)]*)\)", text) for p in group.split()}


def test_scan_finds_the_known_programs() -> None:
    # the scanner itself must see the programs it is meant to find, or the other tests prove nothing
    found = programs_in_code()
    for prog in ("gcc", "ld", "qemu-system-x86_64", "qemu-img", "passt", "ip", "busybox", "iasl", "chromium"):
        assert prog in found, f"the scan no longer finds {prog}"


def test_every_program_in_the_code_is_mapped_to_a_package() -> None:
    unmapped = {p: sorted(files) for p, files in programs_in_code().items() if p not in PROGRAMS}
    assert not unmapped, ("programs run by the code but missing from PROGRAMS (add the Debian package that "
                          f"provides each, and install it in scripts/bootstrap): {unmapped}")


def test_bootstrap_installs_every_program() -> None:
    installed = bootstrap_packages(BOOTSTRAP.read_text())
    assert installed, "no need_pkgs+=(...) lines found in scripts/bootstrap"
    missing = {prog: PROGRAMS[prog] for prog in programs_in_code()
               if prog in PROGRAMS and PROGRAMS[prog] not in (BASE, PIP) and PROGRAMS[prog] not in installed}
    assert not missing, f"scripts/bootstrap does not install these programs' packages: {missing}"


def test_pip_programs_come_from_the_test_extra() -> None:
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["test"]
    names = {re.split(r"[<>=\[ ]", req, maxsplit=1)[0].lower() for req in extra}
    for prog, pkg in PROGRAMS.items():
        if pkg == PIP:
            assert prog in names, f"{prog} is a pip program but not in the test extra"


def test_a_package_dropped_from_bootstrap_is_noticed() -> None:
    text = BOOTSTRAP.read_text()
    assert "need_pkgs+=(passt)" in text
    assert "passt" not in bootstrap_packages(text.replace("need_pkgs+=(passt)", ""))
