"""Low-bit predictors (a 4-bit copy of the FFN's own gate and up): codec, kernel form, files, recipes, building from
activations, and the engine's predictor mode with them, on tiny random models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from llmflash.arch import adapter_for
from llmflash.cli import main
from llmflash.convert import convert
from llmflash.errors import LLMFlashError
from llmflash.ffn import SparsityRule
from llmflash.models import LoadedModel, predictor_dir
from llmflash.predictor import PredictorSet, apply_recipe, dequantize_lowbit, is_recipe, quantize_lowbit
from predictors.collect import Activations, CollectConfig, collect
from predictors.lowbit import LowBitConfig, build_lowbit

from tiny import engine_generate, save_tiny, tiny_llama, tiny_opt, tiny_tokenizer

TEXT = "\n\n".join(f"Entry {i}: a slow green turtle crosses the road {i * 3} times before noon." * 3 for i in range(40))
RULE = SparsityRule("threshold", (0.02, 0.02, 0.02), 0.8)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMFLASH_CACHE", str(tmp_path / "cache"))


def _weights(model):
    adapter = adapter_for(model.config)
    spec = adapter.ffn_spec(model.config)
    return [adapter.ffn_weights(model, layer) for layer in range(spec.n_layers)], spec.activation


def _meta(model, name="tiny", rule=RULE):
    spec = adapter_for(model.config).ffn_spec(model.config)
    from predictors.collect import rule_to_dict

    return {"model": name, "d_model": spec.d_model, "d_ffn": spec.d_ffn, "rule": rule_to_dict(rule)}


def test_codec_is_the_16_level_grid_within_half_a_step():
    w = torch.randn(48, 128)
    codes, scales = quantize_lowbit(w, 64)
    assert codes.dtype == torch.uint8 and codes.shape == (48, 64) and scales.shape == (48, 2)
    deq = dequantize_lowbit(codes, scales)
    levels = (deq.view(48, 2, 64) / scales.float()[..., None]).flatten()
    assert torch.allclose(levels, torch.round(levels - 0.5) + 0.5, atol=1e-4)  # (c - 7.5): half-integers
    assert levels.abs().max() <= 7.5 + 1e-4
    inside = w.abs().view(48, 2, 64) <= 7.5 * scales.float()[..., None]  # not clipped: at most half a step off
    err = (deq - w).abs().view(48, 2, 64)
    assert bool((err[inside] <= (scales.float()[..., None].expand_as(err)[inside] / 2) + 1e-5).all())
    with pytest.raises(LLMFlashError, match="groups"):
        quantize_lowbit(torch.randn(4, 100), 64)


@pytest.mark.parametrize("make", [tiny_llama, tiny_opt], ids=["llama-silu", "opt"])
def test_engine_form_matches_float_form_and_permutes(make):
    model = make()
    weights, act = _weights(model)
    kernel = PredictorSet.lowbit(weights, act, _meta(model), 64)  # the engine's form (int4 kernel where it applies)
    ref = PredictorSet.lowbit(weights, act, _meta(model), 64, dtype=torch.float32)
    x = torch.randn(6, weights[0].d_model)
    for layer in range(len(weights)):
        a, b = kernel.scores(layer, x), ref.scores(layer, x)
        assert torch.allclose(a, b, rtol=0.05, atol=0.02 * float(b.abs().max()))  # bf16 activations and scales
    assert kernel.nbytes < ref.nbytes / 4  # codes, not float weights
    assert kernel.kind == "lowbit" and kernel.ranks == [0] * len(weights)
    order = [np.random.default_rng(i).permutation(weights[0].n_neurons) for i in range(len(weights))]
    before = [kernel.scores(i, x) for i in range(len(weights))]
    kernel.set_threshold_logit(1, float(before[1].median()))
    ids = kernel.active_ids(1, x[:2])
    kernel.permute_outputs(order)
    for i in range(len(weights)):
        assert torch.equal(kernel.scores(i, x), before[i][:, order[i]])
    assert np.array_equal(np.sort(order[1][kernel.active_ids(1, x[:2])]), ids)  # the same neurons, as file rows


def test_files_round_trip_and_recipes(tmp_path):
    model = tiny_llama()
    weights, act = _weights(model)
    pset = PredictorSet.lowbit(weights, act, _meta(model, str(save_tiny(model, tmp_path / "model"))), 64, dtype=torch.float32)
    pset.pin(0, [3, 5])
    for layer in range(3):
        pset.set_threshold_logit(layer, 0.01 * (layer + 1))
    pset.save(tmp_path / "full")
    back = PredictorSet.load(tmp_path / "full")
    x = torch.randn(4, 64)
    for layer in range(3):
        assert torch.equal(back.predict(layer, x), PredictorSet.load(tmp_path / "full", torch.float32).predict(layer, x)) \
            or (back.predict(layer, x) != pset.predict(layer, x)).float().mean() < 0.02
    assert back.pinned(0) == [3, 5] and bool(back.predict(0, x)[:, [3, 5]].all())
    pset.save(tmp_path / "recipe", with_codes=False)
    assert is_recipe(tmp_path / "recipe") and not (tmp_path / "recipe" / "predictors.safetensors").exists()
    assert (tmp_path / "recipe" / "predictors.json").stat().st_size < 20_000
    with pytest.raises(LLMFlashError, match="recipe"):
        PredictorSet.load(tmp_path / "recipe")
    rebuilt = apply_recipe(json.loads((tmp_path / "recipe" / "predictors.json").read_text()), weights, act)
    built = PredictorSet.load(predictor_dir(tmp_path / "recipe"), torch.float32)  # from the model's weights, cached
    assert predictor_dir(tmp_path / "recipe") == predictor_dir(tmp_path / "recipe")
    for layer in range(3):
        assert torch.equal(rebuilt.scores(layer, x), pset.scores(layer, x))
        assert torch.equal(built.scores(layer, x), pset.scores(layer, x))
        assert built.meta["threshold_logits"][layer] == pset.meta["threshold_logits"][layer]
    with pytest.raises(LLMFlashError, match="low-rank"):
        pset.layer_weights(0)


def test_build_from_activations_reaches_the_recall_target(tmp_path):
    model = tiny_llama()
    lm = LoadedModel(model, tiny_tokenizer(), "tiny-llama")
    collect(lm, [TEXT], "inline", tmp_path / "act", RULE, CollectConfig(max_tokens=4096, seq_len=128), progress=False)
    act = Activations.open(tmp_path / "act")
    pset = build_lowbit(act, lm, LowBitConfig(recall_target=0.95), progress=False)
    for s in pset.meta["layers"]:
        assert s["recall"] >= 0.9 and s["predicted_active_fraction"] < 1.0
        assert s["predicted_active_fraction"] / s["true_active_fraction"] < 2.0  # the rule's own quantity, recomputed
    with pytest.raises(LLMFlashError, match="not those"):
        build_lowbit(act, LoadedModel(tiny_llama(seed=1), tiny_tokenizer(), "other"), progress=False)


def test_cli_builds_and_the_engine_runs_with_them(tmp_path):
    """collect -> train-predictors --kind lowbit -> eval-predictors, then predictor mode in the engine: with every
    neuron predicted it computes exactly what oracle mode computes, with a calibrated cut it reads less."""
    src = save_tiny(tiny_llama(), tmp_path / "model")
    flash = convert(str(src), tmp_path / "flash", progress=False, calibration_tokens=512)
    text = tmp_path / "text.txt"
    text.write_text(TEXT, encoding="utf-8")
    act, pred = tmp_path / "act", tmp_path / "pred"
    assert main(["collect", str(flash), "--text-file", str(text), "--out", str(act), "--max-tokens", "3000",
                 "--seq-len", "128", "--sparsity", "threshold"]) == 0
    assert main(["train-predictors", str(act), "--kind", "lowbit", "--model", str(flash), "--out", str(pred)]) == 0
    meta = json.loads((pred / "predictors.json").read_text())
    assert meta["kind"] == "lowbit" and meta["group_size"] == 64 and all(s["recall"] >= 0.9 for s in meta["layers"])
    out = tmp_path / "eval.json"
    assert main(["eval-predictors", str(flash), "--predictors", str(pred), "--text-file", str(text), "--max-tokens", "512",
                 "--ppl", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["kind"] == "lowbit" and res["recall"] > 0.85 and res["ppl_ratio"] < 1.1
    prompt = torch.tensor([5, 17, 99, 3, 42, 7, 120, 64])
    kw = dict(sparsity="threshold", threshold_sparsity=0.8)
    oracle = engine_generate(flash, prompt, 10, mode="oracle", **kw)
    pset = PredictorSet.load(pred, torch.float32)
    for layer in range(pset.n_layers):
        pset.set_threshold_logit(layer, -1.0)  # z >= 0 > -1: every neuron
    pset.save(tmp_path / "all")
    everything = engine_generate(flash, prompt, 10, mode="predictor", predictors=str(tmp_path / "all"), **kw)
    assert everything.tokens == oracle.tokens
    calibrated = engine_generate(flash, prompt, 10, mode="predictor", predictors=str(pred), **kw)
    needed = lambda r: sum(t.cache_hits + t.cache_misses for t in r.per_token)  # noqa: E731
    assert needed(everything) % (3 * 256) == 0 and needed(calibrated) < needed(everything) / 2
    assert calibrated.dram_breakdown["predictors"] == PredictorSet.load(pred).nbytes


def test_bad_group_size_is_one_line(tmp_path, capsys):
    model = tiny_llama()
    src = save_tiny(model, tmp_path / "model")  # before collect, which swaps the FFN modules
    lm = LoadedModel(model, tiny_tokenizer(), "tiny-llama")
    collect(lm, [TEXT], "inline", tmp_path / "act", RULE, CollectConfig(max_tokens=1024, seq_len=128), progress=False)
    assert main(["train-predictors", str(tmp_path / "act"), "--kind", "lowbit", "--model", str(src), "--out",
                 str(tmp_path / "p"), "--group-size", "48"]) != 0
    err = capsys.readouterr().err
    assert "group-size" in err and "Traceback" not in err
    assert not Path(tmp_path / "p").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on the GPU machine)")
def test_lowbit_predictors_on_cuda(tmp_path):
    """On a GPU the low-bit set is held dequantized (no int4 kernel there): every neuron predicted gives the GPU's
    oracle tokens, a calibrated cut reads fewer neurons, and the budget holds."""
    src = save_tiny(tiny_llama(), tmp_path / "model")
    flash = convert(str(src), tmp_path / "flash", progress=False, calibration_tokens=512)
    from llmflash.models import load_in_memory

    lm = load_in_memory(flash)
    weights, act = _weights(lm.model)
    thresholds = lm.thresholds or {}
    rule = SparsityRule("threshold", tuple(thresholds["0.8"]), 0.8) if "0.8" in thresholds else RULE
    meta = {**_meta(lm.model, lm.name, rule)}
    pset = PredictorSet.lowbit(weights, act, meta, 64, dtype=torch.float32)
    for layer in range(pset.n_layers):
        pset.set_threshold_logit(layer, -1.0)
    pset.save(tmp_path / "all")
    for layer in range(pset.n_layers):
        pset.set_threshold_logit(layer, float(rule.thresholds[layer]))  # the rule's own cut: about the true set
    pset.save(tmp_path / "cut")
    prompt = torch.tensor([5, 17, 99, 3, 42, 7, 120, 64])
    kw = dict(sparsity="threshold", threshold_sparsity=0.8, device="cuda")
    oracle = engine_generate(flash, prompt, 10, mode="oracle", **kw)
    everything = engine_generate(flash, prompt, 10, mode="predictor", predictors=str(tmp_path / "all"), **kw)
    assert everything.tokens == oracle.tokens
    cut = engine_generate(flash, prompt, 10, mode="predictor", predictors=str(tmp_path / "cut"), **kw)
    needed = lambda r: sum(t.cache_hits + t.cache_misses for t in r.per_token)  # noqa: E731
    assert needed(cut) < needed(everything) and cut.dram_breakdown["predictors"] > 0
