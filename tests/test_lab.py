"""`make lab`, checked as a reader meets it: JupyterLab opens a chapter's MyST source as a notebook,
renders its directives, and runs its first cells.

The server runs on 127.0.0.1 with a random token and the repository's lab settings
(``.jupyter/lab/settings``, as ``make lab`` passes them), serving a temporary copy of the chapter
so that nothing in the repository is written (no ``.ipynb_checkpoints``, no re-saved pair); its
user settings, workspaces and runtime files live in the same temporary folder. The test never
saves. Screenshots go to ``tests/artifacts/`` (or ``MMTL_ARTIFACTS``): ``lab-exercise.png`` (a
rendered exercise) and ``lab-notebook.png`` (the first cells' output).
"""

import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from browser import chromium_path

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("MMTL_ARTIFACTS", ROOT / "tests" / "artifacts"))
CHAPTER = "maml_sinusoid"  # its first code cells import mmtl_lib and print within seconds
RUN_CELLS = 3  # the Colab cell, the imports (set_threads), the first sampled tasks
PRINTED = "amplitudes:"  # printed by the third code cell
EXERCISE = "MAML on linear regression, in closed form"  # the title of its first {exercise}

pytestmark = pytest.mark.browser


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(server: subprocess.Popen, url: str, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"jupyter lab exited with status {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"jupyter lab did not answer {url.split('?')[0]} within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def stop(server: subprocess.Popen, base: str, token: str) -> None:
    """Shut the server down through its API (which shuts its kernels down first), then make sure."""
    request = urllib.request.Request(f"{base}/api/shutdown", method="POST", headers={"Authorization": f"token {token}"})
    try:
        urllib.request.urlopen(request, timeout=10).close()
        server.wait(timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """``(base url, token)`` of a JupyterLab serving a copy of the chapter under ``chapters/``."""
    home = tmp_path_factory.mktemp("lab")
    watched = [ROOT / "chapters" / name for name in (f"{CHAPTER}.md", f"{CHAPTER}.ipynb", ".ipynb_checkpoints")]
    before = [p.stat().st_mtime_ns if p.exists() else None for p in watched]
    (home / "root" / "chapters").mkdir(parents=True)
    for suffix in (".md", ".ipynb"):
        shutil.copy(ROOT / "chapters" / f"{CHAPTER}{suffix}", home / "root" / "chapters")
    # The test's own user settings: no news prompt over the screenshot, and never an autosave.
    user = home / "user-settings" / "@jupyterlab"
    (user / "apputils-extension").mkdir(parents=True)
    (user / "apputils-extension" / "notification.jupyterlab-settings").write_text('{"fetchNews": "false"}')
    (user / "docmanager-extension").mkdir()
    (user / "docmanager-extension" / "plugin.jupyterlab-settings").write_text('{"autosave": false}')

    port, token = free_port(), secrets.token_hex(16)
    command = [
        sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
        f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={home / 'root'}",
        f"--LabApp.app_settings_dir={ROOT / '.jupyter' / 'lab' / 'settings'}",  # as `make lab`
        f"--LabApp.user_settings_dir={home / 'user-settings'}", f"--LabApp.workspaces_dir={home / 'workspaces'}",
    ]  # fmt: skip
    if os.geteuid() == 0:
        command.append("--allow-root")
    env = {
        **os.environ,
        "JUPYTER_CONFIG_DIR": str(home / "config"),  # no personal jupyter_server_config
        "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
        "IPYTHONDIR": str(home / "ipython"),
        "MMTL_THREADS": os.environ.get("MMTL_THREADS", "1"),
    }
    log = home / "server.log"
    with open(log, "wb") as out:
        server = subprocess.Popen(command, cwd=home, env=env, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(server, f"{base}/api/status?token={token}", log)
        yield base, token
    finally:
        stop(server, base, token)
    assert server.returncode is not None
    assert [p.stat().st_mtime_ns if p.exists() else None for p in watched] == before, "the repository was written"


@pytest.fixture(scope="module")
def browser():
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox", "--disable-dev-shm-usage"])
        yield browser
        browser.close()


def test_a_chapter_opens_as_a_notebook_renders_myst_and_runs(browser, lab):
    base, token = lab
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(f"{base}/lab/tree/chapters/{CHAPTER}.md?token={token}")
    panel = page.locator(".jp-NotebookPanel")
    panel.locator(".jp-Cell").first.wait_for(timeout=60_000)
    assert page.locator(".jp-FileEditor").count() == 0, f"{CHAPTER}.md opened in the text editor"
    assert panel.count() == 1

    # jupyterlab-myst renders the {exercise} directives at the end (the notebook draws lazily:
    # scroll down until the first one is there), then back to the top.
    # The cell may be redrawn meanwhile, so find and scroll to the title in one step in the page.
    scroller = panel.locator(".jp-WindowedPanel-outer")
    show = """title => {
        const found = [...document.querySelectorAll(".myst-exercise-title")]
            .find(e => e.textContent.includes(title));
        if (found) found.scrollIntoView({block: "center"});
        return Boolean(found);
    }"""
    for _ in range(50):
        scroller.evaluate("e => { e.scrollTop = e.scrollHeight; }")
        if page.evaluate(show, EXERCISE):
            break
        page.wait_for_timeout(200)
    else:
        pytest.fail("the {exercise} directive was not rendered by jupyterlab-myst")
    page.wait_for_timeout(500)
    assert page.evaluate(show, EXERCISE)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=ARTIFACTS / "lab-exercise.png")
    scroller.evaluate("e => { e.scrollTop = 0; }")

    code = panel.locator(".jp-CodeCell")
    for i in range(RUN_CELLS):
        code.nth(i).locator(".cm-content").click()
        page.keyboard.press("Shift+Enter")
    expect = pytest.importorskip("playwright.sync_api").expect
    for i in range(RUN_CELLS):  # each ran, in order (a running cell shows [*])
        expect(code.nth(i).locator(".jp-InputPrompt")).to_have_text(f"[{i + 1}]:", timeout=60_000)
    output = code.nth(RUN_CELLS - 1).locator(".jp-OutputArea-output", has_text=PRINTED)
    assert output.count() == 1, f"code cell {RUN_CELLS - 1} did not print {PRINTED!r}"
    texts = code.locator(".jp-OutputArea-output").all_inner_texts()
    assert not any("Traceback" in t or "Error" in t for t in texts), texts
    assert code.first.locator(".jp-OutputArea-output").count() == 0  # the Colab cell: nothing, off Colab

    output.scroll_into_view_if_needed()
    page.screenshot(path=ARTIFACTS / "lab-notebook.png")
    page.close()  # unsaved: the copy stays as it was
