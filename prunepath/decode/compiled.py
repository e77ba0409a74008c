"""A compiled one-token decode step for Llama-architecture models, captured as one CUDA graph.

Shapes: B batch, D hidden, H / Hkv query / key-value heads, hd head size, L cache length, V vocabulary.

Batch-1 decode reads every weight once per token, so its speed is the weight bytes over the memory
bandwidth, provided the step is not launch-bound. The transformers layer stack issues ~30 small kernels
per layer (norms, rotary, cache writes, masks, residuals), each ~3 us even inside a CUDA graph; at the
Llama-3-8B shape that costs as much time as the FFN. Here, as gpt-fast does, the step is written
against plain tensors taken from the model and the non-FFN part of each layer is one `torch.compile`d
function (fused norms, one QKV GEMV, rotary and the cache write fused, SDPA over the static cache with a
position mask, O projection, residuals). On CUDA (`attention="split"`) rotary, the cache write and the
attention are instead one Triton launch (`prunepath.kernels.decode_attention`, flash-decoding: split-K
over only the positions written so far, the partials combined by the last program) between two
compiled functions (residual, norm, QKV GEMV; O GEMV, residual, norm). The FFN between two compiled
blocks is either

* dense: one gate+up GEMV over the concatenated weights, silu * up fused by the compiler, the down
  GEMV (also compiled), or
* PrunePath (Gu, Fu, Yuan 2026): the FFN module itself, i.e. the Triton kernels of `prunepath.kernels`
  (route and select on the device, gate/up and down over the kept experts only).

The whole step (embedding, every layer, final norm, LM head, greedy token choice, position update) is
captured once into a CUDA graph and replayed with no host synchronisation. One compiled function
serves every layer (its weights are arguments), so compilation is paid once, not once per layer.
Prefill runs the same step once per prompt token (the KV cache is this module's own).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from prunepath.ffn.module import PrunePathFFN


class UnsupportedModelError(ValueError):
    """The model is not a Llama-architecture causal LM this step can run."""


def _rmsnorm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm: fp32 statistics, scaled in the input dtype."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * xf.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def norm_qkv(h, ffn_out, ln1, w_qkv, eps: float):
    """Residual of the previous FFN, RMSNorm, one QKV GEMV; returns (h, qkv [B, (H + 2 Hkv) hd]).

    h, ffn_out [B, D]; w_qkv [(H + 2 Hkv) hd, D].
    """
    h = h + ffn_out
    return h, F.linear(_rmsnorm(h, ln1, eps), w_qkv)


def attention_out(h, a, w_o, ln2, eps: float):
    """O projection of the attention output a [B, H * hd], residual, the FFN's RMSNorm; returns (h, FFN input)."""
    h = h + F.linear(a, w_o)
    return h, _rmsnorm(h, ln2, eps)


def attention_block(h, ffn_out, ln1, w_qkv, w_o, ln2, cos_t, sin_t, k_cache, v_cache, pos,
                    n_heads: int, n_kv: int, eps: float):
    """One layer's attention half with SDPA over the static cache (a position mask); returns (h, FFN input).

    cos_t / sin_t [L, hd]; k/v_cache [B, Hkv, L, hd]; pos [1] (the position of this token, on the device).
    """
    B = h.shape[0]
    hd = cos_t.shape[-1]
    h, qkv = norm_qkv(h, ffn_out, ln1, w_qkv, eps)
    q, k, v = qkv.split([n_heads * hd, n_kv * hd, n_kv * hd], dim=-1)
    q = q.view(B, n_heads, 1, hd)
    k = k.view(B, n_kv, 1, hd)
    v = v.view(B, n_kv, 1, hd)
    cos = cos_t.index_select(0, pos).view(1, 1, 1, hd)
    sin = sin_t.index_select(0, pos).view(1, 1, 1, hd)
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin
    k_cache.index_copy_(2, pos, k)
    v_cache.index_copy_(2, pos, v)
    L = k_cache.shape[2]
    mask = (torch.arange(L, device=pos.device) <= pos).view(1, 1, 1, L)
    a = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask, enable_gqa=n_kv != n_heads)
    return attention_out(h, a.reshape(B, -1), w_o, ln2, eps)


def dense_ffn(x, w_gate_up, w_down):
    """silu(x W_g^T) * (x W_u^T) W_d^T with gate and up as one [2F, D] GEMV."""
    gu = F.linear(x, w_gate_up)
    g, u = gu.chunk(2, dim=-1)
    return F.linear(F.silu(g) * u, w_down)


def lm_head(h, ffn_out, w_norm, w_head, eps: float):
    """Last residual, final norm, logits [B, V] (fp32) and the greedy token [B]."""
    logits = F.linear(_rmsnorm(h + ffn_out, w_norm, eps), w_head).float()
    return logits, greedy(logits)


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """argmax over the vocabulary [B, V] -> [B] (the first of equal maxima), in two stages: a one-output
    reduction over V runs in one program (19 us at V = 128256 on an H200), chunks of V run side by side."""
    B, V = logits.shape
    c = 64
    while V % c:
        c //= 2
    if c < 8:
        return logits.argmax(-1)
    vals, idx = logits.view(B, c, V // c).max(-1)  # [B, c]: each chunk's first maximum
    j = vals.argmax(-1)  # the first chunk holding the maximum
    return j * (V // c) + idx.gather(1, j[:, None])[:, 0]


@dataclass
class _Layer:
    ln1: torch.Tensor
    w_qkv: torch.Tensor
    w_o: torch.Tensor
    ln2: torch.Tensor
    ffn: object  # a callable x [B, D] -> [B, D]
    k_cache: torch.Tensor
    v_cache: torch.Tensor


class CompiledDecoder:
    """Greedy static-cache decode of a transformers Llama-architecture model (dense or PrunePath).

    compile=False runs the same step eagerly (CPU, tests); graph=False skips the CUDA graph. pdl=True (Hopper
    and newer, where this torch's compiler offers it) has the compiled kernels use programmatic dependent launch,
    as the PrunePath kernels do: each kernel starts while the previous one drains and waits only where it reads
    that one's output. It is a process-wide compiler setting, read when a function is first compiled.
    attention: "split" (rotary, cache write and split-K attention in one Triton launch,
    `prunepath.kernels.decode_attention`, reading only the positions written so far), "sdpa" (torch SDPA over
    the whole static cache with a position mask), or "auto" (split on CUDA with Triton, else sdpa).
    """

    def __init__(self, model, max_len: int, batch: int = 1, compile: bool = True, graph: bool = True,
                 pdl: bool = True, attention: str = "auto"):
        cfg = getattr(model, "config", None)
        inner = getattr(model, "model", None)
        layers = getattr(inner, "layers", None)
        if layers is None or not hasattr(model, "lm_head") or getattr(cfg, "model_type", "") not in (
                "llama", "mistral", "qwen2"):
            raise UnsupportedModelError(
                f"{type(model).__name__} ({getattr(cfg, 'model_type', '?')}) is not a Llama-architecture causal "
                "LM; the compiled decode step supports llama / mistral / qwen2 layouts. Use prunepath.decode.")
        if getattr(cfg, "hidden_act", "silu") != "silu":
            raise UnsupportedModelError(f"activation {cfg.hidden_act!r}: the compiled dense FFN is SiLU-gated")
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.batch, self.max_len = batch, max_len
        self.n_heads, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.eps = float(cfg.rms_norm_eps)
        self.embed = inner.embed_tokens.weight
        self.w_norm, self.w_head = inner.norm.weight, model.lm_head.weight
        positions = torch.arange(max_len, device=self.device)[None]
        cos, sin = inner.rotary_emb(self.embed[:1][None], positions)  # [1, L, hd] (rope scaling included)
        self.cos_t, self.sin_t = cos[0].contiguous(), sin[0].contiguous()
        self.sparse = False
        self.layers: list[_Layer] = []
        with torch.no_grad():
            for layer in layers:
                att = layer.self_attn
                if any(getattr(att, n).bias is not None for n in ("q_proj", "k_proj", "v_proj", "o_proj")):
                    raise UnsupportedModelError("attention projections with biases are not supported by the "
                                                "compiled decode step; use prunepath.decode")
                w_qkv = torch.cat([att.q_proj.weight, att.k_proj.weight, att.v_proj.weight]).contiguous()
                mlp = layer.mlp
                if isinstance(mlp, PrunePathFFN):
                    self.sparse = True
                    ffn = mlp
                else:
                    w_gu = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).contiguous()
                    ffn = (w_gu, mlp.down_proj.weight)
                kv = dict(device=self.device, dtype=self.dtype)
                self.layers.append(_Layer(layer.input_layernorm.weight, w_qkv, att.o_proj.weight,
                                          layer.post_attention_layernorm.weight, ffn,
                                          torch.zeros(batch, self.n_kv, max_len, hd, **kv),
                                          torch.zeros(batch, self.n_kv, max_len, hd, **kv)))
        self.fast_paths = []
        if self.sparse and self.device.type == "cuda":
            from prunepath.kernels import use_fast_paths

            self.fast_paths = use_fast_paths(model, share_down=True)
        self.model = model
        use_compile = compile and self.device.type == "cuda"
        if use_compile:  # as gpt-fast: tune the generated pointwise / reduction kernels' launch parameters
            import torch._inductor.config as inductor_config

            inductor_config.coordinate_descent_tuning = True
            if hasattr(inductor_config.triton, "enable_pdl"):
                inductor_config.triton.enable_pdl = pdl and torch.cuda.get_device_capability(self.device)[0] >= 9
        wrap = (lambda f: torch.compile(f, fullgraph=True, dynamic=False)) if use_compile else (lambda f: f)
        self._attn, self._dense_ffn, self._head = wrap(attention_block), wrap(dense_ffn), wrap(lm_head)
        self.attention = self._attention_kind(attention)
        self._split = None
        if self.attention == "split":
            from prunepath.kernels.decode_attention import decode_attention

            self._split = decode_attention
            self._norm_qkv, self._attn_out = wrap(norm_qkv), wrap(attention_out)
        self.use_graph = graph and self.device.type == "cuda"
        self.graph = None
        self._graph_key = None
        self.ids = torch.zeros(batch, dtype=torch.long, device=self.device)  # [B] next input token
        self.pos = torch.zeros(1, dtype=torch.long, device=self.device)  # [1] its position
        self.out = torch.zeros(batch, max_len, dtype=torch.long, device=self.device)  # [B, L] generated
        self.zero = torch.zeros(batch, cfg.hidden_size, device=self.device, dtype=self.dtype)
        self.logits = None

    def _attention_kind(self, attention: str) -> str:
        if attention not in ("auto", "split", "sdpa"):
            raise ValueError(f"attention={attention!r}: use 'auto', 'split' or 'sdpa'")
        if attention != "auto":
            return attention
        from prunepath.kernels import HAS_TRITON

        hd = self.cos_t.shape[-1]
        fits = hd >= 16 and hd & (hd - 1) == 0  # the kernel's head tile
        return "split" if self.device.type == "cuda" and HAS_TRITON and fits else "sdpa"

    # ------------------------------------------------------------------ the step
    def _attention(self, layer: _Layer, h: torch.Tensor, f: torch.Tensor):
        if self._split is None:
            return self._attn(h, f, layer.ln1, layer.w_qkv, layer.w_o, layer.ln2, self.cos_t, self.sin_t,
                              layer.k_cache, layer.v_cache, self.pos, self.n_heads, self.n_kv, self.eps)
        h, qkv = self._norm_qkv(h, f, layer.ln1, layer.w_qkv, self.eps)
        a = self._split(qkv, self.cos_t, self.sin_t, layer.k_cache, layer.v_cache, self.pos, self.n_heads)
        return self._attn_out(h, a, layer.w_o, layer.ln2, self.eps)

    def _ffn(self, layer: _Layer, x: torch.Tensor) -> torch.Tensor:
        if isinstance(layer.ffn, tuple):
            return self._dense_ffn(x, *layer.ffn)
        return layer.ffn(x[:, None, :])[:, 0, :]  # the PrunePath FFN module (kernels on CUDA)

    def _step(self) -> None:
        h = self.embed.index_select(0, self.ids)  # [B, D]
        f = self.zero
        for layer in self.layers:
            h, x = self._attention(layer, h, f)
            f = self._ffn(layer, x)
        self.logits, nxt = self._head(h, f, self.w_norm, self.w_head, self.eps)
        self.out.index_copy_(1, self.pos, nxt[:, None])
        self.ids.copy_(nxt)
        self.pos.add_(1)

    def _key(self) -> tuple:
        return tuple(fp.rule_key for fp in self.fast_paths)

    def _capture(self) -> None:
        saved = [t.clone() for t in (self.ids, self.pos, self.out)]
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):  # compile, autotune, build kernel layouts
                self._step()
        torch.cuda.current_stream().wait_stream(s)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._step()
        for t, v in zip((self.ids, self.pos, self.out), saved):
            t.copy_(v)
        self._graph_key = self._key()

    # ------------------------------------------------------------------ public API
    @torch.no_grad()
    def step(self, n: int = 1) -> None:
        """n decode steps from the current token and position (graph replays on CUDA)."""
        for fp in self.fast_paths:
            fp.sync()  # the rule's parameter (tau) into its device tensor, outside the graph
        if self.use_graph and (self.graph is None or self._key() != self._graph_key):
            self._capture()
        for _ in range(n):
            if self.graph is not None:
                self.graph.replay()
            else:
                self._step()

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor) -> None:
        """Feed the prompt [B, T] one token at a time (fills the cache); the next token is then in `ids`."""
        B, T = input_ids.shape
        if B != self.batch:
            raise ValueError(f"prompt batch {B} != the decoder's batch {self.batch}")
        if T >= self.max_len:
            raise ValueError(f"prompt of {T} tokens does not fit the cache of {self.max_len}")
        for layer in self.layers:
            layer.k_cache.zero_()
            layer.v_cache.zero_()
        self.pos.zero_()
        ids = input_ids.to(self.device)
        for t in range(T):
            self.ids.copy_(ids[:, t])
            self.step(1)

    def generate(self, input_ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
        """Greedy continuation [B, new_tokens] of the prompt [B, T]."""
        T = input_ids.shape[1]
        if T + new_tokens > self.max_len:
            raise ValueError(f"{T} prompt + {new_tokens} new tokens exceed the cache of {self.max_len}")
        self.prefill(input_ids)
        self.step(new_tokens - 1)
        return self.out[:, T - 1: T - 1 + new_tokens].cpu()
