"""Build-wide set-up for the PrunePath book, in one place instead of a hidden cell in every chapter.

Loaded by Jupyter Book as a local Sphinx extension (`_config.yml`: sphinx.local_extensions). It

- exports the environment every notebook kernel inherits: progress bars and loading notices off;
- gives the kernels an IPython start-up file (through IPYTHONDIR, inside the build folder) that registers
  the `book` plotly renderer: a figure becomes a <div> and a `Plotly.newPlot` call, without plotly.js and
  without plotly's MathJax tag, so no page embeds the 4.6 MB library or asks a CDN for MathJax;
- ships plotly.js once, as `_static/plotly.min.js`, loaded by every page (the browser caches it), with
  `window.PlotlyConfig = {MathJaxConfig: 'local'}` so that plotly leaves the book's MathJax alone;
- sets the theme's default colour mode (without one, the theme logs a console error on every page);
- keeps only the part of MathJax the pages load (MATHJAX_KEEP);
- records each notebook's execution time in `_build/execution.json`;
- drops sphinx-thebe's scripts: the book has no live kernels (thebe is off), and the theme added the
  thebe configuration script twice, which declared `const THEBE_JS_URL` twice (a JavaScript error on
  every page) and named a CDN URL.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

# The IPython start-up file the kernels run before the first cell (IPython runs every *.py in
# $IPYTHONDIR/profile_default/startup, in name order).
STARTUP = '''\
"""Written by book/_ext/book_setup.py for the book build: registers the `book` plotly renderer."""
import plotly.io as _pio
from plotly.io._base_renderers import MimetypeRenderer as _MimetypeRenderer


class _BookRenderer(_MimetypeRenderer):
    """A figure as a <div> plus a Plotly.newPlot call; plotly.js comes once from the book's _static."""

    def to_mimebundle(self, fig_dict):
        html = _pio.to_html(fig_dict, include_plotlyjs=False, include_mathjax=False, full_html=False,
                            default_width="100%", default_height=460, validate=False,
                            config={"displaylogo": False, "responsive": True})
        return {"text/html": html}


_pio.renderers["book"] = _BookRenderer()
_pio.renderers.default = "book"
'''


def _plotly_js() -> Path:
    import plotly

    path = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    if not path.is_file():
        raise RuntimeError(f"plotly.min.js not found at {path}: reinstall plotly (pip install plotly)")
    return path


def _environment(app) -> None:
    ipython_dir = Path(app.outdir).parent / ".ipython"
    startup = ipython_dir / "profile_default" / "startup"
    startup.mkdir(parents=True, exist_ok=True)
    (startup / "00-book-plotly.py").write_text(STARTUP)
    os.environ["IPYTHONDIR"] = str(ipython_dir)
    os.environ.pop("PLOTLY_RENDERER", None)  # plotly checks it on import, before `book` exists
    os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars are noise in a static page
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # "Generating train split" bars
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # the weight-loading bar and its notices
    # transformers warns about its own deprecated alias when a model's attributes are walked (not our call)
    os.environ.setdefault("PYTHONWARNINGS", "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


def _page_context(app, pagename, templatename, context, doctree) -> None:
    # pydata-sphinx-theme logs a console error ("Got invalid theme mode") on every page when no default
    # colour mode is set, and Jupyter Book sets none.
    context["default_mode"] = context.get("default_mode") or "light"

    def thebe(js) -> bool:
        text = f"{getattr(js, 'filename', '') or ''} {getattr(js, 'attributes', {}).get('body', '')}"
        return "thebe" in text.lower()

    for key in ("script_files", "css_files"):
        if key in context:
            context[key] = [f for f in context[key] if not thebe(f)]


def _copy_plotly(app, exception) -> None:
    if exception is None and app.builder.format == "html":
        static = Path(app.outdir) / "_static"
        static.mkdir(exist_ok=True)
        shutil.copyfile(_plotly_js(), static / "plotly.min.js")


# What the book's MathJax (tex-chtml.js, set by sphinx-mathjax-offline) loads: the combined component, its
# CommonHTML fonts and the TeX extensions it may autoload; the accessibility and menu parts it loads on
# demand. The rest of the 24 MB npm release (SVG output, MathML input, the speech engine, other combined
# components) is never requested and is removed after sphinx-mathjax-offline copied it.
MATHJAX_KEEP = ("tex-chtml.js", "output/chtml/", "input/tex/", "a11y/", "ui/", "adaptors/")


def _prune_mathjax(app, exception) -> None:
    mathjax = Path(app.outdir) / "_static" / "mathjax"
    if exception is not None or not mathjax.is_dir():
        return
    for path in sorted(mathjax.rglob("*"), reverse=True):  # files before their folders
        rel = path.relative_to(mathjax).as_posix() + ("/" if path.is_dir() else "")
        if path.is_file() and not rel.startswith(MATHJAX_KEEP):
            path.unlink()
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()


def _record_execution(app, exception) -> None:
    """Write each notebook's execution time to _build/execution.json (read by book/time_build.py)."""
    if exception is not None:
        return
    from myst_nb.sphinx_ import NbMetadataCollector

    times = {}
    for docname in sorted(app.env.found_docs):
        try:
            data = NbMetadataCollector.get_exec_data(app.env, docname)
        except KeyError:  # not a notebook
            continue
        if data:
            times[docname] = {"runtime_s": data.get("runtime"), "method": data.get("method"),
                              "succeeded": data.get("succeeded")}
    (Path(app.outdir).parent / "execution.json").write_text(json.dumps(times, indent=1))


def setup(app):
    _plotly_js()  # fail at start-up, not after executing every notebook
    app.connect("builder-inited", _environment)
    app.add_js_file(None, body="window.PlotlyConfig = {MathJaxConfig: 'local'};", priority=100)
    app.add_js_file("plotly.min.js", priority=101)
    app.connect("html-page-context", _page_context)
    app.connect("build-finished", _copy_plotly)
    app.connect("build-finished", _record_execution)
    app.connect("build-finished", _prune_mathjax, priority=900)  # after sphinx-mathjax-offline's copy
    return {"parallel_read_safe": True, "parallel_write_safe": True}
