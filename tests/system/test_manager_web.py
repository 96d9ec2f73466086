"""The web UI in a real browser: headless Chromium (Debian's) driven by Playwright, one test per feature.

A real pyvmmd serves the page over TCP with a token; VMs boot the QMP test guest
(tests/support/guests/qmp: "QMPGUEST BOOT", then "tick N" ten times a second).
Playwright's own browser download is never used: the system Chromium is passed
as ``executable_path``.  With ``PYVMM_WEB_SCREENSHOTS=DIR`` the tests save the
screenshots the manager README shows into DIR.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_manager_support import (  # noqa: F401 - fixtures
    Daemon,
    free_port,
    guest_definition,
    manager_guest,
    wait_state,
)

from pyvmm.manager.web import xterm_dir

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
SHOTS = os.environ.get("PYVMM_WEB_SCREENSHOTS")
ALL_ACTIONS = ("start", "shutdown", "destroy", "suspend", "resume", "reboot", "cad", "undefine")


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail("chromium is missing: apt-get install chromium (scripts/bootstrap installs it)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the playwright package is missing: pip install -e .[test]")
    if xterm_dir() is None:
        from pyvmm.manager.web.fetch_xterm import fetch_xterm

        fetch_xterm()  # npm pack @xterm/xterm (the npm registry); raises with a clear message if npm is missing
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="module")
def web_daemon(tmp_path_factory):
    d = Daemon(tmp_path_factory.mktemp("web") / "state", tcp_port=free_port())
    d.start()
    try:
        yield d
    finally:
        d.cleanup()


@pytest.fixture
def page(browser, web_daemon):
    ctx = browser.new_context(viewport={"width": 1400, "height": 1000})
    pg = ctx.new_page()
    pg.errors = []
    pg.dialogs = []
    pg.on("pageerror", lambda e: pg.errors.append(str(e)))
    pg.on("dialog", lambda dlg: (pg.dialogs.append(dlg.message), dlg.dismiss()))
    yield pg
    assert pg.errors == [], pg.errors
    ctx.close()


def open_ui(page, d: Daemon) -> None:
    page.goto(f"{d.url}/#token={d.token}")
    page.locator("#app").wait_for(state="visible", timeout=10_000)


def define(d: Daemon, name: str, kernel: Path, **extra) -> None:
    with d.client() as c:
        c.define(guest_definition(name, kernel, **extra))


def cleanup(d: Daemon, *names: str) -> None:
    with d.client() as c:
        for n in names:
            try:
                vm = c.get(n)
            except Exception:
                continue
            if vm["state"] != "shutoff":
                c.action(n, "destroy")
            c.undefine(n)


def shot(page, name: str) -> None:
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SHOTS) / f"{name}.png"))


def row_state(page, name: str, state: str, timeout: float = 20_000) -> None:
    page.locator(f'#vms tr[data-vm="{name}"] td.state').filter(
        has_text=re.compile(f"^{state}$")).wait_for(timeout=timeout)


def enabled_actions(page) -> set[str]:
    return {a for a in ALL_ACTIONS if page.locator(f'#actions [data-action="{a}"]').is_enabled()}


@contextlib.contextmanager
def vm_on_page(page, d: Daemon, name: str, kernel: Path, *, start: bool = False, tab: str | None = None,
               **extra) -> Iterator[None]:
    """Define NAME (and start it), open the UI on its details (on TAB), and undefine it afterwards."""
    define(d, name, kernel, **extra)
    try:
        if start:
            with d.client() as c:
                c.action(name, "start")
        open_ui(page, d)
        page.click(f'#vms tr[data-vm="{name}"] td.name')
        if tab:
            page.click(f'.tabs [data-tab="{tab}"]')
        yield
    finally:
        cleanup(d, name)


def test_token_login_form_instead_of_prompt(page, web_daemon):
    page.goto(web_daemon.url + "/")
    page.locator("#login").wait_for(state="visible", timeout=10_000)
    assert "token" in page.locator("#login").inner_text()
    assert page.locator("#app").is_hidden()
    page.fill("#login-token", "wrong-token-0123456789")
    page.click('#login button[type="submit"]')
    page.locator("#login-error").filter(has_text="That token was refused.").wait_for(timeout=5_000)
    shot(page, "login")
    page.fill("#login-token", web_daemon.token)
    page.click('#login button[type="submit"]')
    page.locator("#app").wait_for(state="visible", timeout=10_000)
    page.locator("#conn").filter(has_text="connected").wait_for(timeout=10_000)
    assert page.dialogs == []  # no prompt(), no alert()


def test_list_shows_state_cpu_and_memory_per_row(page, web_daemon, manager_guest):  # noqa: F811
    define(web_daemon, "lrun", manager_guest)
    define(web_daemon, "loff", manager_guest)
    try:
        with web_daemon.client() as c:
            c.action("lrun", "start")
        open_ui(page, web_daemon)
        row_state(page, "lrun", "running")
        row_state(page, "loff", "shutoff")
        run = page.locator('#vms tr[data-vm="lrun"]')
        run.locator("td.cpu").filter(has_text=re.compile(r"^\d+\.\d %$")).wait_for(timeout=10_000)
        run.locator("td.memory").filter(has_text=re.compile(r"^\d+ MiB / 64 MiB$")).wait_for(timeout=10_000)
        off = page.locator('#vms tr[data-vm="loff"]')
        assert off.locator("td.cpu").inner_text() == "–" and off.locator("td.memory").inner_text() == "64 MiB"
        assert run.locator("td.vcpus").inner_text() == "1"
        shot(page, "list")
    finally:
        cleanup(web_daemon, "lrun", "loff")


def test_create_form(page, web_daemon, manager_guest, tmp_path):  # noqa: F811
    disk = tmp_path / "data.img"
    disk.write_bytes(b"\0" * 65536)
    junk = tmp_path / "notakernel"
    junk.write_text("hello\n")
    open_ui(page, web_daemon)
    try:
        page.click("#create-open")
        form = page.locator("#create-form")
        form.locator('[name="name"]').fill("made")
        form.locator('[name="memory_mib"]').fill("64")
        form.locator('[name="vcpus"]').fill("2")
        form.locator('[name="kernel"]').fill(str(junk))
        form.locator('[name="start"]').uncheck()
        page.click("#create-submit")
        page.locator("#create-error").filter(has_text=f"kernel {junk}: unrecognised image format").wait_for(
            timeout=10_000)
        assert page.locator("#create").is_visible()  # the form stays open to fix the mistake

        form.locator('[name="kernel"]').fill(str(manager_guest))
        form.locator('[name="accel"]').select_option(os.environ.get("PYVMM_QMP_ACCEL", "kvm"))
        page.click("#create-add-disk")
        form.locator('[name="disk-path"]').fill(str(disk))
        form.locator('[name="nic"]').select_option("user")
        form.locator('[name="start"]').check()
        shot(page, "create")
        page.click("#create-submit")
        row_state(page, "made", "running")
        with web_daemon.client() as c:
            d = c.definition("made")
        assert (d["memory_mib"], d["vcpus"], d["kernel"]) == (64, 2, str(manager_guest))
        assert d["disks"] == [{"path": str(disk), "format": "raw", "readonly": False}]
        assert d["networks"][0]["type"] == "user" and d["networks"][0]["mac"].startswith("52:54:00:")

        # Kernel left empty: the guest kit's default guest, as pyvmm run uses
        page.click("#create-open")
        form.locator('[name="name"]').fill("kitvm")
        form.locator('[name="start"]').uncheck()
        page.click("#create-submit")
        page.locator('#vms tr[data-vm="kitvm"]').wait_for(timeout=60_000)
        from pyvmm.guestkit import default_guest

        with web_daemon.client() as c:
            d = c.definition("kitvm")
        guest = default_guest()
        assert (d["kernel"], d["initrd"], d["cmdline"], d["memory_mib"]) == (
            str(guest.kernel), str(guest.initrd), guest.cmdline, 512)
    finally:
        cleanup(web_daemon, "made", "kitvm")


def test_details_pane(page, web_daemon, manager_guest, tmp_path):  # noqa: F811
    disk = tmp_path / "d.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "1M"], check=True)
    define(web_daemon, "det", manager_guest, cmdline="hello=1", disks=[{"path": str(disk), "format": "qcow2"}],
           networks=[{"type": "user", "mac": "52:54:00:aa:bb:cc"}])
    try:
        open_ui(page, web_daemon)
        page.click('#vms tr[data-vm="det"] td.name')
        facts = page.locator("#facts")
        assert facts.locator('[data-fact="kernel"]').inner_text() == str(manager_guest)
        assert facts.locator('[data-fact="cmdline"]').inner_text() == "hello=1"
        accel = os.environ.get("PYVMM_QMP_ACCEL", "kvm")
        assert facts.locator('[data-fact="accelerator"]').inner_text() == f"{accel} (requested)"
        assert page.locator("#disks tbody tr").first.inner_text().split()[:3] == ["vda", str(disk), "qcow2"]
        assert page.locator("#nics tbody tr").first.inner_text().split()[:5] == ["net0", "user", "–", "virtio-net",
                                                                                 "52:54:00:aa:bb:cc"]
        # a shut-off VM's disks and NICs can be edited here
        page.locator("#disks tbody tr").first.get_by_role("button", name="Remove").click()
        page.wait_for_function("() => document.querySelectorAll('#disks tbody tr').length === 0")
        page.locator('#disk-add [name="path"]').fill(str(disk))
        page.locator('#disk-add [name="format"]').select_option("qcow2")
        page.click('#disk-add button[type="submit"]')
        page.locator("#disks tbody tr").filter(has_text=str(disk)).wait_for(timeout=5_000)
        page.click('#nic-add button[type="submit"]')
        page.wait_for_function("() => document.querySelectorAll('#nics tbody tr').length === 2")
        with web_daemon.client() as c:
            d = c.definition("det")
            assert [x["format"] for x in d["disks"]] == ["qcow2"] and len(d["networks"]) == 2
            c.update("det", {**d, "networks": []})  # user networking needs passt; keep the start simple
            c.action("det", "start")
        facts.locator('[data-fact="accelerator"]').filter(
            has_text=f"{accel} (requested with --accel {accel})").wait_for(timeout=10_000)
        assert page.locator("#disk-add").is_hidden()  # no editing while it runs
        assert "changed while the VM is shut off" in page.locator("#edit-note").inner_text()
        shot(page, "details")
        page.click('.tabs [data-tab="log"]')
        page.locator("#log").filter(has_text="accelerator:").wait_for(timeout=10_000)
        assert "vm.log" in page.locator("#log-path").inner_text()
    finally:
        cleanup(web_daemon, "det")


def test_actions_follow_the_state_rules(page, web_daemon, manager_guest):  # noqa: F811
    define(web_daemon, "act", manager_guest)
    try:
        open_ui(page, web_daemon)
        page.click('#vms tr[data-vm="act"] td.name')
        page.locator("#detail-state").filter(has_text="shutoff").wait_for()
        assert enabled_actions(page) == {"start", "undefine"}

        page.click('#actions [data-action="start"]')
        row_state(page, "act", "running")
        page.locator("#detail-state").filter(has_text="running").wait_for()
        assert enabled_actions(page) == {"shutdown", "destroy", "suspend", "reboot", "cad"}
        page.locator("#console .xterm-rows").filter(has_text="tick").wait_for(timeout=20_000)

        page.click('#actions [data-action="suspend"]')
        page.locator("#detail-state").filter(has_text="paused").wait_for(timeout=10_000)
        assert enabled_actions(page) == {"shutdown", "destroy", "resume"}
        page.click('#actions [data-action="resume"]')
        page.locator("#detail-state").filter(has_text="running").wait_for(timeout=10_000)

        with web_daemon.client() as c:
            before = c.request("GET", "/vms/act/console/scrollback")["text"].count("QMPGUEST BOOT")
        page.click('#actions [data-action="reboot"]')
        with web_daemon.client() as c:
            from test_manager_support import wait_for

            wait_for(lambda: c.request("GET", "/vms/act/console/scrollback")["text"].count("QMPGUEST BOOT") > before,
                     15, "a second boot after reboot")

        page.click('#actions [data-action="shutdown"]')  # the test guest powers off on the ACPI button
        page.locator("#detail-state").filter(has_text="shutoff").wait_for(timeout=20_000)
        page.click('#actions [data-action="start"]')
        page.locator("#detail-state").filter(has_text="running").wait_for(timeout=20_000)
        page.click('#actions [data-action="destroy"]')
        page.locator("#detail-state").filter(has_text="shutoff").wait_for(timeout=20_000)
        with web_daemon.client() as c:
            assert c.get("act")["reason"] == "destroyed"

        delete = page.locator('#actions [data-action="undefine"]')
        delete.click()
        assert delete.inner_text() == "Really delete act?"  # asks first, in the page
        delete.click()
        page.locator('#vms tr[data-vm="act"]').wait_for(state="detached", timeout=10_000)
        assert page.locator("#detail").is_hidden()
    finally:
        cleanup(web_daemon, "act")


def test_terminal_fits_its_box(page, web_daemon, manager_guest):  # noqa: F811
    with vm_on_page(page, web_daemon, "term", manager_guest, start=True, tab="console"):
        page.locator("#console .xterm-rows").filter(has_text="tick").wait_for(timeout=20_000)

        def fit() -> dict:
            return page.evaluate("""() => {
                const box = document.getElementById('console').getBoundingClientRect();
                const screen = document.querySelector('#console .xterm-screen').getBoundingClientRect();
                return {cols: state.term.cols, rows: state.term.rows, boxW: box.width, boxH: box.height,
                        w: screen.width, h: screen.height};
            }""")

        wide = fit()
        # The terminal fills its box: less than one character cell (~9 px by ~17 px) left over on each axis.
        assert wide["w"] <= wide["boxW"] and wide["boxW"] - wide["w"] < 30, wide
        assert wide["h"] <= wide["boxH"] and wide["boxH"] - wide["h"] < 30, wide
        assert wide["cols"] > 100
        note = page.locator("#console-size").inner_text()
        assert f"Terminal {wide['cols']}×{wide['rows']}" in note and "TIOCSWINSZ" in note
        shot(page, "console")
        page.set_viewport_size({"width": 800, "height": 700})
        page.wait_for_function(f"() => state.term.cols < {wide['cols']}")
        narrow = fit()
        assert narrow["boxW"] - narrow["w"] < 30 and narrow["w"] <= narrow["boxW"], narrow
        # the button types the matching stty into the guest's console
        stty = f"stty cols {narrow['cols']} rows {narrow['rows']}"
        assert page.locator("#console-stty").inner_text() == f"type “{stty}” in the guest"


def test_not_running_is_said_clearly(page, web_daemon, manager_guest):  # noqa: F811
    with vm_on_page(page, web_daemon, "idle", manager_guest, tab="console"):
        off = page.locator("#console-off")
        off.wait_for(state="visible")
        assert off.inner_text().startswith("idle is not running (shutoff)")
        page.click('.tabs [data-tab="overview"]')
        page.wait_for_function("() => document.getElementById('cpu-chart').dataset.status === 'not running'")
        shot(page, "not-running")
        page.click('#actions [data-action="start"]')
        off.wait_for(state="hidden", timeout=20_000)


def test_errors_are_one_sentence_with_the_log_one_click_away(page, web_daemon, manager_guest, tmp_path):  # noqa: F811
    broken = tmp_path / "broken.elf"
    broken.write_bytes(b"\x7fELF" + b"\0" * 4096)  # looks like a kernel when defined, fails when it boots
    define(web_daemon, "bad", broken)
    try:
        open_ui(page, web_daemon)
        page.click('#vms tr[data-vm="bad"] button[data-action="start"]')
        alert = page.locator("#alert-text")
        alert.filter(has_text="failed to start").wait_for(timeout=20_000)
        text = alert.inner_text()
        assert text.startswith(f"VM bad failed to start: kernel {broken}: corrupt ELF file"), text
        assert "\n" not in text and "|" not in text and "serial0" not in text
        shot(page, "error")
        page.click("#alert-log")
        page.locator("#tab-log").wait_for(state="visible")
        page.locator("#log").filter(has_text="error: kernel").wait_for(timeout=10_000)
    finally:
        cleanup(web_daemon, "bad")


def test_charts_have_a_time_axis_and_units(page, web_daemon, manager_guest):  # noqa: F811
    with vm_on_page(page, web_daemon, "chart", manager_guest, start=True, tab="overview"):
        page.wait_for_function("() => document.getElementById('mem-chart').dataset.status === 'drawn'"
                               " && state.history.length >= 8", timeout=30_000)
        labels = page.evaluate("""() => ['cpu-chart', 'mem-chart'].map((id) => {
            const c = document.getElementById(id);
            return [c.dataset.xLabels, c.dataset.yLabels];
        })""")
        for (x, y), unit in zip(labels, ("%", "MiB"), strict=True):
            assert x.split("|") == ["−120 s", "−90 s", "−60 s", "−30 s", "now"], x
            assert all(lbl.endswith(" " + unit) for lbl in y.split("|")), y
            assert y.split("|")[0] == f"0 {unit}"
        drawn = page.evaluate("""() => {
            const c = document.getElementById('mem-chart');
            const px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            let blue = 0;
            for (let i = 0; i < px.length; i += 4) if (px[i + 2] > 180 && px[i] < 60) blue++;
            return blue;
        }""")
        assert drawn > 20, "the memory chart drew no line"
        shot(page, "charts")


def test_send_ctrl_alt_del(page, web_daemon, manager_guest):  # noqa: F811
    # the guest prints each keyboard byte
    with vm_on_page(page, web_daemon, "cad", manager_guest, start=True, tab="console", cmdline="keys=1"):
        page.locator("#console .xterm-rows").filter(has_text="tick").wait_for(timeout=20_000)
        page.click('#actions [data-action="cad"]')
        page.locator("#conn").filter(has_text="cad: Ctrl-Alt-Del sent").wait_for(timeout=10_000)
        with web_daemon.client() as c:
            from test_manager_support import wait_for

            keys = wait_for(lambda: (k := re.findall(r"KEY 0x000000([0-9a-f]{2})", c.request(
                "GET", "/vms/cad/console/scrollback")["text"])) and len(k) >= 8 and k, 15, "the scancodes")
        assert keys == ["1d", "38", "e0", "53", "e0", "d3", "b8", "9d"]  # set 1: ctrl, alt, delete down, then up
        page.locator("#console .xterm-rows").filter(has_text="KEY 0x00000053").wait_for(timeout=10_000)


def test_event_history(page, web_daemon, manager_guest):  # noqa: F811
    define(web_daemon, "hist", manager_guest)
    try:
        with web_daemon.client() as c:
            c.action("hist", "start")
            c.action("hist", "suspend")
        open_ui(page, web_daemon)
        page.click('#vms tr[data-vm="hist"] td.name')
        page.click('.tabs [data-tab="events"]')
        rows = page.locator("#events tbody tr")
        rows.filter(has_text="paused").first.wait_for(timeout=10_000)
        texts = [" ".join(t.split()) for t in rows.all_inner_texts()]
        assert any("defined shutoff" in t for t in texts) and any("state running" in t for t in texts), texts
        # new events arrive live, newest first
        page.click('#actions [data-action="resume"]')
        page.wait_for_function("() => document.querySelector('#events tbody tr td:nth-child(3)').textContent"
                               " === 'running'", timeout=10_000)
        shot(page, "events")
    finally:
        cleanup(web_daemon, "hist")
