"""``GET /``, the upload page, in headless Chromium (Debian's chromium and chromium-driver, driven
by selenium): choose an image, see boxes and labels, move the score slider, ask for tiles."""

from __future__ import annotations

import shutil

import pytest
from test_server import Server, jpeg

CHROMIUM = shutil.which("chromium")
DRIVER = shutil.which("chromedriver")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        CHROMIUM is None or DRIVER is None,
        reason="needs Debian's chromium and chromium-driver (.ci/run installs them)",
    ),
]


def test_upload_page_draws_detections(served_artifact, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    image = tmp_path / "scene.jpg"
    image.write_bytes(jpeg())
    server = Server(served_artifact, tmp_path / "server.log")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(DRIVER), options=options)
    try:
        browser.get(server.url + "/")
        WebDriverWait(browser, 20).until(lambda b: "ssdlite320" in b.find_element(By.ID, "model").text)
        browser.find_element(By.ID, "file").send_keys(str(image))
        canvas = browser.find_element(By.ID, "canvas")
        WebDriverWait(browser, 30).until(lambda b: canvas.get_attribute("data-shown") not in (None, ""))
        assert canvas.get_attribute("data-shown") != "error", browser.find_element(By.ID, "status").text
        assert (int(canvas.get_attribute("width")), int(canvas.get_attribute("height"))) == (640, 480)
        rows_at = {}
        for value in ("0", "1"):
            browser.execute_script(
                "const s = document.getElementById('score'); s.value = arguments[0];"
                "s.dispatchEvent(new Event('input'));",
                value,
            )
            rows_at[value] = len(browser.find_elements(By.CSS_SELECTOR, "#table tbody tr"))
        assert rows_at["0"] > 0 and rows_at["1"] == 0  # the slider filters what is drawn
        # Tiles: the same photo again, tiled; the tiles drawn and counted in the status line.
        browser.find_element(By.ID, "tile").click()
        status = browser.find_element(By.ID, "status")
        WebDriverWait(browser, 30).until(lambda b: "tiles and the whole image" in status.text)
        assert status.text.endswith("6 tiles and the whole image"), status.text
    finally:
        browser.quit()
        server.stop()
