"""A model's fingerprint: a short hash that tells whether two models have the same base weights.

A PrunePath checkpoint stores its routers and neuron permutations, never the base weights; it records the
fingerprint of the base it was made on, and `checkpoint.load` refuses a base with another one.
"""

from __future__ import annotations

import hashlib
import json

import torch

# Config fields that decide a model's shapes; missing ones are skipped (they vary by family).
_CONFIG_ESSENTIALS = (
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act", "rope_theta",
    "tie_word_embeddings", "n_embd", "n_layer", "n_head", "n_inner",
    "max_position_embeddings", "rms_norm_eps",
)


def model_fingerprint(model) -> str:
    """A 16-hex-digit hash of the config essentials and the base weights, identical for the same weights.

    It covers the weights the routers are made for: the backbone (`model.base_model`, e.g. LlamaModel inside
    LlamaForCausalLM, BertModel inside BertForMaskedLM), less any parameter the loader had to initialise at
    random (`model.prunepath_untrained`, see model_class). A task head on top does not enter it, so one
    checkpoint fits an encoder loaded bare or with its head, and a random head never makes a fingerprint
    unrepeatable. (In a model with tied embeddings, such as SmolLM2, the LM head is the embedding matrix.)

    Design choices, so the fingerprint of a base model survives what PrunePath does to it:
      * values are rounded to bfloat16 before hashing, so fp32 and bf16 loads of one model agree;
      * besides exact embedding slices, every parameter contributes only its sum of |w| (float64,
        9 significant digits), which is invariant to the neuron permutation that moefy applies;
      * parameters of routers (names with a `router` component) are left out: moefy adds them.
    Fine-tuning the backbone changes the fingerprint, as it should; a converted model keeps the one it
    was loaded with in `model.config.prunepath_fingerprint`.
    """
    cfg = model.config.to_dict() if hasattr(model.config, "to_dict") else {}
    essentials = json.dumps({k: cfg[k] for k in _CONFIG_ESSENTIALS if k in cfg}, sort_keys=True, default=str)
    base = getattr(model, "base_model", model)
    prefix = next((n + "." for n, m in model.named_modules() if m is base and n), "")
    untrained = set(getattr(model, "prunepath_untrained", ()))
    params = [(n, p) for n, p in base.named_parameters()
              if "router" not in n.split(".") and prefix + n not in untrained and n not in untrained]
    # Memo: a full pass reads every weight (~0.3 s for 135M parameters), and a load followed by a
    # checkpoint check asks twice. Any in-place update bumps a tensor's _version; .to() and .data
    # swaps change data_ptr; so an unchanged key means unchanged weights.
    key = (essentials, tuple((n, p.data_ptr(), p._version, p.dtype, tuple(p.shape)) for n, p in params))
    memo = getattr(model, "_prunepath_fingerprint_memo", None)
    if memo is not None and memo[0] == key:
        return memo[1]

    h = hashlib.sha256(essentials.encode())
    threads = torch.get_num_threads()
    # One thread: these reductions are memory-bound, and on a shared 2-core machine a second OpenMP
    # thread made them 10x slower (measured 15 s vs 1.4 s at load average 12).
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            emb = model.get_input_embeddings().weight  # [V, D]
            rows = sorted({0, 1, emb.shape[0] // 2, emb.shape[0] - 1})
            h.update(emb[rows, :64].to(torch.bfloat16).float().cpu().numpy().tobytes())
            stats = []
            for _, p in params:
                # copy=True: for a bf16 model .to() would return the weight itself and abs_ would change it.
                total = p.detach().to(torch.bfloat16, copy=True).abs_().sum(dtype=torch.float64).item()
                stats.append(f"{tuple(p.shape)}:{total:.9g}")
    finally:
        torch.set_num_threads(threads)
    # Sorted, not in module order: a converted model may register its modules differently.
    h.update("|".join(sorted(stats)).encode())
    fingerprint = h.hexdigest()[:16]
    object.__setattr__(model, "_prunepath_fingerprint_memo", (key, fingerprint))
    return fingerprint
