"""A guest cannot make the VMM log without limit (issue 11): a KVM guest in a reset loop.

The boot sector resets the machine through the i8042 (``out 0x64, 0xfe``) as soon as it
runs, so every boot logs the reset and, before the shared limit (pyvmm.ratelimit), reloaded
the kernel with two more lines: about 440 KB of log a minute.
"""

from __future__ import annotations

import subprocess
import sys
import time

from pyvmm.ratelimit import BURST, INTERVAL

RESET_LOOP = bytes([0xB0, 0xFE, 0xE6, 0x64, 0xEB, 0xFE]).ljust(510, b"\0") + b"\x55\xaa"  # mov al,0xfe; out 0x64


def test_reset_loop_guest_log_is_bounded(tmp_path, kvm):
    bs = tmp_path / "resetloop.bin"
    bs.write_bytes(RESET_LOOP)
    log = tmp_path / "vm.log"
    seconds = 6.0
    with open(log, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", "pyvmm", "run", "--accel", "kvm", "-m", "128",
                                 "--kernel", str(bs), "--serial", "null"], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=f)
        try:
            time.sleep(seconds)
            assert proc.poll() is None, log.read_text()
        finally:
            proc.terminate()
            proc.wait(10)
    text = log.read_text()
    lines = text.splitlines()
    resets = [line for line in lines if "reset" in line]
    assert any("guest-triggered messages were suppressed" in line for line in resets), text[-2000:]
    # the burst, then one line per interval (plus start-up and exit lines)
    assert len(resets) <= BURST + seconds / INTERVAL + 2, text[-2000:]
    assert "Traceback" not in text
    assert len(text) < 3000, len(text)
