"""Browser test of the explorer: `panel serve explorer.py` driven by headless Chromium (Playwright).

Runs the real app (explorer.py + prunepath.explore) on a tiny random checkpoint so the server starts in
seconds: PRUNEPATH_EXPLORER_CHECKPOINT points it at the folder. One slow test opens the trained default
checkpoint, whose committed sweep gives the quality card its numbers. Needs Debian's chromium at
/usr/bin/chromium (CI installs it; `apt-get install chromium`); never `playwright install`.
The page is 1366 x 768, a common laptop screen: what the issue asks to see "above the fold" is checked
there. Every request the page makes and every console message is recorded from the first byte: no
request may leave the server, no console error may appear, and the page's weight is bounded.
Screenshots land in artifacts/ (git-ignored) for a human to look at.
"""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from prunepath.explore.loading import build_tiny_checkpoint

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("PRUNEPATH_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
ERROR_TEXT = ("Traceback", "Something went wrong", "Exception")
VIEWPORT = {"width": 1366, "height": 768}
# Bokeh, Panel and plotly.js are served by the app itself: about 7.5 MB in all (plotly.js 4.8 MB).
MAX_PAGE_MB = 12.0
MAX_CHIPS = 160  # explorer.MAX_CHIPS


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(checkpoint: str, log_path: Path, wait_s: float = 90):
    """Start `panel serve explorer.py` on a free port; returns (process, url)."""
    port = _free_port()
    env = dict(os.environ, PRUNEPATH_EXPLORER_CHECKPOINT=checkpoint, PYTHONUNBUFFERED="1")
    log = open(log_path, "w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "panel", "serve", "explorer.py", "--port", str(port), "--address", "127.0.0.1",
         "--allow-websocket-origin", f"127.0.0.1:{port}"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    deadline = time.time() + wait_s
    while time.time() < deadline:  # bounded wait for the port to accept connections
        if proc.poll() is not None:
            log.seek(0)
            pytest.fail(f"panel serve exited with {proc.returncode}:\n{log.read()[-3000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.5)
    else:
        proc.terminate()
        pytest.fail(f"panel serve did not open its port within {wait_s:.0f} s")
    return proc, log, f"http://127.0.0.1:{port}/explorer"


def _stop(proc, log) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
    log.close()


class Recorder:
    """Console errors, requests that leave the server, and bytes loaded, from the page's first request."""

    def __init__(self, page, origin: str):
        self.errors: list[str] = []
        self.outside: list[str] = []
        self.bytes = 0
        page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))
        ours = (origin, origin.replace("http://", "ws://"), "data:", "blob:")
        page.on("request", lambda r: None if r.url.startswith(ours) else self.outside.append(r.url))
        page.on("response", self._size)

    def _size(self, response) -> None:
        try:
            self.bytes += len(response.body())
        except Exception:  # noqa: BLE001 - redirects and websockets have no body
            pass


def _open(browser, url: str):
    pg = browser.new_page(viewport=VIEWPORT)
    rec = Recorder(pg, url.rsplit("/", 1)[0])
    pg.goto(url, timeout=60_000)
    # Panel renders over a websocket after `load`: wait for our own content, not for the load event.
    pg.locator(".pp-mean").wait_for(timeout=180_000)
    return pg, rec


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM}: apt-get install chromium (CI does)")
    pytest.importorskip("playwright.sync_api")
    ckpt = build_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))
    proc, log, url = _serve(str(ckpt), tmp_path_factory.mktemp("log") / "panel.log")
    yield url, log
    _stop(proc, log)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def session(server, browser):
    url, _ = server
    pg, rec = _open(browser, url)
    yield pg, rec
    pg.close()


def _text(pg, css: str) -> str:
    """Rendered text of a pane: Panel draws into the host element's shadow root, which innerText skips."""
    return pg.locator(css).first.evaluate(
        "el => Array.from((el.shadowRoot || el).children)"
        ".filter(c => !['STYLE', 'LINK', 'SCRIPT'].includes(c.tagName)).map(c => c.innerText || '').join('\\n')")


def _numbers(pg) -> str:
    return pg.locator(".pp-numbers").inner_text()


def _mean(numbers: str) -> float:
    return float(numbers.split("experts per token")[1].split()[0])


def _z(pg):
    return pg.locator(".pp-heatmap .js-plotly-plot").first.evaluate("el => JSON.stringify(el.data[0].z)")


def _no_error(pg) -> None:
    assert not pg.locator(".alert-danger").is_visible(), _text(pg, ".alert-danger")
    for word in ERROR_TEXT:  # get_by_text pierces Panel's shadow roots; body.innerText would not
        assert pg.get_by_text(word).count() == 0, f"error text {word!r} on the page"


def _wait(pred, timeout=60.0, what=""):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _above_the_fold(pg, css: str, whole: bool = False) -> dict:
    """The element's box with the page scrolled to the top; it must start (or, whole=True, end) on screen."""
    pg.evaluate("() => window.scrollTo(0, 0)")
    box = pg.locator(css).first.bounding_box()
    assert box is not None, f"{css} is not on the page"
    bottom = box["y"] + box["height"]
    assert 0 <= box["y"] < VIEWPORT["height"], f"{css} starts at y = {box['y']:.0f}, below the fold"
    if whole:
        assert bottom <= VIEWPORT["height"], f"{css} ends at y = {bottom:.0f}, below the fold"
    return box


def test_above_the_fold_at_1366x768(session):
    pg, _ = session
    _wait(lambda: pg.locator(".pp-histogram .js-plotly-plot").count() > 0, what="the histogram")
    _above_the_fold(pg, ".noUi-handle", whole=True)  # τ
    _above_the_fold(pg, ".pp-numbers", whole=True)  # experts per token, active fraction
    _above_the_fold(pg, ".pp-quality", whole=True)  # quality against dense (this checkpoint: no sweep, said so)
    _above_the_fold(pg, ".pp-speed-slot")  # the speed figure's place
    _above_the_fold(pg, ".pp-histogram")
    chip = _above_the_fold(pg, ".pp-chips .pp-tok", whole=True)
    assert chip["height"] > 10 and chip["width"] > 10
    # the chips' colours span the prompt's own range, so that differences show
    colours = pg.locator(".pp-chips .pp-tok").evaluate_all("els => [...new Set(els.map(e => e.style.background))]")
    assert len(colours) >= 3, f"chips in {len(colours)} colour(s): {colours}"
    bars = pg.locator(".pp-histogram .js-plotly-plot").first.evaluate("el => el.data[0].y.filter(v => v > 0).length")
    assert bars >= 1
    assert "No committed sweep of this checkpoint" in _text(pg, ".pp-quality")
    (ROOT / "artifacts").mkdir(exist_ok=True)
    pg.screenshot(path=str(ROOT / "artifacts" / "explorer_fold.png"))


def test_slider_changes_counts_and_heatmap(session):
    pg, _ = session
    assert "τ = 0.70" in _numbers(pg)
    before_numbers, before_z, before_tokens = _numbers(pg), _z(pg), _text(pg, ".pp-tokens")
    handle = pg.locator(".noUi-handle").first
    handle.focus()
    for _ in range(10):  # 0.70 -> 0.20 in steps of 0.05
        pg.keyboard.press("ArrowLeft")
    _wait(lambda: "τ = 0.20" in _numbers(pg), what="the summary at τ = 0.20")
    _wait(lambda: _z(pg) != before_z, what=f"the heatmap to change (still {before_z[:80]}; {_numbers(pg)})")
    after = _numbers(pg)
    assert _mean(after) < _mean(before_numbers), (before_numbers, after)
    assert _text(pg, ".pp-tokens") != before_tokens  # per-token counts beside the tokens
    # the slow panes fill in: continuations, quick estimate, decode speed (no GPU: a message, not an error)
    _wait(lambda: "tokens/s" in _text(pg, ".pp-cont-dense"), 120, "the dense continuation")
    _wait(lambda: "Quick estimate" in _text(pg, ".pp-quick"), 120, "the quick estimate")
    _wait(lambda: "tokens/s" in _text(pg, ".pp-speed"), 120, "the decode speed panel")
    _no_error(pg)
    pg.screenshot(path=str(ROOT / "artifacts" / "explorer.png"), full_page=True)


def test_accuracy_section_one_figure_and_a_task_selector(session):
    pg, _ = session
    fig = ".pp-tradeoff .js-plotly-plot"
    _wait(lambda: pg.locator(fig).count() > 0, what="the trade-off figure")
    title = lambda: pg.locator(fig).first.evaluate("el => el.layout.title.text")  # noqa: E731
    first = title()
    assert first.startswith("WikiText-2 perplexity"), first
    assert ".json" not in first and "results/" not in first, f"a file name in the title: {first}"
    names = pg.locator(fig).first.evaluate("el => el.data.map(t => t.name)")
    for label in ("PrunePath, one τ per layer", "PrunePath, one global τ", "top-k experts (fixed count)",
                  "FLAP (static neurons)", "Wanda-sp (static neurons)"):
        assert label in names, f"{label!r} missing from the headline figure: {names}"
    assert len(set(names)) == len(names), f"a legend entry twice: {names}"
    assert pg.locator(".pp-tradeoff").count() == 1, "one trade-off figure, other tasks behind the selector"
    options = pg.locator(".pp-task select option").all_inner_texts()
    assert any(o.startswith("SST-2") for o in options), options
    pg.locator(".pp-task select").select_option(label=next(o for o in options if o.startswith("SST-2")))
    _wait(lambda: title().startswith("SST-2 accuracy"), what="the SST-2 figure")
    errors = pg.locator(fig).first.evaluate("el => el.data.filter(t => t.error_y && t.error_y.array).length")
    assert errors >= 3, "accuracies carry error bars"
    _no_error(pg)


def test_dense_toggle_keeps_every_expert(session):
    pg, _ = session
    pg.get_by_role("button", name="dense (all experts)").click()
    _wait(lambda: "dense (every expert" in _numbers(pg), what="the dense summary")
    assert "active FFN fraction 100.0%" in _numbers(pg)
    pg.get_by_role("button", name="dense (all experts)").click()
    _wait(lambda: "τ = 0.20" in _numbers(pg), what="back to τ")
    _no_error(pg)


def test_empty_and_long_prompts(session):
    pg, _ = session
    box = pg.locator("textarea").first
    box.fill("")
    box.blur()
    _wait(lambda: pg.locator(".alert-danger").is_visible(), what="the empty-prompt message")
    assert "prompt is empty" in _text(pg, ".alert-danger")
    _wait(lambda: pg.locator(".pp-numbers").count() == 0, what="the old results to clear")
    assert pg.locator(".pp-tok").count() == 0, "chips of the previous prompt stayed on screen"
    assert not _text(pg, ".pp-cont-dense").strip(), "the previous continuation stayed on screen"
    # ~27,500 byte tokens: truncated with a note; the chips are capped and the text shown is the routed head
    box.fill("START " + "many words " * 2500 + " END_OF_PROMPT")
    box.blur()
    _wait(lambda: pg.locator(".pp-numbers").count() > 0 and "routes and continues the first" in _numbers(pg),
          60, "the truncation note")
    assert "27,5" in _numbers(pg)  # the whole paste reached the app (byte tokenizer: 1 per character)
    assert not pg.locator(".alert-danger").is_visible()
    chips = pg.locator(".pp-chips .pp-tok").count()
    assert 0 < chips <= MAX_CHIPS, f"{chips} chips drawn"
    assert "more routed tokens" in _text(pg, ".pp-tokens")
    chip = pg.locator(".pp-chips .pp-tok").first.bounding_box()
    assert chip["height"] < 40, "chips stay one line high"
    _wait(lambda: "tokens/s" in _text(pg, ".pp-cont-tau"), 120, "the continuation of the long prompt")
    shown = _text(pg, ".pp-cont-tau")
    assert "END_OF_PROMPT" not in shown, "the continuation shows the tail of the text that was cut off"
    pg.screenshot(path=str(ROOT / "artifacts" / "explorer_long_prompt.png"))


def test_bad_checkpoint_path_is_a_message(session):
    pg, _ = session
    pg.get_by_text("Checkpoint", exact=True).first.click()  # the collapsed card
    pg.get_by_role("button", name="path", exact=True).click()
    path = pg.get_by_placeholder("/path/to/checkpoint")
    path.fill("/nonexistent/checkpoint")
    path.press("Enter")
    pg.get_by_role("button", name="Load checkpoint").click()
    _wait(lambda: pg.locator(".alert-danger").is_visible(), what="the bad-path message")
    msg = _text(pg, ".alert-danger")
    assert "No checkpoint folder" in msg and "previous checkpoint stays loaded" in msg
    assert pg.get_by_text("Traceback").count() == 0


def test_no_console_error_no_outside_request_and_page_weight(session):
    """Runs last in this module: everything the earlier tests did to the page was recorded."""
    _, rec = session
    assert not rec.errors, f"JavaScript console errors: {rec.errors[:5]}"
    assert not rec.outside, f"requests outside the app's server: {rec.outside[:5]}"
    assert rec.bytes / 2**20 <= MAX_PAGE_MB, f"the page loaded {rec.bytes / 2**20:.1f} MB"


@pytest.mark.slow
def test_default_checkpoint_shows_quality_against_dense(browser, tmp_path):
    """The trained default has a committed sweep: the quality card gives a number and its change."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM}")
    proc, log, url = _serve("default", tmp_path / "panel.log")
    try:
        pg, rec = _open(browser, url)
        _wait(lambda: "vs dense" in _text(pg, ".pp-quality"), 120, "the quality card")
        card = _text(pg, ".pp-quality")
        assert "WikiText-2 perplexity" in card and "%" in card, card
        _above_the_fold(pg, ".pp-quality", whole=True)
        fig = pg.locator(".pp-tradeoff .js-plotly-plot").first
        _wait(lambda: "τ = 0.70" in " ".join(fig.evaluate("el => el.data.map(t => t.name)")), 60, "the τ star")
        pg.screenshot(path=str(ROOT / "artifacts" / "explorer_default.png"))
        assert not rec.errors and not rec.outside, (rec.errors[:3], rec.outside[:3])
        pg.close()
    finally:
        _stop(proc, log)
