"""The published book, checked the way a reader meets it.

The book is built once per session from scratch, with warnings as errors (the build itself is
the first test, and its time is reported). Then, on the built HTML: the intro links every
chapter in the toc, every widget has a static image, every notebook page offers its download
and launch buttons, and finally every page is opened in headless Chromium
(`tests/browser_check.py`): it loads, raises no JavaScript error, shows all its images, has
no broken internal link, and leaves a screenshot in `book/_build/screenshots/`.

`tests/conftest.py` runs these tests last: the build executes every notebook again.
"""

from __future__ import annotations

import importlib.util
import subprocess
import time
from pathlib import Path

import pytest
import yaml

import browser_check

ROOT = Path(__file__).resolve().parents[1]
BOOK = ROOT / "book"
HTML = BOOK / "_build" / "html"

# The build executes every notebook; the default per-test timeout is far too short for it.
pytestmark = pytest.mark.timeout(3600)


def _report(request, line: str) -> None:
    """Print to the terminal, also when pytest captures output (the build time, the pages)."""
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if capture is None:
        print(line)
        return
    with capture.global_and_fixture_disabled():
        print("\n" + line, flush=True)


def _toc_files(toc: dict) -> tuple[list[str], list[str]]:
    """(chapter files, section files) of a jb-book toc, in reading order."""
    chapters, sections = [], []

    def walk(entries: list, into: list) -> None:
        for entry in entries or []:
            if "file" in entry:
                into.append(entry["file"])
            walk(entry.get("sections"), sections)

    for part in toc.get("parts", []):
        walk(part.get("chapters"), chapters)
    walk(toc.get("chapters"), chapters)
    return chapters, sections


@pytest.fixture(scope="session")
def built_book(request) -> float:
    """Build the book from scratch with warnings as errors; returns the build time in s."""
    spec = importlib.util.spec_from_file_location("build_book", ROOT / "scripts" / "build_book.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    t0 = time.perf_counter()
    try:
        seconds = module.build(clean=True)
    except subprocess.CalledProcessError as err:
        _report(request, f"book build FAILED after {time.perf_counter() - t0:.0f} s")
        pytest.fail(f"the book build failed (warnings count as errors), exit status "
                    f"{err.returncode}: the build log above names the file", pytrace=False)
    _report(request, f"book build (warnings as errors): {seconds:.0f} s")
    return seconds


@pytest.fixture(scope="session")
def toc() -> dict:
    return yaml.safe_load((BOOK / "_toc.yml").read_text())


def test_book_builds_with_warnings_as_errors(built_book, request):
    assert (HTML / "index.html").is_file() and (HTML / "intro.html").is_file()
    _report(request, f"book: {len(browser_check.pages(HTML))} pages, built in {built_book:.0f} s")


def test_intro_links_every_chapter(built_book, toc):
    """A chapter added to _toc.yml needs its line in the intro's learning path."""
    from bs4 import BeautifulSoup

    chapters, _ = _toc_files(toc)
    soup = BeautifulSoup((HTML / "intro.html").read_text(encoding="utf-8"), "html.parser")
    article = soup.select_one("article")  # the page's text, not the navigation around it
    assert article is not None, "intro.html has no <article>"
    links = {a["href"].split("#")[0] for a in article.select("a[href]")}
    missing = [c for c in chapters if f"{c}.html" not in links]
    assert not missing, (f"book/intro.md does not link {missing}: add a line "
                         f"'- {missing[0]}: <one sentence>' to its learning-path block")


def test_every_widget_has_a_static_image(built_book):
    """A cell that shows a widget (or calls figure_dashboard) must also show an image, so the
    HTML book, which has no kernel, still shows the widget's default figure."""
    from bs4 import BeautifulSoup

    missing, widgets = [], 0
    for page in browser_check.pages(HTML):
        soup = BeautifulSoup(page.read_text(encoding="utf-8"), "html.parser")
        for cell in soup.select("div.cell"):
            source = cell.select_one(".cell_input")
            output = cell.select_one(".cell_output")
            shows_widget = output is not None and output.select_one(
                'script[type="application/vnd.jupyter.widget-view+json"]') is not None
            calls_dashboard = source is not None and "figure_dashboard(" in source.get_text()
            if shows_widget or calls_dashboard:
                widgets += 1
                if output is None or output.select_one("img") is None:
                    first = source.get_text().strip().splitlines()[0] if source else "?"
                    missing.append(f"{page.relative_to(HTML)}: cell starting {first!r}")
    assert not missing, "widget cells without a static image:\n" + "\n".join(missing)
    if not widgets:
        pytest.skip("no widget cells in the book yet")


def test_notebook_pages_offer_download_and_launch(built_book, toc):
    """Every page built from a notebook offers the .ipynb and a JupyterLab launch link."""
    chapters, sections = _toc_files(toc)
    notebooks = [f for f in chapters + sections if (BOOK / f"{f}.ipynb").is_file()]
    if not notebooks:
        pytest.skip("no notebook pages in the book yet")
    problems = []
    for name in notebooks:
        page = (HTML / f"{name}.html").read_text(encoding="utf-8")
        if not (HTML / "_sources" / f"{name}.ipynb").is_file() or f"_sources/{name}.ipynb" not in page:
            problems.append(f"{name}: no download link to _sources/{name}.ipynb")
        if f"?urlpath=lab/tree/book/{name}.ipynb" not in page:
            problems.append(f"{name}: no Binder launch link into JupyterLab")
    assert not problems, "\n".join(problems)


def test_every_page_in_a_browser(built_book, request):
    t0 = time.perf_counter()
    installed = browser_check.ensure_chromium()
    if installed:
        _report(request, f"installed chromium + chromium-driver with apt-get: {installed:.0f} s")
    reports = browser_check.check_site(HTML, browser_check.SCREENSHOTS)
    seconds = time.perf_counter() - t0
    _report(request, browser_check.summary(reports))
    _report(request, f"browser check: {len(reports)} pages in {seconds:.0f} s, screenshots in "
                     f"{browser_check.SCREENSHOTS.relative_to(ROOT)}")
    bad = [r for r in reports if r.problems]
    assert not bad, f"{len(bad)} page(s) with problems:\n" + browser_check.summary(bad)
