"""`hf-medbeit demo` in a real browser (headless Chromium from Debian, driven by Playwright): the
page's scores equal `hf-medbeit predict`'s; a non-image upload is a message on the page; the Space."""

from __future__ import annotations

import ast
import csv
import os
import shutil
import socket
import subprocess

import numpy as np
import pytest
from PIL import Image

from conftest import DATA
from hf_medbeit import demo
from hf_medbeit.errors import UserError
from hf_medbeit.predict import main as predict_main
from tiny_run import trained_run


@pytest.fixture(scope="session")
def chromium():
    """The system Chromium; installed with apt-get when missing (Playwright's own download is not
    reachable here). Never skipped: without a browser this test fails, saying why."""
    path = shutil.which("chromium")
    if path is None:
        assert shutil.which("apt-get"), "chromium is not installed and there is no apt-get to install it"
        result = subprocess.run(["apt-get", "install", "-y", "chromium"], capture_output=True, text=True)
        if result.returncode != 0:
            subprocess.run(["apt-get", "update"], capture_output=True, text=True)
            result = subprocess.run(["apt-get", "install", "-y", "chromium"], capture_output=True, text=True)
        assert result.returncode == 0, f"apt-get install -y chromium failed:\n{result.stderr[-2000:]}"
        path = shutil.which("chromium")
    assert path, "chromium is still not on PATH after apt-get install"
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return trained_run(tmp_path_factory)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_the_page_shows_the_scores_predict_gives_and_a_message_for_a_non_image(run_dir, chromium, tmp_path):
    from playwright.sync_api import sync_playwright

    with np.load(DATA / "breastmnist.npz", allow_pickle=False) as archive:
        image = archive["test_images"][7]
    upload = tmp_path / "scan.png"
    Image.fromarray(image).save(upload)
    not_image = tmp_path / "report.txt"
    not_image.write_text("not an image")
    predict_main(["--model", str(run_dir), str(upload), "--output", str(tmp_path / "p.csv"), "--device", "cpu"])
    with open(tmp_path / "p.csv", newline="") as handle:
        row = next(csv.DictReader(handle))
    expected = {key[len("score_"):]: float(value) for key, value in row.items() if key.startswith("score_")}

    app, url = demo.serve(str(run_dir), device="cpu", port=free_port(), block=False, examples_dir=str(tmp_path / "examples"))
    try:
        assert url.startswith("http://127.0.0.1:")
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1200, "height": 860})
            page.goto(url)
            page.locator("#upload input[type=file]").set_input_files(str(upload))
            # Wait for the scores themselves ("name: 0.123456"), not a progress text such as "queue: 1/1".
            page.wait_for_function("/: \\d\\.\\d{6}/.test(document.querySelector('#scores')?.innerText ?? '')", timeout=60_000)
            text = page.locator(f"#{demo.SCORES_ID}").inner_text()
            shown = dict(line.rsplit(": ", 1) for line in text.splitlines() if ": " in line)
            assert set(shown) == set(expected)
            for name, value in expected.items():
                assert float(shown[name]) == pytest.approx(value, abs=2e-6), name
            assert page.locator("#heatmap img").count() == 1
            screenshot = tmp_path / "demo.png"
            page.screenshot(path=str(screenshot), full_page=True)
            if os.environ.get("HF_MEDBEIT_DEMO_SCREENSHOT"):  # for the README
                shutil.copy(screenshot, os.environ["HF_MEDBEIT_DEMO_SCREENSHOT"])

            page.goto(url)
            page.locator("#upload input[type=file]").set_input_files(str(not_image))
            page.wait_for_function("document.querySelector('#message')?.innerText.includes('not an image')", timeout=60_000)
            message = page.locator(f"#{demo.MESSAGE_ID}").inner_text()
            assert "report.txt is not an image this page can read" in message and "Traceback" not in page.content()
            assert page.locator(f"#{demo.SCORES_ID}").inner_text().strip() == ""
            browser.close()
    finally:
        app.close()


def test_analyse_without_a_browser_names_an_unreadable_file_and_scores_an_image(run_dir, tmp_path):
    from hf_medbeit.inference import load_classifier

    model = demo.DemoModel(load_classifier(str(run_dir), device="cpu", attn_implementation="eager"))
    assert model.methods == ["gradcam", "rollout", "attention"]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    label, heat, scores, message = model.analyse(str(broken), "rollout")
    assert label is None and heat is None and "broken.png is not an image" in message
    image = tmp_path / "gray.png"
    Image.new("L", (28, 28), 90).save(image)
    label, heat, scores, message = model.analyse(str(image), "rollout")
    assert sum(label.values()) == pytest.approx(1.0) and heat.shape == (28 * 10, 28 * 10, 3)
    assert "rollout heat map" in message


def test_write_space_writes_an_app_its_requirements_and_the_model(run_dir, tmp_path):
    space = demo.main(["--model", str(run_dir), "--write-space", str(tmp_path / "space")])
    app = (space / "app.py").read_text()
    ast.parse(app)
    assert "serve('model'" in app
    requirements = (space / "requirements.txt").read_text().splitlines()
    assert any(line.startswith("gradio==") for line in requirements)
    assert any(line.startswith("torch") for line in requirements) and any(line.startswith("grad-cam") for line in requirements)
    assert (space / "README.md").read_text().startswith("---\ntitle:") and "sdk: gradio" in (space / "README.md").read_text()
    for name in demo.MODEL_FILES:
        assert (space / "model" / name).read_bytes() == (run_dir / name).read_bytes()
    assert (space / "hf_medbeit" / "demo.py").is_file() and list((space / "examples").glob("*.png"))
    with pytest.raises(UserError, match="already exists; pass a new folder"):
        demo.main(["--model", str(run_dir), "--write-space", str(space)])
    with pytest.raises(UserError, match="--port 0 is not a port number"):
        demo.main(["--model", str(run_dir), "--port", "0"])
    assert [path.name for path in tmp_path.iterdir()] == ["space"]
