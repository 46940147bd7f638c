"""optuna-dashboard in a real browser (headless Chromium): the study's note holds the report, and a trial's
page shows its note, its curves image and its reconstruction grid, each rendered."""

from __future__ import annotations

import shutil

import pytest

from tests.helpers import wait_for
from tests.test_dashboard import dashboard_of_one_trial

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("needs Debian's chromium and chromium-driver (.ci/run installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1280,2400"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def page_text(driver, url: str, needle: str) -> str:
    driver.get(url)
    return wait_for(lambda: (t := driver.find_element("tag name", "body").text) and needle in t and t, 60,
                    f"{needle!r} on {url}", interval=0.5)


def rendered_images(driver) -> dict[str, int]:
    """alt text -> the widest display, in CSS pixels, of each image the page finished loading (0 = broken): the
    trial's note shows the pictures at full size, the artifact list as thumbnails."""
    widths: dict[str, int] = {}
    for img in driver.find_elements("tag name", "img"):
        width = driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth ? "
                                      "arguments[0].getBoundingClientRect().width : 0", img)
        widths[img.get_attribute("alt")] = max(width, widths.get(img.get_attribute("alt"), 0))
    return widths


def page_width(driver) -> int:
    """The page's full width in CSS pixels: above the window's (1,280) it scrolls sideways."""
    return driver.execute_script("return document.documentElement.scrollWidth")


@pytest.mark.slow
def test_the_note_curves_and_reconstruction_render_in_a_browser(tmp_path, one_thread, browser):
    with dashboard_of_one_trial(tmp_path) as base:
        note = page_text(browser, f"{base}/dashboard/studies/1/note", "Success targets")
        assert "Study tiny: maximize best_probe_accuracy" in note and "diverged trials < 20%" in note
        assert "The study file" in note and "linear_probe_vode_indices" in note
        browser.save_screenshot(str(tmp_path / "note.png"))
        trial = page_text(browser, f"{base}/dashboard/studies/1/trials", "Trial 0: completed")
        assert "best probe accuracy" in trial
        images = wait_for(lambda: (i := rendered_images(browser)) and i.get("curves.png") and
                          i.get("reconstruction_epoch003.png") and i, 60, "the trial's images to load")
        assert images["curves.png"] >= 600 and images["reconstruction_epoch003.png"] >= 600  # as shown, not as stored
        browser.save_screenshot(str(tmp_path / "trial.png"))
        assert page_width(browser) <= 1280, "the trial page scrolls sideways (it was 2,067 px, then 1,404 px wide)"
        pages = {"": "tiny", "studies/1": "tiny", "studies/1/note": "Success targets", "studies/1/analytics": "tiny",
                 "studies/1/trialTable": "tiny"}
        for page, needle in pages.items():  # no page of the dashboard scrolls sideways in a 1,280-pixel window
            page_text(browser, f"{base}/dashboard/{page}", needle)
            assert page_width(browser) <= 1280, f"/dashboard/{page} is {page_width(browser)} px wide"
