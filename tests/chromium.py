"""Headless Chromium for the browser tests: Debian's `chromium` driven through its `chromedriver` by selenium.

The browser runs isolated and quiet: a fresh profile, no background networking, updates, sync or QUIC, so that
every request a page makes is one the page asked for. `skip_reason()` says why no browser test can run here.
"""
from __future__ import annotations

import json
import shutil
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path

CHROMIUM = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
CHROMEDRIVER = "/usr/bin/chromedriver"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1280,1000"]


def browser_binary() -> str | None:
    "Path of the Chromium executable, or None."
    return next((p for p in CHROMIUM if Path(p).exists()), None) or shutil.which("chromium")


def driver_binary() -> str | None:
    "Path of chromedriver, or None."
    return shutil.which("chromedriver") or (CHROMEDRIVER if Path(CHROMEDRIVER).exists() else None)


def skip_reason() -> str | None:
    "Why the browser tests cannot run here (None when they can)."
    missing = [name for name, path in (("chromium", browser_binary()), ("chromedriver", driver_binary())) if not path]
    if missing:
        return (f"{' and '.join(missing)} not installed: run `apt-get install -y chromium chromium-driver` "
                "(.ci/run does) to run the browser tests")
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium not installed: `pip install -e \".[dev]\"` installs it"
    return None


@contextmanager
def chromium():
    "A headless Chromium WebDriver that keeps its console and network logs; quits and removes its profile afterwards."
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    options = webdriver.ChromeOptions()
    options.binary_location = browser_binary()
    for flag in [*FLAGS, f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    service = Service(driver_binary())
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def console_errors(driver) -> list[str]:
    "The browser console's errors since the last call (reading the log empties it)."
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def requested_urls(driver) -> list[str]:
    "Every URL a page requested since the last call, loaded or failed (from the network log; the browser's own"
    " chrome:// pages left out)."
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        params = message.get("params", {})
        if message["method"] == "Network.requestWillBeSent" and not params.get("documentURL", "").startswith("chrome"):
            urls.append(params["request"]["url"])
    return urls


def free_port() -> int:
    "A TCP port on 127.0.0.1 that nothing listens on."
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
