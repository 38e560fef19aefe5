"""The viewer in a real browser: `cbir serve` in a subprocess, Debian's headless Chromium driven by Playwright.

Uploads the real RSNA DICOM from ../shared (a synthetic one when that folder is absent), waits for the k result
tiles, checks their labels, draws a region on the query and sees the results change, and saves a screenshot.
Skips, with the reason, when Chromium or Playwright is missing (`.ci/run` installs Chromium).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ROOT = Path(__file__).resolve().parents[1]
REAL_DICOM = (ROOT.parent / "shared" / "data" / "real" / "rsna"
              / "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm")
K = 8
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run"]

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from cbir.models import ModelConfig, create_model, save_checkpoint
    root = tmp_path_factory.mktemp("viewer")
    runner = CliRunner()
    for args in (["synth", "--layout", "rsna", "--n", "30", "--size", "64", "--out", str(root / "data"),
                  "--seed", "8"],):
        assert runner.invoke(app, args).exit_code == 0
    save_checkpoint(create_model(ModelConfig(backbone="test_resnet", image_size=32, embed_dim=16, bits=32)),
                    root / "model")
    result = runner.invoke(app, ["ingest", "--data", str(root / "data"), "--model", str(root / "model"), "--index",
                                 str(root / "index"), "--collection", "rsna", "--workers", "0"])
    assert result.exit_code == 0, result.stderr
    port = _free_port()
    process = subprocess.Popen([sys.executable, "-m", "cli.main", "serve", "--index", str(root / "index"),
                                "--collection", "rsna", "--port", str(port)], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env={**os.environ})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2).read()
            break
        except OSError:
            assert process.poll() is None, process.stderr.read() if process.stderr else ""
            assert time.monotonic() < deadline, "cbir serve did not start"
            time.sleep(0.3)
    dicom = REAL_DICOM if REAL_DICOM.is_file() else sorted((root / "data" / "stage_2_train_images").glob("*.dcm"))[0]
    yield {"url": url, "dicom": dicom, "root": root}
    process.terminate()
    process.wait(30)


def test_upload_results_labels_and_region_search(server: dict, tmp_path: Path) -> None:
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not installed")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=FLAGS)
        try:
            page = browser.new_page()
            page.goto(server["url"])
            page.fill("#k", str(K))
            page.set_input_files("#file", str(server["dicom"]))
            page.wait_for_function(f"document.querySelectorAll('[data-testid=result-tile]').length == {K}",
                                   timeout=60_000)
            labels = page.locator("[data-testid=result-tile] .chip").all_inner_texts()
            assert len(labels) >= K and set(labels) <= {"Pneumonia", "No Pneumonia"}
            assert "model: P(Pneumonia)" in page.inner_text("#prediction")
            before = page.locator("[data-testid=result-tile] img").evaluate_all("els => els.map(e => e.src)")
            page.wait_for_function("document.querySelector('[data-testid=result-tile] img').naturalWidth > 0")
            box = page.locator("#region").bounding_box()
            page.mouse.move(box["x"] + 60, box["y"] + 60)
            page.mouse.down()
            page.mouse.move(box["x"] + 250, box["y"] + 260, steps=5)
            page.mouse.up()
            page.wait_for_function("document.getElementById('status').textContent.includes('region search')",
                                   timeout=60_000)
            page.wait_for_function(f"document.querySelectorAll('[data-testid=result-tile]').length == {K}")
            after = page.locator("[data-testid=result-tile] img").evaluate_all("els => els.map(e => e.src)")
            assert after != before                                    # the region found other cases
            page.locator("[data-testid=result-tile]").first.click()
            page.wait_for_function("document.getElementById('large').style.display == 'flex'")
            page.screenshot(path=str(tmp_path / "viewer.png"), full_page=True)
            assert (tmp_path / "viewer.png").stat().st_size > 10_000
            shot = os.environ.get("CBIR_VIEWER_SCREENSHOT")   # docs: save one for the README
            if shot:
                page.locator("#large").click()
                page.screenshot(path=shot, full_page=True)
        finally:
            browser.close()
