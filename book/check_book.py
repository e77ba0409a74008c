"""Check a built PrunePath book: light pages, a complete chapter shape, nothing fetched from outside.

    python book/check_book.py [book/_build/html] [--json report.json] [--no-browser]

Run by CI (`.ci/run`) after `make book`. It checks, and prints one line per page:

1. **weight**: every HTML page ≤ 2 MB and the whole built book ≤ 25 MB (plotly.js ships once, in
   `_static/plotly.min.js`, so a page holds only its own figures' data);
2. **shape**: every chapter page (`notebooks/*.html`) has a "Learning objectives" section at the top and
   an "Exercises" section with at least two hidden (expandable) solutions;
3. **clean outputs**: no cell output shows a Python warning, a temporary path (`/tmp/`) or an internal
   reference ("issue 12");
4. **offline, statically**: no `src`/`href` that loads a resource (scripts, style sheets, images, frames,
   fonts) points outside the book (plain links to other sites are allowed: they load nothing);
5. **offline, in a browser** (headless Chromium through Playwright; skipped with --no-browser): each page
   is loaded with every request recorded; a request for anything that is not a file of the book fails
   the check, and so does any JavaScript console error or uncaught exception.

Exit status 0 when every check passes, 1 otherwise, 2 when the book is not built.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from html.parser import HTMLParser
from pathlib import Path

PAGE_LIMIT = 2 * 1024 * 1024
BOOK_LIMIT = 25 * 1024 * 1024
CHAPTERS = "notebooks"
# Attributes that make a browser fetch something, per tag (an <a href> only navigates when clicked).
LOADING = {"script": "src", "img": "src", "iframe": "src", "source": "src", "audio": "src", "video": "src",
           "embed": "src", "track": "src", "object": "data", "input": "src"}
LOADING_LINK_RELS = {"stylesheet", "preload", "modulepreload", "icon", "shortcut", "apple-touch-icon",
                     "manifest", "prefetch"}
BAD_OUTPUT = [
    (re.compile(r"\b\w*Warning: "), "a Python warning"),
    (re.compile(r"/tmp/"), "a temporary path"),
    (re.compile(r"\bissues? #?\d+\b", re.I), "an internal issue reference"),
]
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


class _Page(HTMLParser):
    """Collects what a page loads, its section titles, its hidden solutions and its cell outputs' text."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.loads: list[str] = []
        self.headings: list[str] = []
        self.dropdowns = 0
        self.outputs: list[str] = []
        self._heading: list[str] | None = None
        self._output_depth = 0  # > 0 while inside a cell output
        self._depth = 0
        self._output_at: list[int] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag in LOADING and a.get(LOADING[tag]):
            self.loads.append(a[LOADING[tag]])
        if tag == "link" and a.get("href") and set((a.get("rel") or "").lower().split()) & LOADING_LINK_RELS:
            self.loads.append(a["href"])
        if tag in ("h1", "h2", "h3"):
            self._heading = []
        classes = set((a.get("class") or "").split())
        solution = tag == "details" and classes & {"dropdown", "sd-dropdown"}
        if solution or tag == "div" and {"admonition", "dropdown"} <= classes:
            self.dropdowns += 1
        if tag == "div":
            self._depth += 1
            if "cell_output" in classes:
                self._output_at.append(self._depth)
                self.outputs.append("")

    def handle_endtag(self, tag):
        if tag in ("h1", "h2", "h3") and self._heading is not None:
            self.headings.append(" ".join("".join(self._heading).split()).strip("#¶ "))
            self._heading = None
        if tag == "div":
            if self._output_at and self._output_at[-1] == self._depth:
                self._output_at.pop()
            self._depth -= 1

    def handle_data(self, data):
        if self._heading is not None:
            self._heading.append(data)
        if self._output_at:
            self.outputs[-1] += data


def _outside(url: str) -> bool:
    """Whether loading `url` from a page of the book would leave the book (data: URIs stay inside)."""
    return bool(re.match(r"^([a-z][a-z0-9+.-]*:)?//", url, re.I)) and not url.lower().startswith("file:")


def check_static(html_dir: Path) -> tuple[list[dict], list[str]]:
    pages, problems = [], []
    for path in sorted(html_dir.rglob("*.html")):
        rel = path.relative_to(html_dir).as_posix()
        if rel.startswith(("_static/", "_sources/", "_images/")):
            continue
        size = path.stat().st_size
        parsed = _Page()
        parsed.feed(path.read_text(encoding="utf-8", errors="replace"))
        page = {"page": rel, "bytes": size, "outside": [u for u in parsed.loads if _outside(u)]}
        if size > PAGE_LIMIT:
            problems.append(f"{rel}: {size / 2**20:.2f} MB, over the {PAGE_LIMIT / 2**20:.0f} MB a page may weigh")
        for url in page["outside"]:
            problems.append(f"{rel}: loads {url} from outside the book")
        if rel.startswith(f"{CHAPTERS}/"):
            heads = [h.lower() for h in parsed.headings]
            page["objectives"] = any("objectives" in h for h in heads)
            page["exercises"] = any(h.startswith("exercises") for h in heads)
            page["summary"] = any(h.startswith("summary") for h in heads)
            page["solutions"] = parsed.dropdowns
            if not page["objectives"]:
                problems.append(f"{rel}: no 'Learning objectives' section")
            if not page["summary"]:
                problems.append(f"{rel}: no 'Summary' section")
            if not page["exercises"]:
                problems.append(f"{rel}: no 'Exercises' section")
            elif parsed.dropdowns < 2:
                problems.append(f"{rel}: {parsed.dropdowns} hidden solution(s); a chapter needs at least 2")
        for text in parsed.outputs:
            for pattern, what in BAD_OUTPUT:
                m = pattern.search(text)
                if m:
                    line = next(ln for ln in text.splitlines() if m.group(0) in ln).strip()[:140]
                    problems.append(f"{rel}: a cell output shows {what}: {line!r}")
        pages.append(page)
    return pages, problems


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def check_browser(html_dir: Path, pages: list[dict]) -> list[str]:
    """Load every page in headless Chromium; record requests that leave the book and console errors."""
    from playwright.sync_api import sync_playwright

    problems = []
    root = html_dir.resolve().as_uri()
    with sync_playwright() as p:
        browser = p.chromium.launch(headless=True, executable_path=_chromium(), args=CHROMIUM_ARGS)
        for page in pages:
            tab = browser.new_page(viewport={"width": 1280, "height": 900})
            outside, errors, failed = [], [], []

            def on_route(route, outside=outside):
                url = route.request.url
                if url.startswith(root) or url.startswith("data:") or url.startswith("blob:"):
                    route.continue_()
                else:
                    outside.append(url)
                    route.abort()

            tab.route("**/*", on_route)
            tab.on("console", lambda m, errors=errors: errors.append(m.text) if m.type == "error" else None)
            tab.on("pageerror", lambda e, errors=errors: errors.append(f"uncaught: {e}"))
            tab.on("requestfailed", lambda r, failed=failed: failed.append(r.url) if r.url.startswith(root) else None)
            tab.goto((html_dir / page["page"]).resolve().as_uri(), wait_until="load", timeout=60_000)
            tab.wait_for_timeout(1500)  # figures draw and MathJax typesets after `load`
            n_figures = tab.evaluate("() => document.querySelectorAll('.plotly-graph-div').length")
            drawn = tab.evaluate("() => document.querySelectorAll('.plotly-graph-div .main-svg').length > 0")
            tab.close()
            page.update(requests_outside=outside, console_errors=errors, figures=n_figures)
            for url in outside:
                problems.append(f"{page['page']}: the browser requested {url}, outside the book")
            for e in errors:
                problems.append(f"{page['page']}: JavaScript console error: {e[:200]}")
            for url in failed:
                problems.append(f"{page['page']}: a file of the book failed to load: {url}")
            if n_figures and not drawn:
                problems.append(f"{page['page']}: {n_figures} plotly figure(s), none drawn")
        browser.close()
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("html", nargs="?", default=str(Path(__file__).resolve().parent / "_build" / "html"))
    ap.add_argument("--json", help="also write the per-page report to this JSON file")
    ap.add_argument("--no-browser", action="store_true", help="skip the headless-Chromium checks")
    args = ap.parse_args(argv)
    html_dir = Path(args.html)
    if not (html_dir / "index.html").is_file():
        print(f"error: {html_dir} holds no built book (no index.html); run `make book` first", file=sys.stderr)
        return 2
    pages, problems = check_static(html_dir)
    browser = not args.no_browser
    if browser and not _chromium():
        problems.append("no Chromium found for the browser checks: apt-get install chromium, or pass --no-browser")
        browser = False
    if browser:
        problems += check_browser(html_dir, pages)
    total = sum(f.stat().st_size for f in html_dir.rglob("*") if f.is_file())
    if total > BOOK_LIMIT:
        problems.append(f"the built book weighs {total / 2**20:.1f} MB, over {BOOK_LIMIT / 2**20:.0f} MB")
    for page in pages:
        extra = ""
        if "objectives" in page:
            yes = {k: "yes" if page[k] else "NO" for k in ("objectives", "summary", "exercises")}
            extra = (f"  objectives {yes['objectives']}, summary {yes['summary']}, exercises {yes['exercises']}"
                     f" ({page['solutions']} hidden solutions)")
        if browser:
            extra += f"  figures {page['figures']}, outside requests {len(page['requests_outside'])}, " \
                     f"console errors {len(page['console_errors'])}"
        print(f"{page['bytes'] / 2**20:6.2f} MB  {page['page']}{extra}")
    print(f"{total / 2**20:6.2f} MB  the whole built book ({len(pages)} pages)")
    if args.json:
        Path(args.json).write_text(json.dumps({"total_bytes": total, "pages": pages, "problems": problems}, indent=1))
    for p in problems:
        print("FAIL", p)
    print("book check: " + ("passed" if not problems else f"{len(problems)} problem(s)"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
