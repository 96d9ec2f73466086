"""The migration QMP commands behave as QEMU's: the same commands go to pyvmm and to
qemu-system-x86_64 and must be accepted or refused alike.

``-incoming defer`` waits in ``inmigrate`` for ``migrate-incoming``; ``migrate unix:PATH``
then moves a running Linux guest; parameters, capabilities and the errors for a bad URI, a
migrate on the destination, a second ``migrate-incoming`` and an out-of-range
``downtime-limit`` are checked on the way.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from support.migration import READY, WORKLOAD, Vm


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["pyvmm", "qemu"])
def test_defer_unix_parameters_and_errors(kind: str, linux, tmp_path: Path) -> None:
    args = ["-kernel", str(linux.kernel), "-initrd", str(linux.initrd), "-append", linux.cmdline, "-m", "256"]
    sock = tmp_path / "mig.sock"
    src = Vm(kind, tmp_path, "src", args)
    dst = Vm(kind, tmp_path, "dst", [*args, "-incoming", "defer"])
    try:
        assert dst.status() == "inmigrate"
        assert dst.cmd("query-migrate") == {}
        assert "waiting for an incoming migration" in dst.error_of("migrate", uri=f"unix:{sock}")
        assert "'-incoming' was not specified" in src.error_of("migrate-incoming", uri=f"unix:{sock}")

        params = src.cmd("query-migrate-parameters")
        assert params["downtime-limit"] == 300 and params["max-bandwidth"] == 128 << 20
        src.cmd("migrate-set-parameters", **{"downtime-limit": 500, "max-bandwidth": 1 << 30})
        params = src.cmd("query-migrate-parameters")
        assert params["downtime-limit"] == 500 and params["max-bandwidth"] == 1 << 30
        assert "downtime_limit" in src.error_of("migrate-set-parameters", **{"downtime-limit": 3_000_000})
        assert src.error_of("migrate-set-capabilities", capabilities=[{"capability": "no-such", "state": True}])
        caps = {c["capability"]: c["state"] for c in src.cmd("query-migrate-capabilities")}
        assert caps["events"] is False
        src.cmd("migrate-set-capabilities", capabilities=[{"capability": "events", "state": True}])
        assert {c["capability"]: c["state"] for c in src.cmd("query-migrate-capabilities")}["events"] is True
        assert src.error_of("migrate", uri="bogus:1")

        src.console.wait_for(READY, 300)
        src.console.send(WORKLOAD)
        src.wait_tick(3)
        dst.cmd("migrate-incoming", uri=f"unix:{sock}")
        assert "already been started" in dst.error_of("migrate-incoming", uri=f"unix:{sock}")
        src.cmd("migrate", uri=f"unix:{sock}")
        info = src.wait_migration()
        assert info["status"] == "completed", info
        assert {"total-time", "downtime", "ram"} <= set(info)
        assert {"transferred", "remaining", "total", "dirty-pages-rate"} <= set(info["ram"])
        assert src.status() == "postmigrate"
        statuses = [e["data"]["status"] for e in src.qmp.get_events() if e["event"] == "MIGRATION"]
        assert statuses[0] == "setup" and statuses[-1] == "completed", statuses
        dst.wait_status("running")
        assert dst.wait_migration()["status"] == "completed"
        last = max(src.ticks())
        dst.wait_tick(last + 2)
        assert dst.ask("echo SHELL=$((6*7))", "SHELL") == "42"
    except AssertionError as e:
        raise AssertionError(f"{e}\nsource stderr:\n{src.stderr()}\ndestination stderr:\n{dst.stderr()}") from None
    finally:
        dst.close()
        src.close()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["pyvmm", "qemu"])
def test_incoming_from_an_inherited_fd(kind: str, linux, tmp_path: Path) -> None:
    """libvirt's restore: the state arrives on a descriptor the VMM inherits (``-incoming fd:N``)."""
    import os

    args = ["-kernel", str(linux.kernel), "-initrd", str(linux.initrd), "-append", linux.cmdline, "-m", "256"]
    state = tmp_path / "vm.state"
    src = Vm(kind, tmp_path, "src", args)
    try:
        src.console.wait_for(READY, 300)
        src.console.send(WORKLOAD)
        src.wait_tick(3)
        src.cmd("stop")
        src.cmd("migrate", uri=f"exec:cat > {state}")
        assert src.wait_migration()["status"] == "completed"
        last = max(src.ticks())
    finally:
        src.close()
    fd = os.open(state, os.O_RDONLY)
    try:
        dst = Vm(kind, tmp_path, "dst", [*args, "-incoming", f"fd:{fd}"], pass_fds=[fd])
    finally:
        os.close(fd)
    try:
        dst.wait_status("paused", 120)
        dst.cmd("cont")
        dst.wait_tick(last + 2)
        assert dst.ask("echo SHELL=$((6*7))", "SHELL") == "42"
    finally:
        dst.close()
