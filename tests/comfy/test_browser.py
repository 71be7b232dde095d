"""The shipped UI workflows in a real browser: Debian's chromium, driven by Playwright, opens the web UI of the test
server (the classic frontend of the 2024 ComfyUI, or the newest one's), loads each workflow the way the app loads a
dropped file, checks that no missing-node or error dialog appears, queues it and waits until its output images show
on the Save Image node. A screenshot per workflow and frontend is kept in artifacts/.

Nothing is downloaded at test time: the browser is the system's chromium (ERASEKIT_CHROMIUM names another binary).
`python3 scripts/dev.py test` installs it when it runs as root with apt-get; elsewhere these tests skip and say how.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import test_workflows
from conftest import ARTIFACTS
from test_workflows import NAMES, WORKFLOWS, set_widget, ui_for_the_tiny_checkpoint

from erasekit.cli.comfy_server import ComfyError

CHROMIUM = Path(os.environ.get("ERASEKIT_CHROMIUM", "/usr/bin/chromium"))
INSTALL_CHROMIUM = ("install Debian's chromium as root: `apt-get install -y chromium` (`python3 scripts/dev.py test` "
                    "does this itself when it runs as root), or set ERASEKIT_CHROMIUM to a Chromium binary")
INSTALL_PLAYWRIGHT = ("install it into the test environment: `.venv/bin/pip install playwright` (the `test` extra has "
                      "it; `python3 scripts/dev.py test` installs that)")
# No sandbox (CI runs as root), no GPU, and nothing that reaches out to the network on its own.
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
               "--disable-sync", "--no-first-run"]
READY_S, TEMPLATES_S, RUN_S, SHOW_S = 120, 60, 600, 60
VIEWPORT = {"width": 1920, "height": 1080}
server = test_workflows.server  # the module-scoped fixture: the test server with the workflows' model files

# Visible dialogs and error toasts: the classic frontend's ComfyDialog (.comfy-modal: missing node types, execution
# and queue errors) and the newest frontend's PrimeVue dialogs and error toasts.
DIALOGS_JS = """() => [...document.querySelectorAll(
        '.comfy-modal, .p-dialog, [role=dialog], [role=alertdialog], .p-toast-message-error')]
    .filter(e => e.getClientRects().length > 0 && getComputedStyle(e).visibility !== 'hidden')
    .map(e => (e.innerText || '').trim().replace(/\\s+/g, ' ').slice(0, 600))"""

# The images each Save Image node shows, once every one of them has loaded: {node id: [[subfolder, filename]]}.
SHOWN_JS = """() => {
    const shown = {};
    for (const node of window.app.graph._nodes.filter(n => n.type === 'SaveImage')) {
        const imgs = node.imgs || [];
        if (!imgs.length || !imgs.every(i => i.complete && i.naturalWidth > 0)) return null;
        shown[node.id] = imgs.map(i => { const q = new URL(i.src, location.href).searchParams;
                                         return [q.get('subfolder') || '', q.get('filename')]; });
    }
    return shown;
}"""


# Zoom and pan the canvas so that the whole graph shows: the frontends load a node's images only when they draw it.
FIT_JS = """() => {
    const canvas = window.app.canvas, nodes = window.app.graph._nodes, title = 40, margin = 20;
    const x0 = Math.min(...nodes.map(n => n.pos[0])), y0 = Math.min(...nodes.map(n => n.pos[1] - title));
    const x1 = Math.max(...nodes.map(n => n.pos[0] + n.size[0]));
    const y1 = Math.max(...nodes.map(n => n.pos[1] + n.size[1]));
    const width = canvas.canvas.clientWidth, height = canvas.canvas.clientHeight;
    const scale = Math.min((width - 2 * margin) / (x1 - x0), (height - 2 * margin) / (y1 - y0), 1);
    canvas.ds.scale = scale;
    canvas.ds.offset[0] = -x0 + (width / scale - (x1 - x0)) / 2;
    canvas.ds.offset[1] = -y0 + (height / scale - (y1 - y0)) / 2;
    canvas.setDirty(true, true);
}"""


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip(f"no Chromium at {CHROMIUM} for the real-browser checks: {INSTALL_CHROMIUM}")
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason=f"no Playwright for the real-browser checks: {INSTALL_PLAYWRIGHT}")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=LAUNCH_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


def _dialogs(page) -> list[str]:
    return page.evaluate(DIALOGS_JS)


class Page:
    """The web UI in one browser page, with the JavaScript alerts it raised."""

    def __init__(self, browser, client):
        self.client = client
        self.alerts: list[str] = []
        self.page = browser.new_page(viewport=VIEWPORT)
        self.page.on("dialog", self._alert)
        self.page.set_default_timeout(READY_S * 1000)

    def _alert(self, dialog) -> None:
        self.alerts.append(f"{dialog.type}: {dialog.message}")
        dialog.dismiss()

    def open(self) -> None:
        """Open the UI; the newest frontend's first start opens its template browser, which is closed here."""
        first_start = self._tutorial_pending()
        self.page.goto(self.client.url)
        self.page.wait_for_function("() => window.app && window.app.graph && window.app.canvas")
        self.frontend = self.page.evaluate("() => window.__COMFYUI_FRONTEND_VERSION__ || null")
        if self.frontend and first_start:
            dialog = self.page.locator(".p-dialog").filter(has_text="Template")
            dialog.wait_for(state="visible", timeout=TEMPLATES_S * 1000)
            self.page.keyboard.press("Escape")
            dialog.wait_for(state="hidden")
        self.page.wait_for_load_state("networkidle")

    def _tutorial_pending(self) -> bool:
        try:
            return self.client.get_json("/settings/Comfy.TutorialCompleted") is not True
        except (ComfyError, ValueError):  # no such route: a server without the newest frontend's settings
            return True

    @property
    def tag(self) -> str:
        return f"frontend-{self.frontend}" if self.frontend else "classic"

    def problems(self) -> list[str]:
        return [*self.alerts, *_dialogs(self.page)]


@pytest.fixture(scope="module")
def ui_page(browser, server):
    client, _ = server
    page = Page(browser, client)
    page.open()
    yield page
    page.page.close()


def _history_images(client, node_id: str, subfolder: str, prefix: str) -> list[list[str]]:
    """[subfolder, filename] of the images node `node_id` saved under subfolder/prefix in the newest prompt that
    saved any, from /history."""
    for entry in reversed(list(client.get_json("/history").values())):
        images = entry.get("outputs", {}).get(node_id, {}).get("images", [])
        if images and all(image["subfolder"] == subfolder and image["filename"].startswith(f"{prefix}_")
                          for image in images):
            return [[image["subfolder"], image["filename"]] for image in images]
    return []


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_ui_workflow_loads_queues_and_shows_its_images(ui_page, server, tiny_checkpoint, name):
    client, info = server
    page = ui_page.page
    if ui_page.problems():  # left over from a failed workflow before this one
        ui_page.alerts.clear()
        page.reload()
        page.wait_for_function("() => window.app && window.app.graph && window.app.canvas")
    workflow = ui_for_the_tiny_checkpoint(json.loads((WORKFLOWS / "ui" / f"{name}.json").read_text()), info,
                                          tiny_checkpoint.name)
    # Its own output folder: Save Image's input differs from the API runs', so ComfyUI saves again even when the
    # rest of the graph is cached from them, and the images shown can be told from theirs.
    subfolder = f"erasekit_browser_{ui_page.tag}"
    saves = [node for node in workflow["nodes"] if node["type"] == "SaveImage"]
    assert saves, f"{name} has no Save Image node"
    for node in saves:
        set_widget(node, info, "filename_prefix", f"{subfolder}/{name}")
    screenshot = ARTIFACTS / f"browser-{name}-{ui_page.tag}.png"
    ARTIFACTS.mkdir(exist_ok=True)
    try:
        page.evaluate("graph => window.app.loadGraphData(graph)", workflow)
        page.wait_for_load_state("networkidle")
        time.sleep(1)  # dialogs open right after the graph is configured
        assert not ui_page.problems(), f"loading {name} opened: {ui_page.problems()}"
        loaded = page.evaluate("() => window.app.graph._nodes.map(n => [n.id, n.type])")
        assert sorted(map(tuple, loaded)) == sorted((node["id"], node["type"]) for node in workflow["nodes"])

        page.evaluate(FIT_JS)
        page.evaluate("() => window.app.queuePrompt(0, 1)")
        saved = {}
        deadline = time.monotonic() + RUN_S
        while not saved and time.monotonic() < deadline:
            assert not ui_page.problems(), f"running {name} opened: {ui_page.problems()}"
            time.sleep(0.5)
            saved = {str(node["id"]): _history_images(client, str(node["id"]), subfolder, name)
                     for node in saves}
            saved = saved if all(saved.values()) else {}
        assert saved, f"{name}: no images saved within {RUN_S} s (server log: {ARTIFACTS / 'comfyui-server.log'})"
        deadline, shown = time.monotonic() + SHOW_S, None
        while not shown and time.monotonic() < deadline:
            assert not ui_page.problems(), f"running {name} opened: {ui_page.problems()}"
            time.sleep(0.5)
            shown = page.evaluate(SHOWN_JS)
        assert shown == saved, f"{name}: the UI shows {shown} {SHOW_S} s after ComfyUI saved {saved}"
        page.wait_for_timeout(500)  # the canvas draws the images on its next frame
    finally:
        page.screenshot(path=str(screenshot))
    assert not ui_page.problems(), f"after {name} ran: {ui_page.problems()}"


@pytest.mark.slow
def test_a_missing_node_type_is_caught(ui_page):
    """The check above sees the missing-node dialog of this frontend (a node type no pack provides)."""
    page = ui_page.page
    workflow = json.loads((WORKFLOWS / "ui" / f"{NAMES[0]}.json").read_text())
    workflow["nodes"][-1]["type"] = "EraseKitNoSuchNode"
    try:
        page.evaluate("graph => window.app.loadGraphData(graph)", workflow)
        deadline = time.monotonic() + 30
        while not ui_page.problems() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert any("EraseKitNoSuchNode" in problem for problem in ui_page.problems()), ui_page.problems()
    finally:
        ui_page.alerts.clear()
        page.reload()
        page.wait_for_function("() => window.app && window.app.graph && window.app.canvas")


# --- scripts/dev.py installs the browser ----------------------------------------------------------------------------


@pytest.fixture
def dev(monkeypatch, tmp_path):
    """scripts/dev.py as a module, with a missing chromium, root, apt-get, and the commands it runs recorded."""
    import importlib.util
    import subprocess

    spec = importlib.util.spec_from_file_location("erasekit_dev", WORKFLOWS.parent / "scripts" / "dev.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.delenv("ERASEKIT_CHROMIUM", raising=False)
    monkeypatch.setattr(module, "CHROMIUM", tmp_path / "chromium")
    monkeypatch.setattr(module.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(module.os, "geteuid", lambda: 0)
    module.ran, module.fail = [], set()

    def run(cmd, **_):
        module.ran.append(cmd[1:])
        ok = cmd[1] not in module.fail
        if ok and cmd[1] == "install":
            module.CHROMIUM.touch()
        return subprocess.CompletedProcess(cmd, 0 if ok else 100, stdout="E: Unable to locate package chromium\n")

    monkeypatch.setattr(module.subprocess, "run", run)
    return module


def test_dev_installs_chromium_as_root_once(dev, capsys):
    dev.fail.add("install")
    dev.ensure_chromium()  # a fresh image: no package lists, so install fails until apt-get update
    assert dev.ran == [["install", "-y", "-q", "chromium"], ["update", "-q"], ["install", "-y", "-q", "chromium"]]
    assert "could not install chromium" in capsys.readouterr().out
    dev.fail.clear()
    dev.ran.clear()
    dev.ensure_chromium()
    assert dev.ran == [["install", "-y", "-q", "chromium"]] and dev.CHROMIUM.exists()
    dev.ensure_chromium()  # present: nothing runs
    assert dev.ran == [["install", "-y", "-q", "chromium"]]
    assert "installing Debian's chromium" in capsys.readouterr().out


def test_dev_without_root_leaves_chromium_and_says_how(dev, monkeypatch, capsys):
    monkeypatch.setattr(dev.os, "geteuid", lambda: 1000)
    dev.ensure_chromium()
    assert dev.ran == []
    assert "the real-browser tests will skip (install Debian's as root: apt-get install -y chromium)" in \
        capsys.readouterr().out
