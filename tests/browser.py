"""A headless Debian chromium driven by Selenium, for the fleet page's tests.

Only the system's chromium and chromedriver are used (``/usr/bin/chromium``,
``/usr/bin/chromedriver``, installed by scripts/test as root): Selenium Manager is never
asked to download anything. The browser's profile lives in a temporary directory that is
removed with it, so each browser starts with empty storage.
"""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
T = TypeVar("T")


def unavailable() -> str | None:
    """Why no browser can run here, or None when both programs are installed."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if not missing:
        return None
    return (f"{' and '.join(missing)} missing: install chromium and chromium-driver "
            "(./scripts/test does as root)")


def artifacts_dir() -> Path:
    """Where screenshots go: $CLUSTERCTL_TEST_ARTIFACTS, else test-artifacts/ at the repo
    root (ignored by git)."""
    given = os.environ.get("CLUSTERCTL_TEST_ARTIFACTS")
    path = Path(given) if given else Path(__file__).resolve().parent.parent / "test-artifacts"
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def chromium(width: int = 1280, height: int = 900) -> Iterator[Any]:
    """A headless chromium (a selenium WebDriver), quit and its profile removed at the end."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="clusterctl-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--no-first-run", "--no-default-browser-check", "--disable-extensions",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--disable-default-apps", "--mute-audio",
                 "--password-store=basic", f"--window-size={width},{height}",
                 f"--user-data-dir={profile}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=str(CHROMEDRIVER), log_output=os.devnull)
    driver = None
    try:
        driver = webdriver.Chrome(service=service, options=options)
        driver.set_page_load_timeout(30)
        driver.set_script_timeout(30)
        yield driver
    finally:
        try:
            if driver is not None:
                driver.quit()
        finally:
            service.stop()
            shutil.rmtree(profile, ignore_errors=True)


def wait_for(what: str, check: Callable[[], T | None], timeout_s: float = 30.0,
             explain: Callable[[], str] | None = None) -> T:
    """Poll ``check`` every 0.1 s until it returns something true; AssertionError naming
    ``what`` (and ``explain()``) when it has not within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while True:
        try:
            found = check()
            if found:
                return found
        except Exception as err:  # a stale element between two renders: try again
            last_error = err
        if time.monotonic() > deadline:
            detail = explain() if explain else ""
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}"
                                 + (f" (last error: {last_error!r})" if last_error else "")
                                 + (f"\n{detail}" if detail else ""))
        time.sleep(0.1)


def console(driver: Any) -> list[dict[str, Any]]:
    """The browser console's entries since the last call (chromium's log)."""
    entries: list[dict[str, Any]] = driver.get_log("browser")
    return entries


def save_screenshot(driver: Any, name: str) -> Path:
    """A PNG of the whole page (not only the window) under ``artifacts_dir()``."""
    path = artifacts_dir() / name
    width = driver.execute_script("return document.documentElement.scrollWidth")
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
        "width": int(width), "height": min(int(height), 8000), "deviceScaleFactor": 1,
        "mobile": False})
    try:
        shot = driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png"})
    finally:
        driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    path.write_bytes(base64.b64decode(shot["data"]))
    return path
