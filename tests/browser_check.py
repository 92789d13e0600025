"""Open every page of the built book in headless Chromium, the way a reader would.

For each HTML page: it loads, it raises no JavaScript error (other than the known CDNs that
an offline run cannot reach), every image has loaded (naturalWidth > 0), every link,
stylesheet, script and image that points inside the site resolves to a file (and, for page
links, to an existing anchor), and a screenshot goes to `book/_build/screenshots/`.

Used by `tests/test_book.py`; on its own it checks an already-built book:

    .venv/bin/python tests/browser_check.py [book/_build/html]

Needs Debian's `chromium` and `chromium-driver` (`ensure_chromium` installs them with
apt-get when missing) and the `selenium` package. The browser runs offline on purpose: every
host but 127.0.0.1 fails to resolve, so the result does not depend on the network, and
external requests show up as failures that must be on the `KNOWN_EXTERNAL` list.
"""

from __future__ import annotations

import base64
import functools
import http.server
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

ROOT = Path(__file__).resolve().parents[1]
HTML = ROOT / "book" / "_build" / "html"
SCREENSHOTS = ROOT / "book" / "_build" / "screenshots"
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")

# Hosts the published book loads from on purpose: MathJax (Sphinx's default), and what the
# theme or myst-nb may add. In an offline run these requests fail, and that is expected.
KNOWN_EXTERNAL = ("cdn.jsdelivr.net", "unpkg.com", "cdnjs.cloudflare.com")

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--hide-scrollbars", "--window-size=1280,900",
    # Offline on purpose: only the local server resolves.
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
]
MAX_SCREENSHOT_HEIGHT = 6000  # px: enough to show a page's look, small enough to open


def ensure_chromium() -> float:
    """Install Debian's chromium and chromium-driver if missing; returns the seconds it took."""
    if CHROMIUM.exists() and CHROMEDRIVER.exists():
        return 0.0
    if not shutil.which("apt-get") or os.geteuid() != 0:
        raise RuntimeError("the browser check needs Debian's chromium and chromium-driver: "
                           "run `apt-get install -y chromium chromium-driver` as root")
    t0 = time.perf_counter()
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update"],
                ["apt-get", "install", "-y", "--no-install-recommends", "chromium",
                 "chromium-driver"]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if done.returncode:
            raise RuntimeError(f"`{' '.join(cmd)}` failed ({done.returncode}):\n"
                               f"{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    seconds = time.perf_counter() - t0
    print(f"installed chromium and chromium-driver with apt-get in {seconds:.0f} s")
    return seconds


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # one line per request would drown the test output
        pass


@contextmanager
def serve(directory: Path):
    """Serve `directory` on 127.0.0.1 at a free port; yields the base URL (ends with '/')."""
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@contextmanager
def chromium():
    """A headless Chromium driven by chromedriver, with a fresh profile, closed on exit."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="shardlab-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)),
                              options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def pages(html: Path) -> list[Path]:
    """Every HTML page a reader can reach: the book's pages, not theme assets or sources."""
    skip = {"_static", "_sources", "_images", "_sphinx_design_static", "_panels_static"}
    return sorted(p for p in html.rglob("*.html")
                  if not skip.intersection(p.relative_to(html).parts[:-1]))


@functools.lru_cache(maxsize=None)
def _anchors(path: Path) -> frozenset[str]:
    text = path.read_text(encoding="utf-8", errors="replace")
    return frozenset(re.findall(r'\b(?:id|name)="([^"]+)"', text))


def _redirect_target(path: Path) -> str | None:
    """The target of a meta-refresh page (the book's index.html), else None."""
    match = re.search(r'http-equiv="refresh"[^>]*url=([^"\s>]+)',
                      path.read_text(encoding="utf-8", errors="replace"), re.IGNORECASE)
    return match.group(1) if match else None


def local_target(url: str, base: str, html: Path) -> tuple[Path, str] | None:
    """(file, anchor) for a URL inside the served site, else None."""
    if not url.startswith(base):
        return None
    parts = urlsplit(url)
    rel = unquote(parts.path)[len(urlsplit(base).path):]
    path = html / rel
    if rel == "" or rel.endswith("/"):
        path = path / "index.html"
    return path, unquote(parts.fragment)


def is_known_external(message: str) -> bool:
    """A failed request to a known CDN (expected offline), or an error it causes."""
    hosts = re.findall(r"https?://([^/\s:\"']+)", message)
    external = [h for h in hosts if h not in ("127.0.0.1", "localhost")]
    return bool(external) and all(any(h == k or h.endswith("." + k) for k in KNOWN_EXTERNAL)
                                  for h in external)


@dataclass
class PageReport:
    page: str
    seconds: float = 0.0
    screenshot: str = ""
    problems: list[str] = field(default_factory=list)
    external_failures: list[str] = field(default_factory=list)


_COLLECT = """
const done = arguments[arguments.length - 1];
for (const img of document.images) { img.loading = 'eager'; }
const deadline = Date.now() + 10000;
(function poll() {
  const pending = Array.from(document.images).filter(i => !i.complete);
  if (pending.length && Date.now() < deadline) { setTimeout(poll, 50); return; }
  const urls = [];
  for (const [sel, attr] of [['a[href]', 'href'], ['link[href]', 'href'], ['img[src]', 'src'],
                             ['script[src]', 'src'], ['iframe[src]', 'src'], ['source[src]', 'src']]) {
    for (const el of document.querySelectorAll(sel)) {
      urls.push([el.tagName.toLowerCase(), el.getAttribute(attr), el[attr]]);
    }
  }
  done({
    ready: document.readyState,
    title: document.title,
    article: !!document.querySelector('article, main, [role=main]'),
    text: (document.body ? document.body.innerText.length : 0),
    broken_images: Array.from(document.images)
        .filter(i => !(i.complete && i.naturalWidth > 0))
        .map(i => i.getAttribute('src')),
    images: document.images.length,
    urls: urls,
  });
})();
"""


_FREEZE = """
const style = document.createElement('style');
style.textContent = '*, *::before, *::after { transition: none !important; animation: none !important; }';
document.head.appendChild(style);
"""


def _screenshot(driver, path: Path) -> None:
    # The full-page capture re-lays out the page at its whole height: with transitions on,
    # the sidebars could be caught mid-slide.
    driver.execute_script(_FREEZE)
    metrics = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})
    size = metrics.get("cssContentSize") or metrics["contentSize"]
    width = max(1, int(size["width"]))
    height = max(1, min(int(size["height"]), MAX_SCREENSHOT_HEIGHT))
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True,
        "clip": {"x": 0, "y": 0, "width": width, "height": height, "scale": 1}})
    path.write_bytes(base64.b64decode(shot["data"]))


def check_page(driver, base: str, html: Path, page: Path, screenshots: Path) -> PageReport:
    rel = page.relative_to(html).as_posix()
    report = PageReport(rel)
    target = _redirect_target(page)
    if target is not None:  # index.html: a redirect, nothing to render
        if not (page.parent / target.split("#")[0]).is_file():
            report.problems.append(f"redirects to missing {target}")
        return report
    t0 = time.perf_counter()
    driver.get_log("browser")  # drop what earlier pages left behind
    driver.get(base + rel)
    info = driver.execute_async_script(_COLLECT)
    time.sleep(0.2)  # let deferred scripts report their failures
    if info["ready"] != "complete" or not info["title"] or not info["article"] or info["text"] < 50:
        report.problems.append(f"did not load as a page: readyState={info['ready']!r}, "
                               f"title={info['title']!r}, text={info['text']} chars")
    for src in info["broken_images"]:
        report.problems.append(f"image did not load: {src}")
    seen: set[str] = set()
    for tag, raw, resolved in info["urls"]:
        if not resolved or resolved in seen or resolved.startswith(("javascript:", "mailto:")):
            continue
        seen.add(resolved)
        local = local_target(resolved, base, html)
        if local is None:
            continue
        path, anchor = local
        if not path.is_file():
            report.problems.append(f"<{tag}> {raw!r}: no file {path.relative_to(html)}")
        elif tag == "a" and anchor and path.suffix == ".html" and anchor not in _anchors(path):
            report.problems.append(f"<a> {raw!r}: no anchor #{anchor} in {path.relative_to(html)}")
    for entry in driver.get_log("browser"):
        if entry["level"] != "SEVERE":
            continue
        message = entry["message"]
        if is_known_external(message):
            report.external_failures.append(message)
        else:
            report.problems.append(f"console error ({entry.get('source', '?')}): {message}")
    shot = screenshots / (rel.replace("/", "__").removesuffix(".html") + ".png")
    _screenshot(driver, shot)
    report.screenshot = str(shot)
    report.seconds = time.perf_counter() - t0
    return report


def check_search(driver, base: str, query: str = "collective") -> PageReport:
    """The search page finds a word every book has (the glossary defines it)."""
    report = PageReport(f"search.html?q={query}")
    t0 = time.perf_counter()
    driver.get(f"{base}search.html?q={query}")
    deadline = time.monotonic() + 15
    hits = 0
    while time.monotonic() < deadline:
        hits = driver.execute_script("return document.querySelectorAll('#search-results li').length")
        if hits:
            break
        time.sleep(0.1)
    if not hits:
        report.problems.append(f"searching for {query!r} found nothing")
    report.seconds = time.perf_counter() - t0
    return report


def check_site(html: Path = HTML, screenshots: Path = SCREENSHOTS) -> list[PageReport]:
    """Check every page of the built book in one browser session; one report per page."""
    if not (html / "index.html").is_file():
        raise FileNotFoundError(f"no built book at {html}: run scripts/build_book.py first")
    ensure_chromium()
    if screenshots.exists():
        shutil.rmtree(screenshots)
    screenshots.mkdir(parents=True)
    with serve(html) as base, chromium() as driver:
        reports = [check_page(driver, base, html, page, screenshots) for page in pages(html)]
        return reports + [check_search(driver, base)]


def summary(reports: list[PageReport]) -> str:
    lines = []
    for r in reports:
        status = "ok" if not r.problems else f"{len(r.problems)} problem(s)"
        extra = f", {len(r.external_failures)} known external failure(s)" if r.external_failures else ""
        lines.append(f"{r.page:<45} {r.seconds:5.1f} s  {status}{extra}")
        lines += [f"    - {p}" for p in r.problems]
    return "\n".join(lines)


if __name__ == "__main__":
    site = Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else HTML
    t0 = time.perf_counter()
    results = check_site(site, SCREENSHOTS if site == HTML else site.parent / "screenshots")
    print(summary(results))
    print(f"{len(results)} pages checked in {time.perf_counter() - t0:.0f} s")
    sys.exit(1 if any(r.problems for r in results) else 0)
