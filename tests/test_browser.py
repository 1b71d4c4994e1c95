"""The demo's report in a real browser: headless Chromium driven by Selenium.

Checks that every image and video loads, that the console stays free of errors and that the
epoch slider changes the figure. A screenshot is saved in the test's folder; set
``BBDECODER_SCREENSHOT=1`` (or a file path) to also save it as ``assets/report.png``.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = os.environ.get("BBDECODER_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("BBDECODER_CHROMEDRIVER", "/usr/bin/chromedriver")
FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1400,1000",
    "--autoplay-policy=no-user-gesture-required",
)
ASSET = Path(__file__).resolve().parents[1] / "assets" / "report.png"

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
if not (Path(CHROMIUM).is_file() or shutil.which("chromium")) or not (
    Path(CHROMEDRIVER).is_file() or shutil.which("chromedriver")
):
    pytest.skip(
        f"Chromium or its driver is absent ({CHROMIUM}, {CHROMEDRIVER}); install Debian's chromium and chromium-driver",
        allow_module_level=True,
    )


def wait_for(condition: Callable[[], Any], timeout: float = 15.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def demo_report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from BBDecoder.demo import run_demo

    result = run_demo(
        tmp_path_factory.mktemp("demo") / "out", epochs=2, samples=300, progress=False, log=lambda _: None
    )
    return result.report


@pytest.fixture(scope="module")
def browser(demo_report: Path) -> Iterator[Any]:
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM if Path(CHROMIUM).is_file() else str(shutil.which("chromium"))
    for flag in FLAGS:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver_path = CHROMEDRIVER if Path(CHROMEDRIVER).is_file() else str(shutil.which("chromedriver"))
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        driver.get(demo_report.as_uri())
        wait_for(lambda: driver.execute_script("return document.readyState") == "complete", what="the page to load")
        yield driver
    finally:
        driver.quit()


def test_every_image_loads(browser: Any) -> None:
    browser.execute_script("document.querySelectorAll('details').forEach(d => d.open = true)")
    count = wait_for(
        lambda: browser.execute_script(
            "const imgs = [...document.images]; return imgs.every(i => i.complete) ? imgs.length : 0"
        ),
        what="every image to finish loading",
    )
    broken = browser.execute_script(
        "return [...document.images].filter(i => !(i.naturalWidth > 0)).map(i => i.getAttribute('src'))"
    )
    assert count >= 8, f"only {count} images on the page"
    assert broken == []


def test_videos_load(browser: Any) -> None:
    count = browser.execute_script("return document.querySelectorAll('video').length")
    assert count >= 1, "the demo's report shows no feature video"
    wait_for(
        lambda: browser.execute_script("return [...document.querySelectorAll('video')].every(v => v.readyState >= 2)"),
        what="every video to reach readyState >= 2",
    )
    sizes = browser.execute_script(
        "return [...document.querySelectorAll('video')].map(v => [v.videoWidth, v.currentSrc])"
    )
    for width, source in sizes:
        assert width > 0 and source.endswith(".webm"), (width, source)


def test_epoch_slider_changes_the_figure(browser: Any) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    sliders = browser.find_elements(By.CSS_SELECTOR, "#gradients .slider")
    assert sliders, "the demo's report has no gradient epoch slider"
    slider = sliders[0]
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", slider)
    frames = json.loads(slider.get_attribute("data-frames"))
    assert [frame["label"] for frame in frames] == ["epoch 1", "epoch 2"]  # the demo ran 2 epochs
    first_image = "return arguments[0].querySelector('.slider-images img')"
    before = browser.execute_script(first_image, slider).get_attribute("src")
    assert before.endswith(frames[-1]["images"][0]["src"])  # the last epoch is shown first
    assert slider.find_element(By.CSS_SELECTOR, ".slider-label").text == "epoch 2"
    slider.find_element(By.CSS_SELECTOR, "input[type=range]").send_keys(Keys.HOME)  # a real key press
    wait_for(lambda: slider.find_element(By.CSS_SELECTOR, ".slider-label").text == "epoch 1", what="the label")
    after = browser.execute_script(first_image, slider)
    assert after.get_attribute("src") != before
    assert after.get_attribute("src").endswith(frames[0]["images"][0]["src"])
    wait_for(lambda: browser.execute_script("return arguments[0].complete", after), what="the new image")
    assert browser.execute_script("return arguments[0].naturalWidth", after) > 0
    step = slider.find_element(By.CSS_SELECTOR, "button.step[data-step='1']")
    # a DOM click: images still loading above can move the button under a real mouse click
    browser.execute_script("arguments[0].click()", step)
    wait_for(lambda: browser.execute_script(first_image, slider).get_attribute("src") == before, what="the next button")


def test_console_has_no_errors(browser: Any) -> None:
    browser.execute_script("window.scrollTo(0, document.body.scrollHeight)")
    time.sleep(0.3)
    errors = [entry for entry in browser.get_log("browser") if entry["level"] in ("SEVERE", "ERROR")]
    assert errors == []


def test_screenshot(browser: Any, tmp_path: Path) -> None:
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.execute_script("window.scrollTo(0, 0)")
    target = tmp_path / "report.png"
    assert browser.save_screenshot(str(target))
    assert target.stat().st_size > 10_000  # a real rendering, not a blank page
    wanted = os.environ.get("BBDECODER_SCREENSHOT")
    if wanted:
        out = ASSET if wanted in ("1", "true", "yes") else Path(wanted)
        browser.set_window_size(1400, min(height + 140, 2700))
        browser.execute_script("document.querySelectorAll('details').forEach(d => d.open = false)")
        browser.execute_script("window.scrollTo(0, 0)")
        time.sleep(0.5)
        out.parent.mkdir(parents=True, exist_ok=True)
        assert browser.save_screenshot(str(out))
