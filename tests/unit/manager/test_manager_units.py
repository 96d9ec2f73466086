"""Manager pieces without a daemon: store, /proc parsing, the VM command line, token checks, the CLI parser."""

from __future__ import annotations

import argparse
import os
import uuid
from pathlib import Path

import pytest

from pyvmm.manager import stats
from pyvmm.manager.auth import TokenAuth, load_or_create_token
from pyvmm.manager.cli import add_vm_parser, definition_from_args, table
from pyvmm.manager.models import VmDefinition, VmDefinitionIn
from pyvmm.manager.store import RuntimeRecord, Store, StoreError
from pyvmm.manager.supervisor import ManagerConfig, Supervisor, VmHandle


def _definition(name: str = "a", **kw) -> VmDefinition:
    return VmDefinition(name=name, uuid=uuid.uuid4(), kernel="/boot/k", **kw)


def test_store_round_trip_and_constraints(tmp_path: Path):
    s = Store(tmp_path / "db")
    d = _definition("one", memory_mib=64, cmdline="console=ttyS0")
    s.add(d)
    with pytest.raises(StoreError, match="already exists"):
        s.add(_definition("one"))
    s.add(_definition("two"))
    rec = RuntimeRecord(str(d.uuid), 1234, 99, "/r/q", "/r/s", "/r/l", 1.0)
    s.set_runtime(rec)
    s.close()
    s = Store(tmp_path / "db")  # survives a reopen, as across daemon restarts
    assert [x.name for x in s.all()] == ["one", "two"]
    assert s.all()[0] == d
    assert s.runtimes() == {str(d.uuid): rec}
    s.remove(str(d.uuid))
    assert [x.name for x in s.all()] == ["two"] and s.runtimes() == {}


def test_proc_stats_of_this_process():
    st = stats.read_stat(os.getpid())
    assert st is not None and st.state in "RS" and st.start_ticks > 0
    assert stats.read_rss_bytes(os.getpid()) > 1 << 20
    assert stats.is_vm_process(os.getpid(), st.start_ticks + 1, "") is False  # pid reuse guard
    assert stats.read_stat(2 ** 22 + 12345) is None
    cpu = stats.CpuSampler()
    assert cpu.sample(10.0, 1.0) == 0.0
    assert cpu.sample(12.0, 2.0) == pytest.approx(50.0)


def test_vm_command_line(tmp_path: Path):
    sup = Supervisor(ManagerConfig(state_dir=tmp_path / "state", pyvmm_command=["pyvmm", "run"]))
    try:
        d = _definition("cmd", vcpus=2, memory_mib=96, initrd="/boot/i", cmdline="quiet",
                        disks=[{"path": "/img/a,b.qcow2", "format": "qcow2", "readonly": True}],
                        networks=[{"type": "tap", "tap": "tap7", "mac": "52:54:00:00:00:07"}, {}])
        h = VmHandle(d)
        cmd = sup.command_for(h, tmp_path / "qmp.sock", tmp_path / "serial.sock")
        u = str(d.uuid)
        assert cmd[:2] == ["pyvmm", "run"]
        text = " ".join(cmd)
        assert f"--serial unix:../{u}/serial.sock,server=on,wait=on" in text
        assert f"--qmp unix:../{u}/qmp.sock,server=on,wait=off" in text
        assert "-m 96M --smp 2" in text and "--initrd /boot/i" in text and "--append=quiet" in text
        assert "--drive file=/img/a,,b.qcow2,format=qcow2,if=virtio,readonly=on" in text
        assert ("--netdev tap,id=net0,ifname=tap7 --device virtio-net-pci,netdev=net0,mac=52:54:00:00:00:07"
                in text)
        assert "--netdev user,id=net1 --device virtio-net-pci,netdev=net1" in text
        assert "--sandbox on" in text  # the manager's VMs run under the seccomp sandbox
    finally:
        sup.store.close()


def test_definition_validation_messages():
    with pytest.raises(ValueError, match="must be an absolute path"):
        VmDefinitionIn(name="x", kernel="vmlinuz")
    with pytest.raises(ValueError, match="memory_mib"):
        VmDefinitionIn(name="x", kernel="/k", memory_mib=1)
    with pytest.raises(ValueError, match="name"):
        VmDefinitionIn(name="../etc", kernel="/k")
    with pytest.raises(ValueError, match="cmdline"):
        VmDefinitionIn(name="x", kernel="/k", cmdline="a\nb")


def test_token_auth(tmp_path: Path):
    tok = load_or_create_token(tmp_path / "token")
    assert len(tok) >= 32 and (tmp_path / "token").stat().st_mode & 0o777 == 0o600
    assert load_or_create_token(tmp_path / "token") == tok
    auth = TokenAuth(None, tok)
    http = {"type": "http", "path": "/api/v1/vms", "headers": [], "query_string": b""}
    assert not auth.allowed(http)
    assert auth.allowed({**http, "headers": [(b"authorization", f"Bearer {tok}".encode())]})
    assert not auth.allowed({**http, "headers": [(b"authorization", f"Bearer {tok}x".encode())]})
    assert auth.allowed({**http, "type": "websocket", "query_string": f"token={tok}".encode()})
    assert auth.allowed({**http, "path": "/"}) and auth.allowed({**http, "path": "/static/app.js"})
    assert not auth.allowed({**http, "type": "websocket", "path": "/"})


def test_cli_definition_and_table(tmp_path: Path):
    p = argparse.ArgumentParser()
    add_vm_parser(p.add_subparsers(dest="command"))
    args = p.parse_args(["vm", "define", "v", "--kernel", "k", "-m", "1G", "--vcpus", "2",
                         "--disk", "d.img,format=qcow2,readonly", "--autostart"])
    d = definition_from_args(args)
    assert d["memory_mib"] == 1024 and d["kernel"] == os.path.abspath("k") and d["autostart"] is True
    assert d["disks"] == [{"path": os.path.abspath("d.img"), "format": "qcow2", "readonly": True}]
    out = table([["1", "vm", "running"]], ["Id", "Name", "State"])
    assert out.splitlines()[0].split() == ["Id", "Name", "State"] and "running" in out


def test_failure_line_and_accelerator_line():
    from pyvmm.manager.supervisor import accelerator_from_log, failure_line

    log = ("pyvmm: accelerator: kvm (requested with --accel kvm)\npyvmm: serial0: client connected on x\n"
           "pyvmm: error: kernel /k: corrupt ELF file\n")
    assert failure_line(log) == "kernel /k: corrupt ELF file"
    assert failure_line("one\ntwo\n\n") == "two" and failure_line("") == "no output"
    assert accelerator_from_log(log) == ("kvm", "requested with --accel kvm")
    assert accelerator_from_log("pyvmm: serial0: x\n") is None


def test_kernel_and_disk_format_checks(tmp_path: Path):
    from pyvmm.manager.models import check_files, disk_format_problem, kernel_format

    k = tmp_path / "k"
    k.write_bytes(b"\x7fELF" + b"\0" * 100)
    assert kernel_format(str(k)) == "elf"
    k.write_text("hello\n")
    assert kernel_format(str(k)) == "unknown"
    with pytest.raises(ValueError, match="unrecognised image format"):
        check_files(VmDefinitionIn(name="x", kernel=str(k)))
    big = tmp_path / "big"
    big.write_bytes(b"\0" * 510 + b"\x55\xaa" + b"\0" * (1 << 17))  # the signature, but too big for a boot sector
    assert kernel_format(str(big)) == "unknown"
    disk = tmp_path / "d"
    disk.write_bytes(b"QFI\xfb\0\0\0\3" + b"\0" * 504)
    assert disk_format_problem(str(disk), "qcow2") is None
    assert disk_format_problem(str(disk), "raw") == "is a qcow2 image, not raw (give format=qcow2)"
    disk.write_bytes(b"KDMV" + b"\0" * 508)
    assert disk_format_problem(str(disk), "raw") == "is a vmdk image, which pyvmm cannot open (raw or qcow2)"


def test_cli_json_anywhere_and_nic_options():
    from pyvmm.cli import build_parser
    from pyvmm.errors import ConfigError
    from pyvmm.manager.cli import parse_nic

    p = build_parser()
    assert p.parse_args(["vm", "list", "--json"]).json is True
    assert p.parse_args(["vm", "--json", "list"]).json is True
    assert p.parse_args(["vm", "list"]).json is False
    assert parse_nic("tap,tap=tap0,mac=52:54:00:00:00:01") == {"type": "tap", "tap": "tap0",
                                                               "mac": "52:54:00:00:00:01"}
    with pytest.raises(ConfigError, match="unknown option 'tap=x'"):
        parse_nic("user,tap=x")
    d = definition_from_args(p.parse_args(["vm", "define", "n", "--nic", "user", "--no-autostart"]))
    assert d == {"name": "n", "networks": [{"type": "user"}], "autostart": False}
