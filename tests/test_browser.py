"""The viewer in a real browser: `cbir serve` in a subprocess, Debian's headless Chromium driven by Playwright.

Uploads an archived DICOM, waits for the k result tiles (plus the query's own, flagged), checks their labels, draws
a region on the query and sees the results change, and saves a screenshot; then uploads the real RSNA DICOM from
../shared, which is not in the archive: k tiles and no self-match.
Then another team, without the archive or its file map, sees the same viewer from thumbnails stored in the index.
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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cbir.cli.main import app
from tests.conftest import REAL, needs_shared

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ROOT = Path(__file__).resolve().parents[1]
REAL_DICOM = REAL / "rsna" / "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
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
    archived = sorted((root / "data" / "stage_2_train_images").glob("*.dcm"))[0]
    with _serving(["--index", str(root / "index"), "--collection", "rsna"]) as url:
        yield {"url": url, "archived": archived, "root": root}


@contextmanager
def _serving(args: list[str], env: dict[str, str] | None = None) -> Iterator[str]:
    """`cbir serve ARGS` in a subprocess (with `env` added to this one's environment), until it answers."""
    port = _free_port()
    process = subprocess.Popen([sys.executable, "-m", "cbir.cli.main", "serve", *args, "--port", str(port)], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, **(env or {})})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    try:
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2).read()
                break
            except OSError:
                assert process.poll() is None, process.stderr.read() if process.stderr else ""
                assert time.monotonic() < deadline, "cbir serve did not start"
                time.sleep(0.3)
        yield url
    finally:
        process.terminate()
        process.wait(30)


@contextmanager
def _chromium(profile: Path) -> Iterator[object]:
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not installed")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, headless=True, args=FLAGS)
        try:
            yield browser
        finally:
            browser.close()


def test_upload_results_labels_and_region_search(server: dict, tmp_path: Path) -> None:
    with _chromium(tmp_path / "profile") as browser:
        page = browser.new_page()
        page.goto(server["url"])
        page.fill("#k", str(K))
        page.set_input_files("#file", str(server["archived"]))
        # the query is an archived image: it finds itself first (flagged, not voting), then K others
        page.wait_for_function(f"document.querySelectorAll('[data-testid=result-tile]').length == {K + 1}",
                               timeout=60_000)
        assert "(self)" in page.locator("[data-testid=result-tile] .caption").first.inner_text()
        labels = page.locator("[data-testid=result-tile] .chip").all_inner_texts()
        assert len(labels) >= K and set(labels) <= {"Pneumonia", "No Pneumonia"}
        assert "model: P(Pneumonia)" in page.inner_text("#prediction")
        assert "the query itself is in the archive" in page.inner_text("#prediction")
        assert not page.locator("[data-testid=no-close-case]").is_visible()   # uncalibrated: no claim either way
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


@needs_shared(REAL_DICOM)
def test_a_real_dicom_outside_the_archive_gets_k_results_and_no_self_match(server: dict, tmp_path: Path) -> None:
    with _chromium(tmp_path / "profile") as browser:
        page = browser.new_page()
        page.goto(server["url"])
        page.fill("#k", str(K))
        page.set_input_files("#file", str(REAL_DICOM))
        page.wait_for_function(f"document.querySelectorAll('[data-testid=result-tile]').length == {K}",
                               timeout=60_000)
        captions = page.locator("[data-testid=result-tile] .caption").all_inner_texts()
        assert len(captions) == K and not any("(self)" in caption for caption in captions)
        assert "the query itself is in the archive" not in page.inner_text("#prediction")
        assert "model: P(Pneumonia)" in page.inner_text("#prediction")


def test_another_team_sees_thumbnails_and_labels_from_the_index_alone(tmp_path: Path) -> None:
    """Team A ingests with --thumbnails into qdrant-client's local mode (the server path) and deletes its
    archive folder; team B (its own key and local state: no file map) serves the viewer from the index alone."""
    from cbir.models import ModelConfig, create_model, save_checkpoint
    runner = CliRunner()
    team_a = {"CBIR_KEY_FILE": str(tmp_path / "a" / "key"), "CBIR_STATE_DIR": str(tmp_path / "a" / "state")}
    team_b = {"CBIR_KEY_FILE": str(tmp_path / "b" / "key"), "CBIR_STATE_DIR": str(tmp_path / "b" / "state")}
    index = f"local:{tmp_path / 'index'}"
    save_checkpoint(create_model(ModelConfig(backbone="test_resnet", image_size=32, embed_dim=16, bits=32)),
                    tmp_path / "model")
    for args in (["synth", "--layout", "rsna", "--n", "24", "--size", "256", "--out", str(tmp_path / "archive"),
                  "--seed", "12"],
                 ["ingest", "--data", str(tmp_path / "archive"), "--model", str(tmp_path / "model"), "--index", index,
                  "--team", "teama", "--collection", "rsna", "--workers", "0", "--thumbnails"]):
        result = runner.invoke(app, args, env=team_a)
        assert result.exit_code == 0, result.stderr
    shutil.rmtree(tmp_path / "archive")
    assert runner.invoke(app, ["synth", "--layout", "rsna", "--n", "2", "--size", "256", "--out",
                               str(tmp_path / "own"), "--seed", "13"]).exit_code == 0
    dicom = REAL_DICOM if REAL_DICOM.is_file() else sorted((tmp_path / "own" / "stage_2_train_images").glob("*.dcm"))[0]
    with _serving(["--index", index, "--collection", "teama.rsna"], env=team_b) as url, \
            _chromium(tmp_path / "profile") as browser:
        page = browser.new_page()
        page.goto(url)
        page.fill("#k", str(K))
        page.set_input_files("#file", str(dicom))
        page.wait_for_function(f"document.querySelectorAll('[data-testid=result-tile]').length == {K}",
                               timeout=60_000)
        labels = page.locator("[data-testid=result-tile] .chip").all_inner_texts()
        assert len(labels) >= K and set(labels) <= {"Pneumonia", "No Pneumonia"}
        page.wait_for_function("[...document.querySelectorAll('[data-testid=result-tile] img')]"
                               ".every(img => img.complete && img.naturalWidth > 0)", timeout=60_000)
        spread = page.locator("[data-testid=result-tile] img").evaluate_all(GREY_SPREAD)
        assert len(spread) == K and min(spread) > 10, spread   # every tile shows an X-ray, none a blank
        page.locator("[data-testid=result-tile]").first.click()
        page.wait_for_function("document.getElementById('large').style.display == 'flex' && "
                               "document.getElementById('largeimg').naturalWidth > 0")
        assert "f-" in page.inner_text("#largeinfo")          # the case's pseudonym, never a file name
        page.screenshot(path=str(tmp_path / "team-b.png"), full_page=True)


#: Per image: the standard deviation of its grey levels, as the browser decoded and drew it.
GREY_SPREAD = """els => els.map(img => {
  const c = document.createElement('canvas'); c.width = img.naturalWidth; c.height = img.naturalHeight;
  const ctx = c.getContext('2d'); ctx.drawImage(img, 0, 0);
  const d = ctx.getImageData(0, 0, c.width, c.height).data; let s = 0, s2 = 0, n = d.length / 4;
  for (let i = 0; i < d.length; i += 4) { s += d[i]; s2 += d[i] * d[i]; }
  return Math.sqrt(s2 / n - (s / n) ** 2);
})"""


def test_the_viewer_warns_when_the_archive_holds_no_close_case(server: dict, tmp_path: Path) -> None:
    """A collection whose close-case threshold no query reaches (set by hand, so that the page is tested
    deterministically; whether real out-of-domain images fall below a fitted threshold is measured elsewhere)."""
    from cbir.search.vote import VoteCalibration
    from cbir.store import open_index
    index = tmp_path / "index"
    shutil.copytree(server["root"] / "index", index)
    with open_index(str(index), writable=True) as idx:
        meta = idx.get_meta("rsna")
        meta["calibration"] = {"k": 10, "vote": VoteCalibration(prior=0.3).to_dict(),
                               "nearest": {"threshold": 1.01, "quantile": 0.01, "median": 1.0, "n": 100}}
        idx.set_meta("rsna", meta)
    with _serving(["--index", str(index), "--collection", "rsna"]) as url, _chromium(tmp_path / "p") as browser:
        page = browser.new_page()
        page.goto(url)
        page.set_input_files("#file", str(server["archived"]))
        page.wait_for_function("document.querySelectorAll('[data-testid=result-tile]').length > 0", timeout=60_000)
        warning = page.locator("[data-testid=no-close-case]")
        assert warning.is_visible() and "no close case" in warning.inner_text()
        assert "(unreliable)" in page.inner_text("#prediction")
