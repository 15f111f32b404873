"""The course as a website, seen in a real browser.

The site is built once with the README's command (`bash docs/build.sh`) and opened from disk in headless
Chromium: every page renders its math with the site's own MathJax, loads every image, logs no error, requests
nothing outside the site and shows no nbdev cell option; the navigation reaches every chapter in order.
Screenshots of two chapters are written to docs/_build/screenshots for a person to look at.
"""
import importlib.util
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from chromium import chromium, console_errors, requested_urls, skip_reason

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "docs" / "_build"
HTML = BUILD / "html"
SKIP = skip_reason()
pytestmark = pytest.mark.skipif(SKIP is not None, reason=f"browser tests skipped: {SKIP}")

_spec = importlib.util.spec_from_file_location("docs_build", ROOT / "docs" / "build.py")
docs_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(docs_build)
PAGES = [docs_build.docname(p.name) for p in docs_build.chapters(ROOT / "nbs")]  # index first, then chapters
CHAPTERS = PAGES[1:]
SCREENSHOTS = {CHAPTERS[0]: None, "04_schedules": "img"}  # page -> element to scroll to (None: top of the page)

WAIT_FOR_MATHJAX = """
const done = arguments[arguments.length - 1];
if (!document.querySelector('.math')) { done('no math'); return; }
const wait = () => (window.MathJax && MathJax.startup && MathJax.startup.promise)
    ? MathJax.startup.promise.then(() => done('typeset'), e => done('MathJax failed: ' + e))
    : setTimeout(wait, 50);
wait();
"""
# the page's prose as a reader sees it: without code, typeset math and scripts
PROSE = """
const main = document.querySelector('article') || document.body;
const copy = main.cloneNode(true);
copy.querySelectorAll('pre, code, script, style, mjx-container, mjx-assistive-mml').forEach(e => e.remove());
return copy.textContent;
"""
RAW_TEX = re.compile(r"\$\$|\\frac|\\begin\{|\$[^$\n]*\\[a-zA-Z]+[^$\n]*\$")


@pytest.fixture(scope="module")
def site() -> Path:
    "The site built by the README's command (with this Python's tools first on the PATH), once for this module."
    start = time.perf_counter()
    env = {**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    run = subprocess.run(["bash", "docs/build.sh"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert run.returncode == 0, f"bash docs/build.sh failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    print(f"site built in {time.perf_counter() - start:.0f} s")
    return HTML


@pytest.fixture(scope="module")
def browser():
    with chromium() as driver:
        driver.set_script_timeout(60)
        yield driver


def open_page(browser, site: Path, page: str) -> str:
    "Open `page` from disk, wait for MathJax, and return what MathJax reported."
    console_errors(browser), requested_urls(browser)  # empty the logs
    browser.get((site / f"{page}.html").as_uri())
    return browser.execute_async_script(WAIT_FOR_MATHJAX)


def test_every_chapter_is_a_page(site):
    assert PAGES[0] == "index" and len(CHAPTERS) >= 13
    missing = [p for p in [*PAGES, "api"] if not (site / f"{p}.html").exists()]
    assert not missing, f"pages not built: {missing}"


@pytest.mark.parametrize("page", [*PAGES, "api", "genindex", "search"])
def test_page_renders_offline(browser, site, page):
    mathjax = open_page(browser, site, page)
    assert mathjax in ("typeset", "no math"), mathjax
    untypeset = browser.execute_script(
        "return [...document.querySelectorAll('.math')].filter(e => !e.querySelector('mjx-container')).length")
    assert untypeset == 0, f"{page}: {untypeset} formulas not typeset by MathJax"
    raw = RAW_TEX.findall(browser.execute_script(PROSE))
    assert not raw, f"{page}: raw TeX visible in the text: {raw[:5]}"
    broken = browser.execute_script(
        "return [...document.images].filter(i => !i.complete || i.naturalWidth === 0).map(i => i.src)")
    assert not broken, f"{page}: images that did not load: {broken}"
    errors = console_errors(browser)
    assert not errors, f"{page}: console errors: {errors}"
    outside = [u for u in requested_urls(browser)
               if not (u.startswith(site.as_uri() + "/") or u.startswith(("data:", "blob:", "about:")))]
    assert not outside, f"{page}: requests leaving the site: {outside}"
    code = browser.execute_script("return [...document.querySelectorAll('pre')].map(p => p.textContent).join('\\n')")
    shown = [line for line in code.splitlines() if re.match(r"\s*#\s*\|", line) or "show_doc(" in line]
    assert not shown, f"{page}: nbdev cell options or show_doc calls shown as code: {shown[:5]}"
    if page in SCREENSHOTS:
        target = SCREENSHOTS[page]
        if target:
            browser.execute_script(f"document.querySelector('article {target}')"
                                   ".scrollIntoView({block: 'center', behavior: 'instant'})")
        shots = BUILD / "screenshots"
        shots.mkdir(exist_ok=True)
        assert browser.save_screenshot(str(shots / f"{page}.png"))


def test_math_is_typeset_with_the_sites_mathjax(browser, site):
    open_page(browser, site, CHAPTERS[0])
    n = browser.execute_script("return document.querySelectorAll('mjx-container').length")
    src = browser.execute_script("return [...document.scripts].map(s => s.src).filter(s => s.includes('mathjax'))")
    assert n > 20, f"only {n} formulas typeset in {CHAPTERS[0]}"
    assert src and all(s.startswith(site.as_uri() + "/_static/mathjax/") for s in src), src


def test_navigation_reaches_every_chapter_in_order(browser, site):
    open_page(browser, site, "index")
    sidebar = browser.execute_script(
        "return [...document.querySelectorAll('.sidebar-tree a.reference')].map(a => a.href)")
    assert [Path(u).stem for u in sidebar] == [*CHAPTERS, "api"]
    visited, page = [], "index"
    for _ in range(len(PAGES) + 1):  # follow the "next" links from the home page to the end
        nxt = browser.execute_script("const a = document.querySelector('a.next-page'); return a && a.href")
        if not nxt:
            break
        browser.get(nxt)
        page = Path(nxt).stem
        visited.append(page)
    assert visited == [*CHAPTERS, "api"]


def test_api_reference_documents_the_package(browser, site):
    open_page(browser, site, "api")
    names = browser.execute_script("return [...document.querySelectorAll('dt.sig')].map(d => d.id)")
    assert {"ddpm_course.schedules.linear_beta_schedule", "ddpm_course.schedules.NoiseSchedule",
            "ddpm_course.sampling.ddim_step", "ddpm_course.unet.UNet"} <= set(names)
    text = browser.execute_script("return document.body.textContent")
    assert "side of the square output" in text  # a parameter comment (nbdev docments) of data.load_digits_with_labels


def test_links_between_pages_resolve(site):
    "Every link within the site (nbdev's links to documented names included) reaches a page and an anchor on it."
    ids = {p.name: set(re.findall(r'\bid="([^"]+)"', p.read_text(encoding="utf-8"))) for p in site.glob("*.html")}
    broken, n = [], 0
    for name in ids:
        for href in re.findall(r'<a class="reference internal" href="([^"]+)"', (site / name).read_text(encoding="utf-8")):
            page, _, anchor = href.partition("#")
            n += 1
            if (page or name) not in ids or (anchor and anchor not in ids[page or name]):
                broken.append(f"{name} -> {href}")
    assert n > 100 and not broken, f"{len(broken)} of {n} links broken: {broken[:10]}"


def test_search_works_from_disk(browser, site):
    console_errors(browser)
    browser.get((site / "search.html").as_uri() + "?q=NoiseSchedule")
    hits = wait_for_hits(browser)
    assert any(h.endswith("04_schedules.html") for h in hits), hits
    errors = console_errors(browser)
    assert not errors, f"search: console errors: {errors}"


def wait_for_hits(browser, timeout: float = 30) -> list[str]:
    "The pages the search page lists, once it has listed some."
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        hits = browser.execute_script("return [...document.querySelectorAll('#search-results li a')].map(a => a.href)")
        if hits:
            return [h.split("#")[0].split("?")[0] for h in hits]
        time.sleep(0.2)
    pytest.fail(f"the search page listed no result within {timeout:.0f} s")

