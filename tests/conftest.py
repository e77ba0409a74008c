"""Test set-up shared by every test module.

TRITON_INTERPRET must be set before any Triton kernel module is imported, so the kernels run on the
CPU here (CI has no GPU). On a CUDA machine, `make test-gpu` (PRUNEPATH_GPU_TESTS=1, the `gpu` mark)
tests the compiled kernels instead.

Tiers: `make test-fast` deselects `slow` (the real default model, or over 10 s on 2 cores) and `browser`
(headless Chromium);
`make test` runs everything (what CI runs). A test that asks for the `default_model` fixture is marked
`slow` here, whether or not it says so itself.
"""

import os
from pathlib import Path

if not os.environ.get("PRUNEPATH_GPU_TESTS"):
    os.environ["TRITON_INTERPRET"] = "1"
_shared = Path(__file__).resolve().parents[1].parent / "shared" / "data"
if "PRUNEPATH_DATA" not in os.environ and _shared.is_dir():
    os.environ["PRUNEPATH_DATA"] = str(_shared)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "default_model" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def default_model():
    """The real default model (SmolLM2-135M-Instruct, fp32, CPU), loaded once. Do not mutate it."""
    from prunepath.models import load_model

    torch.manual_seed(0)
    return load_model()


@pytest.fixture
def tiny_llama():
    """A 2-layer random Llama: D=64, F=128 (4 experts of 32)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).eval()
