"""QMP ``send-key``: pyvmm and QEMU, in the same test, type the same scancodes and give the same errors.

The QMP test guest (tests/support/guests/qmp) with ``keys=1`` prints every byte its keyboard
controller delivers as ``KEY 0x000000NN``.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "support" / "guests" / "qmp"))

from harness import Client, Vmm, build_guest, run_async  # noqa: E402

KEY_RE = re.compile(r"KEY 0x000000([0-9a-f]{2})")
CAD = [{"type": "qcode", "data": k} for k in ("ctrl", "alt", "delete")]


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_guest(tmp_path_factory.mktemp("qmp-guest"))


def _typed(kind: str, guest: Path, tmp_path: Path) -> tuple[list[str], list[str]]:
    tmp_path.mkdir()
    vm = Vmm(kind, guest, tmp_path, extra_args=("-append", "keys=1"))
    vm.start()
    try:
        vm.wait_serial(lambda t: "tick 2" in t, 20, "ticks")
        before = KEY_RE.findall(vm.serial())  # a BIOS may leave its own bytes: only what follows counts

        async def body() -> list[str]:
            c = Client("keys")
            await c.connect(vm.qmp_path)
            assert await c.execute("send-key", {"keys": CAD}) == {}
            assert await c.execute("send-key", {"keys": []}) == {}
            errors = []
            for args in ({"keys": [{"type": "qcode", "data": "nosuch"}]}, {}, {"keys": CAD, "colour": 1}):
                try:
                    await c.execute("send-key", args)
                    errors.append("accepted")
                except Exception as e:  # qemu.qmp's ExecuteError
                    errors.append(str(e))
            await c.close()
            return errors

        errors = run_async(body())
        vm.wait_serial(lambda t: len(KEY_RE.findall(t)) >= len(before) + 8, 20, "the scancodes")
        return KEY_RE.findall(vm.serial())[len(before):], errors
    finally:
        vm.kill()


def test_send_key_ctrl_alt_delete_like_qemu(guest: Path, tmp_path: Path) -> None:
    ours, our_errors = _typed("pyvmm", guest, tmp_path / "pyvmm")
    theirs, their_errors = _typed("qemu", guest, tmp_path / "qemu")
    # Translated set 1 (the 8042 default): ctrl, alt, E0 53 (Delete) pressed, then released in reverse.
    assert theirs[:8] == ["1d", "38", "e0", "53", "e0", "d3", "b8", "9d"], (theirs, ours)
    assert ours == theirs
    assert our_errors == their_errors
    assert their_errors[0] == "Parameter 'data' does not accept value 'nosuch'"
