"""The --share hook: HOST_DIR:TAG, the virtiofsd command lines (Debian 12's C daemon and the Rust one),
and the QEMU options that attach a share (what `pyvmm exec --share` and the SDK use)."""

from __future__ import annotations

import pytest

from pyvmm.cli import configure, parse_run_args
from pyvmm.errors import ConfigError, PyvmmError
from pyvmm.memory import RamBackend
from pyvmm.vhost_user.virtiofsd import Share, Virtiofsd, parse_share, share_options, start_virtiofsd, virtiofsd_command


def test_parse_share(tmp_path):
    assert parse_share(f"{tmp_path}:src") == Share(str(tmp_path), "src")
    assert parse_share(str(tmp_path)) == Share(str(tmp_path), tmp_path.name)
    assert parse_share(f"{tmp_path}:src").guest_mount_command == ["mount", "-t", "virtiofs", "src", "/mnt/src"]


@pytest.mark.parametrize("text,msg", [
    ("/nonexistent/dir:t", "is not a directory"), ("{d}:" + "x" * 37, "at most 36 bytes"),
    ("{d}:a/b", "without '/'"), (":t", "expected HOST_DIR:TAG"),
])
def test_parse_share_errors(tmp_path, text, msg):
    with pytest.raises(ConfigError, match=msg):
        parse_share(text.format(d=tmp_path))


def test_command_lines():
    assert virtiofsd_command("/usr/lib/qemu/virtiofsd", "/srv", "/run/s.sock") == [
        "/usr/lib/qemu/virtiofsd", "--socket-path=/run/s.sock", "-o", "source=/srv", "-o", "sandbox=namespace",
        "-o", "cache=auto"]
    assert virtiofsd_command("/usr/libexec/virtiofsd", "/srv", "/run/s.sock", sandbox="chroot") == [
        "/usr/libexec/virtiofsd", "--socket-path=/run/s.sock", "--shared-dir=/srv", "--sandbox=chroot",
        "--cache=auto"]


class _Daemon:
    def __init__(self, path: str) -> None:
        self.socket_path = path


def test_share_options_are_options_pyvmm_reads(tmp_path):
    argv = share_options([(_Daemon("/run/a,b.sock"), "one"), (_Daemon("/run/c.sock"), "two")],  # type: ignore[list-item]
                         memory=256 << 20, transport="mmio")
    assert argv == ["-object", f"memory-backend-memfd,id=pyvmm-mem,size={256 << 20},share=on",
                    "-machine", "memory-backend=pyvmm-mem",
                    "-chardev", "socket,id=vfs0,path=/run/a,,b.sock",
                    "-device", "vhost-user-fs-device,chardev=vfs0,tag=one",
                    "-chardev", "socket,id=vfs1,path=/run/c.sock",
                    "-device", "vhost-user-fs-device,chardev=vfs1,tag=two"]
    cfg, _ = configure(parse_run_args(["-m", "256M", *argv]))
    assert cfg.memory_backend == RamBackend("pyvmm-mem", "memfd", 256 << 20, share=True)
    assert cfg.chardevs["vfs0"] == "unix:/run/a,,b.sock"
    assert [d.driver for d in cfg.devices] == ["vhost-user-fs-device", "vhost-user-fs-device"]


def test_start_virtiofsd_refuses_a_missing_directory(tmp_path):
    with pytest.raises(PyvmmError, match="is not a directory"):
        start_virtiofsd(str(tmp_path / "nope"), str(tmp_path / "s.sock"))


def test_start_virtiofsd_reports_a_daemon_that_exits(tmp_path):
    """A daemon that dies at start gives one line with its last output, not a hang."""
    fake = tmp_path / "virtiofsd"
    fake.write_text("#!/bin/sh\necho 'fuse: cannot do that' >&2\nexit 3\n")
    fake.chmod(0o755)
    with pytest.raises(PyvmmError, match="virtiofsd exited with status 3: fuse: cannot do that"):
        start_virtiofsd(str(tmp_path), str(tmp_path / "s.sock"), binary=str(fake))
    assert Virtiofsd  # the handle type is public
