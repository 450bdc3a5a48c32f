"""Open a report page in headless Chromium (Selenium + the system's chromium-driver).

Used by the end-to-end test and by ``tools/visualize_docs.py`` for the screenshots in
``docs/``. Needs ``selenium`` and Debian's ``chromium`` + ``chromium-driver`` (or any
Chromium/chromedriver pair on ``PATH``).
"""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from ..errors import LfgraphError

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
DRIVERS = ("chromedriver", "chromium-driver")


def find_chromium() -> tuple[str, str] | None:
    """(browser, driver) executables on PATH, or ``None`` when either is missing."""
    browser = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
    driver = next((shutil.which(d) for d in DRIVERS if shutil.which(d)), None)
    return (browser, driver) if browser and driver else None


@contextmanager
def headless(width: int = 1400, height: int = 1000, scale: float = 1.0) -> Iterator[Any]:
    """A headless Chromium WebDriver that records the browser console (``get_log("browser")``)."""
    found = find_chromium()
    if found is None:
        raise LfgraphError("no Chromium found: apt-get install chromium chromium-driver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        raise LfgraphError("driving Chromium needs selenium: pip install selenium") from None
    opts = webdriver.ChromeOptions()
    opts.binary_location = found[0]
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", f"--window-size={width},{height}",
              f"--force-device-scale-factor={scale}", "--hide-scrollbars"):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(found[1]), options=opts)
    try:
        yield driver
    finally:
        driver.quit()


def open_page(driver: Any, path: str | Path, timeout: float = 20.0) -> None:
    """Load ``path`` and wait until the page's script has drawn everything (``body[data-ready]``)."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(Path(path).resolve().as_uri())
    WebDriverWait(driver, timeout).until(lambda d: d.execute_script("return document.body.dataset.ready === '1'"))


def console_errors(driver: Any) -> list[str]:
    """Console messages of level SEVERE since the last call (script errors included)."""
    return [e["message"] for e in driver.get_log("browser") if e.get("level") == "SEVERE"]


def screenshot(driver: Any, path: str | Path, full_height: bool = True, max_height: int = 4000) -> None:
    """Save a PNG of the page (the whole page height, up to ``max_height`` CSS pixels)."""
    if full_height:
        h = int(driver.execute_script("return document.documentElement.scrollHeight"))
        w = int(driver.execute_script("return window.innerWidth"))
        driver.set_window_size(w, min(h, max_height) + 100)
        driver.execute_script("window.dispatchEvent(new Event('resize'))")
    driver.save_screenshot(str(path))
