"""Browser test of the explorer: `panel serve explorer.py` driven by headless Chromium (Playwright).

Runs the real app (explorer.py + prunepath.explore) on a tiny random checkpoint so the server starts in
seconds: PRUNEPATH_EXPLORER_CHECKPOINT points it at the folder. Needs Debian's chromium at
/usr/bin/chromium (CI installs it; `apt-get install chromium`); never `playwright install`.
The screenshot lands in artifacts/explorer.png (git-ignored) for a human to look at.
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM}: apt-get install chromium (CI does)")
    pytest.importorskip("playwright.sync_api")
    ckpt = build_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))
    port = _free_port()
    env = dict(os.environ, PRUNEPATH_EXPLORER_CHECKPOINT=str(ckpt), PYTHONUNBUFFERED="1")
    log = open(tmp_path_factory.mktemp("log") / "panel.log", "w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "panel", "serve", "explorer.py", "--port", str(port), "--address", "127.0.0.1",
         "--allow-websocket-origin", f"127.0.0.1:{port}"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.time() + 90
        while time.time() < deadline:  # bounded wait for the port to accept connections
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"panel serve exited with {proc.returncode}:\n{log.read()[-3000:]}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.5)
        else:
            pytest.fail("panel serve did not open its port within 90 s")
        yield f"http://127.0.0.1:{port}/explorer", log
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()


@pytest.fixture(scope="module")
def page(server):
    from playwright.sync_api import sync_playwright

    url, _ = server
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        pg = browser.new_page(viewport={"width": 1400, "height": 1600})
        pg.goto(url, timeout=60_000)
        # Panel renders over a websocket after `load`: wait for our own content, not for the load event.
        pg.locator(".pp-mean").wait_for(timeout=120_000)
        yield pg
        browser.close()


def _text(pg, css: str) -> str:
    """Rendered text of a pane: Panel draws into the host element's shadow root, which innerText skips."""
    return pg.locator(css).first.evaluate(
        "el => Array.from((el.shadowRoot || el).children)"
        ".filter(c => !['STYLE', 'LINK', 'SCRIPT'].includes(c.tagName)).map(c => c.innerText || '').join('\\n')")


def _numbers(pg) -> str:
    return pg.locator(".pp-numbers").inner_text()


def _z(pg):
    return pg.locator(".js-plotly-plot").first.evaluate("el => JSON.stringify(el.data[0].z)")


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


def test_slider_changes_counts_and_heatmap(page, server):
    pg = page
    assert "τ = 0.70" in _numbers(pg)
    before_numbers, before_z, before_tokens = _numbers(pg), _z(pg), _text(pg, ".pp-tokens")
    handle = pg.locator(".noUi-handle").first
    handle.focus()
    for _ in range(10):  # 0.70 -> 0.20 in steps of 0.05
        pg.keyboard.press("ArrowLeft")
    _wait(lambda: "τ = 0.20" in _numbers(pg), what="the summary at τ = 0.20")
    _wait(lambda: _z(pg) != before_z, what=f"the heatmap to change (still {before_z[:80]}; {_numbers(pg)})")
    after = _numbers(pg)
    mean = lambda s: float(s.split("mean experts kept")[1].split()[0])  # noqa: E731
    assert mean(after) < mean(before_numbers), (before_numbers, after)
    assert _text(pg, ".pp-tokens") != before_tokens  # per-token counts beside the tokens
    # the slow panes fill in: continuations, quick estimate, decode speed (no GPU: a message, not an error)
    _wait(lambda: "tokens/s" in _text(pg, ".pp-cont-dense"), 120, "the dense continuation")
    _wait(lambda: "Quick estimate" in _text(pg, ".pp-quick"), 120, "the quick estimate")
    _wait(lambda: "tokens/s" in _text(pg, ".pp-speed"), 120, "the decode speed panel")
    _no_error(pg)
    (ROOT / "artifacts").mkdir(exist_ok=True)
    pg.screenshot(path=str(ROOT / "artifacts" / "explorer.png"), full_page=True)


def test_dense_toggle_keeps_every_expert(page):
    pg = page
    pg.get_by_role("button", name="dense (all experts)").click()
    _wait(lambda: "dense (all experts" in _numbers(pg), what="the dense summary")
    assert "active FFN fraction 100.0%" in _numbers(pg)
    pg.get_by_role("button", name="dense (all experts)").click()
    _wait(lambda: "τ = 0.20" in _numbers(pg), what="back to τ")
    _no_error(pg)


def test_bad_input_gives_messages_not_tracebacks(page):
    pg = page
    box = pg.locator("textarea").first
    box.fill("")
    box.blur()
    _wait(lambda: pg.locator(".alert-danger").is_visible(), what="the empty-prompt message")
    assert "prompt is empty" in _text(pg, ".alert-danger")
    box.fill("many words " * 2500)  # ~27,500 byte tokens: truncated with a note
    box.blur()
    _wait(lambda: "routes and continues the first" in _numbers(pg), 60, "the truncation note")
    assert "27,500 tokens" in _numbers(pg)  # the whole paste reached the app (byte tokenizer: 1 per char)
    assert not pg.locator(".alert-danger").is_visible()
    # a checkpoint folder that does not exist: a message, and the loaded model stays
    pg.get_by_role("button", name="path", exact=True).click()
    path = pg.get_by_placeholder("/path/to/checkpoint")
    path.fill("/nonexistent/checkpoint")
    path.press("Enter")
    pg.get_by_role("button", name="Load checkpoint").click()
    _wait(lambda: pg.locator(".alert-danger").is_visible(), what="the bad-path message")
    msg = _text(pg, ".alert-danger")
    assert "No checkpoint folder" in msg and "previous checkpoint stays loaded" in msg
    assert pg.get_by_text("Traceback").count() == 0
    pg.screenshot(path=str(ROOT / "artifacts" / "explorer_bad_input.png"), full_page=True)

