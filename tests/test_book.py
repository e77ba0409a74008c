"""The built book draws its plotly figures in a browser, offline.

Opens two built chapters (book/_build/html, made by `make book`) in headless Chromium with every
non-file request blocked, as a reader without network would see them, and checks that a plotly figure
is actually drawn: a `.plotly-graph-div` holding an SVG with plotted traces and a non-zero size.
Chapter 3 must also draw its offline τ slider (the static fallback for the ipywidgets slider).
The chapters with maths must show it typeset by MathJax, which the book ships itself (the
sphinx-mathjax-offline extension copies it into _static), not as raw TeX.

Skips, saying why, when the book has not been built or no Chromium is available; CI builds the book
before running the tests.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

HTML = Path(__file__).resolve().parents[1] / "book" / "_build" / "html"
PAGES = ("notebooks/01_why_ffn.html", "notebooks/03_routing.html")
# Chapters with display maths ($$ … $$ in notebooks/02_splitting.md and notebooks/04_training.md).
MATH_PAGES = ("notebooks/02_splitting.html", "notebooks/04_training.html")


# No sandbox (root in CI) and none of Chromium's own background traffic: the pages are all it loads.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _chromium_path() -> str | None:
    """A system Chromium for Playwright to drive (CI installs the `chromium` apt package)."""
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(scope="module")
def browser():
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (prunepath[test])")
    if not (HTML / "index.html").is_file():
        pytest.skip(f"the book is not built ({HTML} has no index.html); run `make book` first")
    with playwright.sync_playwright() as p:
        exe = _chromium_path()
        try:
            # A system Chromium when there is one; else Playwright's own (`playwright install chromium`).
            b = p.chromium.launch(headless=True, executable_path=exe, args=CHROMIUM_ARGS)
        except Exception as e:  # noqa: BLE001 - any launch failure means "no usable browser here"
            pytest.skip(f"cannot start headless Chromium ({exe or 'playwright bundle'}): {str(e).splitlines()[0]}")
        yield b
        b.close()


def _open_offline(browser, page_path: str, failed: list[str] | None = None):
    """Open a built page with every non-file request blocked; `failed` collects file:// loads that failed."""
    path = HTML / page_path
    if not path.is_file():
        pytest.fail(f"{path} was not built: is it still in book/_toc.yml?")
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    blocked: list[str] = []

    def block_network(route):
        blocked.append(route.request.url)
        route.abort()

    # Offline, as the issue requires: only file:// (and data:) may load; everything else fails.
    page.route("http*://**", block_network)
    if failed is not None:
        page.on("requestfailed", lambda r: failed.append(r.url) if r.url.startswith("file:") else None)
    page.goto(path.as_uri(), wait_until="load")
    return page, blocked


def test_built_book_passes_its_static_checks():
    """book/check_book.py without the browser part: page weights, chapter shape, clean outputs, no
    resource loaded from outside the book (CI runs the whole script, browser included, after the build)."""
    if not (HTML / "index.html").is_file():
        pytest.skip(f"the book is not built ({HTML} has no index.html); run `make book` first")
    import importlib.util

    spec = importlib.util.spec_from_file_location("check_book", HTML.parents[1] / "check_book.py")
    check_book = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check_book)
    pages, problems = check_book.check_static(HTML)
    assert len([p for p in pages if p["page"].startswith("notebooks/")]) == 8, [p["page"] for p in pages]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("page_path", PAGES)
def test_plotly_figure_is_drawn_offline(browser, page_path):
    page, blocked = _open_offline(browser, page_path)
    try:
        page.wait_for_selector(".plotly-graph-div .main-svg", state="attached", timeout=30_000)
        drawn = page.evaluate(
            """() => [...document.querySelectorAll('.plotly-graph-div')].map(d => ({
                   w: d.getBoundingClientRect().width,
                   h: d.getBoundingClientRect().height,
                   traces: d.querySelectorAll('.main-svg .trace, .main-svg .hm, .main-svg image').length,
                   hasData: Array.isArray(d.data) && d.data.length > 0,
               }))"""
        )
        assert drawn, f"{page_path}: no plotly figure on the page"
        ok = [d for d in drawn if d["w"] > 100 and d["h"] > 100 and d["traces"] > 0 and d["hasData"]]
        assert ok, f"{page_path}: plotly divs present but nothing plotted: {drawn}"
        # plotly.js itself must come from the page, not from a CDN the reader may not reach
        from_cdn = [u for u in blocked if "plot.ly" in u or "plotly" in u]
        assert not from_cdn, f"{page_path}: plotly.js requested from the network: {from_cdn}"
    finally:
        page.close()


def test_routing_chapter_has_offline_tau_slider(browser):
    page, _ = _open_offline(browser, "notebooks/03_routing.html")
    try:
        page.wait_for_selector(".plotly-graph-div .slider-container", state="attached", timeout=30_000)
        title_js = """() => {
            const gd = [...document.querySelectorAll('.plotly-graph-div')]
                .find(d => d.querySelector('.slider-container'));
            const t = gd && gd.querySelector('.gtitle');
            return t ? t.textContent : null;
        }"""
        before = page.evaluate(title_js)
        assert before and "τ" in before, f"chapter 3 should draw a plotly τ slider; its title is {before!r}"
        # Move the slider to its last step, as a click would (the step's own update), and check
        # that the drawn figure changes: the offline fallback must work without a kernel.
        page.evaluate(
            """() => {
                const gd = [...document.querySelectorAll('.plotly-graph-div')]
                    .find(d => d.querySelector('.slider-container'));
                const steps = gd.layout.sliders[0].steps;
                return Plotly.update(gd, ...steps[steps.length - 1].args);
            }"""
        )
        page.wait_for_timeout(500)
        after = page.evaluate(title_js)
        assert after != before, f"moving the τ slider did not change the figure (title stayed {before!r})"
    finally:
        page.close()


# Every text node of the article outside code, scripts and MathJax's own output: any TeX delimiter
# left there is maths that was not typeset.
_RAW_TEX_JS = r"""() => {
    const root = document.querySelector('article') || document.body;
    const skip = 'pre, code, script, style, mjx-container, .highlight, .cell_output';
    const walker = document.createTreeWalker(root, NodeFilter.SHOW_TEXT);
    const raw = [];
    for (let n = walker.nextNode(); n; n = walker.nextNode()) {
        const t = n.textContent;
        if (n.parentElement.closest(skip)) continue;
        if (/\\[\(\[]|\$\$|\$[^$\s][^$]*\$/.test(t)) raw.push(t.trim().slice(0, 120));
    }
    return raw;
}"""


@pytest.mark.parametrize("page_path", MATH_PAGES)
def test_maths_is_typeset_offline(browser, page_path):
    failed: list[str] = []
    page, blocked = _open_offline(browser, page_path, failed)
    try:
        # Sphinx's MathJax must be the book's own copy; a CDN one is blocked here and nothing gets typeset.
        srcs = page.evaluate(
            "() => [...document.querySelectorAll('head script[src]')].map(s => s.src).filter(s => /mathjax/i.test(s))"
        )
        assert srcs, f"{page_path}: no MathJax script in the page head (is sphinx.ext.mathjax still loaded?)"
        remote = [s for s in srcs if not s.startswith("file:")]
        assert not remote, f"{page_path}: MathJax is loaded from the network, not from the book: {remote}"

        page.wait_for_function("() => window.MathJax && MathJax.startup && MathJax.startup.promise", timeout=30_000)
        page.evaluate("() => MathJax.startup.promise.then(() => document.fonts.ready).then(() => true)")
        result = page.evaluate(
            """() => ({
                version: MathJax.version,
                math: document.querySelectorAll('.math').length,
                untypeset: [...document.querySelectorAll('.math')]
                    .filter(el => !el.querySelector('mjx-container'))
                    .map(el => el.textContent.trim().slice(0, 120)),
                display: [...document.querySelectorAll('mjx-container[display="true"]')].map(c => ({
                    w: c.getBoundingClientRect().width, h: c.getBoundingClientRect().height })),
                errors: document.querySelectorAll('mjx-merror').length,
                fonts: [...document.fonts].filter(f => f.family.replace(/"/g, '').startsWith('MJX'))
                    .map(f => f.status),
            })"""
        )
        assert result["math"] > 0, f"{page_path}: no maths on the page; pick another page for MATH_PAGES"
        assert not result["untypeset"], f"{page_path}: maths left as raw TeX: {result['untypeset']}"
        assert result["display"], f"{page_path}: no display maths typeset"
        assert all(d["w"] > 50 and d["h"] > 10 for d in result["display"]), f"{page_path}: {result['display']}"
        assert result["errors"] == 0, f"{page_path}: MathJax reported {result['errors']} TeX error(s)"
        # The CHTML output draws with MathJax's own web fonts, shipped beside it in _static.
        assert "loaded" in result["fonts"], f"{page_path}: no MathJax font loaded: {result['fonts']}"
        assert "error" not in result["fonts"], f"{page_path}: a MathJax font failed to load: {result['fonts']}"
        assert not [u for u in failed if "mathjax" in u.lower()], f"{page_path}: local MathJax files missing: {failed}"
        raw = page.evaluate(_RAW_TEX_JS)
        assert not raw, f"{page_path}: raw TeX left in the text: {raw}"
    finally:
        page.close()
