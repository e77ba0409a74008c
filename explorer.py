"""PrunePath explorer: drag τ and watch one checkpoint get sparser.   `panel serve explorer.py`

A thin Panel view over `prunepath.explore` (all the numbers come from there; nothing is computed here).
Above the fold (1366 × 768): τ and the rule; the experts each token keeps (chips on a colour scale
spanning this prompt's own range, and a small histogram of the per-(token, layer) counts against top-k's
constant); the quality at this setting with its change against dense (read from the checkpoint's committed
sweep, `prunepath.tradeoff_plot`), and the speed figure's slot. Below: continuations, the heatmap, and
the trade-off figure of the book's chapter 5 with this τ marked, other tasks behind a selector.
What is fast runs on every control change: routing the prompt (one forward, cached per rule and τ)
and redrawing the chips, histogram and heatmap. What is slow — the continuations, the quick perplexity estimate,
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
from prunepath.evaluate import tradeoff_plot
from prunepath.explore.explorer import RULE_NAMES, Explorer, Routed, configure_threads
from prunepath.explore.loading import ExplorerError
from prunepath.explore.speed import SpeedError, SpeedSection

# The imports marked F401 above are eager on purpose: plotly, datasets and the evaluator import pandas
# lazily, and two worker threads doing that at once left it half-initialised (seen in the browser test).
pn.extension("plotly", sizing_mode="stretch_width")
log = logging.getLogger("prunepath.explorer")

CSS = """
.pp-tok {display:inline-block; margin:1px; padding:1px 3px; border-radius:3px; font-family:monospace;
         font-size:12px; white-space:pre; line-height:1.6; color:#111}
.pp-tok sub {font-size:9px; margin-left:2px; color:#333}
.pp-chips {max-height:250px; overflow-y:auto; line-height:1.9}
.pp-more {font-size:12px; color:#555; margin-top:4px}
.pp-scale {font-size:11px; color:#444; margin:2px 0 4px 0}
.pp-cont {white-space:pre-wrap; font-size:13px; line-height:1.5; margin-bottom:4px}
.pp-card {font-size:13px; line-height:1.5}
.pp-big {font-size:22px; font-weight:600}
.pp-delta {font-weight:600; color:#b22222}
"""
# Chips drawn at most: a long prompt routes up to ExploreConfig.max_tokens tokens; the chips stay readable
# (they wrap and scroll) and the histogram beside them counts every token.
MAX_CHIPS = 160
# The explorer's rule names -> the sweep's method names (prunepath.tradeoff_plot.METHODS).
SWEEP_METHOD = {"mass": "prunepath", "mass-layer": "prunepath-layer", "topk": "topk", "threshold": "threshold",
                "dense": "dense"}
# Example prompts: plain text whose greedy continuation by the dense default model reads well (checked on the
# default checkpoint, 24 tokens: e.g. "Photosynthesis ..." -> " convert carbon dioxide into oxygen. This process
# is a fundamental part of life on Earth ..."). The old question-answer prompt repeated "The answer is:".
EXAMPLES = {
    "Photosynthesis": "Photosynthesis is the process by which green plants",
    "Water cycle": "The water cycle describes how water moves between the oceans, the air and the land. First,",
    "Healthy habits": "Here are three tips for staying healthy:\n1.",
    "Paris": "Paris is the capital of France. It is known for",
    "A story": "Once upon a time, in a small village by the sea, there lived",
}
DEFAULT_EXAMPLE = "Photosynthesis"


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
        self.example = pn.widgets.Select(name="example prompts", options=list(EXAMPLES), value=DEFAULT_EXAMPLE)
        # max_length: the widget's default (5,000 characters) would cut a long paste silently; the
        # explorer truncates to its token limit instead and says so.
        self.prompt = pn.widgets.TextAreaInput(name="prompt", value=EXAMPLES[DEFAULT_EXAMPLE], height=90,
                                               max_length=200_000)
        self.task = pn.widgets.Select(name="task", options={}, width=360, css_classes=["pp-task"])
        # -- outputs
        self.alert = pn.pane.Alert("", alert_type="danger", visible=False)
        self.info = pn.pane.Alert("Loading the checkpoint…", alert_type="info")
        self.summary = pn.pane.HTML("", css_classes=["pp-summary"], stylesheets=[CSS])
        self.quality = pn.pane.HTML("", css_classes=["pp-quality"], stylesheets=[CSS])
        self.tokens = pn.pane.HTML("", stylesheets=[CSS], css_classes=["pp-tokens"])
        self.histogram = pn.pane.Plotly({"data": [], "layout": {"height": 250}}, css_classes=["pp-histogram"],
                                        width=360, height=260, sizing_mode="fixed")
        self.heatmap = pn.pane.Plotly({"data": [], "layout": {"height": 360}}, css_classes=["pp-heatmap"])
        self.cont_tau = pn.pane.HTML("", stylesheets=[CSS], css_classes=["pp-cont-tau"])
        self.cont_dense = pn.pane.HTML("", stylesheets=[CSS], css_classes=["pp-cont-dense"])
        self.quick = pn.pane.Markdown("", css_classes=["pp-quick"], styles={"font-size": "12px"})
        self.tradeoff = pn.pane.Plotly({"data": [], "layout": {"height": 440}}, css_classes=["pp-tradeoff"])
        self.tradeoff_note = pn.pane.Markdown("", css_classes=["pp-tradeoff-note"], styles={"font-size": "12px"})
        self.speed = pn.pane.Markdown("", css_classes=["pp-speed"])
        # The speed figure (prunepath.explore.speed): this machine's tokens/s at the current τ and dense,
        # beside the recorded H200 curves; the text line under it says what was measured.
        self.speed_fig = pn.pane.Plotly({"data": [], "layout": {"height": 210}}, css_classes=["pp-speed-fig"])
        self._speed_section = SpeedSection(height=210)  # this page's live points
        self.speed_slot = pn.Column(self.speed_fig, self.speed, css_classes=["pp-speed-slot"],
                                    sizing_mode="stretch_width", height=280, scroll=True)  # fixed: the chips stay high
        self.explorer: Explorer | None = None
        self._sweep_rows: list[dict] = []  # the loaded checkpoint's committed sweep rows (tradeoff_plot)
        self._last: tuple | None = None  # (tau, rule, active fraction) of the routed setting shown
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
        self.task.param.watch(lambda _e: self._draw_tradeoff(), "value")
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
        note = pn.pane.Markdown("Per-layer τ, top-k and threshold run at knobs matched to τ's active fraction "
                                "on this prompt.", styles={"font-size": "11px", "color": "#555"})
        checkpoint = pn.Card(self.ckpt_kind, self.ckpt_path, self.load_btn, title="Checkpoint", collapsed=True,
                             sizing_mode="stretch_width")
        controls = pn.Column(
            self.tau, self.dense, self.rule, note, self.example, self.prompt, checkpoint,
            width=300, sizing_mode="stretch_height",
        )
        # Above the fold at 1366 x 768: the numbers, the quality at this setting, the speed slot; then the
        # chips beside the histogram. Everything else scrolls below.
        top = pn.Row(self.summary, self.quality, self.speed_slot, sizing_mode="stretch_width")
        experts = pn.Row(pn.Column(self.tokens, sizing_mode="stretch_width"), self.histogram,
                         sizing_mode="stretch_width")
        accuracy = pn.Column(
            pn.pane.Markdown("### Quality against compute (the book's chapter 5)"), self.task, self.tradeoff,
            self.tradeoff_note, self.quick, sizing_mode="stretch_width",
        )
        main = pn.Column(
            self.alert, top, experts, self.info,
            pn.Row(pn.Column("#### Continuation at this setting", self.cont_tau),
                   pn.Column("#### Dense continuation (every expert)", self.cont_dense)),
            "#### Experts kept per token and layer", self.heatmap,
            accuracy, sizing_mode="stretch_width",
        )
        return pn.Row(controls, main, sizing_mode="stretch_width")

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
        rows, mine = _sweep_rows_for(ex)

        def show():
            self._sweep_rows, self._sweep_mine = rows, mine
            options = {tradeoff_plot.title_for(t, m): (t, m) for t, m in tradeoff_plot.tasks_measured(rows)}
            self.task.options = options
            self.task.visible = bool(options)
            if options and self.task.value not in options.values():
                self.task.value = next(iter(options.values()))
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
                    self._clear()  # the results on screen belong to another prompt: no slow work will follow

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
        self.tokens.object = _chips(r)
        k = r.knobs[0] if rule == "mass" and r.knobs else None
        self.histogram.object = _histogram(r, k)
        what = "dense (every expert, unit gates)" if rule == "dense" else f"{RULE_NAMES[rule]} at τ = {tau:.2f}"
        mflops, dense = r.flops_per_token / 1e6, r.dense_flops_per_token / 1e6
        self.summary.object = (
            f'<div class="pp-numbers pp-card"><b>{what}</b><br>'
            f'experts per token <span class="pp-big pp-mean">{r.mean_experts:.1f}</span> of {e} '
            f'&nbsp;·&nbsp; active FFN fraction <b class="pp-frac">{r.active_fraction:.1%}</b><br>'
            f'rule <code>{r.spec}</code> &nbsp;·&nbsp; {len(r.tokens)} tokens &nbsp;·&nbsp; '
            f'FFN MFLOPs per token <b>{mflops:,.1f}</b> (dense {dense:,.1f}) &nbsp;·&nbsp; update {ms:.0f} ms'
            + (f'<br><i>{html.escape(r.note)}</i>' if r.note else "") + "</div>")
        self._last = (tau if rule == "mass" else None, rule, r.active_fraction)
        self.quality.object = self._quality_card(rule, tau, r.active_fraction)
        self._draw_tradeoff()
        for pane in (self.cont_tau, self.quick):  # stale until the slow work catches up
            pane.loading = True

    def _clear(self) -> None:
        """No valid prompt: nothing routed stays on screen (an empty prompt clears the results)."""
        self._last = None
        self.tokens.object = self.summary.object = self.quality.object = ""
        self.cont_tau.object = self.cont_dense.object = self.quick.object = ""
        self.histogram.object = {"data": [], "layout": {"height": 250}}
        self.heatmap.object = {"data": [], "layout": {"height": 360}}
        for pane in (self.cont_tau, self.cont_dense, self.quick):
            pane.loading = False
        self._draw_tradeoff()

    def _quality_card(self, rule: str, tau: float, fraction: float) -> str:
        """The quality the committed sweep of this checkpoint records at this setting, against dense."""
        if not self._sweep_rows or not self._sweep_mine:
            return ('<div class="pp-card">No committed sweep of this checkpoint: the live quick estimate '
                    "below the fold measures it.</div>")
        method = SWEEP_METHOD.get(rule, rule)
        lines = []
        for task, metric in tradeoff_plot.tasks_measured(self._sweep_rows)[:2]:
            rows = tradeoff_plot.pick_sweep(self._sweep_rows, task, metric)
            dense = tradeoff_plot.value_at(rows, "dense")
            at = tradeoff_plot.value_at(rows, method, tau=tau if rule == "mass" else None, fraction=fraction)
            name = tradeoff_plot.title_for(task, metric).split(" (")[0]
            if dense is None:
                continue
            if rule == "dense":
                lines.append(f"{name} <span class='pp-big'>{dense[1]:.3g}</span> (dense)")
            elif at is None:
                lines.append(f"{name}: this setting is outside the committed sweep "
                             f"(dense {dense[1]:.3g})")
            else:
                delta = tradeoff_plot.change_vs_dense(at[1], dense[1], metric)
                lines.append(f"{name} <span class='pp-big'>{at[1]:.3g}</span> "
                             f"<span class='pp-delta'>{delta}</span> vs dense {dense[1]:.3g}")
        src = "interpolated from the committed sweep of this checkpoint at this τ" if rule == "mass" else \
            "interpolated from the committed sweep of this checkpoint at this active fraction"
        return (f'<div class="pp-card pp-accuracy">{"<br>".join(lines)}<br>'
                f'<small style="color:#555">{src}</small></div>')

    def _draw_tradeoff(self) -> None:
        """The chapter-5 figure for the selected task, this setting marked."""
        if not self._sweep_rows or not self.task.value:
            self.tradeoff.object = {"data": [], "layout": {"height": 60}}
            self.tradeoff_note.object = ("No committed sweep results under `results/`: make them with "
                                         "`prunepath sweep --checkpoint default --fractions 0.25 0.5 0.75`.")
            return
        task, metric = self.task.value
        rows = tradeoff_plot.pick_sweep(self._sweep_rows, task, metric)
        tau, rule, fraction = self._last or (None, None, None)
        mine = self._sweep_mine
        self.tradeoff.object = tradeoff_plot.tradeoff_figure(
            rows, task, metric, tau=tau if mine else None, active_fraction=fraction if mine else None,
            subtitle="this checkpoint" if mine else "the default checkpoint (no sweep of this one is committed)")
        self.tradeoff_note.object = (tradeoff_plot.measured_on(rows) + ". The star: this τ on the global-τ curve; "
                                     "the dotted line: this prompt's active fraction.")

    # -- slow path: continuations, quick estimate, curves, decode speed ----------------------------------

    def _slow_work(self, seq: int, setting, r: Routed, cancel: threading.Event) -> None:
        prompt, rule, tau = setting
        ex = self.explorer
        try:
            for pane, rl in ((self.cont_tau, rule), (self.cont_dense, "dense")):
                if cancel.is_set():
                    return
                self._ui(lambda pane=pane: setattr(pane, "loading", True))
                c = ex.continuation(prompt, rl, tau, cancel=cancel)
                if c is None:
                    return
                routed = ex.tokenizer.decode(ex.encode(prompt)[0])  # the text actually routed (truncated)
                tail = ("…" if len(routed) > 160 else "") + routed[-160:]
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

    def _speed(self, prompt: str, rule: str, tau: float):
        """(figure or None, text): tokens/s measured now at this setting and dense (prunepath.explore.speed)."""
        twin = self.explorer.twin()
        try:
            with twin._lock:  # the twin's routing is changed while measuring
                return self._speed_section.update(twin.model, twin.tokenizer, twin.rule_for(prompt, rule, tau))
        except SpeedError as e:
            return None, f"Decode speed unavailable: {e}"


def _sweep_rows_for(ex: Explorer) -> tuple[list[dict], bool]:
    """(sweep rows, whether they measured the loaded checkpoint): its own committed sweep when there is
    one, else the default checkpoint's (the figure then says so, and the quality card stays empty)."""
    try:
        rows = results.sweep_rows()
    except results.ResultsNotFoundError:
        return [], False  # no results folder (an installed wheel): the page says there is no sweep
    mine = tradeoff_plot.rows_for_checkpoint(rows, getattr(ex.model, "prunepath_train_info", None) or None)
    if getattr(ex.model, "prunepath_train_info", None) and mine:
        return mine, True
    try:
        from prunepath import read_meta

        return tradeoff_plot.rows_for_checkpoint(rows, read_meta("default").get("train")), False
    except Exception:  # noqa: BLE001 - no default checkpoint in this install: no figure, said in the page
        return [], False


def _chips(r: Routed) -> str:
    """Tokens as chips coloured by experts kept (mean over layers), on a scale spanning this prompt's own
    range, so that differences of a few experts show; at most MAX_CHIPS, the rest counted."""
    counts = r.per_token
    shown = counts[:MAX_CHIPS]
    lo, hi = min(counts), max(counts)
    span = max(hi - lo, 1e-6)
    chips = []
    for tok, c in zip(r.tokens, shown):
        t = (c - lo) / span  # 0: fewest experts (blue) .. 1: most (red)
        red, green, blue = (int(70 + 185 * t), int(130 + 90 * (1 - abs(2 * t - 1))), int(255 - 185 * t))
        chips.append(f'<span class="pp-tok" style="background:rgb({red},{green},{blue})" '
                     f'title="{c:.1f} of {r.n_experts} experts">{html.escape(tok)}<sub>{c:.1f}</sub></span>')
    scale = (f'<div class="pp-scale">experts kept per token, mean over layers: '
             f'<span class="pp-tok" style="background:rgb(70,130,255)">{lo:.1f} fewest</span> … '
             f'<span class="pp-tok" style="background:rgb(255,130,70)">{hi:.1f} most</span></div>')
    more = ""
    if len(counts) > MAX_CHIPS:
        more = (f'<div class="pp-more">… {len(counts) - MAX_CHIPS} more routed tokens not drawn as chips '
                f"(the histogram and heatmap count all {len(counts)}).</div>")
    return f'{scale}<div class="pp-chips">{"".join(chips)}</div>{more}'


def _histogram(r: Routed, k: int | None) -> dict:
    """Share of (token, layer) pairs keeping 1..E experts, top-k's matched constant as a line."""
    e = r.n_experts
    flat = r.counts.flatten().tolist()
    share = [flat.count(n) / len(flat) for n in range(1, e + 1)]
    shapes, notes = [], []
    if k is not None:
        shapes.append({"type": "line", "x0": k, "x1": k, "yref": "paper", "y0": 0, "y1": 1,
                       "line": {"color": "#1f77b4", "width": 3}})
        notes.append({"x": k, "y": 1, "yref": "paper", "text": f"top-k: {k}", "showarrow": False,
                      "xanchor": "left", "yanchor": "top", "font": {"color": "#1f77b4", "size": 11}})
    return {"data": [{"type": "bar", "x": list(range(1, e + 1)), "y": share, "marker": {"color": "#d62728"},
                      "hovertemplate": "%{x} experts: %{y:.1%} of (token, layer) pairs<extra></extra>"}],
            "layout": {"title": {"text": "experts kept per (token, layer)", "font": {"size": 12}},
                       "height": 250, "margin": {"l": 40, "r": 10, "t": 30, "b": 35},
                       "xaxis": {"title": {"text": f"experts kept (of {e})"}, "range": [0, e + 1]},
                       "yaxis": {"tickformat": ".0%"}, "shapes": shapes, "annotations": notes,
                       "bargap": 0.05, "template": "plotly_white"}}


def _app():
    view = ExplorerView()
    pn.state.onload(view.load)
    pn.state.on_session_destroyed(lambda _ctx: view.close())
    return pn.Column(pn.pane.Markdown("## PrunePath explorer: one checkpoint, one τ slider",
                                      styles={"margin": "0"}), view)


if pn.state.served:
    configure_threads()  # one torch thread per worker: see configure_threads for the measurement
    _app().servable(title="PrunePath explorer")
