"""The report in a real browser: headless Chromium driven by Selenium.

Two reports: the demo's, and one of a ResNet-50-shaped model at depth 2 (107 gradient
tensors, 16 bottleneck blocks; see ``tests/models.py``). On both: every image and video
loads, every figure is shown at a size where its smallest text (7 pt at 110 dpi, 10.7 px;
10-pt labels in the architecture SVG) is still 8 px or more, the console stays free of
errors, the layer table filters and sorts, a click opens the zoom view, and the page loads
and reacts quickly (the times are printed; run with ``-s`` to see them). On the demo's,
the epoch slider changes the figure; on the ResNet's, the grouped flow chart opens a per-tensor table. A
screenshot is saved in the test's folder; set
``BBDECODER_SCREENSHOT=1`` (or a file path) to also save it as ``assets/report.png``.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings
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
MIN_TEXT_PX = 8.0
FIGURE_TEXT_PX = 7 * 110 / 72  # the smallest type of BBDecoder's figures, at the store's 110 dpi
GRAPH_TEXT_PX = 10 * 96 / 72  # torchview's 10-pt labels in the SVG (1 pt = 4/3 CSS px)
LOAD_BUDGET_S = 5.0
INTERACTION_BUDGET_MS = 250.0

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


# ------------------------------------------------------------------ reports
@pytest.fixture(scope="module")
def demo_report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from BBDecoder.demo import run_demo

    result = run_demo(
        tmp_path_factory.mktemp("demo") / "out", epochs=2, samples=300, progress=False, log=lambda _: None
    )
    return result.report


@pytest.fixture(scope="module")
def resnet_report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ResNet-50-shaped bottleneck CNN at depth 2: two recorded steps, weights, costs, the graph."""
    import torch
    import torch.nn.functional as F
    from models import ResNet50Like

    from BBDecoder import Master_analyzer
    from BBDecoder.report import build_report

    torch.manual_seed(0)
    model = ResNet50Like(width=8)
    root = tmp_path_factory.mktemp("resnet50") / "out"
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([1, 7])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wm = Master_analyzer(model, root, [1, 3, 64, 64], depth=2, verbose=False)
        for _ in range(3):
            loss = F.cross_entropy(wm.forward_propagation(x), y)
            optimizer.zero_grad()
            wm.backward_propagation(loss, collect_grads=True)
            optimizer.step()
        wm.save_collected_grads(0)
        wm.visualize_weight_hist(["conv1", "bn1", "layer1", "layer2.0", "layer3", "fc"])
        wm.visualize_weight_hist(["conv1", "layer3"])
        wm.layer_costs([1, 3, 64, 64], repeats=2)
        wm.visualize_architecture()  # a second drawing: the report shows the newest only
    return build_report(root)


@pytest.fixture(scope="module", params=["demo", "resnet50"])
def browser(request: pytest.FixtureRequest) -> Iterator[Any]:
    from selenium.webdriver.chrome.service import Service

    report = request.getfixturevalue("demo_report" if request.param == "demo" else "resnet_report")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM if Path(CHROMIUM).is_file() else str(shutil.which("chromium"))
    for flag in FLAGS:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver_path = CHROMEDRIVER if Path(CHROMEDRIVER).is_file() else str(shutil.which("chromedriver"))
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.report_name = request.param
    try:
        driver.get(report.as_uri())
        wait_for(lambda: driver.execute_script("return document.readyState") == "complete", what="the page to load")
        yield driver
    finally:
        driver.quit()


def load_everything(browser: Any) -> int:
    """Open every collapsed block and load every (lazy) image; returns the image count."""
    browser.execute_script(
        "document.querySelectorAll('details').forEach(d => d.open = true);"
        "document.querySelectorAll('img[loading=lazy]').forEach(i => i.loading = 'eager');"
    )
    return wait_for(
        lambda: browser.execute_script(
            "const imgs = [...document.images].filter(i => !i.closest('.zoom-overlay'));"
            "return imgs.every(i => i.complete) ? imgs.length : 0"
        ),
        timeout=60,
        what="every image to finish loading",
    )


# -------------------------------------------------------------------- tests
def test_every_image_loads(browser: Any) -> None:
    count = load_everything(browser)
    broken = browser.execute_script(
        "return [...document.images].filter(i => !i.closest('.zoom-overlay') && !(i.naturalWidth > 0))"
        ".map(i => i.getAttribute('src'))"
    )
    assert count >= 8, f"only {count} images on the page"
    assert broken == []


def test_every_figure_is_legible(browser: Any) -> None:
    """Rendered size against natural size: the smallest text of every figure stays >= 8 px."""
    load_everything(browser)
    sizes = browser.execute_script(
        "return [...document.images].filter(i => !i.closest('.zoom-overlay') && i.getClientRects().length)"
        ".map(i => [i.getAttribute('src'), i.getBoundingClientRect().width, i.naturalWidth])"
    )
    assert sizes
    small = []
    for src, shown, natural in sizes:
        base = GRAPH_TEXT_PX if src.endswith(".svg") else FIGURE_TEXT_PX
        if shown * base / natural < MIN_TEXT_PX:
            small.append((src, round(shown), natural, round(shown * base / natural, 1)))
    assert small == [], f"figures shown too small to read (src, shown px, natural px, smallest text px): {small}"


def test_architecture_is_the_newest_svg_with_labelled_clusters(browser: Any) -> None:
    from selenium.webdriver.common.by import By

    viewer = browser.find_element(By.CSS_SELECTOR, "#architecture .arch-viewer img")
    src = viewer.get_attribute("src")
    assert src.endswith(".svg")
    chips = [a.text for a in browser.find_elements(By.CSS_SELECTOR, "#architecture .data-files a")]
    assert len(chips) == len(set(chips)) == 3, chips  # one .gv, .png and .svg: the newest drawing only
    if browser.report_name == "resnet50":
        assert src.endswith("architecture_002.svg")  # the re-drawn graph, the next number
        svg = Path(src.removeprefix("file://")).read_text()
        for label in ("#4 layer1 (Sequential)", "#8 layer2 (Sequential)", "#20 layer4 (Sequential)"):
            assert label in svg
    natural = browser.execute_script("return arguments[0].naturalWidth", viewer)
    assert browser.execute_script("return arguments[0].getBoundingClientRect().width", viewer) == pytest.approx(
        natural, abs=1
    )  # shown at 100% first
    browser.execute_script("document.querySelector('#architecture button[data-zoom=in]').click()")
    wider = browser.execute_script("return arguments[0].getBoundingClientRect().width", viewer)
    assert wider == pytest.approx(1.25 * natural, rel=0.02)


def test_grouped_flow_opens_a_per_tensor_table(browser: Any) -> None:
    """107 tensors: the chart shows blocks; under it, collapsed, a row per tensor with both bars on one log axis."""
    if browser.report_name != "resnet50":
        pytest.skip("the demo's 13-layer CNN has one bar pair per tensor in the chart itself")
    started = time.perf_counter()
    table = browser.execute_script(
        "const box = document.querySelector('#gradients .slider-images details.fig-details');"
        "box.open = true; box.dispatchEvent(new Event('toggle'));"
        "const rows = [...box.querySelectorAll('table.flow-table tbody tr')];"
        "const cell = rows[0].cells[0];"
        "return {summary: box.querySelector('summary').textContent, count: rows.length,"
        " first: cell.textContent, font: parseFloat(getComputedStyle(cell).fontSize),"
        " widths: rows.map(r => [...r.querySelectorAll('.bar')].map(b => b.getBoundingClientRect().width)),"
        " ticks: [...box.querySelectorAll('.flow-axis span')].map(t => t.textContent)}"
    )
    elapsed_ms = 1000 * (time.perf_counter() - started)
    assert table["summary"] == "Gradient flow per tensor (107 tensors)" and table["count"] == 107
    assert table["first"] == "0 conv1.weight" and table["font"] >= MIN_TEXT_PX
    assert all(max_bar >= mean_bar > 0 for max_bar, mean_bar in table["widths"])  # max |g| >= mean |g|, both drawn
    assert table["ticks"][0].startswith("1e") and len(table["ticks"]) >= 2
    assert elapsed_ms < INTERACTION_BUDGET_MS * 4
    print(f"\n[{browser.report_name}] per-tensor flow table of {table['count']} rows built in {elapsed_ms:.0f} ms")


def test_layer_table_filters_and_sorts(browser: Any) -> None:
    started = time.perf_counter()
    visible = browser.execute_script(
        "const box = document.querySelector('.table-filter');"
        "box.value = 'conv'; box.dispatchEvent(new Event('input'));"
        "return [...document.querySelectorAll('table.layers tbody tr')].filter(r => !r.hidden)"
        ".map(r => r.textContent.toLowerCase())"
    )
    assert visible and all("conv" in row for row in visible)
    params = browser.execute_script(
        "const box = document.querySelector('.table-filter'); box.value = ''; box.dispatchEvent(new Event('input'));"
        "const button = [...document.querySelectorAll('table.layers th button')].find(b => b.textContent === 'Params');"
        "button.click(); button.click();"  # descending
        "return [...document.querySelectorAll('table.layers tbody tr')].map(r => Number(r.cells[3].dataset.value))"
    )
    elapsed_ms = 1000 * (time.perf_counter() - started)
    assert params == sorted(params, reverse=True)
    assert elapsed_ms < INTERACTION_BUDGET_MS * 4  # two round trips to the browser included
    print(f"\n[{browser.report_name}] filter + two sorts of {len(params)} rows: {elapsed_ms:.0f} ms")


def test_click_opens_the_zoom_view(browser: Any) -> None:
    from selenium.webdriver.common.keys import Keys

    state = browser.execute_script(
        "const link = document.querySelector('main a.fig-link'); link.scrollIntoView({block: 'center'});"
        "const t0 = performance.now(); link.click();"
        "const overlay = document.querySelector('.zoom-overlay');"
        "return [overlay.classList.contains('open'), performance.now() - t0, link.getAttribute('href')]"
    )
    opened, took_ms, href = state
    assert opened and took_ms < INTERACTION_BUDGET_MS
    zoomed = "document.querySelector('.zoom-overlay img')"
    wait_for(lambda: browser.execute_script(f"return {zoomed}.naturalWidth > 0"), what="the zoomed image")
    assert browser.execute_script(f"return {zoomed}.getAttribute('src')") == href
    width, natural = browser.execute_script(f"return [{zoomed}.getBoundingClientRect().width, {zoomed}.naturalWidth]")
    assert width == pytest.approx(natural, abs=1)  # 100%: every pixel of the figure
    browser.find_element("css selector", "body").send_keys(Keys.ESCAPE)
    assert not browser.execute_script("return document.querySelector('.zoom-overlay').classList.contains('open')")


def test_page_loads_quickly(browser: Any) -> None:
    timing = browser.execute_script(
        "const n = performance.getEntriesByType('navigation')[0];"
        "return {load: n.loadEventEnd - n.startTime, dom: n.domContentLoadedEventEnd - n.startTime,"
        " images: document.images.length, bytes: document.documentElement.outerHTML.length}"
    )
    print(f"\n[{browser.report_name}] page load: {json.dumps(timing)}")
    assert 0 < timing["load"] < 1000 * LOAD_BUDGET_S
    took = browser.execute_script(
        "const t0 = performance.now(); window.scrollTo(0, document.body.scrollHeight); window.scrollTo(0, 0);"
        "return performance.now() - t0"
    )
    assert took < INTERACTION_BUDGET_MS


def test_epoch_slider_changes_the_figure(browser: Any) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    if browser.report_name != "demo":
        pytest.skip("the demo's two epochs")
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


def test_videos_load(browser: Any) -> None:
    if browser.report_name != "demo":
        pytest.skip("only the demo records feature videos")
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
    if wanted and browser.report_name == "demo":
        out = ASSET if wanted in ("1", "true", "yes") else Path(wanted)
        browser.set_window_size(1400, min(height + 140, 2700))
        browser.execute_script("document.querySelectorAll('details').forEach(d => d.open = false)")
        browser.execute_script("window.scrollTo(0, 0)")
        time.sleep(0.5)
        out.parent.mkdir(parents=True, exist_ok=True)
        assert browser.save_screenshot(str(out))
