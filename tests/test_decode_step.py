"""The native decode step of a Llama-family layer's attention (``llmflash.decode_step``) against transformers' modules:
equal within float32 rounding for every resident weight form, grouped and ungrouped heads, attention biases, streamed
layers; layers it cannot take go through transformers' forward."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from llmflash import decode_step
from llmflash.convert import convert
from llmflash.engine import Engine, EngineConfig

from tiny import VOCAB, engine_score_and_generate, save_tiny, tiny_llama, tiny_opt

pytestmark = pytest.mark.skipif(decode_step.library() is None, reason="no native library (no C++ compiler)")

IDS = torch.tensor([0, 72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100, 33, 32, 84, 104, 101, 32, 113])


def _qwen2(seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256, hidden_act="silu",
                      tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, use_sliding_window=False)
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():  # random init leaves the q/k/v biases at zero: make them count
        for name, p in model.named_parameters():
            if name.endswith("proj.bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def _score(path, native: bool, **config) -> tuple[torch.Tensor, list[int], Engine]:
    return engine_score_and_generate(path, IDS, native_attention=native, sparsity="relu", **config)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("decode_step")
    return {"llama": save_tiny(tiny_llama(seed=3, d_model=128, d_ffn=256), root / "llama"),
            "qwen2": save_tiny(_qwen2(), root / "qwen2"), "opt": save_tiny(tiny_opt(), root / "opt")}


@pytest.mark.parametrize("resident", ["auto", "int8", "int4"])
def test_the_native_step_equals_transformers_attention(models, resident, tmp_path):
    """Float32, int8 (a scale per row) and int4 (group-quantized) attention weights, grouped heads (4 query heads on 2
    key/value heads): the same log-probabilities within float32 rounding and the same greedy tokens, with every
    decode step of every layer taken natively."""
    path = convert(str(models["llama"]), tmp_path / resident, progress=False, calibration_tokens=0,
                   resident_dtype=resident)
    ref, ref_tokens, e0 = _score(path, False, mode="dense")
    got, tokens, e1 = _score(path, True, mode="dense")
    assert not e0.decode_steps and len(e1.decode_steps) == 3
    assert all(s.steps == (IDS.numel() - 1) + 11 for s in e1.decode_steps)  # (the prompts' first token: transformers)
    assert torch.allclose(got, ref, atol=2e-5, rtol=0), (got - ref).abs().max()
    assert tokens == ref_tokens


def test_attention_biases_and_ungrouped_heads(models, tmp_path):
    """Qwen2: biases on q, k and v, as many key/value heads as query heads."""
    path = convert(str(models["qwen2"]), tmp_path / "q", progress=False, calibration_tokens=0)
    ref, ref_tokens, _ = _score(path, False, mode="dense")
    got, tokens, e = _score(path, True, mode="dense")
    assert e.decode_steps and all(s.steps for s in e.decode_steps)
    assert torch.allclose(got, ref, atol=2e-5, rtol=0) and tokens == ref_tokens


def test_sparse_modes_and_streamed_layers(models, tmp_path):
    """With the FFN read from flash and attention weights streamed into shared slots (their addresses fixed), the
    oracle's tokens and scores are those of transformers' attention."""
    path = convert(str(models["llama"]), tmp_path / "s", progress=False, calibration_tokens=0)
    kw = dict(mode="oracle", stream_layers=2, lookahead=False)
    ref, ref_tokens, _ = _score(path, False, **kw)
    got, tokens, e = _score(path, True, **kw)
    assert e.stream is not None and len(e.stream.plan.layers) == 2
    assert all(s.steps for s in e.decode_steps)
    assert torch.allclose(got, ref, atol=2e-5, rtol=0) and tokens == ref_tokens


def test_other_layers_go_through_transformers(models, tmp_path):
    """OPT's layers are not Llama's: nothing installed; a prefill's many tokens and a model in bfloat16 take
    transformers' forward (no native step)."""
    path = convert(str(models["opt"]), tmp_path / "o", progress=False, calibration_tokens=0)
    e = Engine(path, EngineConfig(mode="dense", dram_budget=8.0))
    try:
        assert e.decode_steps == []
    finally:
        e.close()
    bf = convert(str(models["llama"]), tmp_path / "bf", dtype="bfloat16", progress=False, calibration_tokens=0)
    _, _, e = _score(bf, True, mode="dense")
    assert all(s.steps == 0 for s in e.decode_steps)
