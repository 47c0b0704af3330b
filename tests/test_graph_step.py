"""The accelerator's fixed decode step (``llmflash.graph_step``: attention over a static key/value buffer, the
predictor's network with it, one CUDA graph per layer on a GPU) against transformers' modules, on the accelerator's
stand-in path on the CPU (the same body, run eagerly): equal within float32 rounding for OPT and Llama-family layers,
grouped heads, attention biases, a buffer that grows, and sparse modes whose predictor mask comes from the step."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import DynamicCache, Qwen2Config, Qwen2ForCausalLM

from llmflash import graph_step
from llmflash.convert import convert
from llmflash.engine import Engine, EngineConfig
from llmflash.flashdir import open_flash_dir
from llmflash.predictor import LowRankPredictor, PredictorSet

from tiny import VOCAB, engine_score_and_generate, save_tiny, tiny_llama, tiny_opt

IDS = torch.tensor([0, 72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100, 33, 32, 84, 104, 101, 32, 113])
LONG = torch.cat([IDS] * 4)  # 80 positions: the buffer grows past its first CHUNK


def _qwen2() -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256, hidden_act="silu",
                      tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, use_sliding_window=False)
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("proj.bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("graph_step")
    models = {"llama": tiny_llama(seed=3, d_model=128, d_ffn=256), "qwen2": _qwen2(), "opt": tiny_opt()}
    return {k: convert(str(save_tiny(m, root / k)), root / f"{k}-flash", progress=False, calibration_tokens=0)
            for k, m in models.items()}


@pytest.fixture
def stand_in(monkeypatch):
    monkeypatch.setattr(Engine, "copy_on_cpu", True)


def _run(path, native: bool, ids=IDS, **config):
    return engine_score_and_generate(path, ids, native_attention=native, sparsity="relu", **config)


@pytest.mark.parametrize("name", ["llama", "qwen2", "opt"])
def test_the_step_equals_transformers_attention(paths, name, stand_in):
    """Every decode step of every layer through the buffer; log-probabilities within float32 rounding, same tokens;
    80 positions make the buffer grow once."""
    ref, ref_tokens, e0 = _run(paths[name], False, LONG, mode="dense")
    got, tokens, e1 = _run(paths[name], True, LONG, mode="dense")
    assert not e0.graph_steps and not e1.decode_steps and e1.graph_steps
    assert all(s.steps == (LONG.numel() - 1) + 11 for s in e1.graph_steps)
    assert all(s.capacity == 2 * graph_step.CHUNK for s in e1.graph_steps)
    assert torch.allclose(got, ref, atol=2e-5, rtol=0), (got - ref).abs().max()
    assert tokens == ref_tokens


@pytest.mark.parametrize("resident", ["int8", "int4"])
def test_quantized_attention_weights(paths, resident, stand_in, tmp_path):
    """int8 and int4 resident attention projections (modules with buffers, no parameters) go through the step too."""
    src = tmp_path / "src"
    save_tiny(tiny_llama(seed=3, d_model=128, d_ffn=256), src)
    path = convert(str(src), tmp_path / resident, progress=False, calibration_tokens=0, resident_dtype=resident)
    ref, ref_tokens, _ = _run(path, False, mode="dense")
    got, tokens, e = _run(path, True, mode="dense")
    assert e.graph_steps and all(s.steps for s in e.graph_steps)
    assert torch.allclose(got, ref, atol=2e-5, rtol=0) and tokens == ref_tokens


def _predictors(path, out, seed: int = 0) -> str:
    fd = open_flash_dir(path)
    lay = fd.layout
    torch.manual_seed(seed)
    mods = [LowRankPredictor(lay.d_model, lay.d_ffn, 8) for _ in range(lay.n_layers)]
    meta = {"d_model": lay.d_model, "d_ffn": lay.d_ffn, "model": fd.name, "rule": {"kind": "relu"}}
    PredictorSet.from_modules(mods, [0.0] * lay.n_layers, meta).save(out)
    return str(out)


class _Counting:
    """Counts how the engine's provider was asked: in the step's graph (``device_mask``) or on its own (``active``)."""

    def __init__(self, provider):
        self.p = provider
        self.graph = self.own = 0

    def install(self):
        p, orig_mask, orig_active = self.p, self.p.device_mask, self.p.active

        def device_mask(layer, x):
            self.graph += 1
            return orig_mask(layer, x)

        def active(layer, x):
            self.own += 1
            return orig_active(layer, x)

        p.device_mask, p.active = device_mask, active


@pytest.mark.parametrize("name", ["llama", "opt"])
def test_sparse_modes_take_the_predictor_mask_from_the_step(paths, name, stand_in, tmp_path):
    """Predictor mode: each decode step's set comes from the mask the step computed with the attention (the provider
    is not asked again), and the tokens, scores and bytes read are those of transformers' attention; the oracle too."""
    pred = _predictors(paths[name], tmp_path / "p")
    cfg = dict(mode="predictor", predictors=pred, budget=4.0)
    ref, ref_tokens, e0 = _run(paths[name], False, **cfg)
    e = Engine(paths[name], EngineConfig(dram_budget=4.0, native_attention=True, sparsity="relu", mode="predictor",
                                         predictors=pred))
    try:
        counter = _Counting(e.provider)
        counter.install()
        got = e.score(IDS)
        res = e.generate(IDS[:8], 12, stop_at_eos=False)
        assert all(m.graph_step is not None for m in e.ffn_modules)
    finally:
        e.close()
    n_layers = open_flash_dir(paths[name]).layout.n_layers
    assert counter.graph == n_layers * ((IDS.numel() - 1) + 11)  # every decode step's mask from the step
    assert counter.own == 2 * n_layers  # the two prefills' (8 and 20 tokens: transformers' forward)
    assert torch.allclose(got, ref, atol=2e-5, rtol=0) and res.tokens == ref_tokens
    _, oracle_ref, _ = _run(paths[name], False, mode="oracle", budget=4.0)
    _, oracle, e2 = _run(paths[name], True, mode="oracle", budget=4.0)
    assert oracle == oracle_ref and e2.graph_steps


def test_the_buffer_follows_transformers_cache(paths, stand_in):
    """After a step the cache's layers hold views of the buffer (its length right, nothing copied); a step through
    transformers' forward (two tokens at once) replaces them, and the next single step copies them in again."""
    e = Engine(paths["opt"], EngineConfig(mode="dense", dram_budget=8.0, sparsity="relu"))
    try:
        step = e.graph_steps[0]
        cache = DynamicCache()
        logits = []
        for chunk in (IDS[:5], IDS[5:6], IDS[6:8], IDS[8:9], IDS[9:10]):
            logits.append(e._forward(chunk.view(1, -1), cache))
            if chunk.numel() == 1:
                assert cache.layers[0].keys.data_ptr() == step.k.data_ptr()
            assert cache.get_seq_length() == sum(c.numel() for c in (IDS[:5], IDS[5:6], IDS[6:8], IDS[8:9],
                                                                       IDS[9:10])[: len(logits)])
        ref = []
        e_ref = Engine(paths["opt"], EngineConfig(mode="dense", dram_budget=8.0, sparsity="relu",
                                                  native_attention=False))
        try:
            cache2 = DynamicCache()
            for chunk in (IDS[:5], IDS[5:6], IDS[6:8], IDS[8:9], IDS[9:10]):
                ref.append(e_ref._forward(chunk.view(1, -1), cache2))
        finally:
            e_ref.close()
        assert step.steps == 3
        for a, b in zip(logits, ref):
            assert np.allclose(a.numpy(), b.numpy(), atol=2e-5)
    finally:
        e.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on the GPU machine)")
@pytest.mark.parametrize("name", ["llama", "opt"])
def test_cuda_step_replays_one_graph_per_layer(paths, name, tmp_path):
    """On a GPU: each layer's step captured as a CUDA graph (again when the buffer grows) and replayed, with
    transformers' tokens and log-probabilities within rounding, dense and in predictor mode (the mask copied out by
    the graph)."""
    pred = _predictors(paths[name], tmp_path / "p")
    for cfg in (dict(mode="dense"), dict(mode="predictor", predictors=pred)):
        ref, ref_tokens, _ = _run(paths[name], False, LONG, device="cuda", **cfg)
        got, tokens, e = _run(paths[name], True, LONG, device="cuda", **cfg)
        assert e.graph_steps and all(s.captures == 2 and s.steps == LONG.numel() - 1 + 11 for s in e.graph_steps)
        assert torch.allclose(got.cpu(), ref.cpu(), atol=1e-4, rtol=0), (got.cpu() - ref.cpu()).abs().max()
        assert tokens == ref_tokens, cfg["mode"]
