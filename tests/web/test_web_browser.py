"""End to end in headless Chromium: the page as a person uses it.

Load the page, upload the astronaut through the file picker, wait for the result card and its
heads count, review (add a cover by a click, draw one by dragging and take it back, toggle an
automatic cover off and on again), apply, download, and check the downloaded file's pixels.
Every request the page makes is recorded (Chrome DevTools network events) and must go to this
server. Screenshots are saved to ``test-artifacts/`` (desktop and phone width).

Uses the system's Chromium and chromedriver (``apt-get install chromium chromium-driver``);
nothing is downloaded at run time. Without them the test fails with that instruction.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Callable, Iterator, TypeVar
from urllib.parse import urlsplit

import numpy as np
import pytest

from anonymiser.cover import CoverStyle, cover

from web_harness import ARTIFACTS, ASTRONAUT_FACE, RunningServer, assert_no_metadata, decode, jpeg_with_metadata

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
#: a spot on the astronaut's suit, well away from her face, where the test adds a cover
CLICK = (420, 400)
#: a drag on the bottom-left, drawn and then taken back
DRAG = ((40, 420), (120, 500))
T = TypeVar("T")

pytestmark = pytest.mark.timeout(120)


def wait_for(what: str, probe: Callable[[], T], timeout: float = 30.0) -> T:
    """Poll ``probe`` until it returns something truthy; fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.1)


@pytest.fixture()
def browser(tmp_path: Path) -> Iterator[object]:
    """Headless Chromium through the system chromedriver, with network events recorded and
    downloads going to ``tmp_path / "downloads"``."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.is_file()]
    if missing:
        pytest.fail(
            f"{', '.join(missing)} not found. The browser test needs the system's Chromium: "
            "`apt-get install -y chromium chromium-driver` (scripts/test installs them).",
            pytrace=False,
        )
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("selenium is not installed: pip install -e '.[test]'", pytrace=False)

    downloads = tmp_path / "downloads"
    downloads.mkdir()
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-default-apps", "--disable-extensions", "--no-proxy-server", "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,1100", "--force-device-scale-factor=1",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    options.add_experimental_option("prefs", {
        "download.default_directory": str(downloads),
        "download.prompt_for_download": False,
        "safebrowsing.enabled": False,
    })
    # The driver path is given, so Selenium Manager (which would download drivers) never runs.
    service = Service(str(CHROMEDRIVER), log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=options)
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    driver.downloads = downloads  # type: ignore[attr-defined]
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture()
def request_paths(web: RunningServer) -> Iterator[list[str]]:
    """Every path the server was asked for during the test (from its own request log)."""
    paths: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            line = json.loads(record.getMessage())
            if "path" in line:
                paths.append(line["path"])

    handler = Collect()
    logger = logging.getLogger("anonymiser.web")
    logger.addHandler(handler)
    previous = logger.level
    logger.setLevel(logging.INFO)
    yield paths
    logger.removeHandler(handler)
    logger.setLevel(previous)


def test_upload_review_download(web: RunningServer, browser: object, request_paths: list[str],
                                astronaut: np.ndarray, tmp_path: Path) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    driver = browser  # typed loosely: selenium is imported inside the fixture
    ARTIFACTS.mkdir(exist_ok=True)
    photo = tmp_path / "PXL_20240501_143012345.jpg"  # a phone's name: the second it was taken
    photo.write_bytes(jpeg_with_metadata(astronaut))

    driver.get(f"{web.url}/")
    wait_for("the page to load its defaults", lambda: driver.execute_script("return document.body.dataset.ready"))
    assert "Nothing is stored." in driver.find_element(By.ID, "privacy").text
    # this server runs CenterFace alone: the page says that heads without a face are missed
    warning = driver.find_element(By.ID, "coverage-warning")
    assert warning.is_displayed() and "Only faces are looked for" in warning.text

    # -- upload through the file picker and wait for the result card
    driver.find_element(By.ID, "pick").send_keys(str(photo))
    card = wait_for("the result card", lambda: driver.find_elements(By.CSS_SELECTOR, ".card[data-state='done']"))[0]
    heads = int(card.get_attribute("data-heads"))
    assert heads >= 1
    assert card.find_element(By.CSS_SELECTOR, ".heads .count").text == str(heads)
    assert card.find_element(By.CSS_SELECTOR, ".name").text == photo.name  # shown, not passed on
    automatic = json.loads(card.get_attribute("data-regions"))
    face = next(r["box"] for r in automatic if r["box"][0] <= ASTRONAUT_FACE[0] and r["box"][2] >= ASTRONAUT_FACE[2])
    wait_for("the image to render", lambda: driver.execute_script(
        "const i = document.querySelector('.card .result'); return i.complete && i.naturalWidth === 512"))
    driver.save_screenshot(str(ARTIFACTS / "web-page.png"))

    # -- review: clicks and drags on the overlay, in image pixels mapped to the shown size
    card.find_element(By.CSS_SELECTOR, "button.review").click()
    overlay = card.find_element(By.CSS_SELECTOR, ".overlay")
    assert overlay.is_displayed()
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", overlay)
    rect = driver.execute_script(
        "const r = document.querySelector('.card .result').getBoundingClientRect(); return [r.width, r.height];")
    scale = rect[0] / 512

    def offset(x: float, y: float) -> tuple[int, int]:
        """Offset from the overlay's centre (Selenium's reference) of image pixel (x, y)."""
        return round((x - 256) * scale), round((y - 256) * scale)

    ActionChains(driver).move_to_element_with_offset(overlay, *offset(*CLICK)).click().perform()
    assert len(overlay.find_elements(By.CSS_SELECTOR, ".box.added")) == 1
    (ActionChains(driver).move_to_element_with_offset(overlay, *offset(*DRAG[0])).click_and_hold()
     .move_by_offset(round(40 * scale), round(40 * scale)).move_by_offset(round(40 * scale), round(40 * scale))
     .release().perform())
    added = overlay.find_elements(By.CSS_SELECTOR, ".box.added")
    assert len(added) == 2, "the drag did not draw a cover"
    added[1].click()  # tapping a new cover takes it back
    assert len(overlay.find_elements(By.CSS_SELECTOR, ".box.added")) == 1
    fx, fy = (face[0] + face[2]) / 2, (face[1] + face[3]) / 2
    ActionChains(driver).move_to_element_with_offset(overlay, *offset(fx, fy)).click().perform()
    assert len(overlay.find_elements(By.CSS_SELECTOR, ".box.removed")) == 1
    apply = card.find_element(By.CSS_SELECTOR, "button.apply")
    assert apply.text == "Apply: uncover 1 person", "the button must say that a person will be shown"
    driver.save_screenshot(str(ARTIFACTS / "web-page-review.png"))
    ActionChains(driver).move_to_element_with_offset(overlay, *offset(fx, fy)).click().perform()
    assert not overlay.find_elements(By.CSS_SELECTOR, ".box.removed"), "tapping again keeps the cover"
    assert apply.text == "Apply changes"

    card.find_element(By.CSS_SELECTOR, "button.apply").click()
    wait_for("the reviewed result", lambda: "manual" in (card.get_attribute("data-regions") or "")
             and card.get_attribute("data-state") == "done")
    regions = json.loads(card.get_attribute("data-regions"))
    manual = [r["box"] for r in regions if r["sources"] == ["manual"]]
    assert len(manual) == 1 and len(regions) == len(automatic) + 1
    x1, y1, x2, y2 = manual[0]
    assert x1 <= CLICK[0] <= x2 and y1 <= CLICK[1] <= y2
    # a tap gives the size of the automatic covers (their median)
    assert (x2 - x1, y2 - y1) == (face[2] - face[0], face[3] - face[1])
    assert int(card.get_attribute("data-heads")) == heads + 1
    assert "(1 by you)" in card.find_element(By.CSS_SELECTOR, ".heads").text

    # -- download and check the file
    card.find_element(By.CSS_SELECTOR, "button.download").click()
    target = driver.downloads / "anonymised-1.jpg"
    wait_for("the download", lambda: list(driver.downloads.iterdir()) and not list(driver.downloads.glob("*.crdownload")))
    assert [p.name for p in driver.downloads.iterdir()] == [target.name], "the original's name (its time) went into the download's"
    data = target.read_bytes()
    assert_no_metadata(data)
    out = decode(data).astype(int)
    original = decode(photo.read_bytes())
    expected = cover(original, np.array([r["box"] for r in regions]), CoverStyle()).astype(int)
    for box in (manual[0], face):
        bx1, by1, bx2, by2 = box
        region = (slice(by1, by2), slice(bx1, bx2))
        assert np.abs(out[region] - expected[region]).mean() < 4, f"cover {box} is not in the download"
        assert np.abs(out[region] - original[region].astype(int)).mean() > 30
    # outside the covers the photo is kept
    mask = np.zeros(out.shape[:2], bool)
    for bx1, by1, bx2, by2 in (r["box"] for r in regions):
        mask[by1:by2, bx1:bx2] = True
    assert np.abs(out[~mask] - original[~mask].astype(int)).mean() < 4

    # -- phone width: one column, nothing wider than the screen
    driver.set_window_size(390, 844)
    driver.execute_script("document.querySelector('.card').scrollIntoView({block: 'start'})")
    time.sleep(0.3)
    assert driver.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
    driver.save_screenshot(str(ARTIFACTS / "web-page-phone.png"))

    # -- no external requests, no blocked resources
    ours: list[str] = []  # requests made by our page
    network: list[str] = []  # every request of the whole browser that would leave the process
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            url = message["params"]["request"]["url"]
            if message["params"].get("documentURL", "").startswith(f"{web.url}/"):
                ours.append(url)
            # chrome:// pages (the initial new-tab page) are built into the browser
            if urlsplit(url).scheme in ("http", "https", "ws", "wss", "ftp"):
                network.append(url)
    assert f"{web.url}/api/anonymise?format=json" in ours and f"{web.url}/api/cover?format=json" in ours
    outside = [u for u in ours if not u.startswith((f"{web.url}/", "blob:", "data:"))]
    outside += [u for u in network if not u.startswith(f"{web.url}/")]
    assert outside == [], f"requests to elsewhere: {outside}"
    known = {"/", "/static/app.css", "/static/app.js", "/api/health", "/api/anonymise", "/api/cover"}
    assert set(request_paths) <= known and {"/", "/api/anonymise", "/api/cover"} <= set(request_paths), request_paths
    problems = [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert problems == [], f"console errors (e.g. Content-Security-Policy violations): {problems}"
