"""Router training: losses move the right way, runs resume exactly, a NaN stops cleanly.

Tiny random Llama (tests/conftest.py: D=64, F=128); converted here with 8 experts of 16 so the
cumulative-mass rule has room to vary. A handful of steps each; the whole module runs in seconds.
"""

import copy
import dataclasses
import json
import os
import shutil
import signal

import pytest
import torch

import prunepath
from prunepath import routing
from prunepath.ffn.module import prunepath_ffns
from prunepath.routing.stats import record
from prunepath.train.config import RoutingLoss, Schedule, Teacher, TrainConfig
from prunepath.train.data import DataConfig
from prunepath.train.losses import routing_losses
from prunepath.train.trainer import STATE_FILE, Trainer, TrainingDiverged, TrainingStopped, train


def _moefy(model, gate="sigmoid", tau=0.9, init="centroid"):
    model.config.prunepath_base = "tiny-llama"  # save() records where the base came from
    cfg = prunepath.MoefyConfig(expert_size=16, rule=routing.CumulativeMass(tau), gate=gate, router_init=init)
    return prunepath.moefy(model, cfg, progress=False)


def _batch(seed=0, b=4, t=16, vocab=128):
    # A learnable toy stream: each sequence repeats a short random motif, so the LM loss can fall.
    g = torch.Generator().manual_seed(seed)
    motif = torch.randint(0, vocab, (b, 4), generator=g)
    ids = motif.repeat(1, t // 4)  # [B, T]
    return ids, torch.ones_like(ids)


def _cfg(**kw):
    base = dict(objective="lm", steps=8, stage1_steps=0, batch_size=4, seq_len=16, lr=5e-2, save_every=4, tau=0.9)
    base.update(kw)
    return TrainConfig.from_flat(base)


def _experts_kept(model, ids) -> float:
    with record(model) as rec, torch.no_grad():
        model(input_ids=ids)
    return rec.stats().mean_experts


def test_lm_loss_decreases(tiny_llama, tmp_path):
    model = _moefy(tiny_llama)
    _, log = train(model, None, _cfg(steps=15, stage1_steps=5), tmp_path, batches=_batch(), progress=False)
    assert [r["stage"] for r in log[:6]] == [1] * 5 + [2]  # stage 1 at τ=1.05, then the target τ
    assert log[0]["tau"] == pytest.approx(1.05) and log[-1]["tau"] == pytest.approx(0.9)
    assert log[-1]["task"] < log[0]["task"] - 0.01
    assert (tmp_path / "prunepath.json").is_file() and (tmp_path / "train_log.json").is_file()


def test_entropy_term_lowers_experts_kept(tiny_llama, tmp_path):
    ids, mask = _batch()
    kept = {}
    for gamma in (0.0, 1.0):
        # zero init: p starts uniform, so τ = 0.9 keeps nearly every expert; a large γ must sharpen p
        model = _moefy(copy.deepcopy(tiny_llama), init="zero")
        cfg = _cfg(steps=10, gamma=gamma, gamma_lb=0.0, lr=1e-2)
        train(model, None, cfg, tmp_path / f"g{gamma}", batches=(ids, mask), progress=False)
        kept[gamma] = _experts_kept(model, ids)
    assert kept[1.0] < kept[0.0] - 0.5, kept


def test_routing_losses_mask_padding():
    z = torch.randn(6, 8)
    mask = torch.tensor([1, 1, 1, 0, 0, 0], dtype=torch.bool)
    ent, lb = routing_losses([z], mask)
    ent_ref, lb_ref = routing_losses([z[:3]], None)
    assert torch.allclose(ent, ent_ref) and torch.allclose(lb, lb_ref)
    # uniform p: entropy log E, load balance exactly 1 (its minimum)
    ent_u, lb_u = routing_losses([torch.zeros(5, 8)], None)
    assert ent_u == pytest.approx(torch.log(torch.tensor(8.0)).item()) and lb_u == pytest.approx(1.0)


def test_resume_reproduces_uninterrupted_run(tiny_llama, tmp_path):
    cfg = _cfg(steps=6, save_every=3, tau_range=(0.5, 0.95))  # τ sampled per batch: the RNG must resume too
    full = _moefy(copy.deepcopy(tiny_llama))
    Trainer(full, None, cfg, tmp_path / "full", progress=False, batches=_batch()).run()

    part = _moefy(copy.deepcopy(tiny_llama))
    Trainer(part, None, cfg, tmp_path / "part", progress=False, batches=_batch()).run(stop_after=3)
    torch.manual_seed(1234)  # whatever happened in between must not matter
    resumed = _moefy(copy.deepcopy(tiny_llama))
    tr = Trainer(resumed, None, cfg, tmp_path / "part", progress=False, batches=_batch())
    log = tr.run(resume=True)
    assert len(log) == 6
    for a, b in zip(prunepath_ffns(full), prunepath_ffns(resumed)):
        assert torch.equal(a.router.weight, b.router.weight)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_finishes_the_step_saves_and_resumes_exactly(tiny_llama, tmp_path, signum):
    cfg = _cfg(steps=6, save_every=100, tau_range=(0.5, 0.95))  # no periodic save before the signal
    full = _moefy(copy.deepcopy(tiny_llama))
    Trainer(full, None, cfg, tmp_path / "full", progress=False, batches=_batch()).run()

    part = _moefy(copy.deepcopy(tiny_llama))
    tr = Trainer(part, None, cfg, tmp_path / "part", progress=False, batches=_batch())
    step = tr._lm_step

    def signalled(i, tau):  # the signal lands in the middle of the third step
        if i == 2:
            os.kill(os.getpid(), signum)
        return step(i, tau)

    tr._lm_step = signalled
    before = signal.getsignal(signum)
    with pytest.raises(TrainingStopped, match=f"{signal.Signals(signum).name} after step 3 of 6.*--resume"):
        tr.run()
    assert signal.getsignal(signum) is before  # the handler is put back
    assert torch.load(tmp_path / "part" / STATE_FILE, weights_only=False)["step"] == 3
    resumed = _moefy(copy.deepcopy(tiny_llama))
    log = Trainer(resumed, None, cfg, tmp_path / "part", progress=False, batches=_batch()).run(resume=True)
    assert [r["step"] for r in log] == list(range(1, 7))
    for a, b in zip(prunepath_ffns(full), prunepath_ffns(resumed)):
        assert torch.equal(a.router.weight, b.router.weight)


def test_resume_refuses_other_settings(tiny_llama, tmp_path):
    model = _moefy(tiny_llama)
    Trainer(model, None, _cfg(steps=2, save_every=1), tmp_path, progress=False, batches=_batch()).run()
    tr = Trainer(model, None, _cfg(steps=2, save_every=1, lr=1e-3), tmp_path, progress=False, batches=_batch())
    with pytest.raises(ValueError, match="other settings.*lr"):
        tr.run(resume=True)


def test_resume_may_extend_the_run_but_not_cut_it_below_the_saved_step(tiny_llama, tmp_path):
    model = _moefy(tiny_llama)
    Trainer(model, None, _cfg(steps=4, save_every=2), tmp_path, progress=False, batches=_batch()).run(stop_after=2)
    log = Trainer(model, None, _cfg(steps=3, save_every=1), tmp_path, progress=False, batches=_batch())
    with pytest.raises(ValueError, match="other settings.*save_every"):
        log.run(resume=True)
    log = Trainer(model, None, _cfg(steps=5, save_every=2), tmp_path, progress=False, batches=_batch()).run(resume=True)
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5]  # constant learning rate: more steps, same first two
    with pytest.raises(ValueError, match="at step 5, past the 3 steps now asked for"):
        Trainer(model, None, _cfg(steps=3, save_every=2), tmp_path, progress=False, batches=_batch()).run(resume=True)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_llama, tmp_path):
    model = _moefy(tiny_llama)
    tr = Trainer(model, None, _cfg(steps=6, save_every=2), tmp_path, progress=False, batches=_batch())
    tr.run(stop_after=2)
    saved = (tmp_path / "prunepath.safetensors").read_bytes(), (tmp_path / STATE_FILE).read_bytes()
    tr.cfg = tr.cfg.replace_flat(gamma=float("nan"))  # the next loss is NaN
    with pytest.raises(TrainingDiverged, match="step 2.*kept"):
        tr.run()
    assert (tmp_path / "prunepath.safetensors").read_bytes() == saved[0]
    assert (tmp_path / STATE_FILE).read_bytes() == saved[1]
    assert tr.state.step == 2


def test_distill_fits_expert_norms(tiny_llama, tmp_path):
    model = _moefy(tiny_llama, gate="one")
    ids = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(0))
    cfg = TrainConfig(objective="distill",
                      schedule=Schedule(steps=40, lr=3e-2, save_every=40),
                      data=DataConfig(batch_size=2, seq_len=16))
    _, log = train(model, None, cfg, tmp_path, batches=(ids, torch.ones_like(ids)), progress=False)
    assert log[-1]["task"] < 0.7 * log[0]["task"]
    # the trained router ranks experts like the true norms more often than chance
    f = prunepath_ffns(model)[0]
    x = torch.randn(64, 64)
    agree = (f.router(x).argmax(-1) == f.expert_norms(x).argmax(-1)).float().mean()
    assert agree > 1 / f.n_experts


def test_lora_saves_adapter_that_load_merges(tiny_llama, tmp_path):
    base = copy.deepcopy(tiny_llama)
    fresh = [copy.deepcopy(tiny_llama) for _ in range(2)]
    for m in fresh:
        m.config.prunepath_base = "tiny-llama"
    model = _moefy(tiny_llama)
    cfg = _cfg(trainable="lora", steps=2, save_every=2, backbone_lr=1e-2)
    trained, _ = train(model, None, cfg, tmp_path, batches=_batch(), progress=False)
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    base.config.prunepath_base = "tiny-llama"
    loaded, _ = prunepath.load(tmp_path, base=(base, None))
    ids = _batch()[0]
    with torch.no_grad():
        assert torch.allclose(trained(input_ids=ids).logits, loaded(input_ids=ids).logits, atol=1e-4)
    # adapter=False: the routers on the untouched base; the hand merge equals peft's own merge
    from peft import PeftModel

    plain, _ = prunepath.load(tmp_path, base=(fresh[0], None), adapter=False)
    with torch.no_grad():
        assert not torch.allclose(plain(input_ids=ids).logits, loaded(input_ids=ids).logits, atol=1e-4)
        via_peft = PeftModel.from_pretrained(plain, tmp_path / "adapter").merge_and_unload()
        assert torch.allclose(via_peft(input_ids=ids).logits, loaded(input_ids=ids).logits, atol=1e-5)
    (tmp_path / "adapter" / "adapter_model.safetensors").write_bytes(b"junk")
    with pytest.raises(prunepath.CheckpointError, match="adapter.*corrupt"):
        prunepath.load(tmp_path, base=(fresh[1], None))


def test_decay_brings_every_learning_rate_linearly_to_zero(tiny_llama, tmp_path):
    cfg = _cfg(trainable="lora", steps=6, decay_steps=4, lr=1e-2, backbone_lr=1e-3, save_every=3)
    assert [cfg.lr_scale(s) for s in range(6)] == [1.0, 1.0, 1.0, 0.75, 0.5, 0.25]
    tr = Trainer(_moefy(tiny_llama), None, cfg, tmp_path, progress=False, batches=_batch())
    seen = []
    step = tr.opt.step

    def spy(*a, **kw):  # the rates the optimizer actually steps with
        seen.append([g["lr"] for g in tr.opt.param_groups])
        return step(*a, **kw)

    tr.opt.step = spy
    log = tr.run()
    assert [r["lr_scale"] for r in log] == [1.0, 1.0, 1.0, 0.75, 0.5, 0.25]
    assert seen == [pytest.approx([1e-2 * f, 1e-3 * f]) for f in (1.0, 1.0, 1.0, 0.75, 0.5, 0.25)]


def test_resume_may_reschedule_the_decay_only_before_it_began(tiny_llama, tmp_path):
    model = _moefy(tiny_llama)
    Trainer(model, None, _cfg(steps=6, decay_steps=2, save_every=2), tmp_path, progress=False,
            batches=_batch()).run(stop_after=4)
    # at step 4 of 6, decaying from step 4: nothing decayed yet, so a longer run with a longer decay may follow
    log = Trainer(model, None, _cfg(steps=8, decay_steps=3, save_every=2), tmp_path, progress=False,
                  batches=_batch()).run(stop_after=6)
    assert [r["lr_scale"] for r in log] == [1.0] * 6  # steps 5 and 6 of the new schedule: still constant
    with pytest.raises(ValueError, match="inside a learning-rate decay"):  # step 6 > the new schedule's start 5
        Trainer(model, None, _cfg(steps=8, decay_steps=2, save_every=2), tmp_path, progress=False,
                batches=_batch()).run(resume=True)
    log = Trainer(model, None, _cfg(steps=8, decay_steps=3, save_every=2), tmp_path, progress=False,
                  batches=_batch()).run(resume=True)
    assert [r["lr_scale"] for r in log][5:] == [1.0, pytest.approx(2 / 3), pytest.approx(1 / 3)]


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="objective"):
        TrainConfig(objective="rl")
    with pytest.raises(ValueError, match="tau"):
        TrainConfig(routing=RoutingLoss(tau=0))
    with pytest.raises(ValueError, match="routers only"):
        TrainConfig(objective="distill", trainable="lora")
    with pytest.raises(ValueError, match="tau_range"):
        TrainConfig(routing=RoutingLoss(tau_range=(0.9, 0.5)))
    with pytest.raises(ValueError, match="decay_steps"):
        TrainConfig(schedule=Schedule(steps=10, decay_steps=11))


def test_resume_refuses_another_base_model(tiny_llama, tmp_path):
    from transformers import LlamaForCausalLM

    Trainer(
        _moefy(copy.deepcopy(tiny_llama)), None, _cfg(steps=2, save_every=1), tmp_path, progress=False, batches=_batch()
    ).run(stop_after=1)
    torch.manual_seed(99)  # same architecture, other weights: another base model
    other = _moefy(LlamaForCausalLM(tiny_llama.config).eval())
    tr = Trainer(other, None, _cfg(steps=2, save_every=1), tmp_path, progress=False, batches=_batch())
    with pytest.raises(ValueError, match="another base model"):
        tr.run(resume=True)


def test_unknown_training_data_is_refused_before_loading_anything():
    with pytest.raises(ValueError, match="unknown training data 'nope'.*sst2"):
        TrainConfig(data=DataConfig(source="nope"))


# ---------------------------------------------------------------------------------------------------------
# the dense teacher (--teacher dense): KL(dense model ‖ sparse model)


def test_kd_loss_is_zero_for_equal_distributions_and_positive_otherwise():
    from prunepath.train.losses import kd_loss

    z = torch.randn(5, 11)
    assert kd_loss(z, torch.log_softmax(z, -1)).item() == pytest.approx(0.0, abs=1e-6)
    assert kd_loss(z, torch.log_softmax(z.flip(-1), -1)).item() > 0.01
    with pytest.raises(ValueError, match="differ"):
        kd_loss(z, z[:, :5])


@pytest.mark.parametrize("trainable", ["router", "lora", "all"])
def test_teacher_is_the_dense_base_model(tiny_llama, tmp_path, trainable):
    # At τ > 1 with unit gates the student is the base model, so the first KL is 0 whatever is trained;
    # at a sparse τ it is positive, and cross-entropy is still logged next to it.
    ids, mask = _batch()
    with torch.no_grad():
        want = torch.log_softmax(tiny_llama(input_ids=ids).logits, -1)  # [B, T, V] the base model
    model = _moefy(copy.deepcopy(tiny_llama), gate="one")
    cfg = _cfg(teacher="dense", trainable=trainable, steps=1, tau=1.05, backbone_lr=1e-2)
    tr = Trainer(model, None, cfg, tmp_path, progress=False, batches=(ids, mask))
    assert torch.allclose(tr._teacher_logprobs(ids, mask), want.reshape(-1, want.shape[-1]), atol=1e-5)
    parts = tr._lm_step(0, 1.05)
    assert parts["kd"].item() == pytest.approx(0.0, abs=1e-7) and parts["ce"].item() > 1.0
    assert tr._lm_step(0, 0.3)["kd"].item() > 1e-5  # a random tiny model: near-uniform logits, small KL


def test_teacher_stays_the_base_model_while_every_weight_trains(tiny_llama, tmp_path):
    ids, mask = _batch()
    with torch.no_grad():
        want = torch.log_softmax(tiny_llama(input_ids=ids).logits, -1).reshape(-1, 128)
    model = _moefy(copy.deepcopy(tiny_llama), gate="one")
    cfg = _cfg(teacher="dense", trainable="all", steps=10, tau=0.6, lr=1e-3, backbone_lr=1e-4)
    tr = Trainer(model, None, cfg, tmp_path, progress=False, batches=(ids, mask))
    log = tr.run()
    assert log[-1]["kd"] < 0.5 * log[0]["kd"]  # the sparse model moves towards the dense distribution
    assert torch.allclose(tr._teacher_logprobs(ids, mask), want, atol=1e-5)  # and the teacher did not move


def test_kd_weight_mixes_kl_and_cross_entropy(tiny_llama, tmp_path):
    model = _moefy(tiny_llama, gate="one")
    tr = Trainer(model, None, _cfg(teacher="dense", kd_weight=0.25), tmp_path, progress=False, batches=_batch())
    p = tr._lm_step(0, 0.5)
    assert p["task"].item() == pytest.approx(0.25 * p["kd"].item() + 0.75 * p["ce"].item(), rel=1e-5)


def test_teacher_settings_are_checked():
    with pytest.raises(ValueError, match="teacher must be"):
        TrainConfig(teacher=Teacher(kind="big"))
    with pytest.raises(ValueError, match="lm objective"):
        TrainConfig(objective="distill", teacher=Teacher(kind="dense"))
    with pytest.raises(ValueError, match="kd_weight"):
        TrainConfig(objective="lm", teacher=Teacher(kind="dense", kd_weight=1.5))


@pytest.mark.slow
def test_mixed_training_data_takes_half_from_each_source(default_model):
    from prunepath.train.data import training_batches

    tokenizer = default_model[1]
    cfg = DataConfig(source="calibration+alpaca", tokens=2048, seq_len=64)
    ids, mask = training_batches(tokenizer, cfg)
    lm_ids, _ = training_batches(tokenizer, dataclasses.replace(cfg, source="calibration", tokens=1024))
    al_ids, al_mask = training_batches(tokenizer, dataclasses.replace(cfg, source="alpaca", tokens=1024))
    assert torch.equal(ids, torch.cat([lm_ids, al_ids])) and torch.equal(mask[len(lm_ids) :], al_mask)
    with pytest.raises(ValueError, match="unknown training data 'nope'"):
        TrainConfig(data=DataConfig(source="calibration+nope"))


def test_unit_gates_warn_that_routers_get_no_task_gradient(tiny_llama, tmp_path):
    import warnings

    with pytest.warns(UserWarning, match="no gradient.*--lr 0"):
        Trainer(_moefy(copy.deepcopy(tiny_llama), gate="one"), None, _cfg(), tmp_path / "a", batches=_batch())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # frozen routers, or sigmoid gates: nothing to warn about
        Trainer(_moefy(copy.deepcopy(tiny_llama), gate="one"), None, _cfg(lr=0.0), tmp_path / "b", batches=_batch())
        Trainer(_moefy(copy.deepcopy(tiny_llama), gate="sigmoid"), None, _cfg(), tmp_path / "c", batches=_batch())


def test_router_training_from_an_adapted_checkpoint_keeps_its_adapter(tiny_llama, tmp_path):
    fresh = [copy.deepcopy(tiny_llama) for _ in range(4)]
    for m in fresh:
        m.config.prunepath_base = "tiny-llama"
    model = _moefy(tiny_llama, gate="one")
    train(model, None, _cfg(trainable="lora", steps=2, save_every=2, backbone_lr=1e-2), tmp_path / "a",
          batches=_batch(), progress=False)
    adapted, _ = prunepath.load(tmp_path / "a", base=(fresh[0], None))
    routers, log = train(adapted, None, _cfg(objective="distill", steps=3, save_every=3), tmp_path / "b",
                         batches=_batch(), progress=False)
    assert (tmp_path / "b" / "adapter" / "adapter_model.safetensors").is_file()
    again, _ = prunepath.load(tmp_path / "b", base=(fresh[1], None))
    ids = _batch()[0]
    with torch.no_grad():
        assert torch.allclose(routers(input_ids=ids).logits, again(input_ids=ids).logits, atol=1e-5)
    with pytest.raises(ValueError, match="already carries a LoRA adapter"):
        Trainer(prunepath.load(tmp_path / "a", base=(fresh[2], None))[0], None, _cfg(trainable="lora"),
                tmp_path / "c", batches=_batch(), progress=False)


def test_continue_adapter_trains_the_saved_adapter_further(tiny_llama, tmp_path):
    bases = [copy.deepcopy(tiny_llama) for _ in range(5)]
    for m in bases:
        m.config.prunepath_base = "tiny-llama"
    model = _moefy(tiny_llama, gate="one")
    lora = dict(trainable="lora", lr=0.0, backbone_lr=1e-2, lora_targets="all")
    train(model, None, _cfg(steps=2, save_every=2, **lora), tmp_path / "a", batches=_batch(), progress=False)
    ids = _batch()[0]
    first, _ = prunepath.load(tmp_path / "a", base=(bases[0], None))
    plain, _ = prunepath.load(tmp_path / "a", base=(bases[1], None), adapter=False)
    cfg = _cfg(steps=3, save_every=3, lora_init=str(tmp_path / "a" / "adapter"), teacher="dense", **lora)
    tr = Trainer(plain, None, cfg, tmp_path / "b", progress=False, batches=_batch())
    with torch.no_grad():  # step 0 of the continued run is the saved adapter, not a fresh (zero) one
        assert torch.allclose(tr.model(input_ids=ids).logits, first(input_ids=ids).logits, atol=1e-4)
    tr.run()
    again, _ = prunepath.load(tmp_path / "b", base=(bases[2], None))
    with torch.no_grad():
        assert not torch.allclose(again(input_ids=ids).logits, first(input_ids=ids).logits, atol=1e-4)
    info = prunepath.read_meta(tmp_path / "b")["train"]
    assert info["steps"] == 3 and [r["steps"] for r in info["previous"]] == [2]  # the lineage is kept
    with pytest.raises(ValueError, match="rank 8.*rank 4.*--lora-r of at least 8"):
        Trainer(prunepath.load(tmp_path / "a", base=(bases[3], None), adapter=False)[0], None,
                cfg.replace_flat(lora_r=4), tmp_path / "c", batches=_batch())
    with pytest.raises(ValueError, match="no adapter_config.json"):
        _cfg(trainable="lora", lora_init=str(tmp_path))
    with pytest.raises(ValueError, match="needs trainable='lora'"):
        _cfg(lora_init=str(tmp_path / "a" / "adapter"))


def test_continue_adapter_grows_its_rank_exactly_and_saves_bf16(tiny_llama, tmp_path):
    from safetensors.torch import load_file

    bases = [copy.deepcopy(tiny_llama) for _ in range(5)]
    for m in bases:
        m.config.prunepath_base = "tiny-llama"
    lora = dict(trainable="lora", lr=0.0, backbone_lr=1e-2, lora_targets="all")
    train(_moefy(tiny_llama, gate="one"), None, _cfg(steps=2, save_every=2, **lora), tmp_path / "a",
          batches=_batch(), progress=False)
    ids = _batch()[0]
    first, _ = prunepath.load(tmp_path / "a", base=(bases[0], None))
    plain, _ = prunepath.load(tmp_path / "a", base=(bases[1], None), adapter=False)
    cfg = _cfg(steps=2, save_every=2, lora_init=str(tmp_path / "a" / "adapter"), adapter_dtype="bf16",
               **{**lora, "lora_r": 12})
    tr = Trainer(plain, None, cfg, tmp_path / "b", progress=False, batches=_batch())
    with torch.no_grad():  # the grown adapter computes what the rank-8 one did
        assert torch.allclose(tr.model(input_ids=ids).logits, first(input_ids=ids).logits, atol=1e-5)
    new_a = [p for n, p in tr.model.named_parameters() if n.endswith("lora_A.default.weight")]
    assert new_a and all(p.shape[0] == 12 and p.requires_grad and p[8:].abs().sum() > 0 for p in new_a)
    tr.run()
    saved = json.loads((tmp_path / "b" / "adapter" / "adapter_config.json").read_text())
    assert (saved["r"], saved["lora_alpha"]) == (12, 24)  # α/r kept at the rank-8 adapter's 16/8
    tensors = load_file(tmp_path / "b" / "adapter" / "adapter_model.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    b_new = [t[:, 8:] for k, t in tensors.items() if "lora_B" in k]
    assert any(t.abs().sum() > 0 for t in b_new)  # the added directions trained
    trained = tr.model(input_ids=ids).logits.detach()
    again, _ = prunepath.load(tmp_path / "b", base=(bases[2], None))
    shutil.copytree(tmp_path / "b", tmp_path / "b32")
    tr.model.save_pretrained(tmp_path / "b32" / "adapter")  # the same adapter in fp32
    exact, _ = prunepath.load(tmp_path / "b32", base=(copy.deepcopy(bases[3]), None))
    with torch.no_grad():
        assert torch.allclose(exact(input_ids=ids).logits, trained, atol=1e-5)
        err = (again(input_ids=ids).logits - trained).abs().mean()  # bf16 rounds the adapter by ~0.4 %
    assert 0 < err < 0.01 * trained.abs().mean()
    with pytest.raises(ValueError, match="rank 8.*rank 4.*at least 8"):
        Trainer(prunepath.load(tmp_path / "a", base=(bases[3], None), adapter=False)[0], None,
                cfg.replace_flat(lora_r=4), tmp_path / "c", batches=_batch())
    with pytest.raises(ValueError, match="adapter_dtype"):
        _cfg(adapter_dtype="fp16")
    from safetensors.torch import save_file

    bad = load_file(tmp_path / "a" / "adapter" / "adapter_model.safetensors")
    key = next(k for k in bad if "lora_A" in k)
    bad[key] = bad[key][:, :-1].contiguous()  # an A for a narrower model
    shutil.copytree(tmp_path / "a" / "adapter", tmp_path / "bad")
    save_file(bad, tmp_path / "bad" / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="does not fit this model"):
        Trainer(prunepath.load(tmp_path / "a", base=(bases[4], None), adapter=False)[0], None,
                cfg.replace_flat(lora_init=str(tmp_path / "bad")), tmp_path / "d", batches=_batch())


def test_keep_every_keeps_loadable_snapshots(tiny_llama, tmp_path):
    bases = [copy.deepcopy(tiny_llama) for _ in range(2)]
    for m in bases:
        m.config.prunepath_base = "tiny-llama"
    model = _moefy(tiny_llama)
    cfg = _cfg(trainable="lora", steps=4, save_every=1, keep_every=2, backbone_lr=1e-2)
    tr = Trainer(model, None, cfg, tmp_path, progress=False, batches=_batch())
    tr.run(stop_after=2)
    ids = _batch()[0]
    with torch.no_grad():
        at_2 = model(input_ids=ids).logits
    tr.run(resume=False)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-000002", "step-000004"]
    snap = tmp_path / "step-000002"
    assert not (snap / STATE_FILE).exists() and (snap / "adapter" / "adapter_config.json").is_file()
    loaded, _ = prunepath.load(snap, base=(bases[0], None))
    final, _ = prunepath.load(tmp_path, base=(bases[1], None))
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, at_2, atol=1e-4)  # step 2's weights, not the last
        assert not torch.allclose(final(input_ids=ids).logits, at_2, atol=1e-4)
    with pytest.raises(ValueError, match="multiple of save_every"):
        TrainConfig(schedule=Schedule(save_every=4, keep_every=6))
