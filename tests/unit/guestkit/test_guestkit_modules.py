"""Module trees: .modinfo parsing, dependency closure order, compressed modules, modules.dep."""

from __future__ import annotations

import lzma
import shutil
import subprocess
from pathlib import Path

import pytest

from pyvmm.guestkit.errors import GuestKitError
from pyvmm.guestkit.modules import ModuleTree, module_name, read_modinfo, strip_compression


def make_module(path: Path, name: str, depends: list[str]) -> None:
    """A relocatable ELF object with a real .modinfo section, like a .ko."""
    gcc = shutil.which("gcc")
    assert gcc, "gcc is needed to build fake kernel modules: apt-get install gcc"
    path.parent.mkdir(parents=True, exist_ok=True)
    src = path.parent / f"{name}.src.c"
    fields = [f"name={name}", f"depends={','.join(depends)}", "license=GPL", "vermagic=9.9.9 SMP"]
    body = "".join(
        f'static const char f{i}[] __attribute__((used, section(".modinfo"), aligned(1))) = "{v}";\n'
        for i, v in enumerate(fields)
    )
    src.write_text(body + "int init_module(void) { return 0; }\n")
    obj = path.parent / f"{name}.src.o"
    subprocess.run([gcc, "-c", "-o", str(obj), str(src)], check=True)
    src.unlink()
    data = obj.read_bytes()
    obj.unlink()
    if path.name.endswith(".xz"):
        data = lzma.compress(data)
    elif path.name.endswith(".zst"):
        zstd = shutil.which("zstd")
        assert zstd, "zstd is needed for this test: apt-get install zstd"
        data = subprocess.run([zstd, "-c"], input=data, capture_output=True, check=True).stdout
    path.write_bytes(data)


@pytest.fixture(scope="module")
def built_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("modtree") / "lib/modules/9.9.9"
    k = root / "kernel"
    make_module(k / "a/base.ko", "base", [])
    make_module(k / "a/mid-one.ko.xz", "mid_one", ["base"])
    make_module(k / "b/mid2.ko.zst", "mid2", ["base", "inbuilt"])
    make_module(k / "b/top.ko", "top", ["mid_one", "mid2"])
    make_module(k / "c/needs_ghost.ko", "needs_ghost", ["ghost"])
    make_module(k / "c/loop_a.ko", "loop_a", ["loop_b"])
    make_module(k / "c/loop_b.ko", "loop_b", ["loop_a"])
    (root / "modules.builtin").write_text("kernel/x/inbuilt.ko\nkernel/x/also-builtin.ko\n")
    return root


@pytest.fixture
def tree(built_tree: Path, tmp_path: Path) -> Path:
    """A private copy per test (some tests add files)."""
    return Path(shutil.copytree(built_tree, tmp_path / "9.9.9"))


def test_names() -> None:
    assert module_name("kernel/drivers/char/hw_random/virtio-rng.ko.xz") == "virtio_rng"
    assert module_name("virtio_blk.ko") == "virtio_blk"
    assert strip_compression("kernel/a/b.ko.zst") == "kernel/a/b.ko"
    assert strip_compression("kernel/a/b.ko") == "kernel/a/b.ko"


def test_modinfo_from_compressed_module(tree: Path) -> None:
    t = ModuleTree(tree)
    info = read_modinfo(t.read("mid-one"))
    assert info["name"] == ["mid_one"]
    assert info["depends"] == ["base"]
    assert t.read("mid2")[:4] == b"\x7fELF"  # zstd decompressed on the host


def test_closure_is_ordered_dependencies_first(tree: Path) -> None:
    res = ModuleTree(tree).resolve(["top", "also_builtin", "nonexistent", "base"])
    order = res.order
    assert set(order) == {"base", "mid_one", "mid2", "top"}
    assert order.index("base") < order.index("mid_one") < order.index("top")
    assert order.index("mid2") < order.index("top")
    assert len(order) == len(set(order))
    assert set(res.builtin) == {"inbuilt", "also_builtin"}
    assert res.missing == ["nonexistent"]


def test_missing_dependency_and_cycles_are_errors(tree: Path) -> None:
    t = ModuleTree(tree)
    with pytest.raises(GuestKitError, match="needs ghost"):
        t.resolve(["needs_ghost"])
    with pytest.raises(GuestKitError, match="cycle"):
        t.resolve(["loop_a"])


def test_modules_dep_is_preferred_when_present(tree: Path) -> None:
    # an installed kernel's modules.dep wins over .modinfo (here: it adds a dependency)
    (tree / "modules.dep").write_text(
        "kernel/a/base.ko:\nkernel/b/top.ko: kernel/a/base.ko\nkernel/a/mid-one.ko.xz: kernel/a/base.ko\n"
    )
    assert ModuleTree(tree).resolve(["top"]).order == ["base", "top"]


def test_not_an_elf_module(tree: Path) -> None:
    (tree / "kernel/c/bad.ko").write_bytes(b"not an elf at all")
    with pytest.raises(GuestKitError, match="not a valid ELF"):
        ModuleTree(tree).resolve(["bad"])


def test_missing_tree(tmp_path: Path) -> None:
    with pytest.raises(GuestKitError, match="does not exist"):
        ModuleTree(tmp_path / "nope")
