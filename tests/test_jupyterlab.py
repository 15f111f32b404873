"""The course in JupyterLab, seen in a real browser: a chapter opens in the notebook view and runs in the kernel.

`jupyter lab` serves a copy of nbs/ on 127.0.0.1 (a copy, so that JupyterLab's autosave never touches the
course), with its settings and workspaces in a temporary folder; headless Chromium opens chapter 01, clears the
stored outputs, runs the cells up to the first printed result through the kernel, and reads that result.
"""
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from chromium import chromium, free_port, skip_reason

ROOT = Path(__file__).resolve().parents[1]
CHAPTER = "01_forward_process.ipynb"
CELL = "alphas_cumprod = torch.cumprod(alphas, 0)"  # a cell of that chapter whose value is printed
OUTPUT = "9.9990e-01"  # in that value: alpha-bar at t = 0 is 1 - 1e-4
SKIP = skip_reason()
pytestmark = pytest.mark.skipif(SKIP is not None, reason=f"browser tests skipped: {SKIP}")


def wait_for(condition, timeout: float, what: str):
    "Poll `condition` until it returns something true; fail naming `what` after `timeout` seconds."
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if result := condition():
            return result
        time.sleep(0.25)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    "URL of a JupyterLab serving a copy of the course on 127.0.0.1 (stopped afterwards)."
    tmp = tmp_path_factory.mktemp("lab")
    shutil.copytree(ROOT / "nbs", tmp / "nbs")
    port, token = free_port(), "ddpm-course-test"
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(tmp / "config"), "JUPYTERLAB_SETTINGS_DIR": str(tmp / "settings"),
           "JUPYTERLAB_WORKSPACES_DIR": str(tmp / "workspaces"), "JUPYTER_RUNTIME_DIR": str(tmp / "runtime"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    log = open(tmp / "lab.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={tmp / 'nbs'}", "--ServerApp.port_retries=0",
         "--LabApp.expose_app_in_browser=True",  # window.jupyterapp: the menu commands, without hunting for menus
         "--LabApp.extension_manager=readonly", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
         *(["--allow-root"] if os.geteuid() == 0 else [])],
        cwd=tmp, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"

    def up():
        try:
            return urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2).status == 200
        except OSError:
            assert server.poll() is None, f"jupyter lab exited:\n{(tmp / 'lab.log').read_text()[-3000:]}"
            return False

    wait_for(up, 120, "jupyter lab to start")
    yield base, token
    server.terminate()
    try:
        server.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.kill()
    log.close()


def test_chapter_runs_in_jupyterlab(lab):
    base, token = lab
    with chromium() as browser:
        browser.get(f"{base}/lab/tree/{CHAPTER}?token={token}")
        wait_for(lambda: browser.execute_script("return document.querySelectorAll('.jp-Notebook .jp-Cell').length > 10"),
                 120, f"{CHAPTER} to open in the notebook view")
        idle = ("const i = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook-ExecutionIndicator');"
                "return i && i.getAttribute('data-status') === 'idle'")
        accept = ("const b = document.querySelector('.jp-Dialog .jp-Dialog-button.jp-mod-accept');"
                  "if (b) { b.click(); return false; }")  # the chapters name no kernel: take the one JupyterLab offers
        wait_for(lambda: browser.execute_script(accept + idle), 120, "the kernel to start")
        target = browser.execute_script(
            "return [...document.querySelectorAll('.jp-Notebook .jp-Cell')].findIndex("
            "c => c.querySelector('.jp-InputArea-editor').textContent.includes(arguments[0]))", CELL)
        assert target > 0, f"no cell of {CHAPTER} contains {CELL!r}"
        output = ("return document.querySelectorAll('.jp-Notebook .jp-Cell')[arguments[0]]"
                  ".querySelector('.jp-OutputArea').textContent")
        assert OUTPUT in browser.execute_script(output, target), "the chapter should open with its stored output"

        browser.execute_script("return jupyterapp.commands.execute('notebook:clear-all-cell-outputs')")
        wait_for(lambda: not browser.execute_script(output, target).strip(), 30, "the stored outputs to clear")
        cell = browser.find_elements("css selector", ".jp-Notebook .jp-Cell")[target]
        browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", cell)
        cell.find_element("css selector", ".jp-InputPrompt").click()  # select the cell, as a reader would
        browser.execute_script("return jupyterapp.commands.execute('notebook:run-all-above')")
        browser.execute_script("return jupyterapp.commands.execute('notebook:run-cell')")
        text = wait_for(lambda: (t := browser.execute_script(output, target)) and OUTPUT in t and t, 180,
                        f"the kernel's output {OUTPUT!r}")
        prompt = browser.execute_script(
            "return document.querySelectorAll('.jp-Notebook .jp-Cell')[arguments[0]]"
            ".querySelector('.jp-InputPrompt').textContent", target)
        assert prompt.strip().strip("[]:").isdigit(), f"the cell was not executed (prompt {prompt!r})"
        assert "Error" not in text, text
        shots = ROOT / "docs" / "_build" / "screenshots"
        shots.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(shots / "jupyterlab.png"))
