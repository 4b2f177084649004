"""The demo in a real browser: start ``app.py`` on 127.0.0.1 with the tiny checkpoint, upload two example images in
headless Chromium, press Stylize, and wait for the result image.  A screenshot of the page is saved under
``artifacts/`` (or ``$MAGICSTYLE_ARTIFACTS``).

Needs Debian's ``chromium`` and ``chromium-driver`` (``.ci/run`` installs them when it can) and the ``selenium``
package; skipped, saying what is missing, otherwise.  The server runs under a time limit and is stopped at the end.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from _tiny import write_config
from conftest import ROOT

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"  # Debian's packages: chromium, chromium-driver
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
ARTIFACTS = Path(os.environ.get("MAGICSTYLE_ARTIFACTS", ROOT / "artifacts"))
SERVER_SECONDS = 120  # the server stops by itself after this, whatever happens to the test
WAIT = 45  # seconds for the page, the upload and the result

pytest.importorskip("gradio", reason="the demo needs the [app] extra (gradio)")
webdriver = pytest.importorskip("selenium.webdriver", reason="the browser test needs selenium (pip install selenium)")
if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
    pytest.skip(f"the browser test needs Chromium and its driver ({CHROMIUM}, {CHROMEDRIVER}): apt-get install "
                "chromium chromium-driver", allow_module_level=True)

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path):
    port = free_port()
    config = write_config(tmp_path / "tiny.yaml")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONPATH": str(ROOT)}
    log = open(tmp_path / "server.log", "wb")
    proc = subprocess.Popen(
        ["timeout", str(SERVER_SECONDS), sys.executable, str(ROOT / "app.py"), "--config", str(config),
         "--host", "127.0.0.1", "--port", str(port)],
        cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + WAIT
        while True:
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the app did not start: {(tmp_path / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="magicstyle-chromium-")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1280,1700",
                 "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"):  # nothing but this machine
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(WAIT)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def test_upload_two_images_and_stylize(server, browser):
    wait = WebDriverWait(browser, WAIT)
    browser.get(server)
    for elem_id, image in (("content", "astronaut.png"), ("style", "ihc.png")):
        upload = wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, f"#{elem_id} input[type=file]")))
        upload.send_keys(str(ROOT / "examples" / image))
        wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, f"#{elem_id} img")))
    browser.find_element(By.CSS_SELECTOR, "#run").click()
    try:
        result = wait.until(EC.visibility_of_element_located((By.CSS_SELECTOR, "#result img")))
        wait.until(lambda d: "phase" in d.find_element(By.CSS_SELECTOR, "#timings").text)
    finally:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(ARTIFACTS / "app.png"))
    assert result.get_attribute("src")
    assert browser.find_element(By.CSS_SELECTOR, "#heatmap img").get_attribute("src")
    assert "generate" in browser.find_element(By.CSS_SELECTOR, "#timings").text
