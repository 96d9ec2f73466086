"""The web UI in a real browser: headless Chromium (Debian's) driven by Playwright.

The test starts a VM from the page, sees its serial output in the page's
console (xterm.js), pauses and resumes it with the page's buttons, and checks
the CPU/memory charts are drawn.  Playwright's own browser download is never
used: the system Chromium is passed as ``executable_path``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from test_manager_support import Daemon, free_port, guest_definition, manager_guest  # noqa: F401

from pyvmm.manager.web import xterm_dir

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail("chromium is missing: apt-get install chromium (scripts/bootstrap installs it)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the playwright package is missing: pip install -e .[test]")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        try:
            yield b
        finally:
            b.close()


def test_web_ui_starts_vm_and_shows_console(browser, tmp_path, manager_guest):  # noqa: F811
    if xterm_dir() is None:
        from pyvmm.manager.web.fetch_xterm import fetch_xterm

        fetch_xterm()  # npm pack @xterm/xterm (the npm registry); raises with a clear message if npm is missing
    d = Daemon(tmp_path / "state", tcp_port=free_port())
    d.start()
    try:
        with d.client() as c:
            c.define(guest_definition("webvm", manager_guest))
            c.define(guest_definition("other", manager_guest))
        page = browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(f"{d.url}/#token={d.token}")
        row = page.locator('tr[data-vm="webvm"]')
        row.locator("td.state").filter(has_text="shutoff").wait_for(timeout=10_000)
        assert page.locator('tr[data-vm="other"]').count() == 1

        row.locator('button[data-action="start"]').click()
        row.locator("td.state").filter(has_text="running").wait_for(timeout=20_000)
        # xterm.js renders into .xterm-rows; the guest prints "tick N" ten times a second
        assert page.evaluate("() => typeof window.Terminal") == "function", "xterm.js was not loaded"
        page.locator("#console .xterm-rows").filter(has_text="tick").wait_for(timeout=20_000)

        row.locator('button[data-action="suspend"]').click()
        row.locator("td.state").filter(has_text="paused").wait_for(timeout=10_000)
        row.locator('button[data-action="resume"]').click()
        row.locator("td.state").filter(has_text="running").wait_for(timeout=10_000)

        # the charts get samples (one a second) and draw a line
        page.wait_for_function("() => document.querySelector('#detail').hidden === false")
        page.wait_for_timeout(2500)
        drawn = page.evaluate("""() => {
            const c = document.getElementById('mem-chart');
            const px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            let blue = 0;
            for (let i = 0; i < px.length; i += 4) if (px[i + 2] > 180 && px[i] < 60) blue++;
            return blue;
        }""")
        assert drawn > 20, "the memory chart drew no line"
        page.screenshot(path=str(tmp_path / "web.png"))

        row.locator('button[data-action="shutdown"]').click()
        row.locator("td.state").filter(has_text="shutoff").wait_for(timeout=20_000)
        assert errors == [], errors
    finally:
        d.cleanup()
