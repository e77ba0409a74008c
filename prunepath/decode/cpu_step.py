"""A decode step for Llama-family models on a CPU, with no transformers layer code in the loop.

Shapes: B batch, T new tokens, D hidden, H / Hkv query / key-value heads, hd head size, L cache length,
V vocabulary.

On a CPU, decoding one token of a small model is bound by reading the weights and by the cost of each
eager operation. transformers' layer forward issues many small operations per layer (norms in several
steps, rotary through concatenations, a dynamic cache that concatenates, masks) and stores weights
[out, in], the layout a one-row GEMV reads slowest. This step runs the same arithmetic with few
operations, as gpt-fast writes its step (`prunepath.decode.compiled` is the GPU version):

* weights copied once into the layout the GEMV reads fastest, [in, out]: one QKV matrix, the O
  projection, the LM head (measured ~20 GB/s against ~11 GB/s for [out, in] on a 2-core AMD EPYC);
* RMSNorm of a row in three operations; rotary from precomputed cos / sign-folded sin tables, applied to the
  queries and keys together (rotate_half(q)·sin = roll(q)·(±sin), bit for bit);
* a static KV cache [B, Hkv, L, hd] written in place; attention is SDPA over the filled slots only;
* the FFN: a base model's gated FFN as two GEMVs (gate and up fused, then down); a PrunePath FFN
  (Gu, Fu, Yuan 2026) through `prunepath.decode.cpu_experts.expert_ffn`, which reads only its kept
  experts (for one fp32 token, one numba-compiled call per layer: `prunepath.decode.cpu_fused`); with every
  expert kept it is the same two GEMVs on the same weights in the base model's
  neuron order, so the sparse loop at 100 % is the dense loop bit for bit.

One fp32 token at batch 1 (decode) runs compiled, when numba is present: per layer one call does the
attention half (norm, QKV, rotary, cache write, attention, O projection, residual, the FFN's norm;
`prunepath.decode.cpu_layer`), then the FFN runs as above (its dense GEMVs compiled too, and the
kept-experts call with its fixed arguments prepared once per rule and gate), and the LM head is a compiled
two-thread GEMV. The eager step spent ~11.6 ms per token of the default checkpoint outside the FFN, about
3 ms of it in the ~15 torch operations per layer around the GEMVs; both loops share the compiled part, and
with it the dense step of the default checkpoint runs ~1.3x faster on two threads of a 2-core AMD EPYC
(scratch pairs). Prefill, batches and bf16 run the eager operations.

The step follows the model's routing as it changes (rule and gate are read at every call), and records
kept experts inside a `prunepath.record` block. Prefill runs the prompt through the same code (all T rows
at once; a PrunePath FFN with more than `max_rows` rows takes the model's torch path). Results agree
with the model's own forward to rounding (the GEMVs sum in another order), and greedy tokens agree.

Threads: torch runs a one-row matmul on one thread; `cpu_experts.gemv` splits it over torch's intra-op
threads. On a machine whose other cores are busy, two-thread operations wait for each other: there
`torch.set_num_threads(1)` is faster.

Memory: the copies above, shared by every decoder of one model. For SmolLM2-135M in fp32: about 540 MB
beside the base model's 540 MB; for its PrunePath model 540 MB with the kept-expert layouts, up to
860 MB once the dense layouts are built too (every expert kept).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from prunepath.decode import cpu_layer
from prunepath.decode.cpu_experts import (
    FUSED_CROSSOVER,
    activation_fn,
    cached_copy,
    dense_ffn,
    dense_gated,
    expert_ffn,
    expert_weights,
    fused_applies,
    fused_ffn,
    fused_plan,
    gemv,
    keeps_every_expert,
)
from prunepath.decode.cpu_fused import compiled_threads
from prunepath.ffn.module import PrunePathFFN

SUPPORTED = ("llama", "mistral", "qwen2")


def step_unsupported(model) -> str:
    """Why this step cannot run `model` ("" when it can): the fallback is the model's own forward."""
    cfg = getattr(model, "config", None)
    kind = getattr(cfg, "model_type", None)
    layers = getattr(getattr(model, "model", None), "layers", None)
    if kind not in SUPPORTED or layers is None or not hasattr(model, "lm_head"):
        return f"model type {kind!r} is not one of the Llama-family layouts {SUPPORTED}"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"activation {cfg.hidden_act!r} (the step's dense FFN is SiLU-gated)"
    if getattr(cfg, "use_sliding_window", kind == "mistral") and getattr(cfg, "sliding_window", None):
        return "sliding-window attention"
    if getattr(model.lm_head, "bias", None) is not None:
        return "an LM head with a bias"
    for layer in layers:
        att, mlp = layer.self_attn, layer.mlp
        if getattr(att.o_proj, "bias", None) is not None:
            return "an attention output projection with a bias"
        projections = ("gate_proj", "up_proj", "down_proj")
        if not isinstance(mlp, PrunePathFFN) and any(
                getattr(getattr(mlp, n, None), "bias", None) is not None for n in projections):
            return "FFN projections with biases"
        if isinstance(mlp, PrunePathFFN) and mlp.kind != "gated":
            return f"a PrunePath FFN of kind {mlp.kind!r}"
    return ""


def _attention_weights(att):
    w = torch.cat([att.q_proj.weight, att.k_proj.weight, att.v_proj.weight]).t().contiguous()  # [D, (H+2Hkv) hd]
    b = None
    if att.q_proj.bias is not None:
        b = torch.cat([att.q_proj.bias, att.k_proj.bias, att.v_proj.bias]).contiguous()
    return w, b, att.o_proj.weight.t().contiguous()  # o: [H hd, D]


def _dense_ffn_weights(mlp):
    w_in = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).t().contiguous()  # [D, 2F]
    return w_in, mlp.down_proj.weight.t().contiguous(), activation_fn(mlp.act_fn)  # down: [F, D]


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """w ⊙ x / sqrt(mean(x²) + eps) per row of x [N, D]. One fp32 row (decode) in three operations (the
    norm, then x ⊙ w scaled by a host number): `F.rms_norm` is a composite of about eight on a CPU and
    took ~10 % of a decode step.  # [N, D]"""
    if x.shape[0] == 1 and x.dtype == torch.float32:
        mean_square = float(torch.linalg.vector_norm(x)) ** 2 / x.shape[1]
        return torch.mul(x, w).mul_(1.0 / math.sqrt(mean_square + eps))
    return F.rms_norm(x, (x.shape[-1],), w, eps)


@dataclass
class _Layer:
    ln1: torch.Tensor
    ln2: torch.Tensor
    w_qkv: torch.Tensor  # [D, (H + 2 Hkv) hd]
    b_qkv: torch.Tensor | None
    w_o: torch.Tensor  # [H hd, D]
    ffn: tuple  # (PrunePathFFN, its ExpertWeights), or a dense FFN's (w_in [D, 2F], w_down [F, D], act)
    k_cache: torch.Tensor  # [B, Hkv, L, hd]
    v_cache: torch.Tensor
    arrays: tuple = ()  # numpy views for `cpu_layer.attention_block`: ln1, ln2, w_qkv, b_qkv, w_o, k, v


def _arrays(layer: _Layer) -> tuple:
    Q = layer.w_qkv.shape[1]
    b = np.zeros(Q, np.float32) if layer.b_qkv is None else layer.b_qkv.detach().numpy()
    return (layer.ln1.detach().numpy(), layer.ln2.detach().numpy(), layer.w_qkv.numpy(), b, layer.w_o.numpy(),
            layer.k_cache[0].numpy(), layer.v_cache[0].numpy())


class CPUDecodeStep:
    """`step(ids [B, T], start)` -> logits [B, V] (fp32) of the last position, writing the KV cache at
    positions start .. start+T-1 (positions before `start` must have been written by earlier calls).

    max_rows: a PrunePath FFN with more rows than this (prefill) takes the model's torch path; so does
    every PrunePath FFN with expert_path=False (it computes every expert and masks).
    Raises ValueError (the reason) for a model `step_unsupported` refuses.
    """

    def __init__(self, model, max_len: int, batch: int = 1, max_rows: int = 8, expert_path: bool = True):
        why = step_unsupported(model)
        if why:
            raise ValueError(f"the CPU decode step cannot run this model: {why}; use the model's own forward "
                             "(prunepath.decode.loop.Decoder does so by itself)")
        cfg, inner = model.config, model.model
        p = next(model.parameters())
        self.dtype, self.device = p.dtype, p.device
        self.batch, self.max_len, self.max_rows, self.expert_path = batch, max_len, max_rows, expert_path
        self.H, self.Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.H
        self.eps = float(cfg.rms_norm_eps)
        self.model = model
        with torch.no_grad():
            positions = torch.arange(max_len, device=self.device)[None]
            cos, sin = inner.rotary_emb(p.new_zeros(1, 1, 1), positions)  # [1, L, hd] (rope scaling included)
            half = self.hd // 2
            sign = torch.cat([-torch.ones(half), torch.ones(self.hd - half)]).to(sin)
            self.cos = cos[0].to(self.dtype).contiguous()  # [L, hd]
            self.sin = (sin[0] * sign).to(self.dtype).contiguous()  # rotate_half(x) = roll(x, hd/2) * sign
        kv = dict(device=self.device, dtype=self.dtype)
        self.k_caches = [torch.zeros(batch, self.Hkv, max_len, self.hd, **kv) for _ in inner.layers]
        self.v_caches = [torch.zeros(batch, self.Hkv, max_len, self.hd, **kv) for _ in inner.layers]
        # one fp32 token at batch 1 runs the compiled attention half (`cpu_layer`) when numba is present
        self.compiled = (batch == 1 and self.dtype == torch.float32 and self.device.type == "cpu"
                         and not cpu_layer.compiled_layer())
        self._scratch = {}
        self._scratch_row = torch.zeros(1, cfg.hidden_size, dtype=self.dtype)  # what `fused_applies` is asked about
        self.refresh()

    def refresh(self) -> None:
        """Re-read the model's weights where they changed since the copies were made (cheap when none did).
        The decode loop calls it once per prefill and per decode call; call it after changing weights
        between direct calls of the step."""
        inner = self.model.model
        self._plans = {}  # layer -> ((rule, gate, weights), the compiled FFN's fixed arguments or None)
        self.embed = inner.embed_tokens.weight
        self.w_norm = inner.norm.weight
        self.w_head = cached_copy(self.model.lm_head, lambda m: m.weight.t().contiguous())  # [D, V]
        self.layers = []
        for i, layer in enumerate(inner.layers):
            w_qkv, b_qkv, w_o = cached_copy(layer.self_attn, _attention_weights)
            mlp = layer.mlp
            ffn = (mlp, expert_weights(mlp)) if isinstance(mlp, PrunePathFFN) else cached_copy(mlp, _dense_ffn_weights)
            self.layers.append(_Layer(layer.input_layernorm.weight, layer.post_attention_layernorm.weight, w_qkv,
                                      b_qkv, w_o, ffn, self.k_caches[i], self.v_caches[i]))
            if self.compiled:
                self.layers[-1].arrays = _arrays(self.layers[-1])
        if self.compiled:
            self._embed_np, self._norm_np = self.embed.detach().numpy(), self.w_norm.detach().numpy()
            self._head_np, self._cos_np, self._sin_np = self.w_head.numpy(), self.cos.numpy(), self.sin.numpy()

    def _ffn(self, layer: _Layer, x: torch.Tensor) -> torch.Tensor:
        f, w = layer.ffn[:2]
        if isinstance(f, PrunePathFFN):
            dense = f.gate == "one" and keeps_every_expert(f.rule, f.n_experts)
            if not self.expert_path or f.rule.needs_scores or (x.shape[0] > self.max_rows and not dense):
                return f(x[None])[0]  # prefill (or the oracle): the model's torch path
            return expert_ffn(f, x, w)  # with every expert kept, the dense FFN (as the base model's, any rows)
        return dense_gated(x, *layer.ffn)

    def _buffers(self, P: int) -> tuple:
        """Scratch arrays of the compiled token for P threads (x, qkv, att, scores, x2 and its tensor view,
        the GEMV parts), made once."""
        if P not in self._scratch:
            D, Q = self.embed.shape[1], self.layers[0].w_qkv.shape[1]
            x2 = np.empty(D, np.float32)
            self._scratch[P] = (np.empty(D, np.float32), np.empty(Q, np.float32),
                                np.empty(self.H * self.hd, np.float32), np.empty((self.H, self.max_len), np.float32),
                                x2, torch.from_numpy(x2)[None], np.empty((P, max(Q, D, self.w_head.shape[1])),
                                                                         np.float32))
        return self._scratch[P]

    def _fused_plan(self, i: int, layer: _Layer):
        """The compiled kept-experts FFN's `cpu_experts.FusedPlan` for layer i under its current rule and gate (None
        when `cpu_experts.fused_applies` refuses it), made again only when the rule or gate object changes."""
        f, w = layer.ffn[:2]
        if not isinstance(f, PrunePathFFN):
            return None
        key = (f.rule, f.gate, w)
        hit = self._plans.get(i)
        if hit is None or hit[0] != key:
            ok = self.expert_path and fused_applies(f, w, self._scratch_row)
            hit = self._plans[i] = (key, fused_plan(f, w, FUSED_CROSSOVER) if ok else None)
        return hit[1]

    def _one_token(self, token: int, pos: int) -> torch.Tensor:
        """One fp32 token at batch 1: per layer, the compiled attention half (`cpu_layer.attention_block`,
        which also adds the previous FFN's output), then the FFN as in the eager step (`_ffn`); the final
        norm and the LM head compiled too.  # [1, V]"""
        P = compiled_threads(torch.get_num_threads())
        x, qkv, att, scores, x2, x2_t, parts = self._buffers(P)
        h = self._embed_np[token].copy()  # [D]
        cos, sin = self._cos_np[pos], self._sin_np[pos]
        y = h  # not read for the first layer
        y_kept = np.empty_like(h)
        for i, layer in enumerate(self.layers):
            ln1, ln2, w_qkv, b_qkv, w_o, k, v = layer.arrays
            cpu_layer.attention_block(h, y, i > 0, ln1, ln2, self.eps, w_qkv, b_qkv, w_o, cos, sin, k, v, pos,
                                      self.H, self.Hkv, P, parts, x, qkv, att, scores, x2)
            plan = self._fused_plan(i, layer)
            if plan is None:
                y = self._ffn(layer, x2_t).numpy()[0]
            else:
                f, w = layer.ffn[:2]
                y = fused_ffn(f, x2_t, plan, lambda g, w=w: dense_ffn(w, x2_t, g), y_kept).numpy()[0]
        cpu_layer.add_norm(h, y, self._norm_np, self.eps, x)
        return torch.from_numpy(cpu_layer.gemv_into(x, self._head_np, P, parts, np.empty(self._head_np.shape[1],
                                                                                np.float32)))[None]

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        B, T = ids.shape
        if B != self.batch:
            raise ValueError(f"batch {B} != the step's batch {self.batch}; build a CPUDecodeStep for it")
        if not 0 <= start <= self.max_len - T:
            raise ValueError(f"positions {start}..{start + T - 1} do not fit the cache of {self.max_len}")
        if self.compiled and T == 1:
            return self._one_token(int(ids[0, 0]), start)
        H, Hkv, hd, end = self.H, self.Hkv, self.hd, start + T
        D = self.embed.shape[1]
        h = F.embedding(ids.reshape(-1), self.embed)  # [B*T, D]
        cos = self.cos[start:end, None, :]  # [T, 1, hd]
        sin = self.sin[start:end, None, :]
        mask = None
        if T > 1 and start > 0:  # SDPA's is_causal aligns top-left: give the mask itself
            mask = (torch.arange(end, device=h.device)[None, :]
                    <= torch.arange(start, end, device=h.device)[:, None])
        for layer in self.layers:
            x = rms_norm(h, layer.ln1, self.eps)
            qkv = gemv(x, layer.w_qkv) if layer.b_qkv is None else torch.addmm(layer.b_qkv, x, layer.w_qkv)
            qk = qkv[:, : (H + Hkv) * hd].view(B, T, H + Hkv, hd)
            qk = qk * cos + qk.roll(hd // 2, -1) * sin  # rotary on queries and keys at once
            q = qk[:, :, :H].transpose(1, 2)  # [B, H, T, hd]
            layer.k_cache[:, :, start:end] = qk[:, :, H:].transpose(1, 2)
            layer.v_cache[:, :, start:end] = qkv[:, (H + Hkv) * hd:].view(B, T, Hkv, hd).transpose(1, 2)
            a = F.scaled_dot_product_attention(q, layer.k_cache[:, :, :end], layer.v_cache[:, :, :end],
                                               attn_mask=mask, is_causal=T > 1 and start == 0,
                                               enable_gqa=H != Hkv)  # [B, H, T, hd]
            h = h + gemv(a.transpose(1, 2).reshape(B * T, H * hd), layer.w_o)
            h = h + self._ffn(layer, rms_norm(h, layer.ln2, self.eps))
        last = h.view(B, T, D)[:, -1]
        return gemv(rms_norm(last, self.w_norm, self.eps), self.w_head).float()  # [B, V]
