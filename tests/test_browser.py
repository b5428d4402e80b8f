"""Notebook 03's calculator, used the way a learner uses it: JupyterLab in a real (headless) browser.

Starts JupyterLab on localhost with a token (all Jupyter state in a temporary directory),
opens a copy of notebooks/03_kv_cache_memory.ipynb in Debian's Chromium driven by
Playwright, runs all cells, changes the context-length slider and the model dropdown, and
checks that the displayed max concurrency equals `kvlab.memory_plan` for those values.
Skipped when /usr/bin/chromium or the playwright package is absent (never `playwright install`).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

import kvlab

CHROMIUM = "/usr/bin/chromium"
REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "03_kv_cache_memory.ipynb"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
# the calculator in notebook 03 is MemoryCalculator(model="llama-3-8b", gpu="H100-80GB", context_len=4096)
# with the other inputs at their defaults: bf16 weights and KV, TP 1, utilization 0.9
CALCULATOR = dict(gpu="H100-80GB", weight_dtype="bfloat16", kv_dtype="bfloat16", tensor_parallel=1,
                  gpu_memory_utilization=0.9)

if not os.path.exists(CHROMIUM):
    pytest.skip(f"{CHROMIUM} is absent (apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")


def expected(model: str, context_len: int) -> str:
    return str(kvlab.memory_plan(kvlab.ModelSpec.preset(model), context_len=context_len, **CALCULATOR)
               .max_concurrent_requests)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def jupyter_lab(tmp_path):
    """A JupyterLab server over a temp dir holding a copy of notebook 03; yields (url, token, root)."""
    root = tmp_path / "lab"
    root.mkdir()
    shutil.copy(NOTEBOOK, root / NOTEBOOK.name)   # autosave must not touch the committed notebook
    env = dict(os.environ)
    for var, sub in [("JUPYTER_CONFIG_DIR", "config"), ("JUPYTER_RUNTIME_DIR", "runtime"),
                     ("JUPYTERLAB_SETTINGS_DIR", "settings"), ("JUPYTERLAB_WORKSPACES_DIR", "workspaces"),
                     ("IPYTHONDIR", "ipython")]:
        env[var] = str(tmp_path / sub)
    news = tmp_path / "settings" / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    news.parent.mkdir(parents=True)
    news.write_text(json.dumps({"fetchNews": "false"}))
    # render every cell (no virtual scrolling), so widgets scrolled out of view stay in the page
    tracker = tmp_path / "settings" / "@jupyterlab" / "notebook-extension" / "tracker.jupyterlab-settings"
    tracker.parent.mkdir(parents=True)
    tracker.write_text(json.dumps({"windowingMode": "none"}))
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    token, port = secrets.token_hex(16), _free_port()
    cmd = [sys.executable, "-m", "jupyter", "lab", "--no-browser", f"--port={port}", "--ServerApp.ip=127.0.0.1",
           f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}", "--ServerApp.port_retries=0"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")
    log = open(tmp_path / "jupyter.log", "w")
    server = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"JupyterLab did not start:\n{(tmp_path / 'jupyter.log').read_text()[-3000:]}")
            time.sleep(0.3)
        yield url, token, root
    finally:
        try:   # ask the server to stop its kernels and itself, then make sure of it
            req = urllib.request.Request(f"{url}/api/shutdown?token={token}", method="POST")
            urllib.request.urlopen(req, timeout=5).close()
            server.wait(timeout=15)
        except Exception:
            pass
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
        log.close()


def test_calculator_in_jupyterlab(jupyter_lab, tmp_path):
    url, token, _ = jupyter_lab
    started = time.monotonic()
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{url}/lab/tree/{NOTEBOOK.name}?token={token}")
            page.get_by_text("Python 3 (ipykernel) | Idle").wait_for(timeout=90_000)

            page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
            page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()

            shown = page.locator(".kvlab-results .kvlab-max-concurrency")
            shown.wait_for(timeout=240_000)

            def wait_for_value(value: str):
                page.wait_for_function(
                    "v => { const e = document.querySelector('.kvlab-results .kvlab-max-concurrency');"
                    " return e !== null && e.textContent.trim() === v; }", arg=value, timeout=60_000)

            wait_for_value(expected("llama-3-8b", 4096))          # the notebook's defaults: 112

            def set_context(tokens: int):
                readout = page.locator(".kvlab-context .widget-readout")
                readout.click()
                page.keyboard.press("Control+A")
                page.keyboard.type(str(tokens))
                page.keyboard.press("Enter")

            set_context(2048)
            wait_for_value(expected("llama-3-8b", 2048))          # 224
            page.locator(".kvlab-model select").scroll_into_view_if_needed()
            page.select_option(".kvlab-model select", "mistral-7b")
            wait_for_value(expected("mistral-7b", 2048))          # 230
            set_context(8192)
            wait_for_value(expected("mistral-7b", 8192))          # the window caps each request at 4096 tokens
            page.locator(".kvlab-memory-calculator").screenshot(path=str(tmp_path / "calculator.png"))

            # an invalid combination: Llama-2-7B cannot take 8192 tokens -> a readable message, no traceback
            page.select_option(".kvlab-model select", "llama-2-7b")
            wait_for_value("n/a")
            message = page.locator(".kvlab-results .kvlab-error").inner_text()
            assert "exceeds llama-2-7b's maximum context of 4096 tokens" in message
            page.screenshot(path=str(tmp_path / "jupyterlab.png"), full_page=True)
            assert "Traceback" not in page.locator(".jp-Notebook").inner_text()
        finally:
            browser.close()
    elapsed = time.monotonic() - started
    print(f"browser test: {elapsed:.1f} s in Chromium; screenshots in {tmp_path}")
    assert (tmp_path / "jupyterlab.png").stat().st_size > 0
