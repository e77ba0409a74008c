"""The built book draws its plotly figures in a browser, offline.

Opens two built chapters (book/_build/html, made by `make book`) in headless Chromium with every
non-file request blocked, as a reader without network would see them, and checks that a plotly figure
is actually drawn: a `.plotly-graph-div` holding an SVG with plotted traces and a non-zero size.
Chapter 3 must also draw its offline τ slider (the static fallback for the ipywidgets slider).

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
            b = p.chromium.launch(headless=True, executable_path=exe, args=["--no-sandbox"])
        except Exception as e:  # noqa: BLE001 - any launch failure means "no usable browser here"
            pytest.skip(f"cannot start headless Chromium ({exe or 'playwright bundle'}): {str(e).splitlines()[0]}")
        yield b
        b.close()


def _open_offline(browser, page_path: str):
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
    page.goto(path.as_uri(), wait_until="load")
    return page, blocked


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
