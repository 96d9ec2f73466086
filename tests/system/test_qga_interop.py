"""pyvmm's QGA client drives Debian's qemu-ga in the default guest, under pyvmm and under QEMU.

The same guest kit, options and exchanges under both VMMs: the delimited sync, guest-ping,
guest-info, guest-get-osinfo, guest-network-get-interfaces, guest-exec with argv, env,
input-data, captured output, an exit status and a signal, the file commands with base64
data (write, seek, read back, flush, close) and guest-shutdown, which ends the VMM.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from pyvmm.qga import QgaClient, QgaCommandError
from support.agentvm import start_agent_vm

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("kind", ["pyvmm", "qemu"])
def test_client_drives_debians_qemu_ga(kind: str, tmp_path: Path) -> None:
    sock, log = tmp_path / "qga.sock", tmp_path / "console.log"
    vm = start_agent_vm(kind, sock, log)
    try:
        with QgaClient(timeout=30) as qga:
            qga.connect(sock, timeout=60)
            qga.sync(timeout=240)
            qga.ping()
            info = qga.info()
            assert info["version"].startswith("7.")
            assert any(c["name"] == "guest-exec" for c in info["supported_commands"])
            osinfo = qga.osinfo()
            assert osinfo["id"] == "pyvmm-guestkit" and osinfo["machine"] == "x86_64"
            assert "lo" in [i["name"] for i in qga.network_interfaces()]

            r = qga.run(["sh", "-c", "echo out; echo err >&2; exit 7"])
            assert (r.returncode, r.stdout, r.stderr) == (7, b"out\n", b"err\n")
            assert qga.run(["sh", "-c", 'echo "$GREETING"; cat'], env={"GREETING": "hi", "PATH": "/bin"},
                           input=b"from stdin").stdout == b"hi\nfrom stdin"
            killed = qga.run(["sh", "-c", "kill -TERM $$"])
            assert killed.signal == 15 and killed.returncode == -15
            with pytest.raises(QgaCommandError):
                qga.exec_start(["/no/such/program"])

            data = os.urandom(300_000) + bytes(range(256))
            qga.write_file("/tmp/blob", data)
            assert qga.read_file("/tmp/blob") == data
            h = qga.file_open("/tmp/blob", "r+")
            assert qga.file_seek(h, 10, "set") == 10
            assert qga.file_write(h, b"XYZ") == 3
            qga.file_flush(h)
            assert qga.file_seek(h, 8, "set") == 8
            assert qga.file_read(h, 5)[0] == data[8:10] + b"XYZ"
            qga.file_close(h)
            with pytest.raises(QgaCommandError):
                qga.file_open("/no/such/dir/file", "r")

            qga.shutdown()
        deadline = time.monotonic() + 60
        while vm.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert vm.poll() == 0, log.read_text(errors="replace")[-2000:]
    finally:
        if vm.poll() is None:
            vm.kill()
        vm.wait()
