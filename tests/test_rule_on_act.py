"""A sparse model whose thresholds compare the activation alone (``rule_on: act``, CATS-style): the in-memory model,
the engine's dense and oracle modes and the training model compute one function, and it is not the |h| rule's."""

from __future__ import annotations

import pytest
import torch

from llmflash.convert import convert_model
from llmflash.engine import Engine, EngineConfig
from llmflash.evaluate import perplexity
from llmflash.ffn import SparsityRule, neuron_outputs
from llmflash.sparse_model import apply_artifact, encode_deltas, write_artifact
from llmflash.sparsity import model_rule

from tiny import tiny_llama, tiny_tokenizer

N_LAYERS, N = 3, 128


def _artifact(path, rule_on: str):
    base = tiny_llama(seed=7, d_ffn=N)
    state = {k: v for k, v in base.state_dict().items() if k != "lm_head.weight"}
    torch.manual_seed(3)
    trained = {k: v + 0.01 * torch.randn_like(v) if ".mlp." in k else v.clone() for k, v in state.items()}
    cfg = {"activation": "silu", "thresholds": [0.05] * N_LAYERS, "n_layers": N_LAYERS, "target_sparsity": 0.6,
           "rule_on": rule_on}
    write_artifact(path, encode_deltas(state, trained, {}, N_LAYERS), cfg, N_LAYERS, shards=1)
    return path


@pytest.fixture(scope="module")
def act_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("act")
    model = apply_artifact(tiny_llama(seed=7, d_ffn=N), _artifact(root / "art", "act"))
    flash = convert_model(model, tiny_tokenizer(), "tiny-act", "tiny-act", root / "flash", progress=False,
                          calibration_tokens=0)
    return model, flash


def test_the_rule_compares_the_activation():
    torch.manual_seed(0)
    x, a, u = torch.randn(5, 16), torch.randn(32, 16), torch.randn(32, 16)
    act = torch.nn.functional.silu
    h_act = neuron_outputs(x, a, u, None, act, 0.3, on_act=True)
    assert torch.equal(h_act != 0, act(x @ a.T).abs() > 0.3)
    h_h = neuron_outputs(x, a, u, None, act, 0.3)
    assert not torch.equal(h_act != 0, h_h != 0)
    with pytest.raises(ValueError):
        SparsityRule("threshold", (0.1,), on="up")


def test_the_model_carries_its_rule(act_model):
    model, _ = act_model
    rule = model_rule(model.config)
    assert rule is not None and rule.on_act
    assert all(layer.mlp.rule_on == "act" for layer in model.model.layers)


def test_engine_modes_compute_the_in_memory_model(act_model):
    model, flash = act_model
    ids = torch.randint(1, 200, (1, 12))
    with torch.no_grad():
        ref = torch.log_softmax(model(ids).logits[0, :-1].float(), -1).gather(-1, ids[0, 1:, None])[:, 0]  # [L-1]
    runs = {}
    for mode in ("dense", "oracle"):
        eng = Engine(flash, EngineConfig(mode=mode, dram_budget=1.0 if mode == "dense" else 3.0, staging_rows=32))
        try:
            assert eng.threshold_on_act
            runs[mode] = eng.generate(ids[0], 8, stop_at_eos=False).tokens
            eng.reset()
            assert torch.allclose(eng.score(ids[0]), ref, atol=1e-4)
        finally:
            eng.close()
    assert runs["dense"] == runs["oracle"]


def test_perplexity_in_memory_uses_the_act_rule(act_model):
    model, _ = act_model
    docs = ["the quick brown fox jumps over the lazy dog " * 20]
    ev = perplexity(model, tiny_tokenizer(), docs, seq_len=32, max_tokens=128, rule=model_rule(model.config),
                    progress=False)
    plain = perplexity(model, tiny_tokenizer(), docs, seq_len=32, max_tokens=128,
                       rule=SparsityRule("threshold", (0.05,) * N_LAYERS), progress=False)
    assert ev["ffn_active_fraction"] != plain["ffn_active_fraction"]


def test_native_step_computes_the_act_rule(act_model):
    """The native step applies the act rule too (``NativeRows(on_act=True)``): the Python path's tokens and scores."""
    import llmflash.native as native

    if native.library() is None:
        pytest.skip("the native step does not build here")
    _, flash = act_model
    ids = torch.randint(1, 200, (12,), generator=torch.Generator().manual_seed(2))
    out = {}
    for on in (False, True):
        eng = Engine(flash, EngineConfig(mode="oracle", dram_budget=3.0, staging_rows=32, native=on))
        try:
            assert eng.native == on
            toks = eng.generate(ids, 8, stop_at_eos=False).tokens
            eng.reset()
            out[on] = toks, eng.score(ids)
        finally:
            eng.close()
    assert out[True][0] == out[False][0]
    assert torch.allclose(out[True][1], out[False][1], rtol=0, atol=1e-5)
