"""Issue 13's live migration acceptance, on pyvmm and (with the same commands) on QEMU.

Two network namespaces with their own addresses on one veth link stand for two hosts.  The
destination waits with ``-incoming tcp:ADDR:PORT`` in one, the source runs in the other
while its guest dirties memory (a counter on the console, and a loop rewriting 4 MiB of a
tmpfs file), and migrates with ``migrate tcp:ADDR:PORT``.  It converges: the source ends in
``postmigrate``, ``query-migrate`` reports a downtime within ``downtime-limit``, and the
destination runs on with the next counter value and a shell that answers.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.migration import READY, WORKLOAD, Vm
from support.netns import in_ns, netns

SRC_ADDR, DST_ADDR = "10.0.9.1", "10.0.9.2"
PORT = 4444
DOWNTIME_LIMIT_MS = 300  # QEMU's default
DIRTIER = ("(while :; do dd if=/dev/urandom of=/t/dirt bs=64k count=64 conv=notrunc 2>/dev/null; done) &\n")


def _ip(*args: str) -> None:
    r = subprocess.run(["ip", *args], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")


@contextlib.contextmanager
def two_hosts() -> Iterator[tuple[str, str]]:
    with netns("mig-src") as a, netns("mig-dst") as b:
        _ip("-n", a, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", b)
        for ns, addr in ((a, SRC_ADDR), (b, DST_ADDR)):
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
        yield a, b


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["pyvmm", "qemu"])
def test_live_migration_between_two_hosts_converges(kind: str, linux, tmp_path: Path) -> None:
    args = ["-kernel", str(linux.kernel), "-initrd", str(linux.initrd), "-append", linux.cmdline, "-m", "256"]
    with two_hosts() as (a, b):
        src = Vm(kind, tmp_path, "src", args, netns=in_ns(a))
        dst = Vm(kind, tmp_path, "dst", [*args, "-incoming", f"tcp:{DST_ADDR}:{PORT}"], netns=in_ns(b))
        try:
            src.console.wait_for(READY, 300)
            src.console.send(WORKLOAD)
            src.wait_tick(3)
            src.console.send(DIRTIER)
            src.wait_tick(max(src.ticks()) + 5)
            assert dst.status() == "inmigrate"
            src.cmd("migrate-set-capabilities", capabilities=[{"capability": "events", "state": True}])
            src.cmd("migrate-set-parameters", **{"downtime-limit": DOWNTIME_LIMIT_MS})
            src.cmd("migrate", uri=f"tcp:{DST_ADDR}:{PORT}")
            info = src.wait_migration(timeout=300)
            assert info["status"] == "completed", f"{info}\n{src.stderr()}"
            assert src.status() == "postmigrate"
            assert 0 <= info["downtime"] <= DOWNTIME_LIMIT_MS, info
            assert info["ram"]["total"] >= 256 << 20  # QEMU counts its ROMs too
            assert info["ram"]["transferred"] > 0
            events = [e["data"]["status"] for e in src.qmp.get_events() if e["event"] == "MIGRATION"]
            assert events[0] == "setup" and "active" in events and events[-1] == "completed", events
            last = max(src.ticks())
            time.sleep(1)
            assert max(src.ticks()) == last, "the source ran on after the migration"
            dst.wait_status("running", 60)
            dst.wait_tick(last + 3)
            assert min(dst.ticks()) <= last + 1, (last, dst.ticks()[:5])
            assert dst.ask("echo SHELL=$((6*7))", "SHELL") == "42"
        except AssertionError as e:
            raise AssertionError(f"{e}\nsource stderr:\n{src.stderr()}\ndestination stderr:\n{dst.stderr()}") from None
        finally:
            dst.close()
            src.close()
