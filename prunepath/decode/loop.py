"""KV-cache decode loop with the one-token step captured as a CUDA graph (`prunepath generate`).

Shapes: B batch, T prompt length, V vocabulary, L cache length.

Single-token decode is memory-bound and, for small models, launch-bound: a 30-layer model issues
hundreds of small kernels per token, and Python plus launch overhead can exceed the GPU time. So, as
gpt-fast does:

* the KV cache is a transformers `StaticCache` preallocated for L tokens; its write position is a
  device tensor it advances itself, so a step needs no host value;
* the one-token step (model forward, token choice, bookkeeping) is captured once into a
  `torch.cuda.CUDAGraph` and replayed, with its inputs (token ids, positions) in static buffers;
* the next token is chosen inside the graph (greedy argmax, or sampling with the exponential-race
  trick argmax(p / Exp(1)), temperature in a device tensor) and written straight into the next step's
  input buffer: the loop runs with no host synchronisation until it is done.

The same `Decoder` runs the dense model and the PrunePath model, so the two are compared on one loop.
For a PrunePath model on CUDA it attaches the Triton fast paths (`prunepath.kernels`); tau lives in a
device tensor, so `decoder.set_tau(0.7)` changes a captured graph without re-capture. Prefill (T > 8
rows) runs eagerly and takes the torch FFN path. On a CPU the step runs eagerly (no graph): for Llama-family models
through `prunepath.decode.cpu_step` (weights in the GEMV's fast layout, a static cache, few operations per
layer, PrunePath FFNs reading only their kept experts, dense and PrunePath models on the same code), for
other models through the model's own forward with a transformers DynamicCache and the kept-expert path
behind each PrunePath FFN's hook (`prunepath.decode.cpu_experts`).
"""

from __future__ import annotations

import argparse
import inspect
import time
from dataclasses import dataclass

import torch

from prunepath.ffn.module import prunepath_ffns
from prunepath.routing.control import set_tau


@dataclass(frozen=True)
class DecodeConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    cuda_graph: bool = True  # capture the step (CUDA only)
    fast_path: bool = True  # PrunePath FFNs read only kept experts: Triton kernels (CUDA), cpu_experts (CPU)
    cpu_step: bool = True  # on a CPU, Llama-family models run prunepath.decode.cpu_step, not their own forward
    seed: int = 0


def _cache_kwarg(model) -> str:
    """transformers renamed `past_key_values` to `cache` in 5.2x; use whichever forward takes."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class Decoder:
    """Static-cache decode loop for a transformers causal LM (dense or PrunePath)."""

    def __init__(self, model, max_len: int = 1024, config: DecodeConfig = DecodeConfig()):
        self.model = model.eval()
        self.max_len = max_len
        self.config = config
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.use_graph = config.cuda_graph and self.device.type == "cuda"
        self.cache_kw = _cache_kwarg(model)
        self.fast_paths = []
        self.is_prunepath = bool(prunepath_ffns(model))
        self.use_cpu_step = False
        if self.device.type == "cpu" and config.cpu_step:
            from prunepath.decode.cpu_step import step_unsupported

            self.use_cpu_step = not step_unsupported(model)
        self.cpu_step = None
        if self.is_prunepath and config.fast_path and self.device.type == "cuda":
            from prunepath.kernels import use_fast_paths

            self.fast_paths = use_fast_paths(model, share_down=True)
        elif self.is_prunepath and config.fast_path and self.device.type == "cpu" and not self.use_cpu_step:
            from prunepath.decode.cpu_experts import use_cpu_paths  # reads only the kept experts' weights

            use_cpu_paths(model)
        self.cache = None
        self.batch = None
        self.graphs: dict[bool, torch.cuda.CUDAGraph] = {}  # one per mode: greedy / sampled
        self.sampling = False
        self._rule_keys = None
        self.temperature = torch.ones(1, device=self.device)  # [1], read by the sampled graph
        torch.manual_seed(config.seed)  # the default generator is the one CUDA graphs capture safely

    @property
    def graph(self):
        return self.graphs.get(self.sampling)

    # ------------------------------------------------------------------ buffers and cache
    def _setup(self, batch: int) -> None:
        from transformers import DynamicCache, StaticCache

        if self.use_cpu_step and (self.cpu_step is None or batch != self.batch):
            from prunepath.decode.cpu_step import CPUDecodeStep

            self.cpu_step = CPUDecodeStep(self.model, self.max_len, batch, expert_path=self.config.fast_path)
        if not self.use_graph:  # eager (CPU): a cache as long as the text, so attention reads no empty slots
            fresh = DynamicCache(config=self.model.config)
            if self.cache is not None and batch == self.batch:
                self.cache = fresh
                return
        if self.cache is not None and batch == self.batch:
            self.cache.reset()  # in place: the captured graph keeps pointing at the same tensors
            return
        self.batch = batch
        self.graphs.clear()
        self.cache = fresh if not self.use_graph else StaticCache(config=self.model.config, max_cache_len=self.max_len)
        dev = self.device
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=dev)  # [B, 1] next input token
        self.pos = torch.zeros(batch, 1, dtype=torch.long, device=dev)  # [B, 1] its position
        self.out = torch.zeros(batch, self.max_len, dtype=torch.long, device=dev)  # [B, L] generated
        self.n_out = torch.zeros(1, dtype=torch.long, device=dev)  # [1] tokens written to `out`

    def _forward(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        if self.cpu_step is not None:
            return self.cpu_step(ids, int(pos[0, 0]))  # [B, V]
        out = self.model(input_ids=ids, position_ids=pos, use_cache=True, **{self.cache_kw: self.cache})
        return out.logits[:, -1, :].float()  # [B, V]

    def _choose(self, logits: torch.Tensor) -> torch.Tensor:
        """Next token [B]: greedy, or a sample at `temperature` (no host sync, graph-safe)."""
        if not self.sampling:
            return logits.argmax(-1)
        probs = torch.softmax(logits / self.temperature, dim=-1)  # [B, V]
        race = torch.empty_like(probs).exponential_(1.0)
        return (probs / race).argmax(-1)  # the exponential race samples exactly from probs

    def _step(self) -> None:
        """One decode step on the static buffers (what the graph captures)."""
        logits = self._forward(self.ids, self.pos)
        nxt = self._choose(logits)  # [B]
        self.out.index_copy_(1, self.n_out, nxt[:, None])
        self.n_out.add_(1)
        self.ids.copy_(nxt[:, None])
        self.pos.add_(1)

    def _sync_rules(self) -> None:
        for fp in self.fast_paths:
            fp.sync()
        keys = tuple(fp.rule_key for fp in self.fast_paths)
        if keys != self._rule_keys:
            self.graphs.clear()  # the rule kind is compiled into the kernels: capture again
            self._rule_keys = keys

    def _capture(self) -> None:
        # Warm up on a side stream (Triton compilation, cuBLAS workspaces, kernel layouts), then capture.
        # Warm-up steps write cache slot `pos`, which the real first step rewrites: no effect on output.
        saved = [t.clone() for t in (self.ids, self.pos, self.n_out)]
        lengths = [getattr(layer, "cumulative_length", None) for layer in getattr(self.cache, "layers", [])]
        saved_len = [c.clone() if isinstance(c, torch.Tensor) else None for c in lengths]
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                self._step()
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._step()
        self.graphs[self.sampling] = graph
        for t, v in zip((self.ids, self.pos, self.n_out), saved):
            t.copy_(v)
        for c, v in zip(lengths, saved_len):
            if v is not None:
                c.copy_(v)

    # ------------------------------------------------------------------ public API
    def set_tau(self, tau: float | list[float]) -> None:
        """Change the PrunePath budget (one τ, or one per layer as `prunepath.set_active_fraction(model, f)` sets); a
        captured graph stays valid (each layer's τ is a device tensor)."""
        set_tau(self.model, tau)
        for fp in self.fast_paths:
            fp.sync()

    @torch.no_grad()  # not inference_mode: its tensors refuse later in-place updates (tau)
    def prefill(self, input_ids: torch.Tensor, temperature: float = 0.0, new_tokens: int | None = None) -> None:
        """Reset the cache, run the prompt [B, T] eagerly, and leave the first new token in `ids`."""
        B, T = input_ids.shape
        n = self.config.max_new_tokens if new_tokens is None else new_tokens
        if T + n > self.max_len:
            raise ValueError(f"prompt of {T} tokens + {n} new ones exceeds the cache "
                             f"length {self.max_len}; build the Decoder with a larger max_len")
        self._setup(B)
        self._sync_rules()
        if self.cpu_step is not None:
            self.cpu_step.refresh()  # the weights may have changed since the last call
        self.sampling = temperature > 0
        if self.sampling:
            self.temperature.fill_(float(temperature))
        ids = input_ids.to(self.device)
        pos = torch.arange(T, device=self.device).expand(B, T)
        nxt = self._choose(self._forward(ids, pos))  # [B]
        self.out.zero_()
        self.out[:, 0] = nxt
        self.n_out.fill_(1)
        self.ids.copy_(nxt[:, None])
        self.pos.fill_(T)

    @torch.no_grad()  # not inference_mode: its tensors refuse later in-place updates (tau)
    def decode(self, n_steps: int) -> None:
        """n_steps more tokens after prefill (graph replays on CUDA)."""
        if self.use_graph and self.graph is None and n_steps > 0:
            self._capture()
        if self.cpu_step is not None:
            self.cpu_step.refresh()
        for _ in range(n_steps):
            if self.graph is not None:
                self.graph.replay()
            else:
                self._step()

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int | None = None, temperature: float | None = None,
                 eos_token_id: int | None = None) -> torch.Tensor:
        """Prompt [B, T] -> [B, T + new] token ids (truncated after EOS when every row has one)."""
        n = max_new_tokens if max_new_tokens is not None else self.config.max_new_tokens
        t = self.config.temperature if temperature is None else temperature
        self.prefill(input_ids, temperature=t, new_tokens=n)
        done = 1
        while done < n:  # check EOS every 16 tokens: one host sync per chunk, not per token
            k = min(16, n - done)
            self.decode(k)
            done += k
            if eos_token_id is not None and (self.out[:, :done] == eos_token_id).any(-1).all():
                break
        new = self.out[:, :done].cpu()
        if eos_token_id is not None:
            for b in range(new.shape[0]):
                hit = (new[b] == eos_token_id).nonzero()
                if len(hit):
                    new[b, hit[0, 0] + 1 :] = eos_token_id
        return torch.cat([input_ids.cpu(), new], dim=1)

    def time_decode(self, input_ids: torch.Tensor, n_tokens: int = 128, warmup: int = 8) -> dict:
        """Tokens/s of the decode loop (prefill excluded), median of 3 timed runs, and peak memory."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        runs = []
        for _ in range(3):
            self.prefill(input_ids, new_tokens=n_tokens + warmup + 1)
            self.decode(warmup)
            if self.device.type == "cuda":
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                self.decode(n_tokens)
                b.record()
                b.synchronize()
                runs.append(a.elapsed_time(b) / 1e3)
            else:
                t0 = time.perf_counter()
                self.decode(n_tokens)
                runs.append(time.perf_counter() - t0)
        sec = sorted(runs)[1]
        peak = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None
        return {"tokens_per_s": input_ids.shape[0] * n_tokens / sec, "ms_per_token": 1e3 * sec / n_tokens,
                "peak_memory_bytes": peak, "graph": self.graph is not None, "runs_s": runs}


# ----------------------------------------------------------------------------- CLI
def add_cli(subparsers) -> None:
    p = subparsers.add_parser("generate", help="generate text with the static-cache decode loop",
                              description="Generate with the CUDA-graph decode loop (eager on CPU).")
    p.add_argument("prompt", help="prompt text (a chat template is applied when the tokenizer has one)")
    p.add_argument("--checkpoint", default="default", help="PrunePath checkpoint dir, or 'default'")
    p.add_argument("--dense", action="store_true", help="load the base model only (no PrunePath)")
    p.add_argument("--tau", type=float, default=None, help="cumulative-mass budget (default: checkpoint's)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: bf16 on CUDA)")
    p.add_argument("--no-graph", action="store_true", help="run the step eagerly")
    p.set_defaults(func=run)


def load_for_decode(checkpoint: str, dense: bool, device: str, dtype: torch.dtype):
    """(model, tokenizer) for the decode loop: a PrunePath checkpoint or, with dense, its base model."""
    import prunepath
    from prunepath.models import load_model

    if dense:
        base = prunepath.checkpoint.read_meta(prunepath.checkpoint.checkpoint_folder(checkpoint))["base"]
        return load_model(base, dtype=dtype, device=device)
    return prunepath.load(checkpoint, device=device, dtype=dtype)


def encode_prompt(tokenizer, prompt: str) -> torch.Tensor:
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    else:
        text = prompt
    return tokenizer(text, return_tensors="pt").input_ids  # [1, T]


def run(args: argparse.Namespace) -> int:
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if args.device == "cuda" else torch.float32)
    model, tok = load_for_decode(args.checkpoint, args.dense, args.device, dtype)
    if args.tau is not None and not args.dense:
        set_tau(model, args.tau)
    ids = encode_prompt(tok, args.prompt)
    dec = Decoder(model, max_len=ids.shape[1] + args.max_new_tokens + 8,
                  config=DecodeConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                      cuda_graph=not args.no_graph))
    out = dec.generate(ids, eos_token_id=tok.eos_token_id)
    print(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return 0
