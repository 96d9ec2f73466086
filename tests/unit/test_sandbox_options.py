"""``-sandbox``'s argument and the filter it builds (the running VMM: tests/system/test_sandbox.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pyvmm.errors import ConfigError
from pyvmm.sandbox import SandboxConfig, build_filter, parse_sandbox


@pytest.mark.parametrize(("texts", "enabled", "allow"), [
    ([], False, set()),
    (["on"], True, set()),
    (["off"], False, set()),
    (["enable=on"], True, set()),
    (["yes"], True, set()),
    (["off,spawn=maybe"], False, set()),  # QEMU checks sub-options only when on
    (["on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"], True, set()),
    (["on,spawn=allow,obsolete=allow"], True, {"spawn", "obsolete"}),
    (["on,elevateprivileges=children"], True, set()),  # deny, and no_new_privs (always set here)
    (["on,spawn=allow", "on"], True, set()),  # filters stack: the stricter wins
    (["on,spawn=allow", "off"], True, {"spawn"}),
])
def test_parse(texts: list[str], enabled: bool, allow: set[str]) -> None:
    cfg = parse_sandbox(texts)
    assert (cfg.enabled, cfg.allow) == (enabled, allow)


@pytest.mark.parametrize(("text", "message"), [
    ("bogus", "-sandbox bogus: Parameter 'enable' expects 'on' or 'off'"),
    ("on,spawn=maybe", "-sandbox on,spawn=maybe: invalid argument for spawn"),
    ("on,resourcecontrol=children", "-sandbox on,resourcecontrol=children: invalid argument for resourcecontrol"),
    ("on,foo=bar", "-sandbox on,foo=bar: Invalid parameter 'foo'"),
])
def test_refused_with_qemus_words(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_sandbox([text])
    assert str(e.value) == message


def _pfc(cfg: SandboxConfig, tmp_path: Path) -> str:
    out = tmp_path / "filter.pfc"
    with open(out, "w") as f:
        build_filter(cfg).export_pfc(f)
    return out.read_text()


def test_filter_allows_the_vmm_and_nothing_to_escape(tmp_path: Path) -> None:
    text = _pfc(SandboxConfig(enabled=True), tmp_path)
    actions = re.findall(r"^\s*action (\S+);", text, re.M)
    assert actions[-2:] == ["KILL_PROCESS", "KILL_PROCESS"], actions[-2:]  # the default, and another ABI's calls
    for name in ("ioctl", "epoll_wait", "futex", "accept4", "openat", "clone", "mmap"):
        assert f"syscall \"{name}\"" in text, name
    for name in ("execve", "ptrace", "mount", "socket", "listen", "bind", "connect", "fork", "setuid", "kexec_load"):
        assert f"syscall \"{name}\"" not in text, name  # not named: the default action, kill
    spawn = _pfc(SandboxConfig(enabled=True, allow={"spawn"}), tmp_path)
    assert "syscall \"execve\"" in spawn and "syscall \"ptrace\"" not in spawn
