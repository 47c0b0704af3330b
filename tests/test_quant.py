"""Flash directories at every stored dtype (float16, int8, int4) on tiny random models: every mode runs and the sparse
modes equal dense at the same dtype, eval-ppl works, bytes are counted exactly, quantization errors stay bounded."""

from __future__ import annotations

import math

import pytest
import torch

from llmflash.commands import eval_ppl
from llmflash.convert import convert
from llmflash.engine import Engine, EngineConfig
from llmflash.flashdir import open_flash_dir

from tiny import save_tiny, tiny_llama, tiny_opt

BIG = 8.0  # tiny models are mostly padding: give them room
PROMPT = torch.tensor([5, 17, 99, 3, 42, 7, 120, 64])
DTYPES = ("float16",)


@pytest.fixture(scope="module")
def qdirs(tmp_path_factory):
    """{(model, dtype): flash dir} for a ReLU llama (gated) and OPT (plain FFN, biases), and a text file."""
    root = tmp_path_factory.mktemp("quant")
    out = {}
    for name, model in (("llama", tiny_llama(relu=True, d_model=128, d_ffn=384)), ("opt", tiny_opt(d_model=128, d_ffn=384))):
        save_tiny(model, root / name)
        for dtype in DTYPES:
            out[name, dtype] = convert(str(root / name), root / f"{name}-{dtype}", dtype=dtype, progress=False,
                                       calibration_tokens=0)
    (root / "text.txt").write_text("The quick brown fox jumps over the lazy dog. " * 40)
    out["text"] = root / "text.txt"
    return out


def _gen(path, mode, n=10, **kw):
    e = Engine(path, EngineConfig(mode=mode, dram_budget=kw.pop("budget", BIG), **kw))
    try:
        return e.generate(PROMPT, n, stop_at_eos=False)
    finally:
        e.close()


def _ppl(path, mode, ids, **kw):
    e = Engine(path, EngineConfig(mode=mode, dram_budget=kw.pop("budget", BIG), **kw))
    try:
        return math.exp(-float(e.score(ids).double().mean()))
    finally:
        e.close()


def _all_active_predictors(path, out):
    """Predictors that mark every neuron active (predictor mode must then equal dense)."""
    from llmflash.predictor import LowRankPredictor, PredictorSet

    fd = open_flash_dir(path)
    lay = fd.layout
    torch.manual_seed(0)
    mods = [LowRankPredictor(lay.d_model, lay.d_ffn, 8) for _ in range(lay.n_layers)]
    meta = {"d_model": lay.d_model, "d_ffn": lay.d_ffn, "model": fd.name, "rule": {"kind": "relu"}}
    PredictorSet.from_modules(mods, [-1e9] * lay.n_layers, meta).save(out)
    return str(out)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["llama", "opt"])
def test_every_mode_runs_and_matches_dense(qdirs, name, dtype, tmp_path):
    path = qdirs[name, dtype]
    ref = _gen(path, "dense").tokens
    for mode in ("naive", "hybrid", "oracle"):
        assert _gen(path, mode).tokens == ref, mode
    assert _gen(path, "predictor", predictors=_all_active_predictors(path, tmp_path / "p")).tokens == ref
    ids = torch.randint(0, 256, (32,), generator=torch.Generator().manual_seed(3))
    dense, oracle = _ppl(path, "dense", ids), _ppl(path, "oracle", ids, window=2)
    # float16: the sparse path sums the same products in another order (cached rows, then new rows), in float16
    assert abs(oracle / dense - 1) < (2e-3 if dtype == "float16" else 1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_eval_ppl_at_every_dtype(qdirs, dtype, tmp_path):
    """eval-ppl (the whole model in DRAM) works on every stored dtype; oracle equals dense; predictor runs."""
    path = str(qdirs["llama", dtype])
    kw = dict(max_tokens=300, seq_len=64)
    dense = eval_ppl(path, str(qdirs["text"]), mode="dense", **kw)
    oracle = eval_ppl(path, str(qdirs["text"]), mode="oracle", **kw)
    pred = eval_ppl(path, str(qdirs["text"]), mode="predictor", predictors=_all_active_predictors(path, tmp_path / "p"), **kw)
    assert math.isfinite(dense["ppl"]) and dense["ppl"] == oracle["ppl"] == pred["ppl"]
