"""8-bit adapter storage: twice the LoRA rank in the bytes of bf16, read back by prunepath alone."""

import copy

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import prunepath
from prunepath import routing
from prunepath.adapter import ADAPTER_FILE, INT8_ADAPTER_FILE, adapter_tensors, peft_readable, quantize_rows
from prunepath.train.config import TrainConfig
from prunepath.train.extract import extract_adapter
from prunepath.train.trainer import Trainer, train


def _moefy(model):
    model.config.prunepath_base = "tiny-llama"
    cfg = prunepath.MoefyConfig(expert_size=16, rule=routing.CumulativeMass(0.9), gate="one", router_init="centroid")
    return prunepath.moefy(model, cfg, progress=False)


def _bases(tiny, n):
    out = [copy.deepcopy(tiny) for _ in range(n)]
    for m in out:
        m.config.prunepath_base = "tiny-llama"
    return out


def _batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 128, (4, 4), generator=g).repeat(1, 4)
    return ids, torch.ones_like(ids)


def _lora(**kw):
    base = dict(objective="lm", trainable="lora", lora_targets="all", steps=2, stage1_steps=0, batch_size=4,
                seq_len=16, lr=0.0, backbone_lr=1e-2, save_every=2, tau=0.9)
    return TrainConfig.from_flat({**base, **kw})


def test_quantize_rows_errs_by_at_most_half_a_step_per_row():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(6, 40, generator=g) * torch.logspace(-3, 1, 6)[:, None]  # rows of very different scales
    t[2] = 0.0
    q, scale = quantize_rows(t)
    assert q.dtype == torch.int8 and scale.dtype == torch.float16 and scale.shape == (6,)
    back = q.float() * scale.float()[:, None]
    step = scale.float()[:, None]
    assert ((back - t).abs() <= 0.5 * step + 1e-7).all()
    assert scale[2] == 0 and back[2].abs().sum() == 0
    assert (q.abs().amax(dim=1)[[0, 1, 3, 4, 5]] >= 126).all()  # each row's range is used


def test_an_int8_adapter_is_half_of_bf16_and_loads_and_trains_on(tiny_llama, tmp_path):
    bases = _bases(tiny_llama, 6)
    ids = _batch()[0]
    for dtype in ("fp32", "int8"):  # the same run twice (same seed, same batches), saved two ways
        train(_moefy(copy.deepcopy(tiny_llama)), None, _lora(adapter_dtype=dtype), tmp_path / dtype, batches=_batch(),
              progress=False)
    folder = tmp_path / "int8" / "adapter"
    assert (folder / INT8_ADAPTER_FILE).is_file() and not (folder / ADAPTER_FILE).exists()  # peft cannot misread it
    with safe_open(folder / INT8_ADAPTER_FILE, framework="pt") as f:
        assert f.metadata()["prunepath_quant"] == "int8-rowwise"
    exact = load_file(tmp_path / "fp32" / "adapter" / ADAPTER_FILE)
    stored = adapter_tensors(folder)
    assert stored.keys() == exact.keys()
    for k, v in stored.items():  # within half a step of its row's scale
        assert ((v - exact[k]).abs().amax(dim=1) <= exact[k].abs().amax(dim=1) / 254 * 1.01 + 1e-7).all()
    payload = sum(t.numel() * t.element_size() for t in load_file(folder / INT8_ADAPTER_FILE).values())
    bf16 = sum(2 * t.numel() for t in exact.values())
    assert payload == bf16 // 2 + 2 * sum(t.shape[0] for t in exact.values())  # 1 byte an entry, 2 a row's scale

    with torch.no_grad():
        want = prunepath.load(tmp_path / "fp32", base=(bases[5], None))[0](input_ids=ids).logits
        loaded, _ = prunepath.load(tmp_path / "int8", base=(bases[0], None))
        err = (loaded(input_ids=ids).logits - want).abs().mean()
        assert 0 < err < 0.01 * want.abs().mean()
        from peft import PeftModel

        plain, _ = prunepath.load(tmp_path / "int8", base=(bases[1], None), adapter=False)
        with peft_readable(folder) as readable:  # a float copy that peft loads: the same model
            assert readable != folder and (readable / ADAPTER_FILE).is_file()
            via_peft = PeftModel.from_pretrained(plain, readable).merge_and_unload()
        torch.testing.assert_close(via_peft(input_ids=ids).logits, loaded(input_ids=ids).logits, atol=1e-5, rtol=1e-5)

    plain, _ = prunepath.load(tmp_path / "int8", base=(bases[2], None), adapter=False)
    cfg = _lora(lora_init=str(folder), adapter_dtype="int8", lora_r=8)
    tr = Trainer(plain, None, cfg, tmp_path / "c", progress=False, batches=_batch())
    with torch.no_grad():  # it trains on from the de-quantised values
        torch.testing.assert_close(tr.model(input_ids=ids).logits, loaded(input_ids=ids).logits, atol=1e-5,
                                   rtol=1e-5)
    tr.run()
    assert (tmp_path / "c" / "adapter" / INT8_ADAPTER_FILE).is_file()
    plain, _ = prunepath.load(tmp_path / "int8", base=(bases[3], None), adapter=False)
    grown = Trainer(plain, None, cfg.replace_flat(lora_r=16), tmp_path / "d", progress=False,
                    batches=_batch())
    with torch.no_grad():  # grown from rank 8 to 16 without changing what it computes
        torch.testing.assert_close(grown.model(input_ids=ids).logits, loaded(input_ids=ids).logits, atol=1e-5,
                                   rtol=1e-5)


def test_a_damaged_int8_adapter_is_refused(tiny_llama, tmp_path):
    bases = _bases(tiny_llama, 3)
    train(_moefy(tiny_llama), None, _lora(adapter_dtype="int8"), tmp_path / "a", batches=_batch(), progress=False)
    path = tmp_path / "a" / "adapter" / INT8_ADAPTER_FILE
    good = load_file(path)
    no_scale = {k: v for k, v in good.items() if k != next(k for k in good if k.endswith(".scale"))}
    save_file(no_scale, path, metadata={"prunepath_quant": "int8-rowwise"})
    with pytest.raises(prunepath.CheckpointError, match="scales"):
        prunepath.load(tmp_path / "a", base=(bases[0], None))
    save_file(good, path, metadata={"prunepath_quant": "int4-blockwise"})
    with pytest.raises(prunepath.CheckpointError, match="cannot read"):
        prunepath.load(tmp_path / "a", base=(bases[1], None))
    path.write_bytes(b"junk")
    with pytest.raises(prunepath.CheckpointError, match="corrupt"):
        prunepath.load(tmp_path / "a", base=(bases[2], None))


def test_two_adapter_files_are_refused_and_a_float_save_drops_a_stale_8bit_one(tiny_llama, tmp_path):
    bases = _bases(tiny_llama, 2)
    model = _moefy(tiny_llama)
    train(copy.deepcopy(model), None, _lora(adapter_dtype="int8"), tmp_path / "a", batches=_batch(), progress=False)
    train(model, None, _lora(adapter_dtype="bf16"), tmp_path / "b", batches=_batch(), progress=False)
    folder = tmp_path / "a" / "adapter"
    # an older float adapter brought back beside the 8-bit one (a checkout of an older default does this)
    (folder / ADAPTER_FILE).write_bytes((tmp_path / "b" / "adapter" / ADAPTER_FILE).read_bytes())
    with pytest.raises(prunepath.CheckpointError, match="two adapters"):
        prunepath.load(tmp_path / "a", base=(bases[0], None))
    # a float save into a folder that holds an 8-bit file replaces it instead of leaving it to shadow the new one
    (folder / ADAPTER_FILE).unlink()
    (tmp_path / "b" / "adapter" / INT8_ADAPTER_FILE).write_bytes((folder / INT8_ADAPTER_FILE).read_bytes())
    train(_moefy(bases[1]), None, _lora(adapter_dtype="bf16", seed=1), tmp_path / "b", batches=_batch(),
          progress=False)
    assert not (tmp_path / "b" / "adapter" / INT8_ADAPTER_FILE).exists()
    assert (tmp_path / "b" / "adapter" / ADAPTER_FILE).is_file()


def test_extract_int8_fits_twice_the_rank_of_bf16_in_the_same_bytes(tiny_llama, tmp_path):
    model = _moefy(copy.deepcopy(tiny_llama))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.rsplit(".", 2)[-2] in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
                p.add_(0.004 * torch.randn(p.shape, generator=g))
    prunepath.save(model, tmp_path / "ft", full_weights=True)
    bases = _bases(tiny_llama, 5)
    budget = 0.05  # MB
    r16 = extract_adapter(tmp_path / "ft", tmp_path / "x16", size_mb=budget, base=(bases[0], None))["rank"]
    rep = extract_adapter(tmp_path / "ft", tmp_path / "x8", size_mb=budget, adapter_dtype="int8", base=(bases[1], None))
    assert sum(rep["rank"].values()) >= 1.8 * sum(r16.values())
    assert rep["adapter_bytes"] <= budget * 1e6 + 20_000  # the tensors and scales fit; the rest is the header
    assert (tmp_path / "x8" / "adapter" / INT8_ADAPTER_FILE).is_file()
    ids = _batch()[0]
    tuned, _ = prunepath.load(tmp_path / "ft", base=(bases[2], None))
    approx, _ = prunepath.load(tmp_path / "x8", base=(bases[3], None))  # a rank pattern: merged through peft
    plain, _ = prunepath.load(tmp_path / "ft", base=(bases[4], None), full_weights=False)
    with torch.no_grad():
        near = (approx(input_ids=ids).logits - tuned(input_ids=ids).logits).norm()
        far = (plain(input_ids=ids).logits - tuned(input_ids=ids).logits).norm()
    assert 0 < near < far  # the 8-bit adapter carries part of the fine-tune
