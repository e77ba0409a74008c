"""Loading a checkpoint for the explorer (or a tiny random one when none is reachable)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from prunepath.errors import CheckpointError
from prunepath.routing.control import set_gate


class ExplorerError(ValueError):
    """Something the user can fix (a bad path, a prompt with no tokens); the page shows the message."""


def _fallback_dir() -> Path:
    from prunepath.models import cache_root

    return cache_root().parent / "explorer" / "default-untrained"


def load_for_explorer(ref: str):
    """(model, tokenizer, source, note) for "default", "tiny" or a checkpoint folder.

    "default": the trained default checkpoint; until it exists, the default model converted on the fly
    (untrained, centroid-initialised routers, unit gates), saved once to the user cache so the next
    start is fast. Errors the user can fix come back as ExplorerError with the reason.
    """
    import prunepath
    from prunepath.models import ModelLoadError

    try:
        if ref == "tiny":
            return (*prunepath.load(build_tiny_checkpoint(Path(tempfile.gettempdir()) / "prunepath-tiny")),
                    "tiny random model (tests)", "A tiny random model for tests: the text is gibberish.")
        if ref != "default":
            folder = Path(ref).expanduser()
            if not folder.is_dir():
                raise ExplorerError(f"No checkpoint folder at {folder}. Give the folder written by "
                                    "`prunepath moefy --out DIR` or `prunepath train`, or choose 'default'.")
            model, tok = prunepath.load(folder)
            return model, tok, str(folder), ""
        try:
            model, tok = prunepath.load("default")
            return model, tok, "default (trained)", ""
        except CheckpointError:
            pass
        note = ("The trained default checkpoint is not in this checkout yet, so this is SmolLM2-135M-Instruct "
                "converted on the fly: k-means experts, untrained routers initialised at the expert centroids, "
                "unit gates. Expect more experts per token and a larger quality drop than a trained checkpoint.")
        cached = _fallback_dir()
        if (cached / "prunepath.json").is_file():
            try:
                model, tok = prunepath.load(cached)
                set_gate(model, "one")
                return model, tok, "default model, converted (untrained)", note
            except CheckpointError:
                pass  # stale cache (another base model version): rebuild below
        model, tok = prunepath.load_model()
        prunepath.moefy(model, prunepath.MoefyConfig(router_init="centroid"), progress=False)
        set_gate(model, "one")  # untrained sigmoid gates would scale every expert by an arbitrary factor
        prunepath.save(model, cached)
        return model, tok, "default model, converted (untrained)", note
    except ExplorerError:
        raise
    except (CheckpointError, ModelLoadError, OSError) as e:
        raise ExplorerError(f"Could not load checkpoint {ref!r}: {e}") from None


def build_tiny_checkpoint(folder: Path, layers: int = 4, d_model: int = 64, d_ff: int = 256) -> Path:
    """A small random Llama with a byte-level tokenizer, saved as a PrunePath checkpoint (for tests).

    Offline and fast (~1 s at the defaults: 4 layers, 8 experts of 32): no download, no default model.
    Reused if already built. Larger shapes (e.g. the default model's 30 x 576 x 1536) exercise the
    GPU decode loop at realistic sizes with no weights to ship.
    """
    folder = Path(folder)
    ckpt = folder / "checkpoint"
    if (ckpt / "prunepath.json").is_file():
        import prunepath

        try:  # reused only while this version of PrunePath still loads it (a format change rebuilds it)
            prunepath.load(ckpt)
            return ckpt
        except (CheckpointError, OSError, ValueError):
            shutil.rmtree(folder)
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    import prunepath

    # Byte-level BPE with no merges: every byte is a token, 256 + 1 special.
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<|endoftext|>"] = len(vocab)
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")
    torch.manual_seed(0)
    heads = max(4, d_model // 64)
    kv_heads = next(k for k in (2, 3, 1) if heads % k == 0)  # grouped-query attention, as the default model
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=d_model, intermediate_size=d_ff, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=1024,
                      eos_token_id=len(vocab) - 1)
    base = folder / "base"
    LlamaForCausalLM(cfg).save_pretrained(base)
    tok.save_pretrained(base)
    model, _ = prunepath.load_model(base)
    prunepath.moefy(model, prunepath.MoefyConfig(expert_size=32), progress=False)  # F/32 experts per layer
    prunepath.save(model, ckpt)
    return ckpt
