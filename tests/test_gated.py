"""A gated sparse model (its predictor is part of the model: ``sparse_model`` with ``gate/``) computes one function in
every path: in memory, and in the engine's dense, oracle and predictor modes (the gate as the predictor)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llmflash.convert import convert_model
from llmflash.engine import Engine, EngineConfig
from llmflash.flashdir import open_flash_dir
from llmflash.predictor import LowRankPredictor, PredictorSet
from llmflash.sparse_model import GATE_DIR, apply_artifact, encode_deltas, write_artifact

from tiny import tiny_llama, tiny_tokenizer

N_LAYERS, D, N = 3, 64, 128


def _gated_artifact(path):
    base = tiny_llama(seed=7, d_ffn=N)
    state = {k: v for k, v in base.state_dict().items() if k != "lm_head.weight"}
    torch.manual_seed(3)
    trained = {k: v + 0.01 * torch.randn_like(v) if ".mlp." in k else v.clone() for k, v in state.items()}
    tensors = encode_deltas(state, trained, {}, N_LAYERS)
    thresholds = [1e-3] * N_LAYERS
    modules = [LowRankPredictor(D, N, 8) for _ in range(N_LAYERS)]
    cuts = [0.0] * N_LAYERS
    cfg = {"activation": "silu", "thresholds": thresholds, "n_layers": N_LAYERS, "target_sparsity": 0.6,
           "gate": {"dir": GATE_DIR, "keep": 0.5, "cuts": cuts}}
    write_artifact(path, tensors, cfg, N_LAYERS, shards=1)
    meta = {"model": "tiny-gated", "d_model": D, "d_ffn": N, "gate": True,
            "rule": {"kind": "threshold", "thresholds": thresholds}}
    PredictorSet.from_modules(modules, cuts, meta).save(path / GATE_DIR)
    return path


@pytest.fixture(scope="module")
def gated(tmp_path_factory):
    root = tmp_path_factory.mktemp("gated")
    art = _gated_artifact(root / "art")
    model = apply_artifact(tiny_llama(seed=7, d_ffn=N), art)
    flash = convert_model(model, tiny_tokenizer(), "tiny-gated", "tiny-gated", root / "flash", progress=False, calibration_tokens=0)
    return model, art, flash


def test_the_gate_is_part_of_the_model(gated):
    model, art, flash = gated
    assert model.config.llmflash_sparsity["gate"] == GATE_DIR
    seen = []
    hooks = [layer.mlp.down_proj.register_forward_hook(lambda m, i, o: seen.append(float((i[0] == 0).float().mean())))
             for layer in model.model.layers]
    with torch.no_grad():
        gated_logits = model(torch.randint(1, 200, (1, 24))).logits
    for h in hooks:
        h.remove()
    assert np.mean(seen) > 0.35  # about half the neurons shut by the gate, a few more by the threshold
    for layer in model.model.layers:  # without the gate: another function
        layer.mlp.gate = None
    with torch.no_grad():
        plain = model(torch.randint(1, 200, (1, 24))).logits
    for layer in model.model.layers:
        layer.mlp.gate = model.llmflash_gate
    assert not torch.allclose(plain, gated_logits)
    assert (open_flash_dir(flash).gate_dir() / "predictors.json").is_file()


def test_every_engine_mode_computes_the_gated_model(gated):
    model, _, flash = gated
    ids = torch.randint(1, 200, (10,))
    runs = {}
    for mode in ("dense", "oracle", "predictor"):
        eng = Engine(flash, EngineConfig(mode=mode, dram_budget=1.0 if mode == "dense" else 3.0, staging_rows=32))
        try:
            runs[mode] = eng.generate(ids, 12, stop_at_eos=False)
            if mode == "predictor":
                assert eng.dram["predictors"] > 0 and "gate" not in eng.dram  # the gate is the predictor: once
            else:
                assert eng.dram["gate"] > 0
        finally:
            eng.close()
    assert runs["oracle"].tokens == runs["dense"].tokens == runs["predictor"].tokens
    # the in-memory model (int8 gate, the same decisions) generates the same tokens
    with torch.no_grad():
        ref = model.generate(ids.view(1, -1), max_new_tokens=12, do_sample=False, pad_token_id=0)[0, ids.numel():]
    assert ref.tolist() == runs["dense"].tokens


def test_perplexity_in_memory_applies_the_gate(gated):
    model, _, flash = gated
    eng = Engine(flash, EngineConfig(mode="predictor", dram_budget=3.0, staging_rows=32))
    try:
        text = " ".join(f"w{i}" for i in range(60))
        ids = eng.tokenizer(text, return_tensors="pt").input_ids[0][:40]
        lp_engine = eng.score(ids)
    finally:
        eng.close()
    with torch.no_grad():
        lp_mem = model(ids.view(1, -1)).logits[0, :-1].log_softmax(-1).gather(-1, ids[1:].view(-1, 1)).flatten()
    assert torch.allclose(lp_engine.float(), lp_mem.float(), atol=1e-3)
