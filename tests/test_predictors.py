"""Predictor pipeline on tiny random models: collect -> train -> eval, files, runtime API, predictor-mode masks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from llmflash.arch import adapter_for
from llmflash.cli import main
from llmflash.errors import LLMFlashError
from llmflash.evaluate import perplexity
from llmflash.ffn import SparsityRule, neuron_outputs
from llmflash.predictor import PredictorSet
from predictors.collect import Activations, CollectConfig, collect
from predictors.evaluate import predicted_mask_fn, window_mask_fn, window_union
from predictors.train import TrainConfig, train_predictors

from tiny import save_tiny, tiny_llama, tiny_opt, tiny_tokenizer

TEXT = "\n\n".join(
    f"Note {i}: the quick brown fox jumps over the lazy dog {i * 7} times, then rests by the river bank." * 3
    for i in range(40)
)
FAST = TrainConfig(rank=8, rank_last=12, last_layers=1, epochs=2, batch_size=256, recall_target=0.95)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMFLASH_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def text_file(tmp_path) -> Path:
    path = tmp_path / "text.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny ReLU Llama, its activations and predictors trained through the Python API."""
    from llmflash.models import LoadedModel

    root = tmp_path_factory.mktemp("trained")
    model = tiny_llama(relu=True)
    lm = LoadedModel(model, tiny_tokenizer(), "tiny-llama")
    collect(lm, [TEXT], "inline", root / "act", SparsityRule("relu"), CollectConfig(max_tokens=4096, seq_len=128), progress=False)
    act = Activations.open(root / "act")
    pset = train_predictors(act, FAST, progress=False)
    pset.save(root / "pred")
    return model, act, pset, root


class ExactPredictor:
    """A perfect predictor: computes the true active set from the model's own FFN weights."""

    def __init__(self, model, rule: SparsityRule) -> None:
        adapter = adapter_for(model.config)
        spec = adapter.ffn_spec(model.config)
        self.n_layers = spec.n_layers
        self.rule = rule
        self.weights = [adapter.ffn_weights(model, i) for i in range(spec.n_layers)]
        from llmflash.ffn import activation_fn

        self.act = activation_fn(spec.activation)

    def predict(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        w = self.weights[layer]
        a, u = (w.up, None) if w.gate is None else (w.gate, w.up)
        return neuron_outputs(x, a, u, w.act_bias, self.act, self.rule.threshold(layer)) != 0


class RandomPredictor:
    def __init__(self, n_layers: int, d_ffn: int, p: float = 0.3, seed: int = 0) -> None:
        self.n_layers, self.d_ffn, self.p = n_layers, d_ffn, p
        self.gen = torch.Generator().manual_seed(seed)

    def predict(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        return torch.rand(*x.shape[:-1], self.d_ffn, generator=self.gen) < self.p


# -- end to end through the CLI -------------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [lambda: tiny_llama(relu=True), tiny_opt], ids=["llama-relu", "opt"])
def test_cli_collect_train_eval(tmp_path, text_file, make):
    model_dir = save_tiny(make(), tmp_path / "model")
    act, pred, out = tmp_path / "act", tmp_path / "pred", tmp_path / "eval.json"
    assert main(["collect", str(model_dir), "--text-file", str(text_file), "--out", str(act), "--max-tokens", "3000",
                 "--seq-len", "128"]) == 0
    man = json.loads((act / "manifest.json").read_text())
    assert man["tokens"] == 3000 and man["rule"] == {"kind": "relu"} and len(man["data_hash"]) == 64
    assert main(["train-predictors", str(act), "--out", str(pred), "--rank", "8", "--epochs", "2", "--batch-size", "256",
                 "--last-layers", "1"]) == 0
    meta = json.loads((pred / "predictors.json").read_text())
    assert meta["ranks"] == [8, 8, 16] and meta["data_hash"] == man["data_hash"]
    for s in meta["layers"]:
        assert {"layer", "rank", "threshold", "recall", "precision", "predicted_active_fraction", "true_active_fraction",
                "samples"} <= set(s)
        assert s["recall"] >= 0.95 - 1e-9  # calibrated on held-out tokens
    assert main(["eval-predictors", str(model_dir), "--predictors", str(pred), "--text-file", str(text_file),
                 "--max-tokens", "1024", "--ppl", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert {"recall", "precision", "predicted_active_fraction", "true_active_fraction", "over_prediction", "per_layer"} <= set(res)
    assert len(res["per_layer"]) == 3 and res["recall"] > 0.8
    assert res["over_prediction"] == pytest.approx(res["predicted_active_fraction"] / res["true_active_fraction"])
    assert res["ppl_predictor"] > 0 and res["ppl_oracle"] > 0


def test_cli_refuses_existing_output_and_bad_actdir(tmp_path, text_file, capsys):
    model_dir = save_tiny(tiny_llama(relu=True), tmp_path / "model")
    (tmp_path / "act").mkdir()
    capsys.readouterr()
    assert main(["collect", str(model_dir), "--text-file", str(text_file), "--out", str(tmp_path / "act")]) == 2
    assert main(["train-predictors", str(tmp_path / "act"), "--out", str(tmp_path / "pred")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("llmflash ") for line in err)
    assert not (tmp_path / "pred").exists()


# -- files and runtime API --------------------------------------------------------------------------------------------

def test_round_trip_save_load(trained):
    model, act, pset, root = trained
    loaded = PredictorSet.load(root / "pred", dtype=torch.float32)
    assert loaded.n_layers == 3 and loaded.ranks == [8, 8, 12] and loaded.model_name == "tiny-llama"
    assert loaded.rule == {"kind": "relu"} and loaded.meta["data_hash"] == act.data_hash
    assert loaded.nbytes == pset.nbytes > 0
    x = torch.randn(50, act.d_model)
    for layer in range(3):
        assert torch.equal(loaded.predict(layer, x), pset.predict(layer, x))
        assert loaded.thresholds[layer] == pytest.approx(pset.thresholds[layer])


def test_int8_engine_form(trained):
    """The engine's int8 form: a quarter of fp32's bytes (ranks padded to 16), nearly the same sets, thresholds and
    pins applied through the folded cut, and a file saved from it loads again."""
    _, act, pset, root = trained
    q = PredictorSet.load(root / "pred")  # ENGINE_DTYPE
    assert q.dtype == torch.int8 and q.ranks == [8, 8, 12]
    assert q.nbytes < pset.nbytes  # (8-row ranks padded to 16 here; 3.6 vs 13.3 MiB for smollm2-relu)
    x = torch.randn(200, act.d_model)
    for layer in range(3):
        agree = (q.predict(layer, x) == pset.predict(layer, x)).float().mean().item()
        assert agree > 0.98
        assert q.scores(layer, x).shape == (200, act.d_ffn) and q.scores(layer, x[0]).shape == (act.d_ffn,)
        assert np.array_equal(q.active_ids(layer, x[:3]), q.predict(layer, x[:3]).any(0).nonzero().flatten().numpy())
    q.set_threshold_logit(0, 1e4)  # nothing passes ...
    assert q.active_ids(0, x[:1]).size == 0
    q.pin(0, [3, 5])  # ... except the pinned neurons
    assert q.active_ids(0, x[:1]).tolist() == [3, 5]
    order = [np.random.default_rng(i).permutation(act.d_ffn) for i in range(3)]
    perm = PredictorSet.load(root / "pred").permute_outputs(order)  # outputs as rows of a reordered file
    fresh = PredictorSet.load(root / "pred")
    for layer in range(3):
        assert torch.equal(perm.predict(layer, x), fresh.predict(layer, x)[:, order[layer]])
    q.save(root / "pred-int8")
    again = PredictorSet.load(root / "pred-int8", dtype=torch.float32)
    assert again.ranks == [8, 8, 12] and again.pinned(0) == [3, 5]


def test_predict_shapes_and_dtype(trained):
    _, act, pset, root = trained
    d, n = act.d_model, act.d_ffn
    for shape in [(d,), (7, d), (2, 5, d)]:
        out = pset.predict(1, torch.randn(*shape))
        assert out.dtype == torch.bool and out.shape == (*shape[:-1], n)
    half = PredictorSet.load(root / "pred", dtype=torch.bfloat16)
    assert half.nbytes == pset.nbytes // 2
    assert half.predict(0, torch.randn(3, d, dtype=torch.bfloat16)).dtype == torch.bool
    assert half.predict(0, torch.randn(3, d)).dtype == torch.bool  # computed in the predictors' dtype


def test_active_ids_is_the_union_of_predict(trained):
    _, act, pset, _ = trained
    for rows in (1, 6):
        x = torch.randn(rows, act.d_model)
        for layer in range(pset.n_layers):
            expect = pset.predict(layer, x).any(dim=0).nonzero().flatten().numpy()
            assert pset.active_ids(layer, x).tolist() == expect.tolist()


def test_incompatible_or_corrupt_predictors_rejected(trained, tmp_path):
    _, act, pset, root = trained
    pset.check_compatible(3, act.d_model, act.d_ffn, "tiny-llama")
    for args in [(4, act.d_model, act.d_ffn, None), (3, act.d_model + 1, act.d_ffn, None),
                 (3, act.d_model, act.d_ffn * 2, None), (3, act.d_model, act.d_ffn, "smollm2")]:
        with pytest.raises(LLMFlashError) as err:
            pset.check_compatible(*args)
        assert "\n" not in str(err.value)
    with pytest.raises(LLMFlashError):
        pset.check_compatible(3, act.d_model, act.d_ffn, None, rule_kind="threshold")
    with pytest.raises(LLMFlashError, match="no predictors"):
        PredictorSet.load(tmp_path / "nothing")
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in ("predictors.json", "predictors.safetensors"):
        (bad / f).write_bytes((root / "pred" / f).read_bytes())
    raw = bytearray((bad / "predictors.safetensors").read_bytes())
    raw[-10] ^= 0xFF
    (bad / "predictors.safetensors").write_bytes(bytes(raw))
    with pytest.raises(LLMFlashError, match="checksum"):
        PredictorSet.load(bad)
    (bad / "predictors.json").write_text("{not json")
    with pytest.raises(LLMFlashError, match="corrupt"):
        PredictorSet.load(bad)


def test_eval_rejects_predictors_of_another_model(trained, tmp_path, text_file, capsys):
    _, _, _, root = trained
    other = save_tiny(tiny_opt(d_model=32), tmp_path / "opt")
    capsys.readouterr()
    assert main(["eval-predictors", str(other), "--predictors", str(root / "pred"), "--text-file", str(text_file)]) == 2
    stderr = capsys.readouterr().err
    err = [line for line in stderr.splitlines() if line.startswith("llmflash ")]
    assert len(err) == 1 and "do not fit" in err[0] and "Traceback" not in stderr


# -- predictor-mode masks ---------------------------------------------------------------------------------------------

def test_window_union_semantics():
    pred = torch.rand(2, 9, 16, generator=torch.Generator().manual_seed(1)) < 0.2  # [B, T, n]
    assert torch.equal(window_union(pred, 1), pred)
    w3 = window_union(pred, 3)
    for t in range(9):
        expect = pred[:, max(0, t - 2) : t + 1].any(dim=1)
        assert torch.equal(w3[:, t], expect)
    assert bool((window_union(pred, 5) | ~w3).all())  # larger window: a superset


def test_window_mask_fn_k1_is_predicted_set_and_larger_k_superset():
    fake = RandomPredictor(2, 32)
    x = torch.randn(1, 10, 8)
    h = torch.ones(1, 10, 32)
    fake.gen.manual_seed(3)
    k1 = predicted_mask_fn(fake)(0, x, h)
    fake.gen.manual_seed(3)
    pred = fake.predict(0, x)
    assert torch.equal(k1, pred)
    fake.gen.manual_seed(3)
    k4 = window_mask_fn(fake, 4)(0, x, h)
    assert bool((k4 | ~k1).all()) and int(k4.sum()) > int(k1.sum())


def test_window_mask_incremental_matches_full_sequence():
    """Prefill + one token per call (KV-cache decoding) keeps the same window as one full-sequence call."""
    torch.manual_seed(0)
    weights = torch.randn(8, 32)
    predictor = type("P", (), {"n_layers": 1, "predict": lambda self, layer, x: (x @ weights) > 1.0})()
    x = torch.randn(1, 12, 8)
    h = torch.ones(1, 12, 32)
    full = window_mask_fn(predictor, 4)(0, x, h)
    inc = window_mask_fn(predictor, 4)
    parts = [inc(0, x[:, :5], h[:, :5])] + [inc(0, x[:, t : t + 1], h[:, t : t + 1]) for t in range(5, 12)]
    assert torch.equal(torch.cat(parts, dim=1), full)


@pytest.mark.parametrize("make,rule", [(lambda: tiny_llama(relu=True), SparsityRule("relu")),
                                       (tiny_opt, SparsityRule("relu")),
                                       (tiny_llama, SparsityRule("threshold", (0.02, 0.03, 0.02)))],
                         ids=["llama-relu", "opt", "llama-threshold"])
def test_perfect_predictor_gives_oracle_perplexity(make, rule):
    model, tok = make(), tiny_tokenizer()
    docs = [TEXT[:1500]]
    oracle = perplexity(model, tok, docs, seq_len=128, max_tokens=600, rule=rule, progress=False)
    exact = ExactPredictor(model, rule)
    for window in (1, 4):
        got = perplexity(model, tok, docs, seq_len=128, max_tokens=600, rule=rule, mask_fn=window_mask_fn(exact, window),
                         progress=False)
        assert got["ppl"] == pytest.approx(oracle["ppl"], rel=1e-6)
    d_ffn = getattr(model.config, "intermediate_size", None) or model.config.ffn_dim
    missing = perplexity(model, tok, docs, seq_len=128, max_tokens=600, rule=rule,
                         mask_fn=predicted_mask_fn(RandomPredictor(3, d_ffn, 0.2)),
                         progress=False)
    assert missing["ppl"] != pytest.approx(oracle["ppl"], rel=1e-3)  # missed neurons are really missing


def test_trained_predictor_recall_on_held_out(trained):
    model, act, pset, _ = trained
    from predictors.evaluate import eval_predictors

    res = eval_predictors(model, tiny_tokenizer(), [TEXT[::-1]], pset, SparsityRule("relu"), max_tokens=1024,
                          seq_len=128, progress=False)
    assert res["recall"] > 0.85 and 0 < res["over_prediction"] < 3
    assert res["window_new_fraction"] <= res["predicted_active_fraction"] <= res["window_active_fraction"]


def test_massive_activation_neuron_is_pinned(tmp_path):
    """A neuron whose contribution dwarfs the rest is always predicted, whatever its count-based recall."""
    from llmflash.models import LoadedModel

    model = tiny_llama(relu=True)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[:, 7] *= 1000.0  # neuron 7 of layer 1: a huge output row
    lm = LoadedModel(model, tiny_tokenizer(), "tiny-massive")
    collect(lm, [TEXT], "inline", tmp_path / "act", SparsityRule("relu"), CollectConfig(max_tokens=2048, seq_len=128),
            progress=False)
    act = Activations.open(tmp_path / "act")
    assert act.neuron_stats()["token_mass"].shape == (3, 2048)
    pset = train_predictors(act, FAST, progress=False)
    assert 7 in pset.pinned(1) and pset.meta["layers"][1]["pinned"] == pset.pinned(1)
    assert bool(pset.predict(1, torch.randn(20, act.d_model))[:, 7].all())
    pset.save(tmp_path / "pred")
    assert PredictorSet.load(tmp_path / "pred").pinned(1) == pset.pinned(1)


def test_check_model_tells_retrained_weights_apart(trained):
    import copy

    model, _, pset, _ = trained
    pset.check_model(model, "tiny-llama", "relu")
    pset.check_model(copy.deepcopy(model).to(torch.bfloat16), "tiny-llama")  # same weights, another dtype: fine
    with pytest.raises(LLMFlashError, match="fingerprint"):
        pset.check_model(tiny_llama(relu=True, seed=1), "tiny-llama")


def test_threshold_calibration_leaves_pinned_neurons_out():
    from predictors.train import threshold_for_recall

    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(4000, 10, generator=gen)
    labels = torch.rand(4000, 10, generator=gen) < 0.01
    labels[:, 0] = True  # neuron 0 carries most positives and is pinned
    scores[:, 0] = 30_000.0
    thr = threshold_for_recall(scores, labels, 0.9, pinned=[0])
    free = labels[:, 1:]
    recall_free = float(((scores[:, 1:] >= thr) & free).sum() / free.sum())
    assert 0.9 <= recall_free < 0.93  # the other neurons get the target on their own
    assert threshold_for_recall(scores, labels, 0.9) > 1_000  # without it, the pinned neuron alone meets the target


def test_hidden_layer_predictors_round_trip(tmp_path):
    """An MLP predictor (Linear -> ReLU -> Linear) saves, loads and predicts the same in float; the engine's int8 form
    takes nearly the same decisions."""
    import torch

    from llmflash.predictor import ENGINE_DTYPE, LowRankPredictor, PredictorSet

    torch.manual_seed(0)
    mods = [LowRankPredictor(64, 96, 12, hidden=True) for _ in range(2)]
    for m in mods:
        torch.nn.init.normal_(m.down.bias, std=0.5)
    meta = {"model": "tiny", "d_model": 64, "d_ffn": 96, "rule": {"kind": "relu"}}
    PredictorSet.from_modules(mods, [0.0, 0.1], meta).save(tmp_path / "p")
    x = torch.randn(50, 64)
    fp = PredictorSet.load(tmp_path / "p", dtype=torch.float32)
    assert fp.meta["hidden_activation"] == "relu"
    with torch.no_grad():
        want = mods[1](x.half().float()) >= 0.1
    assert (fp.predict(1, x) == want).float().mean() > 0.99
    q = PredictorSet.load(tmp_path / "p", dtype=ENGINE_DTYPE)
    assert (q.predict(1, x) == fp.predict(1, x)).float().mean() > 0.95
    ids = q.active_ids(0, x[:1])
    assert set(ids.tolist()) == set(q.predict(0, x[:1])[0].nonzero().flatten().tolist())
