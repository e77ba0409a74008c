"""PrunePath explorer: drag τ and watch one checkpoint get sparser.   `panel serve explorer.py`

A thin Panel view over `prunepath.explore` (all the numbers come from there; nothing is computed here).
What is fast runs on every control change: routing the prompt (one forward, cached per rule and τ)
and redrawing the heatmap and counts. What is slow — the continuations, the quick perplexity estimate,
decode speed — runs on a background thread on a second copy of the model, is cancelled when the
controls move again, and fills in when done. Errors the user can fix show as a message in the page.

Environment: PRUNEPATH_EXPLORER_CHECKPOINT ("default", "tiny" or a folder) picks the checkpoint the
page opens with; PRUNEPATH_DATA the data folder (WikiText-2 for the quick estimate).
"""

from __future__ import annotations

import html
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pandas  # noqa: F401
import panel as pn
import plotly.graph_objects  # noqa: F401
from panel.io.state import set_curdoc

import prunepath.data  # noqa: F401
import prunepath.evaluate  # noqa: F401
from prunepath import results
from prunepath.explore.explorer import EXAMPLES, RULE_NAMES, Explorer, Routed, configure_threads
from prunepath.explore.loading import ExplorerError
from prunepath.explore.speed import SpeedError, SpeedSection
from prunepath.explore_results import sweep_figures

# The imports marked F401 above are eager on purpose: plotly, datasets and the evaluator import pandas
# lazily, and two worker threads doing that at once left it half-initialised (seen in the browser test).
pn.extension("plotly", sizing_mode="stretch_width")
log = logging.getLogger("prunepath.explorer")

CSS = """
.pp-tok {display:inline-block; margin:1px; padding:1px 3px; border-radius:3px; font-family:monospace;
         font-size:12px; white-space:pre; line-height:1.6}
.pp-tok sub {font-size:9px; margin-left:2px; color:#333}
.pp-cont {white-space:pre-wrap; font-size:13px; line-height:1.5; margin-bottom:4px}
"""


def _friendly(e: BaseException) -> str:
    """The message a user sees: ours verbatim; anything unexpected named, its traceback in the server log."""
    if isinstance(e, ExplorerError):
        return str(e)
    log.exception("explorer: unexpected error")
    return f"Something went wrong ({type(e).__name__}: {e}). The server log has the details."


class ExplorerView(pn.viewable.Viewer):
    """The page for one browser session. The model and its caches live in `Explorer` (one per process,
    shared by every session); this class only owns widgets, two worker threads and a request counter."""

    def __init__(self, checkpoint: str | None = None, **params):
        super().__init__(**params)
        ckpt = checkpoint or os.environ.get("PRUNEPATH_EXPLORER_CHECKPOINT", "default")
        # -- controls
        self.tau = pn.widgets.FloatSlider(name="τ (cumulative-mass budget)", start=0.05, end=1.0, step=0.05,
                                          value=0.7, format="0.00")
        self.dense = pn.widgets.Toggle(name="dense (all experts)", value=False, button_type="default")
        self.rule = pn.widgets.RadioBoxGroup(options={v: k for k, v in RULE_NAMES.items() if k != "dense"},
                                             value="mass")
        self.ckpt_kind = pn.widgets.RadioButtonGroup(options=["default", "path"],
                                                     value="default" if ckpt == "default" else "path")
        self.ckpt_path = pn.widgets.TextInput(name="checkpoint folder", value="" if ckpt == "default" else ckpt,
                                              placeholder="/path/to/checkpoint")
        self.load_btn = pn.widgets.Button(name="Load checkpoint", button_type="primary")
        self.example = pn.widgets.Select(name="example prompts", options=list(EXAMPLES), value="Fox")
        # max_length: the widget's default (5,000 characters) would cut a long paste silently; the
        # explorer truncates to its token limit instead and says so.
        self.prompt = pn.widgets.TextAreaInput(name="prompt", value=EXAMPLES["Fox"], height=110, max_length=200_000)
        # -- outputs
        self.alert = pn.pane.Alert("", alert_type="danger", visible=False)
        self.info = pn.pane.Alert("Loading the checkpoint…", alert_type="info")
        self.summary = pn.pane.HTML("", css_classes=["pp-summary"])
        self.tokens = pn.pane.HTML("", stylesheets=[CSS], css_classes=["pp-tokens"])
        self.heatmap = pn.pane.Plotly({"data": [], "layout": {"height": 360}}, css_classes=["pp-heatmap"])
        self.cont_tau = pn.pane.HTML("", stylesheets=[CSS], css_classes=["pp-cont-tau"])
        self.cont_dense = pn.pane.HTML("", stylesheets=[CSS], css_classes=["pp-cont-dense"])
        self.quick = pn.pane.Markdown("", css_classes=["pp-quick"])
        self.curves = pn.Column(css_classes=["pp-curves"])
        self.speed = pn.pane.Markdown("", css_classes=["pp-speed"])
        self.speed_fig = pn.pane.Plotly({"data": [], "layout": {"height": 380}}, css_classes=["pp-speed-fig"])
        self._speed_section = SpeedSection()  # this page's live points
        self.explorer: Explorer | None = None
        self._info_text = ""
        self._doc = pn.state.curdoc  # the session's document: worker threads hand pane updates to it
        self._seq = 0  # request counter: only the newest request redraws
        self._cancel = threading.Event()
        self._fast = ThreadPoolExecutor(1, thread_name_prefix="pp-route")
        self._slow = ThreadPoolExecutor(1, thread_name_prefix="pp-slow")
        for w in (self.tau, self.dense, self.rule):
            w.param.watch(lambda _e: self.request(), "value")
        self.prompt.param.watch(lambda _e: self.request(), "value")
        self.example.param.watch(lambda e: setattr(self.prompt, "value", EXAMPLES[e.new]), "value")
        self.load_btn.on_click(lambda _e: self.load())
        self.ckpt_kind.param.watch(lambda e: setattr(self.ckpt_path, "disabled", e.new == "default"), "value")
        self.ckpt_path.disabled = self.ckpt_kind.value == "default"
        self._layout = self._build()

    def __panel__(self):
        return self._layout

    def close(self) -> None:
        """The browser tab went away: stop slow work and let the worker threads end."""
        self._cancel.set()
        self._fast.shutdown(wait=False, cancel_futures=True)
        self._slow.shutdown(wait=False, cancel_futures=True)

    def _build(self):
        controls = pn.Column(
            "### Routing", self.tau, self.dense, self.rule,
            pn.pane.Markdown("Per-layer τ, top-k and threshold run at knobs matched to τ's active fraction on "
                             "this prompt (per-layer τ: each layer at that fraction).",
                             styles={"font-size": "12px", "color": "#555"}),
            "### Checkpoint", self.ckpt_kind, self.ckpt_path, self.load_btn,
            "### Prompt", self.example, self.prompt, width=320, sizing_mode="stretch_height",
        )
        main = pn.Column(
            self.alert, self.info, self.summary,
            pn.pane.Markdown("#### Experts kept per token (mean over layers)"), self.tokens, self.heatmap,
            pn.Row(pn.Column("#### Continuation at this setting", self.cont_tau),
                   pn.Column("#### Dense continuation (all experts)", self.cont_dense)),
            "#### Accuracy versus dense", self.quick, self.curves,
            "#### Decode speed", self.speed, self.speed_fig,
        )
        return pn.Row(controls, main)

    # -- helpers ---------------------------------------------------------------------------------------

    def _ui(self, fn) -> None:
        """Run `fn` (which changes panes) on the session's event loop, under the document lock.

        Worker threads must not change Bokeh models themselves: updates from several threads race, and
        a heatmap update can be lost (seen in the browser test before this existed).
        """
        if self._doc is None or self._doc.session_context is None:
            fn()  # headless or in a notebook: no event loop to hand over to
            return
        with set_curdoc(self._doc):
            pn.state.execute(fn, schedule=True)

    def _error(self, msg: str = "") -> None:
        self.alert.object, self.alert.visible = msg, bool(msg)

    def _setting(self) -> tuple[str, str, float]:
        # round: the slider's float steps (0.39999999999999997) would otherwise miss the cache
        return self.prompt.value or "", "dense" if self.dense.value else self.rule.value, round(self.tau.value, 4)

    # -- checkpoint ------------------------------------------------------------------------------------

    def load(self) -> None:
        ref = "default" if self.ckpt_kind.value == "default" else (self.ckpt_path.value or "").strip()
        if not ref:
            self._error("Type the path of a checkpoint folder, or choose 'default'.")
            return
        self.info.object = (f"Loading checkpoint {ref!r}… (the first start without a trained default converts "
                            "the default model: a minute or more on 2 cores)")
        self.info.visible = self.load_btn.loading = True
        self._fast.submit(self._load, ref)

    def _load(self, ref: str) -> None:
        try:
            ex = Explorer.open(ref)
        except Exception as e:  # noqa: BLE001 - any failure becomes a message; the old model stays
            msg = _friendly(e) + (" The previous checkpoint stays loaded." if self.explorer else "")

            def failed():
                self._error(msg)
                self.load_btn.loading = False
                self.info.object, self.info.visible = self._info_text, self.explorer is not None

            self._ui(failed)
            return
        self.explorer = ex

        def show():
            self._error()
            self.load_btn.loading = False
            self._info_text = (f"**Checkpoint:** {ex.source} — {ex.n_layers} layers × {ex.n_experts} experts "
                               f"of {ex.ffns[0].expert_size} neurons. " + (ex.note or ""))
            self.info.object = self._info_text
            self.info.alert_type = "warning" if ex.note else "info"
            self.info.visible = True
            self.request()

        self._ui(show)

    # -- fast path: route + redraw ---------------------------------------------------------------------

    def request(self) -> None:
        """A control changed: cancel slow work in flight, route the new setting (newest request wins)."""
        self._seq += 1
        self._cancel.set()
        self._cancel = threading.Event()
        if self.explorer is not None:
            self._fast.submit(self._route, self._seq, self._setting(), self._cancel)

    def _route(self, seq: int, setting, cancel: threading.Event) -> None:
        if seq != self._seq:
            return  # superseded while queued
        prompt, rule, tau = setting
        try:
            t0 = time.perf_counter()
            r = self.explorer.route(prompt, rule, tau)
            fig = r.heatmap_figure()
            ms = (time.perf_counter() - t0) * 1e3
        except Exception as e:  # noqa: BLE001
            msg = _friendly(e)

            def failed():
                if seq == self._seq:
                    self._error(msg)
                    for pane in (self.cont_tau, self.cont_dense, self.quick):  # no slow work will follow
                        pane.loading = False

            self._ui(failed)
            return
        self._ui(lambda: self._draw(seq, r, fig, rule, tau, ms))
        self._slow.submit(self._slow_work, seq, setting, r, cancel)
        if rule != "dense":
            self._fast.submit(self._prefetch, seq, setting)

    def _prefetch(self, seq: int, setting) -> None:
        """Route the slider's neighbouring positions while the user looks: the next step is a cache hit.

        A route of 64 tokens costs ~0.3-0.6 s on one core of the shared 2-core machine, over the 300 ms
        target; a cached one ~1 ms. Stops as soon as a newer request arrives (it waits at most one route).
        """
        prompt, rule, tau = setting
        step = self.tau.step
        for d in (1, -1, 2, -2):
            t = round(tau + d * step, 4)
            if seq != self._seq:
                return
            if self.tau.start <= t <= self.tau.end:
                try:
                    self.explorer.route(prompt, rule, t)
                except Exception:  # noqa: BLE001 - a prefetch never shows errors; the real request will
                    return

    def _draw(self, seq: int, r: Routed, fig: dict, rule: str, tau: float, ms: float) -> None:
        if seq != self._seq:
            return  # a newer request is on its way: drawing this one would only flicker
        self._error()  # a truncation note is information, shown in the summary, not an error
        self.heatmap.object = fig
        e = r.n_experts
        chips = []
        for tok, c in zip(r.tokens, r.per_token):
            shade = int(235 - 175 * c / e)
            chips.append(f'<span class="pp-tok" style="background:rgb({shade},{shade + 20},255)" '
                         f'title="{c:.1f} of {e} experts">{html.escape(tok)}<sub>{c:.1f}</sub></span>')
        self.tokens.object = "".join(chips)
        what = "dense (all experts, unit gates)" if rule == "dense" else f"{RULE_NAMES[rule]} at τ = {tau:.2f}"
        mflops, dense = r.flops_per_token / 1e6, r.dense_flops_per_token / 1e6
        self.summary.object = (
            f'<div class="pp-numbers"><b>{what}</b> &nbsp;→ rule <code>{r.spec}</code><br>'
            f'tokens <b>{len(r.tokens)}</b> &nbsp;·&nbsp; '
            f'mean experts kept <b class="pp-mean">{r.mean_experts:.1f}</b> '
            f'of {e} &nbsp;·&nbsp; active FFN fraction <b class="pp-frac">{r.active_fraction:.1%}</b> &nbsp;·&nbsp; '
            f'FFN MFLOPs per token <b>{mflops:,.1f}</b> (dense {dense:,.1f}) &nbsp;·&nbsp; '
            f'update {ms:.0f} ms'
            + (f'<br><i>{html.escape(r.note)}</i>' if r.note else "") + "</div>")
        for pane in (self.cont_tau, self.quick):  # stale until the slow work catches up
            pane.loading = True

    # -- slow path: continuations, quick estimate, curves, decode speed ----------------------------------

    def _slow_work(self, seq: int, setting, r: Routed, cancel: threading.Event) -> None:
        prompt, rule, tau = setting
        ex = self.explorer
        try:
            figs = self._curves(tau if rule == "mass" else None, r.active_fraction)
            self._ui(lambda: setattr(self.curves, "objects", figs))
            for pane, rl in ((self.cont_tau, rule), (self.cont_dense, "dense")):
                if cancel.is_set():
                    return
                self._ui(lambda pane=pane: setattr(pane, "loading", True))
                c = ex.continuation(prompt, rl, tau, cancel=cancel)
                if c is None:
                    return
                tail = ("…" if len(prompt) > 160 else "") + prompt[-160:]
                text = (f'<div class="pp-cont"><span style="color:#777">{html.escape(tail)}</span>'
                        f"<b>{html.escape(c.text)}</b></div>"
                        f"<small><code>{c.spec}</code> · {c.new_tokens} tokens, greedy · "
                        f"{c.tokens_per_s:.1f} tokens/s on {ex.device}</small>")
                self._ui(lambda pane=pane, text=text: (setattr(pane, "object", text), setattr(pane, "loading", False)))
            if cancel.is_set():
                return
            try:
                q = ex.quick_estimate(ex.rule_for(prompt, rule, tau))
                d = ex.quick_estimate(ex.rule_for(prompt, "dense", tau))
                text = (f"**Quick estimate** (perplexity on the first {q.tokens + 1} tokens of WikiText-2 test, "
                        f"one window; not the committed evaluation): `{q.spec}` **{q.perplexity:.2f}** at "
                        f"{q.active_fraction:.1%} active versus dense (base model) **{d.perplexity:.2f}** "
                        f"({q.perplexity / d.perplexity - 1:+.1%}).")
            except ExplorerError as e:  # no data folder: the rest of the page still works
                text = f"Quick estimate unavailable: {e}"
            self._ui(lambda: (setattr(self.quick, "object", text), setattr(self.quick, "loading", False)))
            if not cancel.is_set():
                fig, speed = self._speed(prompt, rule, tau)
                self._ui(lambda: (setattr(self.speed, "object", speed), fig and setattr(self.speed_fig, "object", fig)))
        except Exception as e:  # noqa: BLE001
            msg = _friendly(e)

            def fail():
                self.quick.loading = self.cont_tau.loading = self.cont_dense.loading = False
                if seq == self._seq:
                    self._error(msg)

            self._ui(fail)

    def _curves(self, tau, fraction) -> list:
        try:
            rows = results.sweep_rows()
        except results.ResultsNotFoundError as e:
            return [pn.pane.Markdown(f"No committed sweep results: {e}")]
        if not rows:
            return [pn.pane.Markdown(
                "No committed sweep results under `results/sweeps/` yet. Make them with "
                "`prunepath sweep --checkpoint default --taus 0.5 0.7 0.9`.")]
        train = getattr(self.explorer.model, "prunepath_train_info", None)  # this checkpoint's sweeps first
        return [pn.pane.Plotly(f) for f in sweep_figures(rows, tau, fraction, train=train)[:6]]

    def _speed(self, prompt: str, rule: str, tau: float):
        """(figure or None, text): tokens/s measured now at this setting and dense (prunepath.explore.speed)."""
        twin = self.explorer.twin()
        try:
            with twin._lock:  # the twin's routing is changed while measuring
                return self._speed_section.update(twin.model, twin.tokenizer, twin.rule_for(prompt, rule, tau))
        except SpeedError as e:
            return None, f"Decode speed unavailable: {e}"


def _app():
    view = ExplorerView()
    pn.state.onload(view.load)
    pn.state.on_session_destroyed(lambda _ctx: view.close())
    return pn.Column(pn.pane.Markdown("## PrunePath explorer — one checkpoint, one τ slider"), view)


if pn.state.served:
    configure_threads()  # one torch thread per worker: see configure_threads for the measurement
    _app().servable(title="PrunePath explorer")
