"""extract-adapter: a full fine-tune's weight changes as a truncated-SVD LoRA adapter.

Tiny random Llama (tests/conftest.py: D=64, F=128, so every target matrix has rank at most 64).
"""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

import prunepath
from prunepath import routing
from prunepath.cli import main
from prunepath.ffn.module import prunepath_ffns
from prunepath.routing.control import set_tau
from prunepath.train.config import LoraSettings, RoutingLoss, Schedule, Teacher, TrainConfig
from prunepath.train.data import DataConfig
from prunepath.train.extract import extract_adapter, format_report
from prunepath.train.lowrank import (
    allocate_ranks,
    gradient_grams,
    input_grams,
    low_rank,
    output_kept,
    whitened_low_rank,
    whitening,
)
from prunepath.train.trainer import train


def _moefy(model):
    model.config.prunepath_base = "tiny-llama"  # save() records where the base came from
    cfg = prunepath.MoefyConfig(expert_size=16, rule=routing.CumulativeMass(0.9), gate="one", router_init="centroid")
    return prunepath.moefy(model, cfg, progress=False)


def _base(tiny):
    m = copy.deepcopy(tiny)
    m.config.prunepath_base = "tiny-llama"
    return m, None


def _perturbed_fine_tune(tiny, folder, seed):
    """A full-weights checkpoint in `folder`: every target linear layer moved a little at random -> calibration ids."""
    model = _moefy(copy.deepcopy(tiny))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.rsplit(".", 2)[-2] in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
                p.add_(0.004 * torch.randn(p.shape, generator=g))
    prunepath.save(model, folder, full_weights=True)
    return torch.randint(0, 128, (4, 16), generator=g)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_low_rank_is_the_svd_truncation_and_pads_exactly():
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(48, 20, generator=g, dtype=torch.float64).float()
    s = torch.linalg.svdvals(delta.double())
    b, a, kept = low_rank(delta, 5)
    assert b.shape == (48, 5) and a.shape == (5, 20)
    err = float(((delta - b @ a).double() ** 2).sum())  # Eckart-Young: the error is the discarded tail
    assert err == pytest.approx(float((s[5:] ** 2).sum()), rel=1e-4)
    assert kept == pytest.approx(float((s[:5] ** 2).sum() / (s**2).sum()), rel=1e-5)
    assert float(b.norm()) == pytest.approx(float(a.norm()), rel=1e-4)  # S split evenly
    b, a, kept = low_rank(delta, 32)  # above min(out, in) = 20: zero-padded, exact
    assert b.shape == (48, 32) and a[20:].abs().sum() == 0 and kept == pytest.approx(1.0)
    torch.testing.assert_close(b @ a, delta, atol=1e-5, rtol=1e-5)
    assert low_rank(torch.zeros(4, 3), 2)[2] == 1.0


def test_full_rank_extraction_reproduces_the_fine_tune(tiny_llama, tmp_path):
    model = _moefy(copy.deepcopy(tiny_llama))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a fine-tune that moved only the target linear layers
        for name, p in model.named_parameters():
            if name.rsplit(".", 2)[-2] in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
                p.add_(0.004 * torch.randn(p.shape, generator=g))  # init std 0.02
    prunepath.save(model, tmp_path / "ft", full_weights=True)
    tuned, _ = prunepath.load(tmp_path / "ft", base=_base(tiny_llama))
    ids = torch.randint(0, 128, (2, 12), generator=g)

    report = extract_adapter(tmp_path / "ft", tmp_path / "x64", rank=64, adapter_dtype="fp32", base=_base(tiny_llama))
    assert set(report["kept"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert min(report["kept"].values()) > 0.99999 and report["not_carried"] == {}
    assert all(0.05 < c < 0.5 for c in report["change"].values())
    small, _ = prunepath.load(tmp_path / "x64", base=_base(tiny_llama))
    torch.testing.assert_close(_logits(small, ids), _logits(tuned, ids), atol=2e-4, rtol=1e-4)
    for f, t in zip(prunepath_ffns(small), prunepath_ffns(tuned)):  # the fine-tune's routers come along
        torch.testing.assert_close(f.router.state_dict(), t.router.state_dict())

    report = extract_adapter(tmp_path / "ft", tmp_path / "x4", rank=4, base=_base(tiny_llama))
    assert max(report["kept"].values()) < 0.5  # random changes are not low-rank
    cfg = json.loads((tmp_path / "x4" / "adapter" / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"]) == (4, 4)
    assert {t.dtype for t in load_file(tmp_path / "x4" / "adapter" / "adapter_model.safetensors").values()} == {
        torch.bfloat16}
    plain, _ = prunepath.load(tmp_path / "ft", base=_base(tiny_llama), full_weights=False)
    approx, _ = prunepath.load(tmp_path / "x4", base=_base(tiny_llama))
    far, near = (_logits(plain, ids) - _logits(tuned, ids)).norm(), (_logits(approx, ids) - _logits(tuned, ids)).norm()
    assert 0 < near < far  # rank 4 closes part of the gap between the base and the fine-tune
    info = prunepath.read_meta(tmp_path / "x4")["train"]
    assert info["objective"] == "extract-adapter" and set(info["extract"]["rank"].values()) == {4}


@pytest.mark.parametrize("tied", [False, True])
def test_a_trained_fine_tune_reports_what_lora_cannot_carry(tiny_llama, tmp_path, tied):
    if tied:  # SmolLM2 ties lm_head to the embeddings: model.safetensors holds the pair under one name
        tiny_llama.config.tie_word_embeddings = True
        tiny_llama.tie_weights()
    model = _moefy(copy.deepcopy(tiny_llama))
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(2))
    cfg = TrainConfig(objective="lm", trainable="all",
                      schedule=Schedule(steps=3, stage1_steps=0, lr=0.0, backbone_lr=1e-2, save_every=3),
                      data=DataConfig(batch_size=4, seq_len=16),
                      routing=RoutingLoss(tau=0.9))
    train(model, None, cfg, tmp_path / "ft", batches=(ids, torch.ones_like(ids)), progress=False)
    report = extract_adapter(tmp_path / "ft", tmp_path / "x", rank=8, targets="ffn", base=_base(tiny_llama))
    assert set(report["kept"]) == {"gate_proj", "up_proj", "down_proj"}
    moved = report["not_carried"]
    assert any("embed_tokens" in n for n in moved) and any("q_proj" in n for n in moved)
    assert any("lm_head" in n for n in moved) != tied
    assert any("norm" in n for n in moved) and all(c > 0 for c in moved.values())
    info = prunepath.read_meta(tmp_path / "x")["train"]
    assert [r["trainable"] for r in info["previous"]] == ["all"]  # the fine-tune's record is kept
    again = TrainConfig(objective="lm", trainable="lora",
                        lora=LoraSettings(targets="ffn", r=8, init=str(tmp_path / "x" / "adapter")),
                        schedule=Schedule(steps=1, stage1_steps=0, lr=0.0, save_every=1),
                        data=DataConfig(batch_size=4, seq_len=16))
    plain, _ = prunepath.load(tmp_path / "x", base=_base(tiny_llama), adapter=False)
    train(plain, None, again, tmp_path / "y", batches=(ids, torch.ones_like(ids)), progress=False)  # trains further
    assert (tmp_path / "y" / "adapter" / "adapter_model.safetensors").is_file()


def test_bad_input_is_refused_before_anything_is_written(tiny_llama, tmp_path, capsys):
    model = _moefy(copy.deepcopy(tiny_llama))
    prunepath.save(model, tmp_path / "routers")  # no full weights
    code = main(["extract-adapter", "--checkpoint", str(tmp_path / "routers"), "--out", str(tmp_path / "o"),
                 "--rank", "4"])
    assert code == 2 and "not a full fine-tune" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    prunepath.save(model, tmp_path / "ft", full_weights=True)
    with pytest.raises(ValueError, match="positive integer"):
        extract_adapter(tmp_path / "ft", tmp_path / "o", rank=0)
    with pytest.raises(ValueError, match="either a rank"):
        extract_adapter(tmp_path / "ft", tmp_path / "o", rank=4, size_mb=1.0)
    with pytest.raises(ValueError, match="either a rank"):
        extract_adapter(tmp_path / "ft", tmp_path / "o")
    with pytest.raises(ValueError, match="not one rank"):
        extract_adapter(tmp_path / "ft", tmp_path / "o", size_mb=1e-6, base=_base(tiny_llama))
    with pytest.raises(ValueError, match="targets"):
        extract_adapter(tmp_path / "ft", tmp_path / "o", rank=4, targets="mlp")
    with pytest.raises(FileExistsError, match="already holds a checkpoint"):
        extract_adapter(tmp_path / "ft", tmp_path / "routers", rank=4)
    (tmp_path / "ft" / "model.safetensors").write_bytes(b"junk")
    with pytest.raises(prunepath.CheckpointError, match="corrupt"):
        extract_adapter(tmp_path / "ft", tmp_path / "o", rank=4, base=_base(tiny_llama))
    assert not (tmp_path / "o").exists()


def test_allocate_ranks_is_the_best_split_of_the_budget():
    # two kinds: "a" (two matrices, steep spectrum, 10 parameters a rank), "b" (flat, 4 a rank); budget 30
    spectra = {"a": [torch.tensor([4.0, 2.0, 0.5]), torch.tensor([3.0, 1.0])],
               "b": [torch.tensor([1.5, 1.4, 1.3, 1.2])]}
    cost = {"a": 10, "b": 4}
    ranks = allocate_ranks(spectra, cost, budget=30)
    gain = {"a": [25.0, 5.0, 0.25], "b": [2.25, 1.96, 1.69, 1.44]}

    def kept(r):
        return sum(sum(gain[k][: r[k]]) for k in r)

    best = max(({"a": i, "b": j} for i in range(4) for j in range(5) if 10 * i + 4 * j <= 30), key=kept)
    assert ranks == best == {"a": 2, "b": 2}  # brute force agrees
    assert allocate_ranks(spectra, cost, budget=9) == {"a": 0, "b": 2}  # "a" no longer fits
    assert allocate_ranks(spectra, cost, budget=10**6) == {"a": 3, "b": 4}  # never beyond the matrices' rank


def test_a_size_budget_gives_the_layers_that_changed_most_more_rank(tiny_llama, tmp_path):
    model = _moefy(copy.deepcopy(tiny_llama))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # the FFN moved ten times as far as attention
        for name, p in model.named_parameters():
            kind = name.rsplit(".", 2)[-2]
            if kind in ("gate_proj", "up_proj", "down_proj", "q_proj", "k_proj", "v_proj", "o_proj"):
                scale = 0.004 if kind.endswith(("gate_proj", "up_proj", "down_proj")) else 0.0004
                p.add_(scale * torch.randn(p.shape, generator=g))
    prunepath.save(model, tmp_path / "ft", full_weights=True)
    budget = 0.05  # MB of bf16: 25,000 parameters, far below full rank (~70,000 per rank-64 kind pair)
    report = extract_adapter(tmp_path / "ft", tmp_path / "x", size_mb=budget, base=_base(tiny_llama))
    r = report["rank"]
    assert min(r["gate_proj"], r["up_proj"], r["down_proj"]) > max(r["q_proj"], r["k_proj"], r["v_proj"], r["o_proj"])
    assert report["adapter_bytes"] <= budget * 1e6 + 20_000  # the tensors fit; the rest is the file's header
    cfg = json.loads((tmp_path / "x" / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == max(r.values()) and all(cfg["rank_pattern"].get(k, cfg["r"]) == v for k, v in r.items() if v)
    ids = torch.randint(0, 128, (2, 12), generator=g)
    tuned, _ = prunepath.load(tmp_path / "ft", base=_base(tiny_llama))
    plain, _ = prunepath.load(tmp_path / "ft", base=_base(tiny_llama), full_weights=False)
    approx, _ = prunepath.load(tmp_path / "x", base=_base(tiny_llama))  # a rank pattern: merged through peft
    far, near = (_logits(plain, ids) - _logits(tuned, ids)).norm(), (_logits(approx, ids) - _logits(tuned, ids)).norm()
    assert 0 < near < far


def test_trainable_linear_changes_only_what_lora_can_carry(tiny_llama, tmp_path):
    tiny_llama.config.tie_word_embeddings = True  # as SmolLM2
    tiny_llama.tie_weights()
    model = _moefy(copy.deepcopy(tiny_llama))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(4))
    cfg = TrainConfig(objective="lm", trainable="linear",
                      teacher=Teacher(kind="dense"),
                      schedule=Schedule(steps=3, stage1_steps=0, lr=0.0, backbone_lr=1e-2, save_every=3),
                      data=DataConfig(batch_size=4, seq_len=16),
                      routing=RoutingLoss(tau=0.9))
    tuned, _ = train(model, None, cfg, tmp_path / "ft", batches=(ids, torch.ones_like(ids)), progress=False)
    changed = {n for n, p in tuned.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.endswith(("_proj.weight",)) for n in changed)  # no embedding, norm or router moved
    assert prunepath.read_meta(tmp_path / "ft")["full_weights"]
    report = extract_adapter(tmp_path / "ft", tmp_path / "x", rank=64, adapter_dtype="fp32", base=_base(tiny_llama))
    assert report["not_carried"] == {} and min(report["kept"].values()) > 0.99999
    small, _ = prunepath.load(tmp_path / "x", base=_base(tiny_llama))
    torch.testing.assert_close(_logits(small, ids), _logits(tuned, ids), atol=2e-4, rtol=1e-4)


def test_whitened_low_rank_is_the_best_rank_for_the_outputs():
    g = torch.Generator().manual_seed(5)
    delta = torch.randn(40, 24, generator=g, dtype=torch.float64).float()
    x = torch.randn(500, 24, generator=g, dtype=torch.float64) * torch.logspace(0, -2, 24, dtype=torch.float64)
    gram = (x.T @ x / x.shape[0]).float()  # strongly anisotropic inputs
    white = whitening(gram, damp=1e-6)
    s_mat, s_inv = white
    torch.testing.assert_close(s_mat @ s_mat.T, gram, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(s_mat @ s_inv, torch.eye(24), atol=1e-4, rtol=1e-4)
    b, a, kept, out_kept = whitened_low_rank(delta, white, 5)
    sv = torch.linalg.svdvals((delta @ s_mat).double())
    err = float((((delta - b @ a) @ s_mat).double() ** 2).sum())
    assert err == pytest.approx(float((sv[5:] ** 2).sum()), rel=1e-3)  # Eckart-Young on ΔW S
    assert out_kept == pytest.approx(float((sv[:5] ** 2).sum() / (sv**2).sum()), rel=1e-5)
    pb, pa, pkept = low_rank(delta, 5)
    plain_err = float((((delta - pb @ pa) @ s_mat).double() ** 2).sum())
    assert err < 0.5 * plain_err  # the plain SVD keeps directions the inputs hardly take
    assert pkept > kept  # ... which is why it keeps more of ‖ΔW‖²
    torch.testing.assert_close(b.norm(dim=0), a.norm(dim=1), rtol=1e-4, atol=1e-6)  # each component balanced
    b, a, kept, out_kept = whitened_low_rank(delta, white, 30)  # above full rank: exact, zero-padded
    assert b.shape == (40, 30) and a[24:].abs().sum() == 0 and out_kept == pytest.approx(1.0)
    torch.testing.assert_close(b @ a, delta, atol=1e-3, rtol=1e-3)
    assert whitened_low_rank(torch.zeros(4, 24), white, 2)[2:] == (1.0, 1.0)
    with pytest.raises(ValueError, match="damp"):
        whitening(gram, damp=0)


def test_fisher_weighted_low_rank_is_the_best_rank_for_the_loss():
    g = torch.Generator().manual_seed(15)
    delta = torch.randn(40, 24, generator=g, dtype=torch.float64).float()
    x = torch.randn(500, 24, generator=g, dtype=torch.float64) * torch.logspace(0, -2, 24, dtype=torch.float64)
    y = torch.randn(500, 40, generator=g, dtype=torch.float64) * torch.logspace(-2, 0, 40, dtype=torch.float64)
    gram, grad = (x.T @ x / 500).float(), (y.T @ y / 500).float()  # both sides strongly anisotropic
    white, out_white = whitening(gram, damp=1e-6), whitening(grad, damp=1e-6)

    def loss_err(b, a):  # tr(Rᵀ Γ R G): the second-order loss change under the K-FAC Fisher
        r = (delta - b @ a).double()
        return float(torch.trace(r.T @ grad.double() @ r @ gram.double()))

    b, a, kept, loss_kept = whitened_low_rank(delta, white, 5, out_white)
    sv = torch.linalg.svdvals((out_white[0].T @ delta @ white[0]).double())
    assert loss_err(b, a) == pytest.approx(float((sv[5:] ** 2).sum()), rel=1e-3)  # Eckart-Young on Tᵀ ΔW S
    assert loss_kept == pytest.approx(float((sv[:5] ** 2).sum() / (sv**2).sum()), rel=1e-4)
    ob, oa, _, _ = whitened_low_rank(delta, white, 5)  # the outputs alone
    assert loss_err(b, a) < 0.5 * loss_err(ob, oa)
    assert output_kept(delta, ob, oa, white[0]) > output_kept(delta, b, a, white[0])  # ... which keep more output
    torch.testing.assert_close(b.norm(dim=0), a.norm(dim=1), rtol=1e-4, atol=1e-6)
    b, a, _, loss_kept = whitened_low_rank(delta, white, 24, out_white)  # full rank: exact
    torch.testing.assert_close(b @ a, delta, atol=1e-3, rtol=1e-3)
    assert loss_kept == pytest.approx(1.0)


def test_gradient_grams_are_each_layers_output_gradient_second_moment(tiny_llama):
    model = _moefy(copy.deepcopy(tiny_llama))
    ids = torch.randint(0, 128, (3, 10), generator=torch.Generator().manual_seed(16))
    names = {n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] in ("v_proj", "up_proj", "down_proj")}
    rules = [f.rule.spec for f in prunepath_ffns(model)]
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    grads = gradient_grams(model, ids, names, taus=(0.5, 1.05), batch_size=2)
    assert set(grads) == names and [f.rule.spec for f in prunepath_ffns(model)] == rules  # restored
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())  # no parameter gradient was made
    outs = {}  # the same gradients by hand: every output retained, the summed loss over all rows at once

    def keep(name):
        def fn(_m, _a, out):
            out.retain_grad()
            outs[name] = out

        return fn

    hooks = [dict(model.named_modules())[n].register_forward_hook(keep(n)) for n in names]
    seen = {n: [] for n in names}
    for tau in (0.5, 1.05):
        set_tau(model, tau)
        outs.clear()
        logits = model(input_ids=ids).logits[:, :-1]
        torch.nn.functional.cross_entropy(logits.reshape(-1, 128), ids[:, 1:].reshape(-1), reduction="sum").backward()
        for n in names:
            seen[n].append(outs[n].grad.reshape(-1, outs[n].shape[-1]))
    for h in hooks:
        h.remove()
    for n in names:
        gr = torch.cat(seen[n])
        torch.testing.assert_close(grads[n], gr.T @ gr / (2 * 3 * 9), atol=1e-7, rtol=1e-4)
    assert grads["model.layers.1.mlp.up_proj"].shape == (128, 128)


def test_input_grams_are_each_layers_input_second_moment(tiny_llama):
    model = _moefy(copy.deepcopy(tiny_llama))
    ids = torch.randint(0, 128, (3, 10), generator=torch.Generator().manual_seed(6))
    names = {n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "down_proj")}
    rules = [f.rule.spec for f in prunepath_ffns(model)]
    grams = input_grams(model, ids, names, taus=(0.5, 1.05), batch_size=2)
    assert set(grams) == names and [f.rule.spec for f in prunepath_ffns(model)] == rules  # restored
    seen = {}  # the same inputs, captured by hand, one τ after the other
    hooks = [dict(model.named_modules())[n].register_forward_pre_hook(
        lambda m, a, n=n: seen.setdefault(n, []).append(a[0].reshape(-1, a[0].shape[-1]))) for n in names]
    for tau in (0.5, 1.05):
        set_tau(model, tau)
        with torch.no_grad():
            model(input_ids=ids)
    for h in hooks:
        h.remove()
    for n in names:
        x = torch.cat(seen[n])
        torch.testing.assert_close(grams[n], x.T @ x / x.shape[0], atol=1e-5, rtol=1e-4)
    layer0 = "model.layers.0.self_attn."
    torch.testing.assert_close(grams[layer0 + "q_proj"], grams[layer0 + "k_proj"])  # one input, shared
    down = grams["model.layers.0.mlp.down_proj"]
    assert down.shape == (128, 128) and not torch.allclose(down, grams[layer0 + "q_proj"][:1, :1])


def test_whitened_extraction_keeps_more_of_each_layers_output_change(tiny_llama, tmp_path):
    ids = _perturbed_fine_tune(tiny_llama, tmp_path / "ft", seed=7)
    full = extract_adapter(tmp_path / "ft", tmp_path / "w64", rank=64, adapter_dtype="fp32", base=_base(tiny_llama),
                           whiten=ids, taus=(0.6, 1.05))
    assert min(full["output_kept"].values()) > 0.9999 and min(full["kept"].values()) > 0.9999
    assert full["whiten"] == {"tokens": 64, "taus": [0.6, 1.05], "damp": 0.01}
    tuned, _ = prunepath.load(tmp_path / "ft", base=_base(tiny_llama))
    exact, _ = prunepath.load(tmp_path / "w64", base=_base(tiny_llama))
    torch.testing.assert_close(_logits(exact, ids), _logits(tuned, ids), atol=2e-4, rtol=1e-4)

    white = extract_adapter(tmp_path / "ft", tmp_path / "w4", rank=4, base=_base(tiny_llama), whiten=ids,
                            taus=(0.6, 1.05), adapter_dtype="fp32")
    extract_adapter(tmp_path / "ft", tmp_path / "p4", rank=4, base=_base(tiny_llama), adapter_dtype="fp32")
    ref, _ = prunepath.load(tmp_path / "ft", base=_base(tiny_llama))  # the grams, recomputed by hand
    grams = input_grams(ref, ids, {"model.layers.1.mlp.down_proj", "model.layers.0.self_attn.o_proj"}, (0.6, 1.05))
    plain, _ = prunepath.load(tmp_path / "ft", base=_base(tiny_llama), full_weights=False)
    weights = {n: dict(m.named_modules()) for n, m in (("tuned", tuned), ("plain", plain))}
    for module, gram in grams.items():
        delta = (weights["tuned"][module].weight - weights["plain"][module].weight).detach()
        errs = []
        for folder in ("w4", "p4"):
            t = load_file(tmp_path / folder / "adapter" / "adapter_model.safetensors")
            key = f"base_model.model.{module}.lora_"
            approx = t[key + "B.weight"] @ t[key + "A.weight"]
            errs.append(float(torch.trace((delta - approx) @ gram @ (delta - approx).T)))  # E‖(ΔW − BA) x‖²
        assert errs[0] < errs[1]  # whitened beats plain on the inputs it saw
    assert all(0 < v < 1 for v in white["output_kept"].values())
    assert "output change kept" in format_report(white) and "whitened by" in format_report(white)


@pytest.mark.slow  # ~12 s on 2 cores
def test_fisher_extraction_keeps_more_of_each_layers_loss_change(tiny_llama, tmp_path):
    ids = _perturbed_fine_tune(tiny_llama, tmp_path / "ft", seed=17)
    kw = dict(whiten=ids, taus=(0.6, 1.05), adapter_dtype="fp32")  # a fresh base each time: load converts it
    full = extract_adapter(tmp_path / "ft", tmp_path / "f64", rank=64, fisher=0.01, base=_base(tiny_llama), **kw)
    assert min(full["loss_kept"].values()) > 0.9999 and full["whiten"]["fisher"] == 0.01
    fisher = extract_adapter(tmp_path / "ft", tmp_path / "f4", rank=4, fisher=0.01, base=_base(tiny_llama), **kw)
    extract_adapter(tmp_path / "ft", tmp_path / "w4", rank=4, base=_base(tiny_llama), **kw)
    assert all(0 < v < 1 for v in fisher["loss_kept"].values()) and "output_kept" in fisher
    report = format_report(fisher)
    assert "loss-weighted kept" in report and "weighted by the loss's gradients" in report
    tuned, _ = prunepath.load(tmp_path / "ft", base=_base(tiny_llama))
    module = "model.layers.1.mlp.down_proj"
    gram = input_grams(tuned, ids, {module}, (0.6, 1.05))[module]
    grad = gradient_grams(tuned, ids, {module}, (0.6, 1.05))[module]
    plain, _ = prunepath.load(tmp_path / "ft", base=_base(tiny_llama), full_weights=False)
    delta = (dict(tuned.named_modules())[module].weight - dict(plain.named_modules())[module].weight).detach()
    errs = []
    for folder in ("f4", "w4"):
        t = load_file(tmp_path / folder / "adapter" / "adapter_model.safetensors")
        key = f"base_model.model.{module}.lora_"
        r = delta - t[key + "B.weight"] @ t[key + "A.weight"]
        errs.append(float(torch.trace(r.T @ grad @ r @ gram)))  # the K-FAC loss change
    assert errs[0] < errs[1]


def test_whiten_bad_input_is_refused_before_anything_is_written(tiny_llama, tmp_path, capsys):
    model = _moefy(copy.deepcopy(tiny_llama))
    prunepath.save(model, tmp_path / "ft", full_weights=True)
    for bad in (10, torch.zeros(5, dtype=torch.long), True):
        with pytest.raises(ValueError, match="whiten must be"):
            extract_adapter(tmp_path / "ft", tmp_path / "o", rank=4, whiten=bad)
    ids = torch.zeros(1, 8, dtype=torch.long)
    with pytest.raises(ValueError, match="taus"):
        extract_adapter(tmp_path / "ft", tmp_path / "o", rank=4, whiten=ids, taus=())
    with pytest.raises(ValueError, match="damp"):
        extract_adapter(tmp_path / "ft", tmp_path / "o", rank=4, whiten=ids, damp=0.0)
    with pytest.raises(ValueError, match="give whiten too"):
        extract_adapter(tmp_path / "ft", tmp_path / "o", rank=4, fisher=0.01)
    with pytest.raises(ValueError, match="fisher"):
        extract_adapter(tmp_path / "ft", tmp_path / "o", rank=4, whiten=ids, fisher=0.0)
    with pytest.raises(ValueError, match="tokenizer"):  # a count needs the tokenizer, which a bare pair lacks
        extract_adapter(tmp_path / "ft", tmp_path / "o", rank=4, whiten=1024, base=_base(tiny_llama))
    code = main(["extract-adapter", "--checkpoint", str(tmp_path / "ft"), "--out", str(tmp_path / "o"), "--rank", "4",
                 "--whiten", "100"])  # the CLI says so too, before any model loads
    assert code == 2 and "whiten must be" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
