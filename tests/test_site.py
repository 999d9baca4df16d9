"""The built website, checked as a reader meets it: every page opened in headless Chromium.

These tests read the site that ``make book`` built (``book/_build/html``, or ``MMTL_SITE``), with
the chapters executed, so the figures are there. ``make test`` builds it first; run on their own,
the tests are skipped when there is no site, unless ``MMTL_REQUIRE_SITE=1`` (as in ``make test``)
makes a missing site a failure. Screenshots go to ``tests/artifacts/`` (or ``MMTL_ARTIFACTS``).

The site is served over HTTP on 127.0.0.1, and every request to another host is refused and
counted as a failure: a page that needs the network (a CDN) fails here as it would offline.
"""

import functools
import http.server
import os
import re
import threading
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urljoin, urlparse

import pytest
from browser import chromium_path

ROOT = Path(__file__).resolve().parents[1]
SITE = Path(os.environ.get("MMTL_SITE", ROOT / "book" / "_build" / "html"))
ARTIFACTS = Path(os.environ.get("MMTL_ARTIFACTS", ROOT / "tests" / "artifacts"))

pytestmark = pytest.mark.site

if not (SITE / "index.html").exists():
    if os.environ.get("MMTL_REQUIRE_SITE") == "1":
        raise RuntimeError(f"MMTL_SITE={SITE} has no index.html: build the site with `make book` first")
    pytest.skip(f"no built site at {SITE}: run `make book` (or `make test`)", allow_module_level=True)

# The pages a reader reaches: everything but Sphinx's generated indexes and the downloads.
PAGES = sorted(
    p.relative_to(SITE).as_posix()
    for p in SITE.rglob("*.html")
    if not p.relative_to(SITE).parts[0].startswith("_") and p.name not in {"genindex.html", "py-modindex.html"}
)
CHAPTERS = [p for p in PAGES if p.startswith("chapters/")]


class Links(HTMLParser):
    """The ids of a page and the links (``href``/``src``) it contains."""

    def __init__(self):
        super().__init__()
        self.ids, self.links = set(), []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        for key in ("id", "name"):
            if attrs.get(key):
                self.ids.add(attrs[key])
        for key in ("href", "src"):
            if attrs.get(key) and not (tag == "link" and attrs.get("rel") in {"preconnect", "dns-prefetch"}):
                self.links.append(attrs[key])


@functools.cache
def parse(path: Path) -> Links:
    parser = Links()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


def test_the_site_has_every_chapter_and_the_reference_pages():
    chapters = {p.stem for p in (ROOT / "chapters").glob("*.md")}
    assert {Path(p).stem for p in CHAPTERS} == chapters
    for page in ("book/api.html", "book/bibliography.html", "book/notation.html", "book/licence.html", "search.html"):
        assert page in PAGES or page == "search.html", page


def test_no_broken_internal_link_or_anchor():
    broken = []
    for page in [*PAGES, "genindex.html", "py-modindex.html"]:
        source = SITE / page
        if not source.exists():
            continue
        for link in parse(source).links:
            url = urlparse(link)
            if url.scheme or link.startswith(("//", "mailto:", "javascript:", "data:")):
                continue
            target = (source.parent / unquote(url.path)).resolve() if url.path else source
            if target.is_dir():
                target = target / "index.html"
            if not target.exists():
                broken.append(f"{page}: {link} (no file {target.relative_to(SITE.resolve())})")
            elif url.fragment and target.suffix == ".html" and unquote(url.fragment) not in parse(target).ids:
                broken.append(f"{page}: {link} (no id #{url.fragment})")
    assert not broken, f"{len(broken)} broken links:\n" + "\n".join(broken[:40])


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def site_url():
    handler = functools.partial(QuietHandler, directory=str(SITE))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def browser():
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox"])
        yield browser
        browser.close()


class Page:
    """A browser tab that records console errors and failed or off-site requests."""

    def __init__(self, browser, site_url):
        self.site_url = site_url
        self.context = browser.new_context(viewport={"width": 1280, "height": 900})
        self.page = self.context.new_page()
        self.problems = []
        self.page.on("console", lambda m: m.type == "error" and self.problems.append(f"console: {m.text}"))
        self.page.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
        self.page.on("requestfailed", lambda r: self.problems.append(f"failed: {r.url} {r.failure}"))
        self.page.on("response", lambda r: r.status >= 400 and self.problems.append(f"HTTP {r.status}: {r.url}"))
        self.context.route(re.compile(r"^(?!" + re.escape(site_url) + r")"), self.refuse)

    def refuse(self, route):
        self.problems.append(f"off-site request: {route.request.url}")
        route.abort()

    def open(self, page):
        self.page.goto(urljoin(self.site_url, page), wait_until="load")
        if page == "index.html":
            # The site root redirects to the landing page, as on GitHub Pages.
            self.page.wait_for_url("**/book/index.html")
            self.page.wait_for_load_state("load")
        # MathJax typesets after load; its startup promise resolves when the page is done.
        self.page.evaluate("() => window.MathJax && MathJax.startup ? MathJax.startup.promise : null")
        return self.page

    def close(self):
        self.context.close()


@pytest.fixture
def tab(browser, site_url):
    tab = Page(browser, site_url)
    yield tab
    tab.close()


RAW_TEX = """() => {
  const article = document.querySelector("article") || document.body;
  const copy = article.cloneNode(true);
  // code is code wherever it appears: blocks, inline, autodoc's signatures (a regex's "$" is not TeX)
  copy.querySelectorAll("pre, code, .pre, .sig, mjx-container, .MathJax, script, style, .cell_output, .output")
      .forEach(e => e.remove());
  const text = copy.textContent;
  const tex = /\\\\\\(|\\\\\\)|\\\\\\[|\\\\\\]|\\$[^$\\s]/g;
  return [...text.matchAll(tex)].map(m => text.slice(Math.max(0, m.index - 30), m.index + 30));
}"""

FIGURES = """() => [...document.querySelectorAll("article img")].map(
  img => ({src: img.getAttribute("src"), complete: img.complete, width: img.naturalWidth,
           height: img.naturalHeight}))"""


@pytest.mark.parametrize("page", PAGES)
def test_page_renders_offline(tab, page):
    """No raw TeX, every figure loaded with a size, no console error, no failed or off-site request."""
    view = tab.open(page)
    raw = view.evaluate(RAW_TEX)
    assert not raw, f"{page}: TeX left untypeset: {raw[:5]}"
    if page in CHAPTERS or page == "book/api.html":
        assert view.locator("mjx-container").count() > 0, f"{page}: MathJax typeset nothing"
    broken = [f for f in view.evaluate(FIGURES) if not (f["complete"] and f["width"] > 0 and f["height"] > 0)]
    assert not broken, f"{page}: figures that did not load: {broken}"
    assert not tab.problems, f"{page}:\n" + "\n".join(tab.problems)


@pytest.mark.parametrize("page", [p for p in CHAPTERS if not p.endswith("preface.html")])
def test_chapter_shows_executed_figures(tab, page):
    view = tab.open(page)
    assert len(view.evaluate(FIGURES)) > 0, f"{page}: no figure (were the chapters executed?)"


def test_solutions_are_collapsed_and_open_on_a_click(tab):
    view = tab.open("chapters/reptile.html")
    solution = view.locator("div.solution.dropdown").first
    body = solution.locator(":scope > :not(.admonition-title)").first
    assert not body.is_visible(), "a solution is open before the reader asks for it"
    solution.locator(".admonition-title").click()
    body.wait_for(state="visible", timeout=5000)
    solution.scroll_into_view_if_needed()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    view.screenshot(path=ARTIFACTS / "site-solution-open.png")
    assert not tab.problems, tab.problems


def test_search_finds_reptile(tab):
    view = tab.open("search.html?q=Reptile")
    results = view.locator("#search-results ul.search li")
    results.first.wait_for(timeout=15000)
    found = results.all_inner_texts()
    assert any("Reptile" in text for text in found), found
    assert any("reptile" in link for link in results.locator("a").evaluate_all("as => as.map(a => a.href)"))


def test_copy_buttons_and_notebook_download(tab):
    view = tab.open("chapters/maml_sinusoid.html")
    assert view.locator("button.copybtn").count() > 0, "no copy button on the code cells"
    download = view.locator("a[href$='maml_sinusoid.ipynb']")
    assert download.count() == 1, "no .ipynb in the download menu"
    notebook = view.request.get(urljoin(tab.site_url, "_sources/chapters/maml_sinusoid.ipynb"))
    assert notebook.ok and notebook.json()["cells"], "the downloadable notebook is missing or empty"
    source = view.locator("a[href$='maml_sinusoid.md']")
    assert source.count() == 1, "no link to the chapter's source"


def test_launch_and_repository_buttons_are_hidden_without_a_repository(tab):
    if os.environ.get("MMTL_REPO_URL"):
        pytest.skip("the site was built with a repository URL")
    view = tab.open("chapters/maml_sinusoid.html")
    for name in ("colab", "binder", "github"):
        assert view.locator(f"a[href*='{name}']").count() == 0, f"a {name} link without a repository URL"


def test_footer_names_both_licences(tab):
    view = tab.open("index.html")
    footer = view.locator("footer.bd-footer-content").inner_text()
    assert "CC BY 4.0" in footer and "MIT" in footer, footer


@pytest.mark.parametrize(
    "page, name",
    [
        ("book/index.html", "site-landing.png"),
        ("chapters/maml_sinusoid.html", "site-chapter-math-figure.png"),
        ("book/api.html", "site-api.png"),
    ],
)
def test_screenshots(tab, page, name):
    view = tab.open(page)
    if page.startswith("chapters/"):
        # Scroll to the first figure, so the shot shows math and a figure together.
        view.locator("article img").first.scroll_into_view_if_needed()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    view.screenshot(path=ARTIFACTS / name)
    assert (ARTIFACTS / name).stat().st_size > 10_000
    assert not tab.problems, tab.problems
