"""Results of record: the one module that finds, reads and writes the files under `results/`.

    results/sweeps/<checkpoint>_<task>-<protocol>_<device>.json   a sweep: {"meta": {...}, "rows": [...]}
    results/bench/<kind>_<model>_<device>.json                    a benchmark: {"kind", "device", "date", "rows"}
    results/training/*.json                                       how the default checkpoint was trained

A sweep row is one number: method, knob, target and measured active fraction, task, metric, value, n,
protocol (`prunepath.sweep`). A sweep's meta records the checkpoint, device, dtype, versions, date and the
commands that made it; a benchmark file the device, versions and date. Views of them (Markdown tables, HTML
figures, CSV) are made on demand by `prunepath report`, never committed.

Where the folder is: `$PRUNEPATH_RESULTS` if set, else the `results/` of the checkout this package runs from,
else `./results`. An installed wheel carries no results (only the default checkpoint): point
PRUNEPATH_RESULTS at a checkout's `results/` to read them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

RESULTS_ENV = "PRUNEPATH_RESULTS"
SWEEPS, BENCH, TRAINING = "sweeps", "bench", "training"
KINDS = (SWEEPS, BENCH, TRAINING)


class ResultsNotFoundError(FileNotFoundError):
    """No results folder, or no such results file in it; the message says where it looked and the fix."""


def _checkout_results() -> Path | None:
    """`results/` beside the pyproject.toml of the checkout this module was imported from, if any."""
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "pyproject.toml").is_file() and here.is_relative_to(parent / "prunepath"):
            return parent / "results" if (parent / "results").is_dir() else None
    return None


def results_dir(create: bool = False) -> Path:
    """The results folder (see the module docstring for the order of places looked at).

    create: for writers; without a checkout or PRUNEPATH_RESULTS, `./results` is made rather than refused.
    """
    env = os.environ.get(RESULTS_ENV)
    if env:
        path = Path(env).expanduser()
        if create:
            path.mkdir(parents=True, exist_ok=True)
        if not path.is_dir():
            raise ResultsNotFoundError(
                f"{RESULTS_ENV}={env} is not a folder. Fix: point it at a PrunePath checkout's results/ folder, "
                f"or unset it to use the checkout's own.")
        return path
    found = _checkout_results() or (Path.cwd() / "results")
    if create:
        found.mkdir(parents=True, exist_ok=True)
    if not found.is_dir():
        raise ResultsNotFoundError(
            "no results folder: this prunepath is installed without its repository, and ./results does not exist. "
            f"Fix: export {RESULTS_ENV}=/path/to/prunepath/results (a checkout's results/ folder).")
    return found


def _resolve(name: str | os.PathLike, kind: str) -> Path:
    """A results file from a path, or from a bare name (with or without .json) inside results/<kind>/."""
    path = Path(name)
    if path.suffix != ".json" and not path.exists():
        path = path.with_suffix(".json")
    if path.is_file():
        return path
    if len(path.parts) == 1:
        inside = results_dir() / kind / path.name
        if inside.is_file():
            return inside
        known = ", ".join(p.stem for p in sorted((results_dir() / kind).glob("*.json"))) or "none"
        raise ResultsNotFoundError(f"no {kind} file {path.stem!r} in {results_dir() / kind}; there are: {known}")
    raise ResultsNotFoundError(f"no results file {path}")


def read_json(path: str | os.PathLike) -> dict:
    """One results file as a dict; a clear error for a missing, half-written or foreign file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ResultsNotFoundError(f"no results file {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not a results file (not JSON: {e}); "
                         "a sweep still writing it, or another file") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a results file: a results file holds one JSON object")
    return data


def write_json(path: str | os.PathLike, data: dict, indent: int = 1) -> Path:
    """Write a results file atomically (a temporary file, then a rename), so readers never see half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=indent, default=str) + "\n")
    tmp.replace(path)
    return path


# ---------------------------------------------------------------------------------------------------
# sweeps


@dataclass(frozen=True)
class Sweep:
    """One sweep file: its path, meta (checkpoint, device, dtype, versions, date, commands) and rows."""

    path: Path
    meta: dict = field(default_factory=dict)
    rows: list[dict] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def checkpoint(self) -> str:
        """The checkpoint the sweep measured: the first part of its file name (`default_...`)."""
        return self.name.split("_", 1)[0]

    @property
    def trained(self) -> list[dict]:
        """The training records (`prunepath.json` → `train`) of the checkpoints its runs measured."""
        runs = self.meta.get("runs") if isinstance(self.meta.get("runs"), list) else []
        found = [self.meta.get("train")] + [run.get("train") for run in runs if isinstance(run, dict)]
        return [t for t in found if isinstance(t, dict) and t]

    @property
    def commands(self) -> list[str]:
        """The commands that made it (a file several runs appended to keeps each run's)."""
        runs = self.meta.get("runs") if isinstance(self.meta.get("runs"), list) else []
        found = list(self.meta.get("commands") or [])
        found += [c for run in runs if isinstance(run, dict) for c in run.get("commands", []) if c not in found]
        return found

    def values(self, task: str, metric: str) -> dict[tuple[str, float | None], float]:
        """{(method, target fraction): value} for one task and metric (dense: target None)."""
        return {(r["method"], r.get("target_fraction")): r["value"] for r in self.rows
                if r.get("task") == task and r.get("metric") == metric}


def load_sweep(name: str | os.PathLike) -> Sweep:
    """A sweep by path, or by name in results/sweeps/ (e.g. "default_wikitext2_h200")."""
    path = _resolve(name, SWEEPS)
    data = read_json(path)
    rows = data.get("rows")
    if not isinstance(rows, list) or any(not isinstance(r, dict) for r in rows):
        raise ValueError(f"{path} is not a sweep: a sweep file holds {{'meta': ..., 'rows': [one dict per number]}}")
    return Sweep(path, data.get("meta") if isinstance(data.get("meta"), dict) else {}, rows)


def list_sweeps(checkpoint: str | None = None, kind: str = SWEEPS) -> list[Sweep]:
    """The sweeps under results/<kind>/ (sorted by name), only `checkpoint`'s when given ("default").

    A file that is not a sweep (half-written, or another kind of JSON) is left out, not an error.
    """
    out = []
    for path in sorted((results_dir() / kind).glob("*.json")):
        try:
            sweep = load_sweep(path)
        except ValueError:
            continue
        if checkpoint is None or sweep.checkpoint == checkpoint:
            out.append(sweep)
    return out


def sweep_rows(checkpoint: str | None = None) -> list[dict]:
    """Every row of the sweeps of record, each with row["source"] (file, checkpoint, device) and row["trained"]
    (the training records of what it measured), skipping rows without a numeric value and active fraction."""
    rows = []
    for sweep in list_sweeps(checkpoint):
        source = f"{SWEEPS}/{sweep.path.name}"
        if sweep.meta.get("checkpoint"):
            source += f" · checkpoint {sweep.meta['checkpoint']}, {sweep.meta.get('device', '?')} " \
                      f"{sweep.meta.get('dtype', '')}"
        trained = sweep.trained
        for r in sweep.rows:
            if {"method", "task", "metric", "value", "active_fraction"} <= r.keys() \
                    and isinstance(r["value"], (int, float)) and isinstance(r["active_fraction"], (int, float)):
                rows.append({**r, "source": source, "trained": trained})
    return rows


def write_sweep(path: str | os.PathLike, meta: dict, rows: list[dict]) -> Path:
    """Write (or rewrite, as rows arrive) a sweep file: `path` with .json."""
    return write_json(Path(path).with_suffix(".json"), {"meta": meta, "rows": rows})


def sweep_path(checkpoint: str, tasks: str, device: str) -> Path:
    """Where a sweep of record goes: results/sweeps/<checkpoint>_<tasks>_<device>.json."""
    return results_dir(create=True) / SWEEPS / f"{_slug(checkpoint)}_{_slug(tasks)}_{device_slug(device)}.json"


# ---------------------------------------------------------------------------------------------------
# benchmarks


def device_slug(device: str) -> str:
    """A device for a file name: "NVIDIA H200" → "h200", "cuda" → "cuda", "cpu" / "CPU: AMD EPYC" → "cpu"."""
    d = device.strip().lower()
    if d.startswith("cpu"):
        return "cpu"
    return _slug(d.removeprefix("nvidia ").split(" ")[0]) or "unknown"


def _slug(text: str) -> str:
    keep = "".join(c if c.isalnum() or c in "-." else "-" for c in str(text).strip().lower())
    return "-".join(p for p in keep.split("-") if p)


def bench_path(kind: str, device: str, model: str | None = None) -> Path:
    """Where a benchmark of record goes: results/bench/<kind>_<model>_<device>.json (no model: <kind>_<device>)."""
    stem = "_".join([_slug(kind)] + ([_slug(model)] if model else []) + [device_slug(device)])
    return results_dir(create=True) / BENCH / f"{stem}.json"


def load_bench(name: str | os.PathLike) -> dict:
    """A benchmark file by path, or by name in results/bench/ (e.g. "decode_default_h200")."""
    return read_json(_resolve(name, BENCH))


def list_bench(kind: str | None = None) -> list[Path]:
    """The benchmark files under results/bench/, only those of `kind` ("decode", "ffn", ...) when given."""
    folder = results_dir() / BENCH
    return sorted(p for p in folder.glob("*.json") if kind is None or p.name.startswith(f"{kind}_"))


def write_bench(path: str | os.PathLike, data: dict) -> Path:
    """Write a benchmark file (replacing the one of record when it is re-measured: no versioned copies)."""
    return write_json(path, data)


@dataclass(frozen=True)
class RecordedBench:
    """One recorded decode benchmark: which file, where it ran, when, and its tokens/s figures."""

    source: str
    device: str
    date: str
    figures: tuple[tuple[str, float], ...]  # (variant, tokens/s)


def decode_benchmarks(limit: int = 8) -> list[RecordedBench]:
    """The decode tokens/s of every results/bench/decode_*.json, with its device and date (no folder: none)."""
    try:
        paths = list_bench("decode")
    except ResultsNotFoundError:
        return []
    out = []
    for path in paths:
        try:
            data = read_json(path)
        except (OSError, ValueError):
            continue
        rows = data.get("rows") if isinstance(data.get("rows"), list) else []
        figs = [(str(r.get("variant") or r.get("rule") or i), float(r["tokens_per_s"]))
                for i, r in enumerate(rows) if isinstance(r, dict) and isinstance(r.get("tokens_per_s"), (int, float))]
        if figs:
            what = f"{path.name} ({data.get('model', '?')}, {data.get('dtype', '?')})"
            out.append(RecordedBench(what, str(data.get("device") or "unknown device"),
                                     str(data.get("date") or "unknown date"), tuple(figs[:limit])))
    return out


def training_file(name: str) -> dict:
    """A file of results/training/ by name (e.g. "stages_default_cpu", "curve_default_v2")."""
    return read_json(_resolve(name, TRAINING))


def list_training(prefix: str = "") -> list[Path]:
    """The files of results/training/ whose name starts with `prefix` ("curve_", "tau_", ...)."""
    return sorted((results_dir() / TRAINING).glob(f"{prefix}*.json"))
