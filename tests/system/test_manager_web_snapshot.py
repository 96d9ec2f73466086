"""The web UI's snapshot, clone and restore controls in a real browser (as test_manager_web.py runs it).

A pyvmmd with its defaults (VMs under the seccomp sandbox: the daemon passes them their state file)
serves the page over TCP with a token; the VM boots the QMP test guest.  Snapshot writes the
directory, Restore (under the list) brings the snapshot back as a new VM that continues ticking
from it, Clone starts a copy.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from test_manager_support import (  # noqa: F401 - fixtures
    Daemon,
    free_port,
    guest_definition,
    manager_guest,
    wait_for,
)
from test_manager_web import browser, open_ui, row_state  # noqa: F401 - fixtures

TICK = re.compile(r"tick (\d+)")


@pytest.fixture
def snap_daemon(tmp_path: Path):
    d = Daemon(tmp_path / "state", tcp_port=free_port())
    d.start()
    try:
        yield d
    finally:
        d.cleanup()


@pytest.fixture
def page(browser, snap_daemon):  # noqa: F811
    ctx = browser.new_context(viewport={"width": 1400, "height": 1000})
    pg = ctx.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    yield pg
    assert errors == [], errors
    ctx.close()


def ticks(c, name: str) -> list[int]:
    return [int(t) for t in TICK.findall(c.request("GET", f"/vms/{name}/console/scrollback")["text"])]


def test_snapshot_restore_and_clone_buttons(page, snap_daemon: Daemon, manager_guest: Path,  # noqa: F811
                                            tmp_path: Path) -> None:
    snap = tmp_path / "websnap"
    with snap_daemon.client() as c:
        c.define(guest_definition("w", manager_guest))
        c.action("w", "start")
        wait_for(lambda: len(ticks(c, "w")) >= 3, 20, "ticks from w")
        open_ui(page, snap_daemon)
        page.click('#vms tr[data-vm="w"] td.name')
        ops = page.locator("#state-ops")
        ops.locator('[data-op="snapshot"]').wait_for(state="visible", timeout=10_000)
        wait_for(lambda: ops.locator('[data-op="snapshot"]').is_enabled(), 10, "Snapshot enabled")
        ops.locator('[name="dir"]').fill(str(snap))
        ops.locator('[data-op="snapshot"]').click()
        page.locator("#state-note").filter(has_text=f"w: snapshot in {snap}").wait_for(timeout=30_000)
        assert (snap / "vm.state").is_file() and (snap / "snapshot.json").is_file()
        snap_tick = ticks(c, "w")[-1]

        form = page.locator("#restore-form")
        form.locator('[name="dir"]').fill(str(snap))
        form.locator('[name="name"]').fill("w-restored")
        form.locator('button[type="submit"]').click()
        row_state(page, "w-restored", "running", timeout=30_000)
        after = wait_for(lambda: (t := ticks(c, "w-restored")) and len(t) >= 3 and t, 20, "restored ticks")
        assert 1 < after[0] <= snap_tick + 2, (snap_tick, after[:5])

        page.click('#vms tr[data-vm="w"] td.name')
        ops.locator('[name="count"]').fill("1")
        ops.locator('[data-op="clone"]').click()
        page.locator("#state-note").filter(has_text="w: cloned as w-clone1").wait_for(timeout=30_000)
        row_state(page, "w-clone1", "running", timeout=30_000)
        assert c.get("w-clone1")["uuid"] != c.get("w")["uuid"]

        # a shut-off VM offers none of them
        c.action("w", "destroy")
        row_state(page, "w", "shutoff")
        wait_for(lambda: not ops.locator('[data-op="snapshot"]').is_enabled(), 10, "Snapshot disabled")
        assert not ops.locator('[data-op="migrate"]').is_enabled()
